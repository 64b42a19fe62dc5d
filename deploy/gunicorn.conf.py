# gthread workers: a multi-GB upload keeps one thread busy for minutes while the worker's
# main loop keeps heart-beating, so the arbiter does not kill it mid-transfer.
import os

worker_class = "gthread"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
threads = int(os.environ.get("GUNICORN_THREADS", "8"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "120"))
graceful_timeout = 30
keepalive = 5
accesslog = "-"
errorlog = "-"
loglevel = os.environ.get("LOG_LEVEL", "info").lower()
# Large request bodies are streamed by the application; no header is that big.
limit_request_field_size = 16380
