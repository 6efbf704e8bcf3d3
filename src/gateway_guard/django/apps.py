"""The Django app: registers the system checks (see :mod:`gateway_guard.django.checks`)."""

from __future__ import annotations

from django.apps import AppConfig
from django.core import checks

__all__: list[str] = []  # Django finds the AppConfig by itself; nothing here is API


class GatewayGuardConfig(AppConfig):
    name = "gateway_guard.django"
    # The default label would be "django": unhelpful in messages, and too likely to clash.
    label = "gateway_guard"
    verbose_name = "gateway_guard"

    def ready(self) -> None:
        from .checks import CHECKS, TAG  # noqa: PLC0415 - imports views' modules on use

        for check in CHECKS:
            checks.register(check, TAG)
