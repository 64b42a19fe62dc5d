"""Tokens, namespace policy, webhooks and their deliveries, publisher keys."""

from __future__ import annotations

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
