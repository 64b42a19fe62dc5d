"""Upload files or a folder to a version through the REST API's resumable sessions."""

from __future__ import annotations

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
