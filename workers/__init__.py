"""Celery app and thin tasks (arrive with the worker issues)."""
