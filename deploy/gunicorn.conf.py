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


def post_worker_init(worker):
    """Once the app is loaded, keep the garbage collector off the start-up heap and off
    every request's short-lived objects.

    Django, DRF, the URLconf with its views and serializers are ~130k long-lived objects; a
    list of 1,000 versions allocates tens of thousands more per request. With the defaults a
    full collection (about every fifth such list) walks all of them and young collections run
    every 700 allocations: measured in-process, 49 ms of GC per list request on average and a
    p95 of 319 ms (median 84). gc.freeze() moves the start-up heap to the permanent generation
    and a young-generation threshold of 50,000 lets a request finish before its objects are
    scanned: 8.5 ms of GC per request, p95 141 ms. Cyclic garbage is still collected, every
    50,000 allocations instead of 700. Importing the URLconf first freezes the views too.
    """
    import gc

    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - imported for its side effect
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
