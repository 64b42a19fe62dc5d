from django.urls import path

from registry.dashboard.views import auth, pages

app_name = "dashboard"

urlpatterns = [
    path("login", auth.login_view, name="login"),
    path("logout", auth.logout_view, name="logout"),
    path("", pages.home, name="home"),
]
