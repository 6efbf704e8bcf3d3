"""Log records that name the request: its id, its route and the upstream it is calling.

:class:`RequestContextFilter` puts ``request_id``, ``route`` and ``upstream`` on every
record that passes through a handler it is attached to, read from the request the record
was logged in (any framework; threads and asyncio tasks alike, since the request context is
a ``ContextVar``). Outside a request each is ``"-"``, so one format string serves every line.
A record that already carries one of them (our own gateway-error line sets all three) keeps
its value.

One line per setup (docs/logging.md)::

    # Django settings.py
    LOGGING = gateway_guard.log.dict_config()
    # Flask
    gateway_guard.log.install(app.logger, format=gateway_guard.log.FORMAT)
    # uvicorn: gateway-guard log-config > logging.json; uvicorn app:app --log-config logging.json
    # anything else
    gateway_guard.log.install()

Attach the filter to *handlers*, not loggers: a logger's filters see only the records
logged on that logger itself, not those its children propagate to it.
"""

from __future__ import annotations

import logging
from typing import Any

from .context import get_context as _get_context

__all__ = ["FORMAT", "RequestContextFilter", "dict_config", "install", "safe_path"]

#: A format showing the three fields; works for every record once the filter is attached.
FORMAT = "%(asctime)s %(levelname)s [%(request_id)s %(route)s %(upstream)s] %(name)s: %(message)s"

_MISSING = "-"
# A raw path in a log line: escaped (no CR/LF or terminal escapes reach the log) and cut.
_MAX_PATH = 200


def safe_path(path: str) -> str:
    """``path`` fit for one log line: non-printable characters escaped, at most 200 long."""
    if not path.isprintable():
        path = repr(path)[1:-1]
    if len(path) > _MAX_PATH:
        path = path[: _MAX_PATH - 1] + "\u2026"
    return path


class RequestContextFilter(logging.Filter):
    """Adds ``request_id``, ``route`` and ``upstream`` to each record; never drops one.

    ``route`` is the matched ``[[routes]]`` entry's name (its path template unless named);
    a request outside every route shows its raw path (escaped and bounded).
    ``upstream`` is the upstream the request is calling, or called last. ``default`` is
    the value outside a request (``"-"``).
    """

    def __init__(self, name: str = "", default: str = _MISSING) -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = _get_context()
        fields = vars(record)
        if ctx is None:
            default = self.default
            fields.setdefault("request_id", default)
            fields.setdefault("route", default)
            fields.setdefault("upstream", default)
            return True
        if fields.get("request_id") is None:
            fields["request_id"] = ctx.request_id
        if fields.get("route") is None:
            route = ctx.route
            fields["route"] = route.name if route is not None else safe_path(ctx.path)
        if fields.get("upstream") is None:
            fields["upstream"] = ctx.upstream or self.default
        return True


_FILTER_PATH = f"{__name__}.RequestContextFilter"


def dict_config(
    level: str = "INFO", *, format: str = FORMAT, loggers: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` mapping: one stderr handler with the filter.

    The root logger and uvicorn's, gunicorn's and Django's loggers all write through it,
    each line naming its request. ``loggers`` adds or overrides logger entries. The
    mapping is plain JSON data, so it also serves ``uvicorn --log-config`` (written out by
    ``gateway-guard log-config``)::

        LOGGING = gateway_guard.log.dict_config()          # Django settings.py
    """
    entry = {"handlers": ["gateway_guard"], "level": level, "propagate": False}
    config: dict[str, Any] = {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_context": {"()": _FILTER_PATH}},
        "formatters": {"gateway_guard": {"format": format}},
        "handlers": {
            "gateway_guard": {
                "class": "logging.StreamHandler",
                "formatter": "gateway_guard",
                "filters": ["request_context"],
            }
        },
        "root": {"handlers": ["gateway_guard"], "level": level},
        "loggers": {
            name: dict(entry)
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error", "django")
        },
    }
    if loggers:
        config["loggers"].update(loggers)
    return config


def install(
    logger: logging.Logger | str | None = None, *, format: str | None = None
) -> RequestContextFilter:
    """Attach one :class:`RequestContextFilter` to every handler of ``logger`` (the root
    logger by default), adding a stderr handler with :data:`FORMAT` when it has none.

    ``format`` also sets that format on each of them (their own formatter is kept
    otherwise, for example a JSON one). Calling it again adds nothing twice. Returns the
    filter.
    """
    target = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)
    handlers = target.handlers
    if not handlers:
        stream = logging.StreamHandler()
        stream.setFormatter(logging.Formatter(FORMAT))
        target.addHandler(stream)
    found = None
    for handler in target.handlers:
        for existing in handler.filters:
            if isinstance(existing, RequestContextFilter):
                found = existing
    request_filter = found or RequestContextFilter()
    for handler in target.handlers:
        if request_filter not in handler.filters:
            handler.addFilter(request_filter)
        if format is not None:
            handler.setFormatter(logging.Formatter(format))
    return request_filter
