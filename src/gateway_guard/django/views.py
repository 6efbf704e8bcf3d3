"""Django views of the optional integrations: ``path("metrics", metrics_view)``."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse

__all__ = ["metrics_view"]


def metrics_view(request: HttpRequest) -> HttpResponse:
    """The Prometheus metrics (the ``prometheus`` extra), for ``urlpatterns``."""
    # Imported on the first scrape, not with the Django app: the extra stays optional.
    from gateway_guard.metrics import endpoint  # noqa: PLC0415 - the extra stays optional

    served = endpoint(request.method or "GET")
    response = HttpResponse(served.body, status=served.status)
    for name, value in served.headers:
        response[name] = value
    return response
