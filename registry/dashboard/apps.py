from django.apps import AppConfig


class DashboardConfig(AppConfig):
    name = "registry.dashboard"
    label = "dashboard"
