"""Event hooks: typed events for what the guard decides, and the hub that delivers them.

Every event is a frozen dataclass (with slots) subclassing :class:`Event`. Register a
callback on the Guard for one event class, or for :class:`Event` to hear them all::

    unsubscribe = guard.on(gg.events.CallEnded, lambda event: print(event.outcome))
    ...
    unsubscribe()

Callbacks run synchronously, on the thread (or asyncio task) that made the decision, so
they must be quick and must not block: count, set a gauge, start a span. A callback that
raises never breaks the call: its first failure is logged with the traceback, later ones
are counted silently (``Hooks.failures``).

Events are emitted by the decision cores (the call core, the breaker, the inbound core),
so every driver and adapter emits the same ones. With no callback registered, emitting
costs one ``is None`` test at each point: nothing is built.

==========================  ==========================================================
event                       when
==========================  ==========================================================
:class:`AttemptStarted`     an attempt is admitted and about to be sent
:class:`AttemptEnded`       the attempt answered, failed or was cancelled
:class:`RetryScheduled`     the attempt failed and another one follows after ``wait``
:class:`CallGivenUp`        the call failed and will not be retried (``reason`` says why)
:class:`CallEnded`          the call is over: success, failure, rejected or cancelled
:class:`BreakerRejected`    the breaker refused an attempt (open, or half-open and full)
:class:`BreakerTransitioned` a breaker changed state
:class:`BulkheadRejected`   the outbound bulkhead had no slot for the call
:class:`BudgetExhausted`    a retry was refused because the retry budget is spent
:class:`InboundAdmitted`    an inbound request took a shedding slot (it runs the app)
:class:`InboundReleased`    ... and gave it back
:class:`InboundShed`        an inbound request was refused before the app ran
:class:`GatewayErrorAnswered` an inbound request was answered (or aborted) as a gateway error
==========================  ==========================================================
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias, TypeVar

if TYPE_CHECKING:
    from .errors import UpstreamError

__all__ = [
    "AttemptEnded",
    "AttemptOutcome",
    "AttemptStarted",
    "BreakerRejected",
    "BreakerTransitioned",
    "BudgetExhausted",
    "BulkheadRejected",
    "CallEnded",
    "CallGivenUp",
    "CallOutcome",
    "Carrier",
    "Event",
    "GatewayErrorAnswered",
    "Hooks",
    "InboundAdmitted",
    "InboundReleased",
    "InboundShed",
    "RetryScheduled",
]

logger = logging.getLogger("gateway_guard")

AttemptOutcome: TypeAlias = Literal["success", "failure", "cancelled"]
CallOutcome: TypeAlias = Literal["success", "failure", "rejected", "cancelled"]


class Carrier(Protocol):
    """A request's headers, case-insensitive and writable: ``httpx.Headers`` and others."""

    def get(self, key: str, /) -> str | None: ...

    def __contains__(self, key: object, /) -> bool: ...

    def __setitem__(self, key: str, value: str, /) -> None: ...


@dataclass(frozen=True, slots=True)
class Event:
    """The base of every event: ``guard.on(Event, fn)`` hears them all."""


_T = TypeVar("_T")


def _fast_init(cls: type[_T]) -> type[_T]:
    """Replace a frozen dataclass's ``__init__`` by one that sets each slot through its
    descriptor: the generated one looks ``object.__setattr__`` up for every field. Half
    the cost of building an event (bench/observability.py --instructions); still frozen.
    """
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    setters = {f"_set{i}": cls.__dict__[name].__set__ for i, name in enumerate(names)}
    body = "".join(f"    _set{i}(self, {name})\n" for i, name in enumerate(names))
    exec(f"def __init__(self, {', '.join(names)}):\n{body}", setters)
    init = setters["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    cls.__init__ = init  # type: ignore[method-assign]
    return cls


# --- outbound calls ------------------------------------------------------------------------
# ``call_id`` tells the events of one call apart from those of calls running at the same
# time (unique while the call runs); ``route`` is the inbound route's name, or None.


@_fast_init
@dataclass(frozen=True, slots=True)
class AttemptStarted(Event):
    """An attempt was admitted and is about to be sent. ``attempt`` counts from 1.

    ``headers`` are the request's headers, case-insensitive and writable until it is
    sent: a tracing hook injects its trace context there.
    """

    upstream: str
    route: str | None
    method: str
    attempt: int
    call_id: int
    headers: Carrier = field(repr=False, compare=False)


@_fast_init
@dataclass(frozen=True, slots=True)
class AttemptEnded(Event):
    """An attempt is over: ``success`` (an answer that is not a failure status),
    ``failure`` (a failure status, or an error classified as ``proxy_error``) or
    ``cancelled`` (no answer we can judge). ``duration`` in seconds."""

    upstream: str
    route: str | None
    method: str
    attempt: int
    call_id: int
    outcome: AttemptOutcome
    duration: float
    status: int | None
    proxy_error: str | None


@_fast_init
@dataclass(frozen=True, slots=True)
class RetryScheduled(Event):
    """Attempt ``attempt`` failed; attempt ``attempt + 1`` follows after ``wait`` seconds."""

    upstream: str
    route: str | None
    method: str
    attempt: int
    call_id: int
    wait: float
    status: int | None
    proxy_error: str | None


@_fast_init
@dataclass(frozen=True, slots=True)
class CallGivenUp(Event):
    """The call failed and is not retried. ``reason``: ``probe`` (a half-open probe is
    one attempt), or the retry rule that said no (:mod:`gateway_guard.retry`):
    ``attempts_exhausted``, ``not_retryable``, ``non_idempotent``, ``streaming_body``,
    ``retry_after_too_long``, ``deadline``, ``budget``."""

    upstream: str
    route: str | None
    method: str
    call_id: int
    attempts: int
    reason: str
    duration: float
    status: int | None
    proxy_error: str | None


@_fast_init
@dataclass(frozen=True, slots=True)
class CallEnded(Event):
    """The call is over. ``outcome``: ``success``, ``failure`` (given up, or the deadline
    ran out), ``rejected`` (its breaker refused it) or ``cancelled``. ``duration`` in
    seconds from the call's start; ``attempts`` sent (0 when the first was refused).

    A success whose body is streamed ends when its headers arrive.
    """

    upstream: str
    route: str | None
    method: str
    call_id: int
    outcome: CallOutcome
    attempts: int
    duration: float
    status: int | None
    proxy_error: str | None


@_fast_init
@dataclass(frozen=True, slots=True)
class BreakerRejected(Event):
    """The breaker refused attempt ``attempt`` of a call; ``state`` is the breaker's
    (``open``, ``half_open`` with every probe slot taken, ``forced_open``)."""

    upstream: str
    route: str | None
    method: str
    call_id: int
    attempt: int
    state: str
    retry_after: float | None


@_fast_init
@dataclass(frozen=True, slots=True)
class BreakerTransitioned(Event):
    """A breaker changed state (``CircuitBreaker.subscribe``'s ``Transition``).

    ``old`` and ``new`` are state values (``closed``, ``open``, ``half_open``,
    ``forced_open``, ``disabled``); ``at`` is wall-clock time (Unix seconds).
    """

    upstream: str
    old: str
    new: str
    reason: str
    at: float


@_fast_init
@dataclass(frozen=True, slots=True)
class BulkheadRejected(Event):
    """The upstream's bulkhead had no slot (or none within ``max_wait``): no attempt made."""

    upstream: str
    route: str | None
    retry_after: float | None


@_fast_init
@dataclass(frozen=True, slots=True)
class BudgetExhausted(Event):
    """A retry of the call was refused because the upstream's retry budget is spent."""

    upstream: str
    route: str | None
    method: str
    call_id: int
    attempt: int


# --- inbound requests ----------------------------------------------------------------------
# ``route`` is the matched route's name, or None for a request no route matched.


@_fast_init
@dataclass(frozen=True, slots=True)
class InboundAdmitted(Event):
    """An inbound request took a shedding slot and runs the app."""

    route: str | None


@_fast_init
@dataclass(frozen=True, slots=True)
class InboundReleased(Event):
    """An admitted inbound request gave its slot back (the response is done)."""

    route: str | None


@_fast_init
@dataclass(frozen=True, slots=True)
class InboundShed(Event):
    """An inbound request was refused before the app ran. ``reason``: ``capacity`` (no
    slot and no room in the queue), ``queue_timeout``, ``evicted`` (by a higher-priority
    request) or ``dependency_down`` (``upstream``'s breaker is open)."""

    route: str | None
    reason: str
    priority: str
    upstream: str | None
    retry_after: float | None


@_fast_init
@dataclass(frozen=True, slots=True)
class GatewayErrorAnswered(Event):
    """An inbound request was answered with our gateway error page, or aborted with a
    gateway error after its response had started (``started``).

    ``request_id`` is the reference a visitor quotes from the page. ``error`` is the
    exception itself (never shown to visitors).
    """

    request_id: str
    route: str | None
    upstream: str | None
    status: int
    proxy_error: str | None
    received_status: int | None
    attempts: int
    elapsed: float
    started: bool
    error: UpstreamError = field(repr=False, compare=False)


# --- the hub -------------------------------------------------------------------------------

E = TypeVar("E", bound=Event)
Callback: TypeAlias = Callable[[Any], object]
# A call's end without the event: CallEnded's fields, positionally, in its order.
CallEndCallback: TypeAlias = Callable[
    [str, "str | None", str, int, CallOutcome, int, float, "int | None", "str | None"], object
]


class _CallEndFields:
    """The key of the callbacks that take a call's end as CallEnded's fields."""


_CALL_ENDED_FIELDS = tuple(f.name for f in dataclasses.fields(CallEnded))


class Hooks:
    """The callbacks of one Guard, by event class. Registering is thread-safe; emitting
    reads one dict that is replaced, never changed, so it takes no lock.

    ``on_change`` is called (with the lock held) whenever the first callback is added or
    the last one removed, so the emitters can switch themselves on or off.

    ``call_ended`` is what the call core calls with CallEnded's fields at a call's
    end, None while nothing hears it: it builds the event only for the callbacks that
    take events, not for the package's own that take its fields (metrics, tracing).
    ``each_attempt`` says a callback hears AttemptStarted or AttemptEnded: without one,
    the call core skips its per-attempt reporting on a success.
    """

    __slots__ = (
        "_by_class",
        "_dispatch",
        "_ended",
        "_failed",
        "_lock",
        "_on_change",
        "call_ended",
        "each_attempt",
        "failures",
    )

    call_ended: CallEndCallback | None
    each_attempt: bool

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self._lock = threading.Lock()
        # By event class, and the fields' callbacks under _CallEndFields.
        self._by_class: dict[type[Any], tuple[Callable[..., object], ...]] = {}
        # For each concrete event class, the callbacks of it and of its base classes.
        self._dispatch: dict[type[Event], tuple[Callback, ...]] = {}
        self._ended: tuple[Callable[..., object], ...] = ()
        self.call_ended = None
        self.each_attempt = False
        self._on_change = on_change
        # Callbacks that raised: the first time is logged, every time is counted.
        self._failed: set[int] = set()
        self.failures = 0

    def __bool__(self) -> bool:
        return bool(self._by_class)

    def on(self, event: type[E], callback: Callable[[E], object]) -> Callable[[], None]:
        """Call ``callback(event)`` for every event of class ``event`` (or a subclass).

        Returns a function that unsubscribes it (calling it again does nothing).
        """
        if not (isinstance(event, type) and issubclass(event, Event)):
            raise TypeError(f"expected an Event class from gateway_guard.events, got {event!r}")
        if not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        return self._subscribe(event, callback)

    def _on_call_end(self, callback: CallEndCallback) -> Callable[[], None]:
        """Call ``callback`` with CallEnded's fields at every call's end, and build no
        event for it (the package's own hot hooks). Returns the unsubscribe function.

        For metrics and the tracing probe: -9,300 instructions a call, building CallEnded
        alone 7,400 (712,300 -> 703,000 in bench/observability.py --instructions,
        2026-12-07). A callback here must be quick; one that raises is logged once.
        """
        return self._subscribe(_CallEndFields, callback)

    def _subscribe(self, key: type[Any], callback: Callable[..., object]) -> Callable[[], None]:
        with self._lock:
            was = bool(self._by_class)
            self._by_class[key] = (*self._by_class.get(key, ()), callback)
            self._rebuild(was)
        done = False

        def unsubscribe() -> None:
            nonlocal done
            with self._lock:
                if done:
                    return
                done = True
                was = bool(self._by_class)
                callbacks = list(self._by_class.get(key, ()))
                callbacks.remove(callback)
                if callbacks:
                    self._by_class[key] = tuple(callbacks)
                else:
                    del self._by_class[key]
                self._rebuild(was)

        return unsubscribe

    def _rebuild(self, was: bool) -> None:
        dispatch: dict[type[Event], tuple[Callback, ...]] = {}
        for cls in _all_events():
            found: tuple[Callback, ...] = ()
            for base in cls.__mro__:
                found += self._by_class.get(base, ())
            if found:
                dispatch[cls] = found
        self._dispatch = dispatch
        self.each_attempt = AttemptStarted in dispatch or AttemptEnded in dispatch
        self._ended = self._by_class.get(_CallEndFields, ())
        if self._ended or CallEnded in dispatch:
            self.call_ended = self._call_end_dispatcher()
        else:
            self.call_ended = None
        now = bool(self._by_class)
        if now != was and self._on_change is not None:
            self._on_change(now)

    def wants(self, event: type[Event]) -> bool:
        """Whether any callback hears ``event`` (so building it is worth it)."""
        return event in self._dispatch

    def emit(self, event: Event) -> None:
        """Deliver ``event`` to its callbacks; one that raises is logged once and skipped."""
        for callback in self._dispatch.get(type(event), ()):
            try:
                callback(event)
            except Exception:
                self._failure(callback, type(event))

    def _call_end_dispatcher(self) -> CallEndCallback:
        """One function for the current callbacks of a call's end: each fields callback
        called by name, each in its own try, then the event if some callback takes it.

        Made again whenever the callbacks change, so a call pays no loop and no lookup
        of ours (-1,300 instructions a call against a loop over them, for metrics and
        the tracing probe, under valgrind, 2026-12-07).
        """
        fields = ", ".join(_CALL_ENDED_FIELDS)
        namespace: dict[str, Any] = {"_failure": self._failure, "_CallEnded": CallEnded}
        body = []
        for i, callback in enumerate(self._ended):
            namespace[f"_c{i}"] = callback
            body.append(
                f"    try:\n        _c{i}({fields})\n"
                f"    except Exception:\n        _failure(_c{i}, _CallEnded)\n"
            )
        if CallEnded in self._dispatch:
            namespace["_emit"] = self.emit
            body.append(f"    _emit(_CallEnded({fields}))\n")
        exec(f"def call_ended({fields}):\n{''.join(body)}", namespace)
        ended: CallEndCallback = namespace["call_ended"]
        return ended

    def _failure(self, callback: Callable[..., object], event: type[Event]) -> None:
        self.failures += 1
        key = id(callback)
        if key in self._failed:
            return
        if len(self._failed) < 1024:  # bounded: callbacks are few, ids could be reused
            self._failed.add(key)
        logger.exception(
            "gateway_guard event hook %r failed on %s; it stays registered, and its "
            "further failures are not logged",
            callback,
            event.__name__,
        )


def _all_events() -> list[type[Event]]:
    found: list[type[Event]] = []
    todo: list[type[Event]] = [Event]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found
