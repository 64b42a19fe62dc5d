"""Hand-written joins for the hottest lookups, hydrated into ordinary model instances.

Why our own: every version read, upload and download starts with the same lookup (the version,
its model and namespace, its creator and submitter, and the caller's role), and the caller's
token before it. Building and compiling that select_related queryset cost ~0.9 ms per request
in Django's ORM for a query SQLite answers in 0.02 ms: most of a metadata read (profiled for
the metadata benchmark, benchmarks/bench_meta.py). Django keeps no compiled statements, and no
maintained library adds that (django-cachalot caches results, which an authorisation lookup
must never reuse). So the SQL is composed here, once per database vendor, from the models'
own metadata (no column name is spelled by hand), and each row is turned back into model
instances through the fields' database converters, the way the ORM's compiler does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from django.db import connection
from django.db.models import Field, Model


@dataclass(frozen=True)
class Part:
    """One table of a join: `model` under the SQL alias `alias`, with `fields` (attnames) read,
    or every concrete field when None. Fields not read are deferred on the instance."""

    model: type[Model]
    alias: str
    fields: tuple[str, ...] | None = None

    def concrete(self) -> list[Field]:
        every = self.model._meta.concrete_fields
        if self.fields is None:
            return list(every)
        return [f for f in every if f.attname in self.fields]


def quote(name: str) -> str:
    return connection.ops.quote_name(name)


def table(part: Part) -> str:
    """`"table" "alias"`, for a FROM or JOIN clause."""
    return f"{quote(part.model._meta.db_table)} {quote(part.alias)}"


def col(part: Part, attname: str) -> str:
    """`"alias"."column"` of the field with `attname`."""
    field = next(f for f in part.model._meta.concrete_fields if f.attname == attname)
    return f"{quote(part.alias)}.{quote(str(field.column))}"


def select_list(parts: Sequence[Part]) -> str:
    return ", ".join(col(p, f.attname) for p in parts for f in p.concrete())


_Converter = Callable[[Any, Any, Any], Any]


class Hydrator:
    """Turns the columns of `parts` in a row (in select_list order) into instances."""

    def __init__(self, parts: Sequence[Part]) -> None:
        self.parts = list(parts)
        self.plan: list[tuple[Part, list[str], list[tuple[list[_Converter], Any]]]] = []
        for part in self.parts:
            fields = part.concrete()
            converters = []
            for f in fields:
                expression = f.get_col(part.alias)
                converters.append(
                    (
                        connection.ops.get_db_converters(expression)
                        + expression.get_db_converters(connection),
                        expression,
                    )
                )
            self.plan.append((part, [f.attname for f in fields], converters))
        self.width = sum(len(names) for _, names, _ in self.plan)

    def instances(self, row: Sequence[Any]) -> list[Model | None]:
        """One instance per part; None for a part whose primary key is NULL (a LEFT JOIN
        that found nothing)."""
        out: list[Model | None] = []
        at = 0
        for part, names, converters in self.plan:
            values = []
            for value, (funcs, expression) in zip(
                row[at : at + len(names)], converters, strict=True
            ):
                for func in funcs:
                    value = func(value, expression, connection)
                values.append(value)
            at += len(names)
            pk = values[names.index(part.model._meta.pk.attname)]
            out.append(None if pk is None else part.model.from_db(connection.alias, names, values))
        return out


class JoinQuery:
    """A query built once per database vendor by `build(vendor) -> (sql, hydrator)`."""

    def __init__(self, build: Callable[[], tuple[str, Hydrator]]) -> None:
        self.build = build
        self._built: dict[str, tuple[str, Hydrator]] = {}

    def first(self, params: Sequence[Any]) -> Row | None:
        """The instances of the first row and the row's extra columns, or None."""
        rows = self._run(params, one=True)
        return rows[0] if rows else None

    def all(self, params: Sequence[Any]) -> list[Row]:
        """Every row: its instances and its extra columns."""
        return self._run(params, one=False)

    def _run(self, params: Sequence[Any], *, one: bool) -> list[Row]:
        built = self._built.get(connection.vendor)
        if built is None:
            built = self._built[connection.vendor] = self.build()
        sql, hydrator = built
        with connection.cursor() as cursor:
            cursor.execute(sql, list(params))
            if one:
                first = cursor.fetchone()
                rows = [first] if first is not None else []
            else:
                rows = cursor.fetchall()
        return [(hydrator.instances(row), tuple(row[hydrator.width :])) for row in rows]


# One result row: an instance (or None) per part, then the columns after the parts'.
Row = tuple[list[Model | None], tuple[Any, ...]]
