"""Model references as people type them: NS/MODEL, NS/MODEL:VERSION, NS/MODEL@ALIAS."""

from __future__ import annotations

import re
from dataclasses import dataclass

from smr.errors import UsageError

_REF = re.compile(
    r"^(?P<ns>[a-z0-9][a-z0-9-]{0,62})/(?P<model>[A-Za-z0-9][A-Za-z0-9._-]{0,127})"
    r"(?:(?::(?P<version>[0-9]{1,9}))|(?:@(?P<alias>[a-z][a-z0-9_-]{0,62})))?$"
)


@dataclass(frozen=True)
class Ref:
    namespace: str
    model: str
    version: int | None = None
    alias: str | None = None

    @property
    def model_path(self) -> str:
        return f"/namespaces/{self.namespace}/models/{self.model}"

    @property
    def selector(self) -> str | None:
        """What names the version in a URL: its number or alias (None: not given)."""
        if self.version is not None:
            return str(self.version)
        return self.alias

    def version_path(self, selector: str | int | None = None) -> str:
        chosen = selector if selector is not None else self.selector
        if chosen is None:
            raise UsageError(f"{self} names no version: add :VERSION or @ALIAS.")
        return f"{self.model_path}/versions/{chosen}"

    def __str__(self) -> str:
        tail = f":{self.version}" if self.version is not None else ""
        tail += f"@{self.alias}" if self.alias else ""
        return f"{self.namespace}/{self.model}{tail}"


def parse_ref(text: str) -> Ref:
    match = _REF.match(text)
    if match is None:
        raise UsageError(
            f"{text!r} is not a model reference: use NS/MODEL, NS/MODEL:VERSION or "
            "NS/MODEL@ALIAS (e.g. acme/bert@production)."
        )
    version = match.group("version")
    return Ref(
        namespace=match.group("ns"),
        model=match.group("model"),
        version=int(version) if version else None,
        alias=match.group("alias"),
    )
