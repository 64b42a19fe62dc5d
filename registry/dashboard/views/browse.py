"""Namespace, model and version pages; compare two versions."""

from __future__ import annotations

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
