"""Settings, read live, and the process's Guard built from them.

Nothing here copies a Django setting at import time: every read goes through
``django.conf.settings``, so ``override_settings`` works in tests. The Guard is built on
first use and dropped when ``GATEWAY_GUARD`` changes (Django sends ``setting_changed``
from ``override_settings``); the next :func:`get_guard` builds a new one, with fresh
breakers, budgets and limiters.
"""

from __future__ import annotations

import threading
from typing import Any

from django.conf import settings
from django.core.signals import setting_changed

from gateway_guard.guard import Guard

__all__ = ["get_guard"]

SETTING = "GATEWAY_GUARD"


class _Conf:
    """The Django settings gateway_guard reads, looked up on every access."""

    @property
    def GATEWAY_GUARD(self) -> Any:
        # Unset means "from the environment": GATEWAY_GUARD_SETTINGS and GATEWAY_GUARD__*.
        # Any type may be found here; checks.py reports the wrong ones (E002).
        return getattr(settings, SETTING, None)

    @property
    def DEBUG(self) -> bool:
        return bool(settings.DEBUG)

    @property
    def MIDDLEWARE(self) -> list[str]:
        return list(getattr(settings, "MIDDLEWARE", None) or ())


conf = _Conf()

_lock = threading.Lock()
_guard: Guard | None = None


def get_guard() -> Guard:
    """The process's :class:`~gateway_guard.Guard`, built from ``settings.GATEWAY_GUARD``.

    Built once, on first use (the middleware asks for it when Django loads it, so invalid
    settings stop the server at startup); rebuilt after ``GATEWAY_GUARD`` changes under
    ``override_settings``. Raises :class:`gateway_guard.SettingsError` on invalid settings.
    """
    guard = _guard
    if guard is None:
        guard = _build()
    return guard


def _build() -> Guard:
    global _guard
    with _lock:
        # Another thread may have built it while this one waited for the lock.
        if _guard is None:
            _guard = Guard(conf.GATEWAY_GUARD)
        return _guard


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    global _guard
    if setting == SETTING:
        with _lock:
            _guard = None


setting_changed.connect(_on_setting_changed, dispatch_uid="gateway_guard.django.conf")
