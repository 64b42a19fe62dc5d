import binascii
import re
from base64 import b64decode

from django.core.exceptions import FieldDoesNotExist
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import connection, models
from django.utils.dateparse import parse_datetime
from rest_framework import exceptions, pagination

from registry.errors import InvalidInput

MAX_PAGE_SIZE = 1000
DIGITS_RE = re.compile(r"[0-9]{1,19}")


def invalid_cursor() -> InvalidInput:
    return InvalidInput("Invalid cursor; use the `next`/`previous` links as given.", param="cursor")


class CursorPagination(pagination.CursorPagination):
    """Stable cursor pages (`?cursor=`), `?limit=` from 1 to 1000."""

    ordering = "-created_at"
    page_size_query_param = "limit"
    page_size_query_description = f"Number of results per page, 1 to {MAX_PAGE_SIZE}."
    max_page_size = MAX_PAGE_SIZE

    def paginate_queryset(self, queryset, request, view=None):
        self._position_field = _ordering_field(queryset.model, self.ordering)
        return super().paginate_queryset(queryset, request, view)

    def decode_cursor(self, request):
        encoded = request.query_params.get(self.cursor_query_param)
        try:
            # DRF's decoding skips characters outside base64, so `%%%` would silently mean
            # "the first page": decode strictly first.
            if encoded is not None and not b64decode(encoded.encode("ascii"), validate=True):
                raise invalid_cursor()
            cursor = super().decode_cursor(request)
        except (UnicodeEncodeError, binascii.Error, exceptions.NotFound) as exc:
            # A malformed cursor is the client's input error, not a missing resource.
            raise invalid_cursor() from exc
        if cursor is not None and cursor.position is not None:
            # DRF filters with the position as given: one that the ordering field cannot hold
            # would fail inside the query (a 500), so it is refused here.
            _check_position(self._position_field, str(cursor.position))
        return cursor

    def get_page_size(self, request):
        raw = request.query_params.get(self.page_size_query_param)
        if raw is None:
            return self.page_size
        if not DIGITS_RE.fullmatch(raw) or not 1 <= int(raw) <= self.max_page_size:
            raise InvalidInput(
                f"limit must be a whole number from 1 to {self.max_page_size}.", param="limit"
            )
        return int(raw)

    def get_schema_operation_parameters(self, view):
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"] = {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": self.max_page_size,
                    "default": self.page_size,
                }
        return parameters


def cursor_by(field: str) -> type[CursorPagination]:
    return type(f"CursorBy{field.strip('-').title()}", (CursorPagination,), {"ordering": field})


def _ordering_field(model: type[models.Model], ordering) -> models.Field | None:
    name = (ordering if isinstance(ordering, str) else ordering[0]).lstrip("-")
    try:
        field = model._meta.get_field(name)
    except FieldDoesNotExist:
        return None
    return field if isinstance(field, models.Field) else None


def _check_position(field: models.Field | None, position: str) -> None:
    if "\x00" in position:
        raise invalid_cursor()
    if field is None:
        return
    if isinstance(field, models.IntegerField):
        # Every integer list here orders by a count (version number, sequence, size).
        _, high = connection.ops.integer_field_range(field.get_internal_type())
        if not DIGITS_RE.fullmatch(position) or int(position) > (high or 0):
            raise invalid_cursor()
    elif isinstance(field, models.DateTimeField):
        try:
            moment = parse_datetime(position)
        except ValueError:  # well-formed, but no such day or hour
            moment = None
        if moment is None or moment.tzinfo is None:
            raise invalid_cursor()
    else:
        try:
            field.run_validators(field.to_python(position))
        except DjangoValidationError as exc:
            raise invalid_cursor() from exc
