from rest_framework import exceptions, pagination

from registry.errors import InvalidInput


class CursorPagination(pagination.CursorPagination):
    """Stable cursor pages (`?cursor=`), `?limit=` up to 1000."""

    ordering = "-created_at"
    page_size_query_param = "limit"
    max_page_size = 1000

    def decode_cursor(self, request):
        try:
            return super().decode_cursor(request)
        except exceptions.NotFound as exc:
            # A malformed cursor is the client's input error, not a missing resource.
            raise InvalidInput("Invalid cursor; use the `next`/`previous` links as given.") from exc


def cursor_by(field: str) -> type[CursorPagination]:
    return type(f"CursorBy{field.strip('-').title()}", (CursorPagination,), {"ordering": field})
