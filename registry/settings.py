"""Settings, all from the environment with safe embedded defaults.

Embedded defaults (no services): SQLite under var/, objects under var/objects, a local keyring
generated under var/keys. Production: DATABASE_URL, SMR_STORAGE=s3 with S3_*,
SMR_KEY_PROVIDER=aws-kms or a mounted keyring file. Any secret may be given as NAME_FILE
pointing at a file.
"""

from __future__ import annotations

import os
import secrets
from datetime import timedelta
from pathlib import Path
from typing import overload

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


@overload
def env(name: str, default: str) -> str: ...
@overload
def env(name: str, default: None = None) -> str | None: ...


def env(name: str, default: str | None = None) -> str | None:
    """Read NAME, or the contents of the file named by NAME_FILE (Kubernetes secrets)."""
    path = os.environ.get(f"{name}_FILE")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise ImproperlyConfigured(f"{name}_FILE={path} cannot be read: {exc}") from exc
    return os.environ.get(name, default)


def env_bool(name: str, default: bool) -> bool:
    value = env(name)
    if value is None:
        return default
    return value.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    value = env(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from exc


DEBUG = env_bool("SMR_DEBUG", False)
# Production refuses embedded fallbacks (generated secret key, generated keyring).
SMR_PRODUCTION = env_bool("SMR_PRODUCTION", False)
VAR_DIR = Path(env("SMR_VAR_DIR", str(BASE_DIR / "var")))

# Embedded mode keeps a per-install key here; `make run` (manage.py demo_setup) creates it
# before starting gunicorn and Celery, so every process signs with the same key.
EMBEDDED_SECRET_KEY_FILE = VAR_DIR / "secret_key"

SECRET_KEY = env("SECRET_KEY")
if not SECRET_KEY:
    if SMR_PRODUCTION:
        raise ImproperlyConfigured(
            "SECRET_KEY (or SECRET_KEY_FILE) is required when SMR_PRODUCTION=1"
        )
    try:
        SECRET_KEY = EMBEDDED_SECRET_KEY_FILE.read_text().strip()
    except FileNotFoundError:
        SECRET_KEY = ""
    if not SECRET_KEY:
        # Dev and tests only: a per-process key, never written anywhere (importing settings
        # writes nothing). Sessions signed by one process fail in another; the prefix makes
        # `check --deploy` refuse it (security.W009).
        SECRET_KEY = "django-insecure-ephemeral-" + secrets.token_urlsafe(50)

ALLOWED_HOSTS = [
    h.strip() for h in (env("ALLOWED_HOSTS", "127.0.0.1,localhost") or "").split(",") if h
]
CSRF_TRUSTED_ORIGINS = [
    o.strip() for o in (env("CSRF_TRUSTED_ORIGINS", "") or "").split(",") if o.strip()
]

INSTALLED_APPS = [
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "axes",
    "drf_spectacular_sidecar",
    "registry",
    "registry.dashboard",
    "api",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Outermost after security: a database outage in any layer below answers 503, not 500.
    "api.errors.OutageMiddleware",
    # Serves the API docs' assets (and later the dashboard's) without a separate web server.
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "registry.middleware.AuditContextMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # A strict Content-Security-Policy on every response (django-csp): see CONTENT_SECURITY_POLICY.
    "csp.middleware.CSPMiddleware",
    # Last, as django-axes requires: turns a lockout flagged during login into our JSON 429.
    "axes.middleware.AxesMiddleware",
]

# The lockout backend first: it refuses a locked-out username+address before any password is
# checked (django-axes). It skips calls without a request (shell, commands).
AUTHENTICATION_BACKENDS = [
    "api.authentication.LockoutBackend",
    "django.contrib.auth.backends.ModelBackend",
]

ROOT_URLCONF = "registry.urls"
APPEND_SLASH = False
WSGI_APPLICATION = "registry.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

DATABASES = {
    "default": dj_database_url.parse(
        env("DATABASE_URL", f"sqlite:///{VAR_DIR / 'registry.sqlite3'}") or "",
        conn_max_age=env_int("DB_CONN_MAX_AGE", 60),
        # A persistent connection that died while idle (database restarted) is replaced at the
        # next request instead of failing it.
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A database that silently drops packets answers a prompt 503, not a hung request.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", env_int("DB_CONNECT_TIMEOUT", 5)
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Embedded mode: BEGIN IMMEDIATE serialises writers, as the audit log's advisory lock
    # does on PostgreSQL, and avoids "database is locked" upgrade deadlocks.
    DATABASES["default"].setdefault("OPTIONS", {})["transaction_mode"] = "IMMEDIATE"
    # WAL lets readers run beside the one writer, and a commit appends to the log instead of
    # rewriting pages (create: 20.8 -> 14.7 ms measured). synchronous=FULL keeps every
    # committed change, audit events included, across a power loss.
    DATABASES["default"]["OPTIONS"]["init_command"] = (
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL"
    )
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True
STATIC_URL = "static/"
STATIC_ROOT = env("STATIC_ROOT") or None
# Serve straight from the installed apps' static folders: no collectstatic step to forget.
WHITENOISE_USE_FINDERS = True

# Uploads are streamed from the WSGI input by the file views; nothing is buffered by Django.
DATA_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024

# --- Registry knobs -------------------------------------------------------------------------
# Largest single artifact file accepted (bytes). Default 1 TiB.
SMR_MAX_ARTIFACT_SIZE = env_int("SMR_MAX_ARTIFACT_SIZE", 1 << 40)
# Resumable uploads: default part size offered to clients and how long a session lives.
SMR_UPLOAD_PART_SIZE = env_int("SMR_UPLOAD_PART_SIZE", 64 << 20)
SMR_UPLOAD_SESSION_TTL = env_int("SMR_UPLOAD_SESSION_TTL", 7 * 24 * 3600)
# Default lifetime of personal access tokens in days (0 = never expires).
SMR_TOKEN_DEFAULT_DAYS = env_int("SMR_TOKEN_DEFAULT_DAYS", 90)
# Refused accesses recorded per actor and namespace per window; more are counted, not logged
# one by one (registry/services/denials.py), so a flood cannot grow the audit log unboundedly.
SMR_DENIED_AUDIT_BURST = env_int("SMR_DENIED_AUDIT_BURST", 10)
SMR_DENIED_AUDIT_WINDOW = env_int("SMR_DENIED_AUDIT_WINDOW", 60)

# Object store: "fs" (a folder) or "s3" (any S3-compatible endpoint).
SMR_STORAGE = env("SMR_STORAGE", "fs")
SMR_OBJECTS_DIR = Path(env("SMR_OBJECTS_DIR", str(VAR_DIR / "objects")))
S3_ENDPOINT_URL = env("S3_ENDPOINT_URL")
S3_BUCKET = env("S3_BUCKET", "smr-artifacts")
S3_REGION = env("S3_REGION", "us-east-1")
S3_ACCESS_KEY_ID = env("S3_ACCESS_KEY_ID")
S3_SECRET_ACCESS_KEY = env("S3_SECRET_ACCESS_KEY")
S3_PART_SIZE = env_int("S3_PART_SIZE", 16 << 20)
S3_MAX_CONCURRENCY = env_int("S3_MAX_CONCURRENCY", 4)
# Per-part checksum declared on multipart uploads ("" to disable for servers that reject it).
S3_CHECKSUM_ALGORITHM = env("S3_CHECKSUM_ALGORITHM", "CRC32")

# Audit checkpoints are signed with an Ed25519 key kept in a file, never in the database.
SMR_AUDIT_SIGNING_KEY_FILE = Path(
    env("SMR_AUDIT_SIGNING_KEY_FILE", str(VAR_DIR / "keys" / "audit-ed25519.pem"))
)
SMR_AUDIT_CHECKPOINT_INTERVAL = env_int("SMR_AUDIT_CHECKPOINT_INTERVAL", 300)
# Take the client address from X-Forwarded-For (only behind a trusted reverse proxy).
SMR_TRUST_X_FORWARDED_FOR = env_bool("SMR_TRUST_X_FORWARDED_FOR", False)

# Key-encryption keys: "local" (keyring file) or "aws-kms".
SMR_KEY_PROVIDER = env("SMR_KEY_PROVIDER", "local")
SMR_KEYRING_FILE = Path(env("SMR_KEYRING_FILE", str(VAR_DIR / "keys" / "keyring.json")))
KMS_KEY_ID = env("KMS_KEY_ID")
KMS_ENDPOINT_URL = env("KMS_ENDPOINT_URL")
KMS_REGION = env("KMS_REGION", S3_REGION)

if SMR_STORAGE not in {"fs", "s3"}:
    raise ImproperlyConfigured(f"SMR_STORAGE must be 'fs' or 's3', got {SMR_STORAGE!r}")
if SMR_KEY_PROVIDER not in {"local", "aws-kms"}:
    raise ImproperlyConfigured(
        f"SMR_KEY_PROVIDER must be 'local' or 'aws-kms', got {SMR_KEY_PROVIDER!r}"
    )
if SMR_KEY_PROVIDER == "aws-kms" and not KMS_KEY_ID:
    raise ImproperlyConfigured("SMR_KEY_PROVIDER=aws-kms needs KMS_KEY_ID (a key id, ARN or alias)")

# --- Celery ---------------------------------------------------------------------------------
CELERY_BROKER_URL = env("CELERY_BROKER_URL", "filesystem://")
if CELERY_BROKER_URL == "filesystem://":
    # Embedded mode: a real worker with no broker server (kombu's filesystem transport). The
    # folders are created by demo_setup and by workers.app on first use, not here.
    _celery_dir = VAR_DIR / "celery"
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_celery_dir / "queue"),
        "data_folder_out": str(_celery_dir / "queue"),
        # kombu's default is ./control, relative to wherever the worker was started.
        "control_folder": str(_celery_dir / "control"),
        "store_processed": False,
    }
else:
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        # Redis hands an unacknowledged message (its worker died: acks_late) to another worker
        # after this many seconds. It must exceed the longest task (a DP job's or a rewrap's
        # hard time limit, 3 h 5 min by default), or a running task is delivered twice:
        # harmless for most (they are idempotent), but a second delivery of a DP job still
        # training takes it for a dead worker's and fails it.
        "visibility_timeout": env_int("SMR_BROKER_VISIBILITY_TIMEOUT", 4 * 3600),
        # How often a worker looks for such messages (one cheap sorted-set range query).
        "unacked_restore_interval": env_int("SMR_BROKER_RESTORE_INTERVAL", 10),
        "unacked_restore_throttle": 1,
    }
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_TASK_IGNORE_RESULT = True
# One queue per kind of work, so a flood of uploads to scan cannot starve signing or DP
# training; periodic housekeeping stays on the default `celery` queue.
CELERY_TASK_DEFAULT_QUEUE = "celery"
CELERY_TASK_ROUTES = {
    "workers.tasks.version_scan": {"queue": "scan"},
    # A slow or dead receiver must hold up neither scans nor housekeeping.
    "workers.tasks.webhook_deliver": {"queue": "webhooks"},
    # DP training holds a worker for minutes to hours, on a GPU where there is one.
    "workers.tasks.dp_retrain": {"queue": "dp"},
    "workers.tasks.privacy_audit": {"queue": "dp"},
}
# A scan past the soft limit fails its job cleanly; the hard limit kills the pool process.
SMR_SCAN_SOFT_TIME_LIMIT = env_int("SMR_SCAN_SOFT_TIME_LIMIT", 3300)
SMR_SCAN_TIME_LIMIT = env_int("SMR_SCAN_TIME_LIMIT", 3600)
# The job outbox: a job whose enqueue failed is sent again after SMR_JOB_UNSENT_AFTER
# seconds, one still queued SMR_JOB_REDISPATCH_AFTER seconds after it was sent is sent again;
# jobs_dispatch runs every SMR_JOB_DISPATCH_INTERVAL seconds. A job whose worker died
# SMR_JOB_MAX_ATTEMPTS times fails.
SMR_JOB_UNSENT_AFTER = env_int("SMR_JOB_UNSENT_AFTER", 30)
SMR_JOB_REDISPATCH_AFTER = env_int("SMR_JOB_REDISPATCH_AFTER", 7800)
SMR_JOB_DISPATCH_INTERVAL = env_int("SMR_JOB_DISPATCH_INTERVAL", 30)
SMR_JOB_MAX_ATTEMPTS = env_int("SMR_JOB_MAX_ATTEMPTS", 5)
# A job `running` this long lost its worker and its message (past every time limit and the
# broker's redelivery): jobs_dispatch queues it again.
SMR_JOB_LOST_AFTER = env_int("SMR_JOB_LOST_AFTER", 4 * 3600)
# KEK rotation (`rewrap_keys --job`): data keys re-wrapped SMR_REWRAP_BATCH_SIZE at a time, one
# transaction each. A run past the soft limit fails its job; a new job resumes where it stopped.
SMR_REWRAP_BATCH_SIZE = env_int("SMR_REWRAP_BATCH_SIZE", 100)
SMR_REWRAP_SOFT_TIME_LIMIT = env_int("SMR_REWRAP_SOFT_TIME_LIMIT", 3 * 3600)
SMR_REWRAP_TIME_LIMIT = env_int("SMR_REWRAP_TIME_LIMIT", 3 * 3600 + 300)
if SMR_REWRAP_TIME_LIMIT >= SMR_JOB_LOST_AFTER:
    raise ImproperlyConfigured(
        "SMR_REWRAP_TIME_LIMIT must be below SMR_JOB_LOST_AFTER, or a rewrap job still running "
        "would be taken for lost and started a second time."
    )
# DP training and privacy audits (the `dp` queue): a run past the soft limit stops, commits the
# steps it ran to the ledger and fails its job.
SMR_DP_SOFT_TIME_LIMIT = env_int("SMR_DP_SOFT_TIME_LIMIT", 3 * 3600)
SMR_DP_TIME_LIMIT = env_int("SMR_DP_TIME_LIMIT", 3 * 3600 + 300)
if SMR_DP_TIME_LIMIT >= SMR_JOB_LOST_AFTER:
    raise ImproperlyConfigured(
        "SMR_DP_TIME_LIMIT must be below SMR_JOB_LOST_AFTER, or a DP job still running would "
        "be taken for lost (and its steps committed) while it still trains."
    )
# Training device of the dp workers: auto (a GPU if torch sees one), cpu or cuda.
SMR_DP_DEVICE = env("SMR_DP_DEVICE", "auto")
# Webhooks: each attempt waits SMR_WEBHOOK_TIMEOUT seconds at most; a failed one is retried
# after SMR_WEBHOOK_BACKOFF * 2**(attempt-1) seconds, up to SMR_WEBHOOK_MAX_ATTEMPTS attempts.
# Receivers on loopback/private/link-local/reserved addresses are refused (SSRF) unless
# SMR_WEBHOOK_ALLOW_PRIVATE=1.
SMR_WEBHOOK_TIMEOUT = env_int("SMR_WEBHOOK_TIMEOUT", 10)
SMR_WEBHOOK_BACKOFF = env_int("SMR_WEBHOOK_BACKOFF", 30)
SMR_WEBHOOK_MAX_ATTEMPTS = env_int("SMR_WEBHOOK_MAX_ATTEMPTS", 5)
SMR_WEBHOOK_ALLOW_PRIVATE = env_bool("SMR_WEBHOOK_ALLOW_PRIVATE", False)
# https receivers must present a certificate valid for the URL's host from a CA in the system
# trust store or, when set, in this PEM file instead (a private CA; add the public CAs to the
# file too if public receivers must keep working).
SMR_WEBHOOK_CA_BUNDLE = env("SMR_WEBHOOK_CA_BUNDLE", "")
if SMR_WEBHOOK_CA_BUNDLE and not Path(SMR_WEBHOOK_CA_BUNDLE).is_file():
    raise ImproperlyConfigured(
        f"SMR_WEBHOOK_CA_BUNDLE={SMR_WEBHOOK_CA_BUNDLE} is not a file; mount the PEM bundle of "
        "the CAs that issue webhook receivers' certificates there, or unset it to use the "
        "system trust store."
    )
# The delivery outbox, as for jobs: webhooks_dispatch runs every SMR_WEBHOOK_DISPATCH_INTERVAL
# seconds and sends an attempt whose enqueue failed (the broker was down at commit) once it has
# been due SMR_WEBHOOK_UNSENT_AFTER seconds, one sent but still untaken
# SMR_WEBHOOK_REDISPATCH_AFTER seconds after it was due (beyond the broker's visibility
# timeout), and one a worker claimed more than SMR_WEBHOOK_LOST_AFTER seconds ago (past the
# task's hard time limit, SMR_WEBHOOK_TIMEOUT + 60: that worker died).
SMR_WEBHOOK_DISPATCH_INTERVAL = env_int("SMR_WEBHOOK_DISPATCH_INTERVAL", 30)
SMR_WEBHOOK_UNSENT_AFTER = env_int("SMR_WEBHOOK_UNSENT_AFTER", 30)
SMR_WEBHOOK_REDISPATCH_AFTER = env_int("SMR_WEBHOOK_REDISPATCH_AFTER", 7800)
SMR_WEBHOOK_LOST_AFTER = env_int("SMR_WEBHOOK_LOST_AFTER", SMR_WEBHOOK_TIMEOUT + 120)
if SMR_WEBHOOK_LOST_AFTER <= SMR_WEBHOOK_TIMEOUT + 60:
    raise ImproperlyConfigured(
        "SMR_WEBHOOK_LOST_AFTER must exceed SMR_WEBHOOK_TIMEOUT + 60 (the delivery task's hard "
        "time limit), or a slow attempt still running would be taken over and POSTed twice."
    )
CELERY_BEAT_SCHEDULE = {
    "jobs-dispatch": {
        "task": "workers.tasks.jobs_dispatch",
        "schedule": SMR_JOB_DISPATCH_INTERVAL,
    },
    "webhooks-dispatch": {
        "task": "workers.tasks.webhooks_dispatch",
        "schedule": SMR_WEBHOOK_DISPATCH_INTERVAL,
    },
    "audit-checkpoint": {
        "task": "workers.tasks.audit_checkpoint",
        "schedule": SMR_AUDIT_CHECKPOINT_INTERVAL,
    },
    # Frequent, because it also finishes cleanups an outage interrupted (cheap when idle).
    "storage-janitor": {"task": "workers.tasks.storage_janitor", "schedule": 300},
}

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "api.authentication.BearerTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["api.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "api.schema.AutoSchema",
    "EXCEPTION_HANDLER": "api.errors.exception_handler",
    "DEFAULT_METADATA_CLASS": "api.metadata.Metadata",
    "DEFAULT_PAGINATION_CLASS": "api.pagination.CursorPagination",
    "PAGE_SIZE": 100,
    "UNAUTHENTICATED_USER": None,
    # Refuses (429) every request from an address over SMR_RATE_AUTH_FAILURES; the other
    # throttles are per view (api/throttles.py) and read their rates from settings per request.
    "DEFAULT_THROTTLE_CLASSES": ["api.throttles.AuthFailureThrottle"],
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Secure Model Registry API",
    "DESCRIPTION": "Envelope-encrypted, audited model registry. Errors are "
    '`{"code", "message", "extra"}` with a stable code.',
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    # Swagger UI assets ship in a wheel: the docs page works without internet access.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    # Findings and the namespace policy share one severity list: one enum in the schema.
    "ENUM_NAME_OVERRIDES": {"SeverityEnum": "registry.models.SEVERITY_CHOICES"},
}

SESSION_COOKIE_HTTPONLY = True
SESSION_COOKIE_SECURE = env_bool("SMR_SECURE_COOKIES", SMR_PRODUCTION)
SESSION_COOKIE_SAMESITE = "Lax"
# Dashboard sessions end after SMR_SESSION_AGE seconds (default 12 h) and with the browser.
SESSION_COOKIE_AGE = env_int("SMR_SESSION_AGE", 12 * 3600)
SESSION_EXPIRE_AT_BROWSER_CLOSE = True
CSRF_COOKIE_SECURE = SESSION_COOKIE_SECURE
CSRF_COOKIE_SAMESITE = "Lax"
# Readable by the dashboard's JavaScript, which echoes it as X-CSRFToken (Django's advice:
# an HttpOnly CSRF cookie adds no protection).
CSRF_COOKIE_HTTPONLY = False

# Throttles and the folding of denied-access events count in the cache. Without SMR_CACHE_URL
# each process counts alone (local memory); set it (redis://...) so all workers share counts.
SMR_CACHE_URL = env("SMR_CACHE_URL")
if SMR_CACHE_URL:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": SMR_CACHE_URL,
        }
    }

# --- Identity: lockout and throttles ----------------------------------------------------------
# Password logins (django-axes): SMR_LOGIN_FAILURE_LIMIT failures of one username from one
# address lock that pair out for SMR_LOGIN_COOLOFF seconds (a failure while locked out
# restarts it); answered 429 locked_out with Retry-After. Per username+address, so an attacker
# elsewhere cannot lock the real user out. Attempts are kept in the database (shared by every
# worker); the audit log, not axes' access log, records logins.
AXES_FAILURE_LIMIT = env_int("SMR_LOGIN_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(seconds=env_int("SMR_LOGIN_COOLOFF", 900))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_DISABLE_ACCESS_LOG = True
AXES_LOCKOUT_CALLABLE = "api.auth.lockout_response"
# The same client address as the audit log (honours SMR_TRUST_X_FORWARDED_FOR).
AXES_CLIENT_IP_CALLABLE = "api.authentication.client_ip"
# API throttles, as DRF rates ("N/s", "N/min", "N/hour", "N/day"). Failed authentications
# (bad tokens, bad passwords) per client address: past the rate every request from it is 429
# until the window ends, answered before any token lookup. Token creation per user. Uploads
# (file PUT, upload sessions, parts) per user: generous, it only stops runaway loops.
SMR_RATE_AUTH_FAILURES = env("SMR_RATE_AUTH_FAILURES", "100/min")
SMR_RATE_TOKEN_CREATE = env("SMR_RATE_TOKEN_CREATE", "30/min")
SMR_RATE_UPLOAD = env("SMR_RATE_UPLOAD", "600/min")
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
# Scripts and styles only from this origin, as files: no inline script, style or eval anywhere
# (the dashboard's htmx is vendored and told not to inject styles). The API docs page is the
# one exception, for Swagger UI's inline styles (registry.urls).
CONTENT_SECURITY_POLICY = {
    "DIRECTIVES": {
        "default-src": ["'self'"],
        "script-src": ["'self'"],
        "style-src": ["'self'"],
        "img-src": ["'self'", "data:"],
        "connect-src": ["'self'"],
        "font-src": ["'self'"],
        "object-src": ["'none'"],
        "base-uri": ["'none'"],
        "form-action": ["'self'"],
        "frame-ancestors": ["'none'"],
    }
}
LOGIN_URL = "/login"
if SMR_PRODUCTION:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = True
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": (env("LOG_LEVEL", "INFO") or "INFO").upper()},
    "loggers": {
        "django.db.backends": {"level": "WARNING"},
        "botocore": {"level": "WARNING"},
        # Failures and lockouts are WARNINGs; its INFO lines repeat what the audit log says.
        "axes": {"level": "WARNING"},
    },
}
