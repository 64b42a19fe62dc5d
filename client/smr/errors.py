"""One exception family carrying the server's stable error codes, and the CLI's exit codes."""

from __future__ import annotations

from typing import Any

# Exit codes of the `smr` command (README): 0 ok, 1 error, 2 usage, 3 verification failed,
# 4 not found or forbidden.
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY, EXIT_NOT_FOUND = 0, 1, 2, 3, 4


class SmrError(Exception):
    """An error from the registry (`code`, `message`, `extra` as the server sent them, and the
    HTTP `status`), or from the client itself (status 0)."""

    exit_code = EXIT_ERROR

    def __init__(
        self,
        message: str,
        *,
        code: str = "error",
        status: int = 0,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        self.extra = extra or {}
        if status in (401, 403, 404):
            self.exit_code = EXIT_NOT_FOUND

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "status": self.status, **self.extra}


class VerificationError(SmrError):
    """A digest or signature did not verify: nothing unverified was written (exit 3)."""

    exit_code = EXIT_VERIFY

    def __init__(self, message: str, *, code: str = "verification_failed", **extra: Any) -> None:
        super().__init__(message, code=code, extra=extra)
        self.exit_code = EXIT_VERIFY


class UsageError(SmrError):
    exit_code = EXIT_USAGE

    def __init__(self, message: str) -> None:
        super().__init__(message, code="usage")
        self.exit_code = EXIT_USAGE
