"""The exception tree, and the one place that names upstream failures.

::

    GatewayGuardError
    ├── SettingsError               (also a ValueError) bad settings, raised at startup
    └── UpstreamError               anything rendered as a gateway error
        ├── UpstreamConnectError    502  dns_error, connection_refused,
        │                                destination_ip_unroutable, tls_*
        ├── UpstreamTimeout         504  connection_timeout, connection_read_timeout,
        │                                connection_write_timeout, http_response_timeout
        ├── UpstreamProtocolError   502  http_protocol_error, http_response_incomplete,
        │                                connection_terminated
        ├── UpstreamStatusError     502  the upstream answered a failure status (received_status)
        ├── CircuitOpenError        503  destination_unavailable
        ├── LoadShedError           503  connection_limit_reached
        └── UpstreamConfigError     500  proxy_configuration_error

Error types are RFC 9209's registry names; :func:`classify` picks the most specific one
by walking an exception's cause chain down to the real ``OSError`` / ``ssl`` error. It
knows httpx's exceptions by class, and those of the optional clients (requests, urllib3,
aiohttp) and http.client's by name (``_BY_NAME``), so classifying them imports none.
"""

from __future__ import annotations

import errno
import http.client
import socket
import ssl
from collections import deque
from collections.abc import Iterator, Sequence
from typing import ClassVar

import anyio
import httpx

__all__ = [
    "CircuitOpenError",
    "GatewayGuardError",
    "LoadShedError",
    "SettingsError",
    "SettingsProblem",
    "UpstreamConfigError",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamStatusError",
    "UpstreamTimeout",
]


class GatewayGuardError(Exception):
    """Base class of every exception gateway_guard raises on purpose."""


class SettingsProblem:
    """One thing wrong with the settings: where (dotted key path) and what."""

    __slots__ = ("message", "path")

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message

    def __repr__(self) -> str:
        return f"SettingsProblem({self.path!r}, {self.message!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SettingsProblem) and (self.path, self.message) == (
            other.path,
            other.message,
        )

    def __hash__(self) -> int:
        return hash((self.path, self.message))


class SettingsError(GatewayGuardError, ValueError):
    """Invalid settings. The message lists every problem, one per line, each with its key path.

    ``problems`` holds them as :class:`SettingsProblem` objects for tools (the Django system
    checks turn each into its own check message).
    """

    def __init__(self, problems: Sequence[SettingsProblem] | str) -> None:
        if isinstance(problems, str):
            problems = [SettingsProblem("", problems)]
        self.problems: tuple[SettingsProblem, ...] = tuple(problems)
        if len(self.problems) == 1:
            message = str(self.problems[0])
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} problems in gateway_guard settings:\n{lines}"
        super().__init__(message)


class UpstreamError(GatewayGuardError):
    """An upstream call failed in a way the inbound request should answer as a gateway error.

    Attributes (``None`` where unknown):

    - ``status``: the HTTP status to answer with (502, 503, 504, or 500 for configuration).
    - ``proxy_error``: the RFC 9209 error type, or ``None`` when the upstream answered a
      failure status (``received_status`` then says which).
    - ``upstream``: the configured upstream name (never its host).
    - ``attempts``: how many attempts were made (0 when none was: breaker open, shed).
    - ``elapsed``: seconds spent on the call including retries and waits.
    - ``retry_after``: seconds after which trying again makes sense.
    - ``received_status``: the status the upstream answered, where it answered one.
    """

    default_status: ClassVar[int] = 502
    default_proxy_error: ClassVar[str | None] = "http_protocol_error"

    def __init__(
        self,
        message: str = "",
        *,
        proxy_error: str | None = None,
        upstream: str | None = None,
        attempts: int = 0,
        elapsed: float = 0.0,
        retry_after: float | None = None,
        received_status: int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message or self.__class__.__name__)
        self.status: int = status if status is not None else self.default_status
        self.proxy_error: str | None = (
            proxy_error if proxy_error is not None else self.default_proxy_error
        )
        self.upstream = upstream
        self.attempts = attempts
        self.elapsed = elapsed
        self.retry_after = retry_after
        self.received_status = received_status


class UpstreamConnectError(UpstreamError):
    """The connection to the upstream could not be made (the request was never sent)."""

    default_proxy_error = "connection_refused"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time."""

    default_status = 504
    default_proxy_error = "http_response_timeout"


class UpstreamProtocolError(UpstreamError):
    """The upstream answered, but not with a whole, well-formed HTTP response."""

    default_proxy_error = "http_protocol_error"


class UpstreamStatusError(UpstreamError):
    """The upstream answered a failure status and retries are spent.

    ``response`` is the last response, already read and closed (its body is available as
    ``response.content`` for logging; it is never shown to visitors): an
    ``httpx.Response``, or the ``requests.Response`` / ``aiohttp.ClientResponse`` of those
    drivers (``await response.read()`` gives aiohttp's).
    """

    default_proxy_error = None

    def __init__(
        self, message: str = "", *, response: httpx.Response | None = None, **kwargs: object
    ) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.response = response


class CircuitOpenError(UpstreamError):
    """The upstream's circuit breaker is open: the call was not attempted."""

    default_status = 503
    default_proxy_error = "destination_unavailable"


class LoadShedError(UpstreamError):
    """A concurrency limit was reached (outbound bulkhead or inbound shedding)."""

    default_status = 503
    default_proxy_error = "connection_limit_reached"


class UpstreamConfigError(UpstreamError):
    """The call could not be made because of how it is configured (bad URL, scheme, ...)."""

    default_status = 500
    default_proxy_error = "proxy_configuration_error"


# --- classification --------------------------------------------------------------------

_UNROUTABLE = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EADDRNOTAVAIL})
_RESET = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})
# Resolver failures surface as plain OSErrors with only a message on some paths (anyio
# wraps them), so the text is the last resort. These are glibc's and macOS' wordings.
_DNS_WORDS = (
    "name or service not known",
    "temporary failure in name resolution",
    "nodename nor servname",
    "no address associated with hostname",
    "name resolution",
    "getaddrinfo failed",
)
# Chains are short in practice; the cap keeps a pathological one from costing a request.
_CHAIN_LIMIT = 64


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception behind it, nearest first.

    Follows causes, contexts, exception-group members, and exceptions passed as arguments:
    httpcore wraps the real error as ``ConnectError(oserror)`` and its connection pool
    re-raises with ``from None``, so for connection failures ``args`` is the only place the
    ``OSError`` (and its errno) survives.
    """
    seen: set[int] = set()
    queue = deque([exc])
    while queue and len(seen) < _CHAIN_LIMIT:
        current = queue.popleft()
        if id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        if isinstance(current, BaseExceptionGroup):
            queue.extend(current.exceptions)
        queue.extend(arg for arg in current.args if isinstance(arg, BaseException))
        reason = getattr(current, "reason", None)  # urllib3's MaxRetryError
        if isinstance(reason, BaseException):
            queue.append(reason)
        if current.__cause__ is not None:
            queue.append(current.__cause__)
        if current.__context__ is not None and not current.__suppress_context__:
            queue.append(current.__context__)


def _is_reset(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionResetError | BrokenPipeError | ConnectionAbortedError) or (
        isinstance(exc, OSError) and exc.errno in _RESET
    )


def _connect_error_type(exc: BaseException) -> tuple[type[UpstreamError], str]:
    chain = list(_chain(exc))

    def found(*types: type[BaseException], errnos: frozenset[int] = frozenset()) -> bool:
        return any(
            isinstance(e, types) or (isinstance(e, OSError) and e.errno in errnos) for e in chain
        )

    # Most specific first. A connect can fail several ways at once (one attempt per
    # resolved address, gathered in an exception group by anyio), so each test looks at the
    # whole chain before the next: 127.0.0.1 refusing beats ::1 being unreachable, whichever
    # attempt happened to come first.
    if found(ssl.SSLCertVerificationError):
        return UpstreamConnectError, "tls_certificate_error"
    if found(ssl.SSLError):
        return UpstreamConnectError, "tls_protocol_error"
    if found(socket.gaierror):
        return UpstreamConnectError, "dns_error"
    if found(ConnectionRefusedError, errnos=frozenset({errno.ECONNREFUSED})):
        return UpstreamConnectError, "connection_refused"
    if found(TimeoutError):
        return UpstreamTimeout, "connection_timeout"
    if found(errnos=_UNROUTABLE):
        return UpstreamConnectError, "destination_ip_unroutable"
    # A refused TCP connect is ECONNREFUSED; a reset or EOF while connecting means the TCP
    # connection was made and then dropped during the TLS handshake (the sync backend
    # reports that EOF as ssl.SSLEOFError, the anyio one as a bare EndOfStream).
    if found(
        ConnectionResetError,
        BrokenPipeError,
        ConnectionAbortedError,
        anyio.EndOfStream,
        errnos=_RESET,
    ):
        return UpstreamConnectError, "tls_protocol_error"
    text = " ".join(str(e).lower() for e in chain)
    if any(word in text for word in _DNS_WORDS):
        return UpstreamConnectError, "dns_error"
    if "certificate" in text:
        return UpstreamConnectError, "tls_certificate_error"
    if "ssl" in text or "tls" in text:
        return UpstreamConnectError, "tls_protocol_error"
    if "refused" in text or "all connection attempts failed" in text:
        return UpstreamConnectError, "connection_refused"
    if "unreachable" in text:
        return UpstreamConnectError, "destination_ip_unroutable"
    return UpstreamConnectError, "connection_refused"


# Other clients' exceptions (requests, urllib3, aiohttp), known by the qualified names of
# their classes, so that classifying them imports none of those libraries. Looked up along
# the exception's MRO, most derived first (urllib3's NewConnectionError is a subclass of
# its ConnectTimeoutError). ``None``: the type says nothing, look at what it wraps;
# ``_CONNECT``: a failed connect, named by what the chain holds (errno, ssl, resolver).
_CONNECT = (UpstreamConnectError, "")
_TERMINATED = (UpstreamProtocolError, "connection_terminated")
_CONFIG = (UpstreamConfigError, "proxy_configuration_error")
_BY_NAME: dict[str, tuple[type[UpstreamError], str] | None] = {
    # urllib3 (2.x)
    "urllib3.exceptions.NameResolutionError": (UpstreamConnectError, "dns_error"),
    "urllib3.exceptions.NewConnectionError": _CONNECT,
    "urllib3.exceptions.ConnectTimeoutError": (UpstreamTimeout, "connection_timeout"),
    "urllib3.exceptions.ReadTimeoutError": (UpstreamTimeout, "connection_read_timeout"),
    "urllib3.exceptions.TimeoutError": (UpstreamTimeout, "http_response_timeout"),
    "urllib3.exceptions.SSLError": _CONNECT,
    "urllib3.exceptions.ProxyError": (UpstreamConnectError, "destination_unavailable"),
    "urllib3.exceptions.DecodeError": (UpstreamProtocolError, "http_response_content_coding"),
    "urllib3.exceptions.EmptyPoolError": (LoadShedError, "connection_limit_reached"),
    "urllib3.exceptions.LocationValueError": _CONFIG,
    "urllib3.exceptions.ProtocolError": None,
    "urllib3.exceptions.MaxRetryError": None,
    # requests
    "requests.exceptions.ConnectTimeout": (UpstreamTimeout, "connection_timeout"),
    "requests.exceptions.ReadTimeout": (UpstreamTimeout, "connection_read_timeout"),
    "requests.exceptions.SSLError": _CONNECT,
    "requests.exceptions.ProxyError": (UpstreamConnectError, "destination_unavailable"),
    "requests.exceptions.ContentDecodingError": (
        UpstreamProtocolError,
        "http_response_content_coding",
    ),
    "requests.exceptions.InvalidURL": _CONFIG,
    "requests.exceptions.InvalidSchema": _CONFIG,
    "requests.exceptions.MissingSchema": _CONFIG,
    "requests.exceptions.TooManyRedirects": (UpstreamProtocolError, "http_protocol_error"),
    "requests.exceptions.ConnectionError": None,
    "requests.exceptions.ChunkedEncodingError": None,
    "requests.exceptions.Timeout": (UpstreamTimeout, "http_response_timeout"),
    # aiohttp (3.x)
    "aiohttp.client_exceptions.ClientConnectorDNSError": (UpstreamConnectError, "dns_error"),
    "aiohttp.client_exceptions.ClientConnectorCertificateError": (
        UpstreamConnectError,
        "tls_certificate_error",
    ),
    "aiohttp.client_exceptions.ServerFingerprintMismatch": (
        UpstreamConnectError,
        "tls_certificate_error",
    ),
    "aiohttp.client_exceptions.ClientConnectorSSLError": (
        UpstreamConnectError,
        "tls_protocol_error",
    ),
    "aiohttp.client_exceptions.ClientProxyConnectionError": (
        UpstreamConnectError,
        "destination_unavailable",
    ),
    "aiohttp.client_exceptions.ClientHttpProxyError": (
        UpstreamConnectError,
        "destination_unavailable",
    ),
    "aiohttp.client_exceptions.ClientConnectorError": _CONNECT,
    "aiohttp.client_exceptions.ConnectionTimeoutError": (UpstreamTimeout, "connection_timeout"),
    "aiohttp.client_exceptions.SocketTimeoutError": (UpstreamTimeout, "connection_read_timeout"),
    "aiohttp.client_exceptions.ServerTimeoutError": (UpstreamTimeout, "connection_read_timeout"),
    "aiohttp.client_exceptions.ServerDisconnectedError": _TERMINATED,
    "aiohttp.client_exceptions.ClientConnectionResetError": _TERMINATED,
    "aiohttp.client_exceptions.ClientPayloadError": None,
    "aiohttp.client_exceptions.ClientOSError": None,
    "aiohttp.client_exceptions.InvalidURL": _CONFIG,
    "aiohttp.client_exceptions.NonHttpUrlClientError": _CONFIG,
    "aiohttp.client_exceptions.TooManyRedirects": (UpstreamProtocolError, "http_protocol_error"),
    "aiohttp.http_exceptions.ContentEncodingError": (
        UpstreamProtocolError,
        "http_response_content_coding",
    ),
    "aiohttp.http_exceptions.ContentLengthError": (
        UpstreamProtocolError,
        "http_response_incomplete",
    ),
    "aiohttp.http_exceptions.TransferEncodingError": (
        UpstreamProtocolError,
        "http_response_incomplete",
    ),
    "aiohttp.http_exceptions.HttpProcessingError": (UpstreamProtocolError, "http_protocol_error"),
}
_NOT_FOUND = (UpstreamError, "?")


def _by_name(exc: BaseException) -> tuple[type[UpstreamError], str] | None:
    """The classification of another client's exception by its class's name, ``None`` when
    it says nothing, or ``_NOT_FOUND`` when no class of its MRO is known."""
    for cls in type(exc).__mro__:
        key = f"{cls.__module__}.{cls.__qualname__}"
        if key in _BY_NAME:
            found = _BY_NAME[key]
            if found is _CONNECT:
                return _connect_error_type(exc)
            return found
    return _NOT_FOUND


def _was_reset(exc: BaseException) -> bool:
    return any(_is_reset(inner) for inner in _chain(exc))


def _classify_one(exc: BaseException) -> tuple[type[UpstreamError], str] | None:
    """The classification of ``exc`` itself, or ``None`` when its type says nothing."""
    if isinstance(exc, UpstreamError):
        return type(exc), exc.proxy_error or "http_protocol_error"
    if isinstance(exc, httpx.ConnectTimeout):
        return UpstreamTimeout, "connection_timeout"
    if isinstance(exc, httpx.ReadTimeout):
        return UpstreamTimeout, "connection_read_timeout"
    if isinstance(exc, httpx.WriteTimeout):
        return UpstreamTimeout, "connection_write_timeout"
    if isinstance(exc, httpx.PoolTimeout):
        # Our own connection pool was exhausted: a local limit, not the upstream's fault.
        return LoadShedError, "connection_limit_reached"
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout, "http_response_timeout"
    if isinstance(exc, httpx.ConnectError):
        return _connect_error_type(exc)
    if isinstance(exc, httpx.ProxyError):
        return UpstreamConnectError, "destination_unavailable"
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return UpstreamConfigError, "proxy_configuration_error"
    if isinstance(exc, httpx.DecodingError):
        return UpstreamProtocolError, "http_response_content_coding"
    if isinstance(exc, httpx.RemoteProtocolError):
        text = str(exc).lower()
        if _was_reset(exc):
            return UpstreamProtocolError, "connection_terminated"
        if "incomplete" in text or "complete message body" in text:
            return UpstreamProtocolError, "http_response_incomplete"
        if "disconnected without sending" in text:
            return UpstreamProtocolError, "connection_terminated"
        return UpstreamProtocolError, "http_protocol_error"
    if isinstance(exc, httpx.ReadError | httpx.WriteError | httpx.CloseError):
        return UpstreamProtocolError, "connection_terminated"
    if isinstance(exc, httpx.LocalProtocolError):
        return UpstreamConfigError, "proxy_internal_error"
    if isinstance(exc, httpx.TooManyRedirects):
        return UpstreamProtocolError, "http_protocol_error"
    if not isinstance(exc, httpx.HTTPError):
        named = _by_name(exc)
        if named is not _NOT_FOUND:
            return named
    # http.client's (under requests/urllib3): RemoteDisconnected is also a reset.
    if isinstance(exc, http.client.IncompleteRead):
        return UpstreamProtocolError, "http_response_incomplete"
    if isinstance(exc, http.client.RemoteDisconnected):
        return UpstreamProtocolError, "connection_terminated"
    if isinstance(exc, http.client.HTTPException):
        return UpstreamProtocolError, "http_protocol_error"
    if isinstance(exc, ssl.SSLError | socket.gaierror | ConnectionRefusedError) or (
        isinstance(exc, OSError) and exc.errno in _UNROUTABLE
    ):
        return _connect_error_type(exc)
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout, "http_response_timeout"
    if isinstance(exc, OverflowError) and "port must be" in str(exc):
        # httpx does not range-check URL ports. On asyncio, connect() raises this and it
        # escapes httpx unmapped, inside anyio's exception group; the sync backend instead
        # lets getaddrinfo wrap the port modulo 65536 and connects somewhere else.
        return UpstreamConfigError, "proxy_configuration_error"
    return None


def classify(exc: BaseException) -> tuple[type[UpstreamError], str]:
    """Name a transport failure: the exception class to raise and the RFC 9209 error type.

    Accepts httpx exceptions (and what they wrap) and plain ``OSError`` / ``ssl`` errors.
    An exception group (``asyncio.TaskGroup``, anyio), or any exception raised ``from`` one
    of those, is named after the nearest failure inside it that says more. Anything
    unrecognised is an ``http_protocol_error``: we know the upstream exchange failed but
    not how, and 502 is the honest answer.
    """
    for inner in _chain(exc):
        found = _classify_one(inner)
        if found is not None:
            return found
    if _was_reset(exc):
        return UpstreamProtocolError, "connection_terminated"
    return UpstreamProtocolError, "http_protocol_error"


def from_exception(
    exc: BaseException,
    *,
    upstream: str | None = None,
    attempts: int = 1,
    elapsed: float = 0.0,
) -> UpstreamError:
    """Build the classified :class:`UpstreamError` for ``exc`` (the caller chains it).

    When ``exc`` is an :class:`UpstreamError` already, or holds one (an exception-group
    member, or a cause), that error is returned as it is, with its status and
    ``retry_after``: re-raise it rather than chaining it to ``exc``.
    The message is for logs and debug pages only; production pages never show it.
    """
    for inner in _chain(exc):
        if isinstance(inner, UpstreamError):
            return inner
    cls, proxy_error = classify(exc)
    detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return cls(
        f"upstream {upstream or '?'} failed ({proxy_error}): {detail}",
        proxy_error=proxy_error,
        upstream=upstream,
        attempts=attempts,
        elapsed=elapsed,
    )
