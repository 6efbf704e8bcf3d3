"""Guard: the runtime that owns upstream policies, breakers, limiters and the route table."""

from __future__ import annotations

from .policy import CallPolicy, Policies, compile_policies
from .settings import Settings, SettingsSource, load_settings

__all__ = ["Guard"]


class Guard:
    """Load, validate and compile settings once; serve guarded clients and decisions.

    ``settings`` is a mapping, a ``.toml``/``.json`` path, a :class:`Settings`, or ``None``
    to read ``GATEWAY_GUARD_SETTINGS`` and ``GATEWAY_GUARD__*`` from the environment.
    Raises :class:`gateway_guard.SettingsError` naming every bad key.
    """

    def __init__(self, settings: SettingsSource = None) -> None:
        self.settings: Settings = load_settings(settings)
        self.policies: Policies = compile_policies(self.settings)

    def policy(self, upstream: str) -> CallPolicy:
        """The effective policy of ``upstream`` outside any route."""
        try:
            return self.policies.calls[upstream]
        except KeyError:
            known = ", ".join(sorted(self.policies.calls)) or "none configured"
            raise KeyError(f"unknown upstream {upstream!r} (upstreams: {known})") from None
