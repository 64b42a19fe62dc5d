from rest_framework import pagination


class CursorPagination(pagination.CursorPagination):
    """Stable cursor pages (`?cursor=`), `?limit=` up to 1000."""

    ordering = "-created_at"
    page_size_query_param = "limit"
    max_page_size = 1000


def cursor_by(field: str) -> type[CursorPagination]:
    return type(f"CursorBy{field.strip('-').title()}", (CursorPagination,), {"ordering": field})
