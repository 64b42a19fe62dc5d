"""The SDK: `Registry(url, token)` pushes and pulls whole models, verified end to end.

from smr import Registry
path = Registry("https://registry.example", token).pull("acme/bert@production")
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smr import config
from smr.http import Api
from smr.refs import Ref, parse_ref

# progress(event, path, done_bytes, total_bytes): the CLI draws bars with it.
Progress = Callable[[str, str, int, int], None]


@dataclass(frozen=True)
class Version:
    namespace: str
    model: str
    number: int
    state: str
    files: list[dict[str, Any]]
    raw: dict[str, Any]

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Version:
        return cls(
            namespace=body["namespace"],
            model=body["model"],
            number=int(body["number"]),
            state=body["state"],
            files=list(body.get("files") or []),
            raw=body,
        )


@dataclass(frozen=True)
class PushResult:
    ref: Ref
    version: int
    files: list[dict[str, Any]]
    bytes_sent: int
    submitted: bool


@dataclass(frozen=True)
class PullResult:
    ref: Ref
    version: int
    path: Path
    files: list[dict[str, Any]]
    bytes_received: int
    signature: dict[str, Any] | None


class Registry:
    """A registry and a token (SMR_URL / SMR_TOKEN or `smr login`'s file when left out)."""

    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        if url is None or token is None:
            settings = config.load(url)
            url, token = url or settings.url, token or settings.token
        self.url = url.rstrip("/")
        self.api = Api(self.url, token)

    def close(self) -> None:
        self.api.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def version(self, ref: str | Ref) -> Version:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        return Version.from_json(self.api.json("GET", ref.version_path()))

    def versions(self, ref: str | Ref, **filters: str) -> Iterator[Version]:
        """Every version of a model, newest first, across cursor pages."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        for item in self.api.pages(f"{ref.model_path}/versions", filters):
            yield Version.from_json(item)

    # Implemented in smr.transfer (push/pull with resume, cache and verification).
    def push(
        self,
        ref: str | Ref,
        path: str | Path,
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        submit: bool = False,
        tags: dict[str, str] | None = None,
        description: str = "",
        workers: int = 4,
        progress: Progress | None = None,
    ) -> PushResult:
        from smr import transfer

        return transfer.push(
            self,
            parse_ref(ref) if isinstance(ref, str) else ref,
            Path(path),
            include=include,
            exclude=exclude,
            submit=submit,
            tags=tags,
            description=description,
            workers=workers,
            progress=progress,
        )

    def pull(
        self,
        ref: str | Ref,
        dest: str | Path | None = None,
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        trusted_key: str | Path | None = None,
        workers: int = 4,
        progress: Progress | None = None,
    ) -> Path:
        return self.pull_result(
            ref,
            dest,
            include=include,
            exclude=exclude,
            trusted_key=trusted_key,
            workers=workers,
            progress=progress,
        ).path

    def pull_result(
        self,
        ref: str | Ref,
        dest: str | Path | None = None,
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        trusted_key: str | Path | None = None,
        workers: int = 4,
        progress: Progress | None = None,
    ) -> PullResult:
        from smr import transfer

        return transfer.pull(
            self,
            parse_ref(ref) if isinstance(ref, str) else ref,
            Path(dest) if dest is not None else None,
            include=include,
            exclude=exclude,
            trusted_key=Path(trusted_key) if trusted_key is not None else None,
            workers=workers,
            progress=progress,
        )

    @staticmethod
    def load_tensors(path: str | Path) -> dict[str, Any]:
        """Every tensor of the safetensors files under a pulled model's folder (numpy arrays)."""
        from safetensors.numpy import load_file

        tensors: dict[str, Any] = {}
        for file in sorted(Path(path).rglob("*.safetensors")):
            tensors.update(load_file(str(file)))
        return tensors
