"""Webhooks: per-namespace receivers of signed event deliveries, with retries and history.

`webhooks_emit` runs inside the transaction of the state change it reports: it inserts one
pending WebhookDelivery row per subscribed webhook and enqueues the delivery once that
transaction commits (`transaction.on_commit`, like jobs), so a receiver never hears of a
change that rolled back. `webhook_deliver` makes one attempt; a failed attempt that may be
retried adds the next attempt's row and enqueues it after an exponential backoff. Delivery
is at least once: receivers drop duplicates by X-SMR-Delivery.

The pending rows are the outbox, as Job rows are for jobs: a publish that fails (the broker is
down at commit) leaves `enqueued_at` null, and the periodic `webhooks_dispatch` (beat) sends
such attempts once the broker answers, along with attempts whose message the broker lost and
attempts whose worker died mid-POST. A worker claims an attempt (a conditional UPDATE of
`claimed_at`) before it POSTs, so however many messages name an attempt, one POST at a time.

Signature (documented for receivers): the POST carries X-SMR-Timestamp (unix seconds) and
X-SMR-Signature: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>, body being the exact
request bytes. The secret is "whsec_" + the hex of 32 random bytes; those bytes are a data key
of the key provider (generated and wrapped like an artifact's DEK, bound to the webhook's id),
so the database holds only their wrapped form; each attempt unwraps them to sign.

SSRF: the URL is checked at creation and again at each attempt; its host is resolved once and
the connection goes to the address that was checked (the Host header and, for https, SNI and
certificate check keep the hostname), so a DNS answer that changes in between (rebinding)
cannot redirect the request. Redirects are never followed.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import ssl
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import urllib3
from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from registry.crypto import keys
from registry.errors import (
    IntegrityFailure,
    InvalidInput,
    KeyServiceUnavailable,
    NotFound,
    WebhookUrlNotAllowed,
)
from registry.keyconfig import get_key_provider, provider_for
from registry.models import (
    AuditAction,
    ModelVersion,
    Namespace,
    Webhook,
    WebhookDelivery,
    WebhookDeliveryState,
    WebhookEvent,
)
from registry.services.audit import audit_record, audit_target
from registry.services.envelope import key_provider_call

logger = logging.getLogger(__name__)

DELIVER_TASK = ("workers.tasks.webhook_deliver", "webhooks")
SIGNATURE_VERSION = "v1"
SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix, not a secret)
USER_AGENT = "SecureModelRegistry-Webhook/1"


# --- Signing ----------------------------------------------------------------------------------


def webhook_signature(*, secret: str, timestamp: int, body: bytes) -> str:
    """The X-SMR-Signature value: v1=<hex HMAC-SHA256(secret, f"{timestamp}.{body}")>."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"{SIGNATURE_VERSION}={mac.hexdigest()}"


def webhook_signature_verify(
    *, secret: str, timestamp: int, body: bytes, signature: str, tolerance: int = 300
) -> bool:
    """What a receiver does: recompute, compare in constant time, refuse stale timestamps."""
    if abs(time.time() - timestamp) > tolerance:
        return False
    expected = webhook_signature(secret=secret, timestamp=timestamp, body=body)
    return hmac.compare_digest(expected, signature)


def secret_context(webhook_id: uuid.UUID) -> dict[str, str]:
    """The encryption context of a webhook's wrapped secret: a wrapped secret copied onto
    another webhook's row does not unwrap there (and no artifact DEK passes for one). Frozen
    in migration 0013, which wrapped the secrets stored before."""
    return {"smr:webhook": str(webhook_id), "smr:use": "webhook-signing-secret"}


def webhook_secret(*, webhook: Webhook) -> str:
    """The plaintext signing secret of `webhook`, unwrapped by the key provider. Raises
    KeyServiceUnavailable (retry later) or IntegrityFailure (the wrapped secret, its KEK or its
    context is wrong). Never log, store or return what it gives."""
    wrapped = keys.WrappedKey(kek_id=webhook.secret_kek_id, blob=bytes(webhook.secret_wrapped))
    provider = key_provider_call(provider_for, webhook.secret_kek_id)
    raw = key_provider_call(provider.unwrap, wrapped, secret_context(webhook.pk))
    return SECRET_PREFIX + raw.hex()


# --- SSRF -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    address: str  # the checked IP the connection goes to
    path: str


def _address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_loopback
        or ip.is_private
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or not ip.is_global
    )


def webhook_url_check(url: str) -> Target:
    """Parse and resolve `url`; raise WebhookUrlNotAllowed unless every address it resolves
    to is public (or SMR_WEBHOOK_ALLOW_PRIVATE is set). Returns the address to connect to."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlNotAllowed(f"The webhook URL is malformed: {exc}.") from None
    if parts.scheme not in ("http", "https"):
        raise WebhookUrlNotAllowed("The webhook URL must start with http:// or https://.")
    if parts.username is not None or parts.password is not None:
        raise WebhookUrlNotAllowed(
            "The webhook URL must not carry credentials; the signature authenticates us."
        )
    host = parts.hostname
    if not host:
        raise WebhookUrlNotAllowed("The webhook URL has no host.")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise WebhookUrlNotAllowed(
            f"The webhook host {host!r} does not resolve; use a name with a public address."
        ) from None
    addresses = []
    for info in infos:
        # The scope id of a link-local IPv6 answer ("fe80::1%eth0") is not part of the address.
        addresses.append(ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]))
    if not addresses:
        raise WebhookUrlNotAllowed(f"The webhook host {host!r} has no address.")
    if not settings.SMR_WEBHOOK_ALLOW_PRIVATE:
        refused = [str(a) for a in addresses if not _address_allowed(a)]
        if refused:
            # Every answer must be public: a name with one public and one private address
            # would otherwise reach the private one on some attempts.
            raise WebhookUrlNotAllowed(
                f"The webhook host {host!r} resolves to a non-public address ({refused[0]}); "
                "receivers on loopback, private, link-local or reserved addresses are refused "
                "unless the operator sets SMR_WEBHOOK_ALLOW_PRIVATE=1.",
                address=refused[0],
            )
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return Target(parts.scheme, host, port, str(addresses[0]), path)


# --- Management -------------------------------------------------------------------------------


def webhook_create(
    *, namespace: Namespace, url: str, events: list[str], creator: User | None
) -> tuple[Webhook, str]:
    """Register a receiver for `events` of `namespace` (admins; audited).

    Returns the webhook and its signing secret, which the caller shows once: it is never
    returned again. The
    secret's bytes are a fresh data key of the key provider; only their wrapped form is
    stored. The URL must pass the SSRF check now and again at every delivery.
    """
    unknown = sorted(set(events) - set(WebhookEvent.values))
    if not events or unknown:
        raise InvalidInput(
            f"events must name at least one of {WebhookEvent.values}.", field="events"
        )
    webhook_url_check(url)
    webhook = Webhook(namespace=namespace, url=url, events=sorted(set(events)), created_by=creator)
    # Outside the transaction: with KMS this is a network call.
    raw, wrapped = key_provider_call(
        get_key_provider().generate_data_key, secret_context(webhook.pk)
    )
    secret = SECRET_PREFIX + raw.hex()
    webhook.secret_wrapped = wrapped.blob
    webhook.secret_kek_id = wrapped.kek_id
    with transaction.atomic():
        webhook.save(force_insert=True)
        audit_record(
            action=AuditAction.WEBHOOK_CREATE,
            namespace=namespace.name,
            target=audit_target(namespace.name, f"webhooks/{webhook.pk}"),
            details={"url": url[:500], "events": webhook.events, "kek_id": wrapped.kek_id},
        )
    return webhook, secret


def webhook_list(*, namespace: Namespace) -> QuerySet[Webhook]:
    return Webhook.objects.filter(namespace=namespace).order_by("created_at")


def webhook_get(*, namespace: Namespace, webhook_id: uuid.UUID) -> Webhook:
    webhook = Webhook.objects.filter(namespace=namespace, pk=webhook_id).first()
    if webhook is None:
        raise NotFound(f"Webhook {webhook_id} not found in namespace {namespace.name!r}.")
    return webhook


def webhook_delete(*, namespace: Namespace, webhook_id: uuid.UUID) -> None:
    """Delete a webhook and its delivery history (audited); pending attempts are dropped."""
    with transaction.atomic():
        webhook = webhook_get(namespace=namespace, webhook_id=webhook_id)
        url = webhook.url
        webhook.delete()
        audit_record(
            action=AuditAction.WEBHOOK_DELETE,
            namespace=namespace.name,
            target=audit_target(namespace.name, f"webhooks/{webhook_id}"),
            details={"url": url[:500]},
        )


def webhook_secret_rewrap(*, webhook: Webhook, target: keys.KeyProvider) -> bool:
    """Re-wrap a webhook's secret under `target`'s primary KEK (audited); the secret itself
    does not change. Idempotent, and safe to run twice at once: the UPDATE is conditional on
    the old kek_id, as for artifacts (`artifact_rewrap`)."""
    to_kek = target.primary_kek_id()
    if webhook.secret_kek_id == to_kek:
        return False
    old = keys.WrappedKey(kek_id=webhook.secret_kek_id, blob=bytes(webhook.secret_wrapped))
    context = secret_context(webhook.pk)
    source = key_provider_call(provider_for, webhook.secret_kek_id)
    if source.scheme == target.scheme:
        new = key_provider_call(source.rewrap, old, context, to_kek_id=to_kek)
    else:
        new = key_provider_call(keys.rewrap_between, old, context, source, target)
    with transaction.atomic():
        updated = Webhook.objects.filter(pk=webhook.pk, secret_kek_id=webhook.secret_kek_id).update(
            secret_wrapped=new.blob, secret_kek_id=new.kek_id
        )
        if updated:
            audit_record(
                action=AuditAction.KEY_REWRAP,
                namespace=webhook.namespace.name,
                target=audit_target(webhook.namespace.name, f"webhooks/{webhook.pk}"),
                details={"from_kek_id": webhook.secret_kek_id, "to_kek_id": new.kek_id},
            )
    return updated == 1


def webhook_secrets_rewrap_all(*, target: keys.KeyProvider) -> tuple[int, int]:
    """Re-wrap every webhook secret not yet under `target`'s primary KEK: (moved, total)."""
    qs = Webhook.objects.exclude(secret_kek_id=target.primary_kek_id()).select_related("namespace")
    total = qs.count()
    moved = sum(webhook_secret_rewrap(webhook=w, target=target) for w in qs.iterator())
    return moved, total


def webhook_deliveries(*, webhook: Webhook) -> QuerySet[WebhookDelivery]:
    return WebhookDelivery.objects.filter(webhook=webhook)


# --- Emitting and delivering ------------------------------------------------------------------


def version_payload(version: ModelVersion, **extra: Any) -> dict[str, Any]:
    """The `data` of a version event (version.model.namespace must be loaded)."""
    return {
        "namespace": version.model.namespace.name,
        "model": version.model.name,
        "version": version.number,
        "state": str(version.state),
        **extra,
    }


def webhooks_emit(*, namespace: Namespace, event: str, payload: dict[str, Any]) -> int:
    """Queue `event` for every active webhook of `namespace` subscribed to it.

    Call inside the transaction of the state change: the rows commit with it and the
    deliveries are enqueued only after it commits. Returns how many were queued.
    """
    hooks = [
        h for h in Webhook.objects.filter(namespace=namespace, active=True) if event in h.events
    ]
    if not hooks:
        return 0
    now = timezone.now()
    # Every attempt sends the same body: when it happened belongs to the payload.
    payload = {**payload, "occurred_at": now.isoformat()}
    rows = WebhookDelivery.objects.bulk_create(
        WebhookDelivery(webhook=h, event=event, payload=payload, attempt=1, next_attempt_at=now)
        for h in hooks
    )
    ids = [row.pk for row in rows]

    def enqueue_all() -> None:
        for attempt_id in ids:
            if not webhook_enqueue(attempt_id=attempt_id):
                break  # the broker is down: webhooks_dispatch sends the rest later

    transaction.on_commit(enqueue_all)
    return len(rows)


def _publish(attempt_id: uuid.UUID, countdown: float) -> None:
    # Imported here: the Celery app belongs to the worker layer, above the services.
    from workers.app import app

    task, queue = DELIVER_TASK
    with app.connection_for_write(settings.CELERY_BROKER_URL) as conn:
        # Fail fast: a request must not hang on a dead broker; webhooks_dispatch retries.
        conn.ensure_connection(max_retries=0)
        app.send_task(
            task,
            args=[str(attempt_id)],
            queue=queue,
            countdown=countdown,
            connection=conn,
            retry=False,
        )


def webhook_enqueue(*, attempt_id: uuid.UUID, countdown: float = 0) -> bool:
    """Publish a pending attempt's message and stamp `enqueued_at`. Never raises for a broker
    outage: the attempt stays unsent and `webhooks_dispatch` sends it later."""
    try:
        _publish(attempt_id, countdown)
    except Exception as exc:
        # kombu's OperationalError, redis' ConnectionError, OSError: whatever the transport
        # raises, the committed change stands and the outbox keeps the attempt.
        logger.warning(
            "could not enqueue webhook delivery %s; webhooks_dispatch will retry: %s",
            attempt_id,
            exc,
        )
        return False
    WebhookDelivery.objects.filter(
        pk=attempt_id, state=WebhookDeliveryState.PENDING, enqueued_at__isnull=True
    ).update(enqueued_at=timezone.now())
    return True


def _seconds(name: str) -> timedelta:
    return timedelta(seconds=int(getattr(settings, name)))


def _lost_attempts(*, now: datetime, unsent: timedelta, stale: timedelta, lost: timedelta) -> Q:
    """Pending attempts whose message is missing: never published and due for `unsent`;
    published, due for `stale` and never taken (the broker lost it); or taken by a worker
    that has held it past `lost` (it died mid-attempt)."""
    return Q(state=WebhookDeliveryState.PENDING) & (
        Q(enqueued_at__isnull=True, claimed_at__isnull=True, next_attempt_at__lte=now - unsent)
        | Q(
            enqueued_at__lte=now - stale,
            claimed_at__isnull=True,
            next_attempt_at__lte=now - stale,
        )
        | Q(claimed_at__lte=now - lost)
    )


def webhooks_dispatch(
    *, unsent_after: timedelta | None = None, stale_after: timedelta | None = None
) -> int:
    """Send again every pending attempt whose message is missing; returns how many were sent.

    An attempt never published (the broker was down at commit) is sent once it has been due
    for `unsent_after`; one published but still untaken `stale_after` after it was due is sent
    again; one claimed by a worker for longer than SMR_WEBHOOK_LOST_AFTER (past the task's
    hard time limit: that worker died) is released and sent again. Each send first wins a
    conditional UPDATE, so two dispatchers never publish the same attempt in one round.
    Defaults come from settings.
    """
    now = timezone.now()
    due = _lost_attempts(
        now=now,
        unsent=unsent_after if unsent_after is not None else _seconds("SMR_WEBHOOK_UNSENT_AFTER"),
        stale=stale_after if stale_after is not None else _seconds("SMR_WEBHOOK_REDISPATCH_AFTER"),
        lost=_seconds("SMR_WEBHOOK_LOST_AFTER"),
    )
    candidates = list(
        WebhookDelivery.objects.filter(due)
        .order_by("next_attempt_at")
        .values_list("pk", flat=True)[:1000]
    )
    sent = 0
    for attempt_id in candidates:
        stamp = timezone.now()
        # The claim to publish: re-checks `due` in the UPDATE, and afterwards the row no longer
        # matches it (a fresh enqueued_at, no claim), so a concurrent dispatcher skips it.
        if not WebhookDelivery.objects.filter(due, pk=attempt_id).update(
            enqueued_at=stamp, claimed_at=None
        ):
            continue
        try:
            _publish(attempt_id, 0)
        except Exception as exc:
            # No message went out: unsent again, so the next run picks it up first.
            WebhookDelivery.objects.filter(pk=attempt_id, enqueued_at=stamp).update(
                enqueued_at=None
            )
            logger.warning("webhooks_dispatch: the broker is still down: %s", exc)
            break
        sent += 1
    return sent


def _body(row: WebhookDelivery) -> bytes:
    document = {
        "id": str(row.delivery_id),
        "event": row.event,
        "data": row.payload,
    }
    return json.dumps(document, separators=(",", ":"), sort_keys=True).encode()


def _post(target: Target, headers: dict[str, str], body: bytes) -> int:
    """POST to the checked address; returns the status. Raises on connection errors."""
    timeout = urllib3.Timeout(total=settings.SMR_WEBHOOK_TIMEOUT)
    pool: urllib3.HTTPConnectionPool
    if target.scheme == "https":
        # Connect to the checked IP, yet verify the certificate for the hostname (SNI too).
        pool = urllib3.HTTPSConnectionPool(
            target.address,
            target.port,
            timeout=timeout,
            retries=False,
            server_hostname=target.host,
            assert_hostname=target.host,
            cert_reqs="CERT_REQUIRED",
            # None: the system trust store.
            ca_certs=settings.SMR_WEBHOOK_CA_BUNDLE or None,
        )
    else:
        pool = urllib3.HTTPConnectionPool(
            target.address, target.port, timeout=timeout, retries=False
        )
    host_header = target.host if ":" not in target.host else f"[{target.host}]"
    default_port = 443 if target.scheme == "https" else 80
    if target.port != default_port:
        host_header = f"{host_header}:{target.port}"
    with pool:
        response = pool.urlopen(
            "POST",
            target.path,
            body=body,
            headers={**headers, "Host": host_header},
            redirect=False,
            preload_content=False,
            assert_same_host=False,
        )
        try:
            response.read(4096)  # a receiver's answer is not kept: only its status
        finally:
            response.release_conn()
        return int(response.status)


def _tls_reason(exc: BaseException) -> str:
    """OpenSSL's words for why a certificate failed ("self-signed certificate", "Hostname
    mismatch, ..."), found in the chain of causes urllib3 wraps it in."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError) and seen.verify_message:
            return str(seen.verify_message)
        seen = seen.__cause__ or seen.__context__
    return str(exc)


def _signed_headers(row: WebhookDelivery, secret: str, body: bytes) -> dict[str, str]:
    timestamp = int(time.time())
    return {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "X-SMR-Event": row.event,
        "X-SMR-Delivery": str(row.delivery_id),
        "X-SMR-Timestamp": str(timestamp),
        "X-SMR-Signature": webhook_signature(secret=secret, timestamp=timestamp, body=body),
    }


def webhook_deliver(*, attempt_id: uuid.UUID) -> uuid.UUID | None:
    """Make one pending delivery attempt; returns the id of the next attempt if one is due.

    The attempt is claimed first (a conditional UPDATE of `claimed_at`): a duplicate message,
    or one the dispatcher re-sent, finds it claimed or finished and sends nothing. Only a claim
    older than SMR_WEBHOOK_LOST_AFTER (its worker died) can be taken over, so a receiver may
    still see an event twice (drop duplicates by X-SMR-Delivery), never two POSTs at once.
    The outcome is written by the claim's holder only, pending -> succeeded/failed, and
    schedules at most one next attempt.
    """
    claim = timezone.now()
    claimed = (
        WebhookDelivery.objects.filter(pk=attempt_id, state=WebhookDeliveryState.PENDING)
        .filter(
            Q(claimed_at__isnull=True)
            | Q(claimed_at__lte=claim - _seconds("SMR_WEBHOOK_LOST_AFTER"))
        )
        .update(claimed_at=claim)
    )
    if not claimed:
        return None
    row = WebhookDelivery.objects.select_related("webhook").filter(pk=attempt_id).first()
    if row is None:
        return None  # its webhook was deleted in between
    webhook = row.webhook
    body = _body(row)
    status: int | None = None
    error = ""
    retryable = True
    started = time.monotonic()
    if not webhook.active:
        error, retryable = "The webhook is disabled.", False
    else:
        try:
            # Checked again now: DNS may have changed since creation, or the setting.
            target = webhook_url_check(webhook.url)
            headers = _signed_headers(row, webhook_secret(webhook=webhook), body)
            status = _post(target, headers, body)
            if not 200 <= status < 300:
                error = f"The receiver answered HTTP {status}."
        except WebhookUrlNotAllowed as exc:
            error, retryable = exc.message, False
        except IntegrityFailure:
            # The history says what to do; which KEK and why is for the operator's log.
            logger.error(
                "webhook %s: its signing secret did not unwrap under %s",
                webhook.pk,
                webhook.secret_kek_id,
            )
            error, retryable = (
                "The webhook's signing secret could not be decrypted; the incident was logged. "
                "Delete the webhook and register it again.",
                False,
            )
        except (KeyServiceUnavailable, keys.KeyProviderError) as exc:
            logger.warning("webhook %s: could not unwrap its signing secret: %s", webhook.pk, exc)
            error = "The key service is unavailable, so the delivery could not be signed."
        except urllib3.exceptions.SSLError as exc:
            # Retried: the receiver may fix its certificate; nothing was sent to it meanwhile.
            error = (
                f"The receiver's TLS certificate was refused ({_tls_reason(exc)}); it must be "
                f"valid for {target.host!r} and issued by a CA the registry trusts (the system "
                "store, or SMR_WEBHOOK_CA_BUNDLE). Nothing was sent."
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            error = f"Could not deliver: {type(exc).__name__}: {exc}"
    duration_ms = int((time.monotonic() - started) * 1000)
    succeeded = not error
    final = succeeded or not retryable or row.attempt >= settings.SMR_WEBHOOK_MAX_ATTEMPTS
    if not succeeded and final and retryable:
        error = f"{error} Gave up after {row.attempt} attempts."
    next_id: uuid.UUID | None = None
    delay = settings.SMR_WEBHOOK_BACKOFF * 2 ** (row.attempt - 1)
    with transaction.atomic():
        won = WebhookDelivery.objects.filter(
            pk=row.pk, state=WebhookDeliveryState.PENDING, claimed_at=claim
        ).update(
            state=WebhookDeliveryState.SUCCEEDED if succeeded else WebhookDeliveryState.FAILED,
            response_status=status,
            error=error[:500],
            duration_ms=duration_ms,
            next_attempt_at=None,
        )
        if won and not final:
            following = WebhookDelivery.objects.create(
                webhook=webhook,
                delivery_id=row.delivery_id,
                event=row.event,
                payload=row.payload,
                attempt=row.attempt + 1,
                next_attempt_at=timezone.now() + timedelta(seconds=delay),
            )
            next_id = following.pk
            transaction.on_commit(lambda: webhook_enqueue(attempt_id=following.pk, countdown=delay))
    return next_id
