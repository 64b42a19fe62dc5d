"""Where the client finds the registry and its token: SMR_URL / SMR_TOKEN, else the file
`smr login` wrote under $XDG_CONFIG_HOME/smr/ (mode 0600). The token never travels in argv."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from smr.errors import UsageError


def config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "smr"


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "smr"


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "smr"


@dataclass(frozen=True)
class Settings:
    url: str
    token: str

    def __repr__(self) -> str:  # never print the token
        return f"Settings(url={self.url!r}, token=<hidden>)"


def credentials_path() -> Path:
    return config_dir() / "credentials.json"


def save(url: str, token: str) -> Path:
    """Store the URL and token for later commands, readable by this user only (0600)."""
    folder = config_dir()
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = credentials_path()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump({"url": url.rstrip("/"), "token": token}, handle)
    os.replace(tmp, path)
    os.chmod(path, 0o600)
    return path


def load(url: str | None = None) -> Settings:
    """The registry to talk to: the arguments, then SMR_URL/SMR_TOKEN, then the saved file."""
    saved: dict[str, str] = {}
    path = credentials_path()
    if path.exists():
        saved = json.loads(path.read_text())
    final_url = url or os.environ.get("SMR_URL") or saved.get("url")
    token = os.environ.get("SMR_TOKEN") or saved.get("token")
    if not final_url:
        raise UsageError("No registry URL: run `smr login --url URL` or set SMR_URL.")
    if not token:
        raise UsageError("No token: run `smr login --url URL` or set SMR_TOKEN.")
    return Settings(url=final_url.rstrip("/"), token=token)
