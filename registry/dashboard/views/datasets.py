"""Datasets, their budgets (plotted) and ledgers, DP jobs."""

from __future__ import annotations

from django.urls import URLPattern

urlpatterns: list[URLPattern] = []
