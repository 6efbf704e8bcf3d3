"""The aiohttp driver of the call core: a client middleware, and a guarded session.

aiohttp (3.12+) lets a ``ClientSession`` take middlewares that wrap every request and may
call the next handler more than once: the native seam for retries. :class:`GuardedMiddleware`
follows the call core's protocol (see :mod:`gateway_guard._call`) as the httpx drivers do
(``transport.py``), and adds only the aiohttp glue: the request's body kind, the
classification of aiohttp's exceptions (``errors.from_exception``, which knows them by
name) and a watch on the response body.

Deadlines: each attempt ends after its connect and read timeouts (to the response's
headers), or at the call's deadline if sooner (the tighter of its own and the inbound
request's); a session's own ``ClientTimeout`` still applies too (``guard.aiohttp_session``
sets ``sock_connect`` from the policy). The body of a response handed over is watched until
it ends: at the deadline a body still arriving is cut off (its reader raises
:class:`UpstreamTimeout`), so a call ends at its deadline however the upstream paces its
bytes. One watchdog per event loop keeps all of these (:class:`_Watchdog`).

Its outcome is settled when the body ends, like the httpx drivers' ``WRAP``: when aiohttp
releases or closes the response's connection, the body either reached its end (a
success), broke off (a failure; the reader gets aiohttp's own error, which the inbound
adapters answer as a gateway error), or was given up early (says nothing of the upstream).

Imported only when asked for: ``import gateway_guard`` never imports aiohttp.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import ClientSession as ClientSession  # re-exported for Guard's annotations
from aiohttp import payload

from ._call import RAISE, WRAP, Call, shed
from .errors import LoadShedError, UpstreamError, UpstreamTimeout, from_exception

if TYPE_CHECKING:
    from aiohttp import ClientRequest, ClientResponse
    from aiohttp.client_middlewares import ClientHandlerType

    from .guard import UpstreamRuntime

__all__ = ["GuardedMiddleware", "session"]

# What the next handler raises for the network (anything else is ours or the app's).
_TRANSPORT_ERRORS = (aiohttp.ClientError, OSError)
# Raised before a byte of the request is written: safe to retry for any method.
_NEVER_SENT = (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError)
_MAX_ERROR_BODY = 64 * 1024
_MAX_DRAIN = 64 * 1024


def _deadline_error(call: Call) -> UpstreamTimeout:
    name = call.rt.name
    return UpstreamTimeout(
        f"deadline of upstream {name!r} exhausted",
        proxy_error="http_response_timeout",
        upstream=name,
    )


def _streaming(request: ClientRequest) -> bool:
    body = request.body
    return not isinstance(body, payload.BytesPayload) and bool(getattr(body, "size", 0) != 0)


class GuardedMiddleware:
    """An aiohttp client middleware that guards every request to one upstream::

    session = aiohttp.ClientSession(middlewares=(guard.aiohttp_middleware("payments"),))
    """

    __slots__ = ("_rt",)

    def __init__(self, runtime: UpstreamRuntime) -> None:
        self._rt = runtime

    async def __call__(self, request: ClientRequest, handler: ClientHandlerType) -> ClientResponse:
        rt = self._rt
        fast = rt.fail_fast
        if fast is not None:
            # The fail-fast bulkhead by TokenLimiter's inline protocol, as in transport.py.
            try:
                fast.tokens.pop()
            except IndexError:
                raise shed(rt, fast.refused()) from None
        else:
            try:
                await rt.bulkhead.acquire_async()
            except LoadShedError as exc:
                raise shed(rt, exc) from None
        try:
            call = Call(rt, request.method, request.headers, _streaming(request))
            dog = _watchdog(asyncio.get_running_loop())
            task = asyncio.current_task()
            while True:
                # The attempt ends after its connect and read timeouts, or at the call's
                # deadline if sooner: the loop's watchdog cancels this task then (see
                # _Watchdog for why not asyncio.timeout, aiohttp's sock_read or a timer each).
                limit = rt.clock() + call.connect_timeout + call.read_timeout
                cut = _Cut(rt, min(limit, call.deadline_at), task)
                dog.watch(cut)
                try:
                    response = await handler(request)
                except _TRANSPORT_ERRORS as exc:
                    error: UpstreamError = from_exception(exc, upstream=rt.name)
                    wait = call.failed(error, not isinstance(exc, _NEVER_SENT))
                    if wait < 0.0:
                        raise error from exc
                    if wait > 0.0:
                        await asyncio.sleep(wait)
                    call.admit()
                    continue
                except asyncio.CancelledError as exc:
                    if not cut.fired:
                        call.cancelled()
                        raise
                    task.uncancel()  # type: ignore[union-attr]  # our own cancel, consumed
                    if cut.at >= call.deadline_at:
                        error = _deadline_error(call)
                    else:
                        error = UpstreamTimeout(
                            f"upstream {rt.name!r} did not answer within the attempt's timeouts",
                            proxy_error="connection_read_timeout",
                            upstream=rt.name,
                        )
                    wait = call.failed(error, True)
                    if wait < 0.0:
                        raise error from exc
                    if wait > 0.0:
                        await asyncio.sleep(wait)
                    call.admit()
                    continue
                except BaseException:
                    call.cancelled()
                    raise
                finally:
                    dog.forget(cut)
                outcome = call.answered(response.status, response.headers, False)
                if outcome < 0.0:
                    break
                await _drain(response, call)
                if outcome > 0.0:
                    await asyncio.sleep(outcome)
                call.admit()
        finally:
            if fast is not None:
                fast.tokens.append(None)
                fast.released += 1
            else:
                rt.bulkhead.release()
        if outcome == WRAP:
            _watch(response, call, dog)
        elif outcome == RAISE:
            error = call.status_error()
            await _read_capped(response, call)
            error.response = response  # type: ignore[assignment]
            raise error
        return response


# --- deadlines -----------------------------------------------------------------------------


class _Cut:
    """An attempt in flight: cancelled by the watchdog at the call's deadline."""

    __slots__ = ("at", "fired", "rt", "task")

    def __init__(self, rt: UpstreamRuntime, at: float, task: asyncio.Task[Any] | None) -> None:
        self.rt = rt
        self.at = at
        self.task = task
        self.fired = False

    def fire(self) -> None:
        if self.task is not None:
            self.fired = True
            self.task.cancel()


class _Watchdog:
    """One ticking timer per event loop for every guarded attempt and body on it.

    A timer per call (asyncio.timeout() or call_later) costs a heap push, and a cancelled
    one stays in the loop's heap until enough pile up, every later push and pop paying
    Python-level comparisons for it: +66,000 instructions a call against bare aiohttp's
    327,000 in bench/clients.py --instructions, 2026-12-07. Here a call costs a dict insert
    and delete; the tick (every ``TICK`` s, only while something is watched) ends what is
    due, so a deadline is kept to within one tick.
    """

    TICK = 0.02

    __slots__ = ("_handle", "_watched")

    def __init__(self) -> None:
        # No reference to the loop (it keys the registry weakly): each runs on the loop.
        self._watched: dict[int, _Cut | _BodyWatch] = {}
        self._handle: asyncio.TimerHandle | None = None

    def watch(self, item: _Cut | _BodyWatch) -> None:
        self._watched[id(item)] = item
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_later(self.TICK, self._tick)

    def forget(self, item: _Cut | _BodyWatch) -> None:
        self._watched.pop(id(item), None)

    def _tick(self) -> None:
        due = [item for item in self._watched.values() if item.rt.clock() >= item.at]
        for item in due:
            self._watched.pop(id(item), None)
            item.fire()
        if self._watched:
            self._handle = asyncio.get_running_loop().call_later(self.TICK, self._tick)
        else:
            self._handle = None


_watchdogs: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Watchdog] = (
    weakref.WeakKeyDictionary()
)


def _watchdog(loop: asyncio.AbstractEventLoop) -> _Watchdog:
    dog = _watchdogs.get(loop)
    if dog is None:
        dog = _watchdogs[loop] = _Watchdog()
    return dog


def _watch(response: ClientResponse, call: Call, dog: _Watchdog) -> None:
    """Settle ``call`` when the body of ``response`` ends, and cut it off at the deadline."""
    connection = response.connection
    if connection is None:
        # The body was whole (and the connection released) before the headers were
        # handed over: the common case for small bodies, settled at once, not watched.
        _settle(response, call)
        return
    watch = _BodyWatch(response, call, dog)
    dog.watch(watch)
    connection.add_callback(watch.released)


def _settle(response: ClientResponse, call: Call) -> None:
    content = response.content
    exc = content.exception()
    if exc is None and content.is_eof():
        call.body_done()
    elif isinstance(exc, UpstreamError):
        call.body_failed(exc)
    elif isinstance(exc, aiohttp.ClientPayloadError):
        call.body_failed(from_exception(exc, upstream=call.rt.name))
    else:
        call.cancelled()  # released or closed before the end: nothing learned


class _BodyWatch:
    """A body still arriving: settled when aiohttp releases or closes its connection (at
    its end, when it breaks off, or when the caller gives it up), cut off at the deadline."""

    __slots__ = ("_call", "_dog", "_loop", "_open", "_response", "at", "rt")

    def __init__(self, response: ClientResponse, call: Call, dog: _Watchdog) -> None:
        self._response = response
        self._call = call
        self._dog = dog
        self._open = True
        self._loop = asyncio.get_running_loop()
        self.rt = call.rt
        self.at = call.deadline_at

    def released(self) -> None:
        # aiohttp calls this from release()/close(), which its finaliser may call for a
        # response dropped unread: the breaker's lock must not be taken here, so the
        # outcome is settled on the loop's next turn (call_soon takes no lock).
        if not self._open:
            return
        self._open = False
        self._dog.forget(self)
        try:
            self._loop.call_soon(_settle, self._response, self._call)
        except RuntimeError:  # the loop is closed: only the lock-free report is left
            self._call.dropped()

    def fire(self) -> None:
        content = self._response.content
        if self._open and not content.is_eof():
            content.set_exception(_deadline_error(self._call))
            self._response.close()  # the connection goes, and released() hears of it


async def _drain(response: ClientResponse, call: Call) -> None:
    """Read (a small) failure body before retrying, so the connection can be reused."""
    try:
        async with asyncio.timeout(max(call.deadline_at - call.rt.clock(), 0.0)):
            size = 0
            while size <= _MAX_DRAIN:
                chunk = await response.content.readany()
                if not chunk:
                    break
                size += len(chunk)
    except (*_TRANSPORT_ERRORS, TimeoutError):
        pass  # the connection is gone anyway; the retry opens another
    finally:
        response.release()


async def _read_capped(response: ClientResponse, call: Call) -> None:
    """Keep up to _MAX_ERROR_BODY of a failure body (``await response.read()`` gives it)."""
    chunks: list[bytes] = []
    try:
        async with asyncio.timeout(max(call.deadline_at - call.rt.clock(), 0.0)):
            size = 0
            while size < _MAX_ERROR_BODY:
                chunk = await response.content.readany()
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except (*_TRANSPORT_ERRORS, TimeoutError):
        pass  # what arrived is kept; a failure body is evidence, not data
    finally:
        response._body = b"".join(chunks)[:_MAX_ERROR_BODY]
        response.release()


def session(runtime: UpstreamRuntime, **kwargs: Any) -> ClientSession:
    """A new ``aiohttp.ClientSession`` for the upstream of ``runtime``: ``base_url`` and the
    connect and read timeouts from its policy, and the guard as its first middleware."""
    policy = runtime.policy
    if policy.base_url is not None:
        kwargs.setdefault("base_url", policy.base_url)
    # The read timeout and the deadline are the middleware's (a watchdog per loop);
    # aiohttp's sock_read would add a timer rescheduled on every chunk of every response
    # (+52,000 instructions a call in bench/clients.py --instructions, 2026-12-07).
    kwargs.setdefault(
        "timeout", aiohttp.ClientTimeout(total=None, sock_connect=policy.connect_timeout)
    )
    middlewares = (GuardedMiddleware(runtime), *kwargs.pop("middlewares", ()))
    return ClientSession(middlewares=middlewares, **kwargs)
