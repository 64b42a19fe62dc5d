"""Who is acting: set per request by middleware and authentication, per task by workers.

The context lives in a ContextVar, so threads and asyncio tasks each see their own, and every
audit record made while handling a request carries that request's actor, id and client IP.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import TypeAlias


@dataclass
class AuditContext:
    request_id: str = ""
    client_ip: str = ""
    actor_kind: str = "anonymous"  # user, system, anonymous
    user: str = ""
    token: str = ""


ContextToken: TypeAlias = contextvars.Token[AuditContext | None]

_context: contextvars.ContextVar[AuditContext | None] = contextvars.ContextVar(
    "smr_audit_context", default=None
)


def context() -> AuditContext:
    """The current context; outside any request (shell, command, task) the "system" actor."""
    ctx = _context.get()
    if ctx is None:
        ctx = AuditContext(actor_kind="system", user="system")
        _context.set(ctx)
    return ctx


def context_begin(*, request_id: str = "", client_ip: str = "") -> ContextToken:
    """Start an anonymous context for one request; pass the token to context_end()."""
    return _context.set(AuditContext(request_id=request_id, client_ip=client_ip))


def context_replay(ctx: AuditContext) -> ContextToken:
    """Make a context captured earlier (context_snapshot) current; undo with context_end()."""
    return _context.set(ctx)


def context_end(token: ContextToken) -> None:
    """Restore the context that was current before context_begin() or context_replay()."""
    _context.reset(token)


def context_set_actor(*, user: str, token: str = "") -> None:
    """Record that an authenticated user (and, if any, which API token) is acting."""
    ctx = context()
    ctx.actor_kind = "user"
    ctx.user = user
    ctx.token = token


def context_snapshot() -> AuditContext:
    """A copy of the current context, for work that outlives the request (streamed bodies)."""
    return AuditContext(**vars(context()))


def context_set_system(name: str = "system") -> None:
    """Record that the system itself acts, under `name` (a worker task, a command)."""
    ctx = context()
    ctx.actor_kind = "system"
    ctx.user = name
    ctx.token = ""
