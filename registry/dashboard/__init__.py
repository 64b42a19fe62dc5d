"""The web dashboard: server-rendered pages (Django templates + vendored htmx) over the same
services and selectors as the REST API. No permission or state rule lives here."""
