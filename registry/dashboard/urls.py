from django.urls import path

from registry.dashboard.views import audit, auth, browse, datasets, pages, reviews, settings, upload

app_name = "dashboard"

# Each page module owns its routes (and its templates, dashboard/<module>_*.html).
urlpatterns = [
    path("login", auth.login_view, name="login"),
    path("logout", auth.logout_view, name="logout"),
    path("", pages.home, name="home"),
    *browse.urlpatterns,
    *upload.urlpatterns,
    *reviews.urlpatterns,
    *audit.urlpatterns,
    *datasets.urlpatterns,
    *settings.urlpatterns,
]
