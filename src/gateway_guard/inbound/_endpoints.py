"""The paths the middleware answers itself: the status page, the health check, metrics.

Every adapter asks :meth:`Endpoints.wants` about the path before anything else (so these
paths are never shed, never routed, never counted), and hands the request to
:meth:`Endpoints.serve`, which answers it whole. ``guard.endpoints`` is None when none of
``[status] path``, ``[health] path`` and ``[metrics] path`` is set: the request path then
only compares it with None. The metrics answer belongs to the integration
(``gateway_guard.metrics.endpoint``, a :class:`Served`); this module only routes to it.

Access to the status page:

- ``GET path`` as HTML is a shell without data, served to anyone; its script fetches the
  JSON.
- The JSON (``GET path``, ``GET path/errors/<reference>``) needs ``Authorization: Bearer
  <token>``, unless the request comes from a loopback address *and* carries no
  forwarding header (behind a reverse proxy on the same host every request would
  otherwise look local).
- ``POST path/upstreams/<name>/<action>`` always needs the token. It is compared in
  constant time; cookies are never read, so a browser cannot be tricked into an action
  (no CSRF). Without a configured token, actions answer 403.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from gateway_guard._status import find_error, status_data
from gateway_guard._status_page import StatusPage, json_body
from gateway_guard.render import RenderedError

if TYPE_CHECKING:
    from gateway_guard.guard import Guard

__all__ = ["ACTIONS", "Endpoints", "Served"]

logger = logging.getLogger("gateway_guard")

H = TypeVar("H")
Reader = Callable[[H, str], "str | None"]

#: The breaker actions of ``POST path/upstreams/<name>/<action>``, by the method they call.
ACTIONS = {
    "force-open": "force_open",
    "force-closed": "force_closed",
    "disable": "disable",
    "reset": "reset",
}
_FORWARDED = ("forwarded", "x-forwarded-for", "x-real-ip")
_JSON = "application/json"
_COMMON = [("cache-control", "no-store"), ("x-content-type-options", "nosniff")]


class Served(NamedTuple):
    """A whole response from an integration's endpoint: status, header fields, body."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _answer(
    status: int, data: object, extra: list[tuple[str, str]] | None = None, *, head: bool = False
) -> RenderedError:
    body = json_body(data)
    headers = [
        ("content-type", _JSON),
        ("content-length", str(len(body))),
        *_COMMON,
        *(extra or ()),
    ]
    return RenderedError(status, headers, b"" if head else body)


def _is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class Endpoints:
    """The paths of one Guard that the middleware serves itself."""

    __slots__ = (
        "_guard",
        "_page",
        "_token",
        "health",
        "metrics",
        "paths",
        "prefix",
        "serve_metrics",
        "status",
    )

    def __init__(
        self, guard: Guard, status: str | None, health: str | None, metrics: str | None = None
    ) -> None:
        self._guard = guard
        self.health = health
        self.metrics = metrics
        #: Set by the metrics integration when it is loaded (``[metrics] path``).
        self.serve_metrics: Callable[[str], Served] | None = None
        self.status = status.rstrip("/") if status else None
        #: What :meth:`wants` compares a path with, worked out once: the paths answered
        #: whole, and the status page's prefix (None without one).
        self.paths = frozenset(p for p in (health, self.status, metrics) if p)
        self.prefix = self.status + "/" if self.status else None
        token = guard.settings.status.token
        self._token = token.encode() if token else None
        self._page: StatusPage | None = None

    @classmethod
    def for_guard(cls, guard: Guard) -> Endpoints | None:
        settings = guard.settings
        status, health, metrics = (
            settings.status.path,
            settings.health.path,
            settings.metrics.path,
        )
        if status is None and health is None and metrics is None:
            return None
        return cls(guard, status, health, metrics)

    def wants(self, path: str) -> bool:
        """Whether ``path`` is one the middleware answers itself."""
        prefix = self.prefix
        return path in self.paths or (prefix is not None and path.startswith(prefix))

    def serve(
        self, method: str, path: str, headers: H, read: Reader[H], client: str | None
    ) -> RenderedError:
        """The whole answer to a request for one of our paths (see :meth:`wants`)."""
        head = method == "HEAD"
        if path == self.metrics and self.serve_metrics is not None:
            served = self.serve_metrics(method)
            return RenderedError(served.status, served.headers, served.body)
        if path == self.health:
            if method not in ("GET", "HEAD"):
                return _answer(405, {"error": "method not allowed"}, [("allow", "GET, HEAD")])
            return _answer(
                200, {"status": "ok", "service": self._guard.settings.service}, head=head
            )
        assert self.status is not None
        rest = path[len(self.status) :].strip("/")
        if method == "POST":
            return self._action(rest, headers, read, client)
        if method not in ("GET", "HEAD"):
            return _answer(405, {"error": "method not allowed"}, [("allow", "GET, HEAD, POST")])
        accept = read(headers, "accept") or ""
        if "text/html" in accept and (rest == "" or rest.startswith("errors/")):
            return self._html(head)
        refused = self._refuse_read(headers, read, client)
        if refused is not None:
            return refused
        if rest == "":
            return _answer(200, status_data(self._guard), head=head)
        if rest.startswith("errors/"):
            record, note = find_error(self._guard, rest[len("errors/") :])
            if record is None:
                missing: dict[str, Any] = {"error": "no recent gateway error has this reference"}
                if note is not None:
                    missing["note"] = note
                return _answer(404, missing, head=head)
            return _answer(200, record, head=head)
        return _answer(404, {"error": "not found"}, head=head)

    def _html(self, head: bool) -> RenderedError:
        page = self._page
        if page is None:
            settings = self._guard.settings
            assert self.status is not None
            page = self._page = StatusPage(
                service=settings.service,
                brand=settings.brand.name,
                accent=settings.brand.accent_color,
                base=self.status,
            )
        headers = [
            ("content-type", "text/html; charset=utf-8"),
            ("content-length", str(len(page.body))),
            *_COMMON,
            ("content-security-policy", page.csp),
            ("referrer-policy", "no-referrer"),
            ("x-frame-options", "DENY"),
        ]
        return RenderedError(200, headers, b"" if head else page.body)

    def _authorized(self, headers: H, read: Reader[H]) -> bool:
        token = self._token
        if token is None:
            return False
        given = read(headers, "authorization") or ""
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer":
            return False
        # Constant time: the comparison must not tell an attacker how much was right.
        return hmac.compare_digest(value.strip().encode("utf-8", "replace"), token)

    def _local(self, headers: H, read: Reader[H], client: str | None) -> bool:
        return _is_loopback(client) and all(read(headers, name) is None for name in _FORWARDED)

    def _refuse_read(self, headers: H, read: Reader[H], client: str | None) -> RenderedError | None:
        if self._local(headers, read, client) or self._authorized(headers, read):
            return None
        return self._unauthorized()

    def _unauthorized(self) -> RenderedError:
        if self._token is None:
            return _answer(403, {"error": "set [status] token to allow this from other hosts"})
        return _answer(
            401,
            {"error": "needs Authorization: Bearer <the [status] token>"},
            [("www-authenticate", 'Bearer realm="gateway_guard"')],
        )

    def _action(self, rest: str, headers: H, read: Reader[H], client: str | None) -> RenderedError:
        parts = rest.split("/")
        if len(parts) != 3 or parts[0] != "upstreams":
            return _answer(404, {"error": "not found"})
        _, name, action = parts
        if not self._authorized(headers, read):
            # Checked before the name is: without the token nothing is told, not even
            # which upstreams exist.
            return self._unauthorized()
        method_name = ACTIONS.get(action)
        if method_name is None or name not in self._guard.upstreams:
            return _answer(404, {"error": "unknown upstream or action", "actions": list(ACTIONS)})
        breaker = self._guard.breaker(name)
        getattr(breaker, method_name)()
        state = breaker.state.value
        logger.warning(
            "status page: %s on upstream %s (now %s), from %s",
            action,
            name,
            state,
            client or "-",
            extra={"upstream": name, "breaker_action": action, "breaker_to": state},
        )
        data: dict[str, Any] = {"upstream": name, "action": action, "state": state}
        return _answer(200, data)
