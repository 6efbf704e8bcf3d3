"""The fleet store: one view of each upstream's breaker and retry budget across processes.

``[state] backend = "redis"`` makes every process and host that shares a ``key_prefix``
behave as one fleet, without a Redis round trip on a call's path:

- **Counts travel in the background.** Each process counts its calls locally, as in local
  mode. A background thread shares this process's window counts (breaker) and budget
  counts every ``TICK`` while anything is failing or retrying, and once a ``HEARTBEAT``
  otherwise, and reads the others' in the same script call. The breaker adds the others'
  counts to its own when it judges its rates (:meth:`CircuitBreaker.set_peer_counts`), so
  the opening decision is the fleet's *aggregated failure rate*: one sick process among
  healthy ones is diluted by their successes and does not open the fleet's breaker,
  while a failing upstream reaches ``min_calls`` fleet-wide about as fast as it would in
  one process. (A quorum of processes was the alternative; it ignores how much traffic
  each process sees, and needs ``min_calls`` failures in several processes before any
  opens, which is the N-fold cost we are here to remove.)
- **Decisions travel at once.** The breaker decides (``breaker.py`` is the one core);
  a transition it decides is published with a compare-and-set on the record's
  generation (``TRANSITION``) and pushed to every process over pub/sub, which adopt it
  (:meth:`CircuitBreaker.adopt`). A slow poll (every ``HEARTBEAT``) and a full re-read on
  every reconnect catch what pub/sub missed.
- **Half-open is fleet-wide.** A probe takes a token with one atomic script call
  (``TAKE_PROBE``): exactly ``half_open_calls`` tokens per spell across the fleet. That
  round trip is on the probe's path, and only there: probes are rare, and a closed
  breaker's calls never reach this module. Probe outcomes are added up in Redis
  (``REPORT``) and handed back to the breaker, which judges them.
- **One clock.** Open times are Redis server time (``TIME`` inside the scripts), turned
  into each process's monotonic clock on arrival, so hosts' clocks never disagree.
- **Redis trouble never reaches a request.** Down at startup or mid-flight: local state,
  one warning, reconnection with capped backoff, and a resync on return (this process's
  decisions made meanwhile are published then; the first to publish wins, the others
  adopt it). Slow: every command has a bounded timeout and runs on the background
  thread, except a probe's token, which falls back to a local decision on any error.
  Keys flushed: the first process to notice writes its state back.

Threads, not asyncio: redis-py's sync client on two background threads serves sync and
async apps alike, and an event loop never awaits Redis (only a probe's token is asked
for inline, bounded at ``PROBE_TIMEOUT_CAP``).

The status page's fleet view (docs/status-page.md) rides on the same background work:

- **Who is alive, and their numbers.** Each process's counts entry also carries its
  bulkheads' calls in flight, and its field name (``host:pid:random``) says who wrote it.
  The sync thread keeps what its last script call read (:meth:`FleetStore.status`), so the
  page's fleet table costs no Redis command; its age is shown, and past ``PEER_TTL_MS``
  (or with Redis away) the page says the fleet data is unavailable.
- **Recent gateway errors, fleet-wide.** :class:`~gateway_guard._recent.RecentErrors` hands
  each record to a bounded queue here (an append: no lock, no I/O on the error path); the
  sync thread sends what is queued every ``TICK`` in one script call (``SHARE_ERRORS``)
  into a capped set ordered by time and an index by reference. The status page reads them on an
  operator's request only, one command bounded by ``command_timeout``
  (:meth:`FleetStore.fleet_errors`, :meth:`FleetStore.find_error`), and not at all while
  the store is down or just timed out.

Fork safety: gunicorn forks after the app may have built its Guard; a forked child makes
new connections, a new process id and its own threads (:func:`gateway_guard._fork`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from . import _fork
from ._schema import StateSettings
from .breaker import BreakerState, CircuitBreaker, Transition
from .retry import RetryBudget

if TYPE_CHECKING:
    from ._bulkhead import Limiter
    from ._recent import ErrorRecord, RecentErrors

__all__ = ["FleetStore", "FleetUpstream"]

logger = logging.getLogger("gateway_guard")

TICK = 0.1  # counts are shared at most this often, and only while something fails or retries
HEARTBEAT = 1.0  # otherwise once a second: the safety-net poll, and "I am alive" for the counts
PEER_TTL_MS = 5000  # a process silent this long is gone: its counts stop counting
MAX_BACKOFF = 1.0  # reconnection attempts back off to this, so a returning Redis is found fast
PROBE_TIMEOUT_CAP = 0.05  # a probe's token waits at most this, whatever command_timeout says
MAX_TASKS = 4096  # queued publications; transitions are rare, so this is never reached in use
ERRORS_KEPT = 512  # the fleet's recent gateway errors in Redis: as many as one process's ring
ERRORS_QUEUED = 512  # recorded here and not sent yet; past this the oldest are dropped (counted)
ERRORS_TTL = 86_400  # seconds: the error keys of a service that stopped go away
MAX_REFERENCE = 128  # a reference longer than a request id can be is never asked for

# Transitions decided here that the fleet must hear. Not "consecutive_timeouts" (the
# hung-upstream trigger judges this process's own attempts: one sick host must not open
# everyone's breaker), "open_elapsed" (each process derives it from the shared open time) or
# "fleet" (adopted, so already the fleet's).
PUBLISHED = frozenset(
    {
        "failure_rate",
        "slow_call_rate",
        "probes_failed",
        "probes_succeeded",
        "force_open",
        "force_closed",
        "disable",
        "reset",
    }
)
# An operator's action applies whatever the fleet decided meanwhile: no compare-and-set.
MANUAL = frozenset({"force_open", "force_closed", "disable", "reset"})

# KEYS: record, counts for each upstream. ARGV: me, ttl_ms, then one entry per upstream
# ("" to write nothing). Writes the entries stamped with server time, drops entries of
# processes gone silent, returns {now_ms, record, counts, record, counts, ...}.
SYNC = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[1]
local ttl = tonumber(ARGV[2])
local out = {tostring(now)}
for i = 1, #KEYS / 2 do
  local rec = KEYS[2 * i - 1]
  local cnt = KEYS[2 * i]
  local entry = ARGV[2 + i]
  if entry ~= '' then
    redis.call('HSET', cnt, me, entry .. '|' .. now)
    redis.call('PEXPIRE', cnt, ttl * 4)
  end
  local counts = redis.call('HGETALL', cnt)
  local live = {}
  for j = 1, #counts, 2 do
    local stamp = tonumber(string.match(counts[j + 1], '|(%d+)$') or '0')
    if now - stamp > ttl then
      redis.call('HDEL', cnt, counts[j])
    else
      live[#live + 1] = counts[j]
      live[#live + 1] = counts[j + 1]
    end
  end
  out[#out + 1] = redis.call('HGETALL', rec)
  out[#out + 1] = live
end
return out
"""

# KEYS: the errors (a sorted set by time), the index (reference -> entry). ARGV: how many
# to keep, TTL seconds, then (reference, time, record) triples. Entries are "time|record"
# (the time with the fractions as_json rounds away). Ordered by the records' own time,
# not by when each process got to share them, so the oldest are the ones trimmed. The
# index keeps the newest record of a reference; a trimmed one leaves it too, unless a
# newer record of its reference replaced it there.
SHARE_ERRORS = """
local cap = tonumber(ARGV[1])
for i = 3, #ARGV - 2, 3 do
  local entry = ARGV[i + 1] .. '|' .. ARGV[i + 2]
  redis.call('ZADD', KEYS[1], ARGV[i + 1], entry)
  local held = redis.call('HGET', KEYS[2], ARGV[i])
  if not held or (tonumber(string.match(held, '^([^|]*)|')) or 0) <= tonumber(ARGV[i + 1]) then
    redis.call('HSET', KEYS[2], ARGV[i], entry)
  end
end
local extra = redis.call('ZCARD', KEYS[1]) - cap
if extra > 0 then
  for _, old in ipairs(redis.call('ZRANGE', KEYS[1], 0, extra - 1)) do
    local ok, rec = pcall(cjson.decode, string.match(old, '^[^|]*|(.*)$') or '')
    if ok and type(rec) == 'table' and type(rec.reference) == 'string'
        and redis.call('HGET', KEYS[2], rec.reference) == old then
      redis.call('HDEL', KEYS[2], rec.reference)
    end
  end
  redis.call('ZREMRANGEBYRANK', KEYS[1], 0, extra - 1)
end
if redis.call('HLEN', KEYS[2]) > 2 * cap then
  redis.call('DEL', KEYS[2])  -- written by something else: start the index afresh
end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return math.max(extra, 0)
"""

# KEYS: record. ARGV: expected gen ("*": any, "new": only if missing), state, wait seconds,
# consecutive opens, channel, upstream, epoch for a new record. Returns {applied, record, now}.
TRANSITION = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local exists = redis.call('EXISTS', KEYS[1]) == 1
local gen = tonumber(redis.call('HGET', KEYS[1], 'gen') or '0')
local epoch = redis.call('HGET', KEYS[1], 'epoch') or ARGV[7]
if (ARGV[1] == 'new' and exists)
    or (ARGV[1] ~= '*' and ARGV[1] ~= 'new' and exists and tonumber(ARGV[1]) ~= gen) then
  return {0, redis.call('HGETALL', KEYS[1]), tostring(now)}
end
gen = gen + 1
local open_until = now + math.floor(tonumber(ARGV[3]) * 1000)
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', ARGV[2], 'gen', gen, 'epoch', epoch,
  'open_until', open_until, 'opens', ARGV[4], 'probes', 0, 'results', 0,
  'failures', 0, 'slow', 0, 'since', now)
redis.call('PUBLISH', ARGV[5], cjson.encode({u = ARGV[6], state = ARGV[2], gen = gen,
  epoch = epoch, open_until = open_until, opens = tonumber(ARGV[4]), now = now}))
return {1, redis.call('HGETALL', KEYS[1]), tostring(now)}
"""

# KEYS: record. ARGV: half_open_calls, probe timeout ms. 1: a token; 0: none left;
# -1: the fleet is not probing (no record, or closed/forced/disabled): decide locally.
# A spell whose tokens are all out for longer than a call can last (its probes' process
# died) hands out a fresh set, or the fleet would stay half-open for ever.
TAKE_PROBE = """
local rec = redis.call('HMGET', KEYS[1], 'state', 'open_until', 'probes', 'since')
local state = rec[1]
if not state then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local probes = tonumber(rec[3] or '0')
if state == 'open' then
  if now < tonumber(rec[2]) then return 0 end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probes', 0, 'results', 0,
    'failures', 0, 'slow', 0, 'since', now)
  probes = 0
elseif state ~= 'half_open' then
  return -1
elseif probes >= tonumber(ARGV[1]) and now - tonumber(rec[4] or '0') > tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'probes', 0, 'results', 0, 'failures', 0, 'slow', 0, 'since', now)
  probes = 0
end
if probes >= tonumber(ARGV[1]) then return 0 end
redis.call('HINCRBY', KEYS[1], 'probes', 1)
return 1
"""

# KEYS: record. ARGV: gen, "report" or "return", failed (0/1), slow (0/1).
# report: {results, failures, slow} of the spell so far; return: a token given back.
REPORT = """
local rec = redis.call('HMGET', KEYS[1], 'gen', 'state', 'probes')
if rec[2] ~= 'half_open' or tonumber(rec[1]) ~= tonumber(ARGV[1]) then return false end
if ARGV[2] == 'return' then
  if tonumber(rec[3] or '0') > 0 then redis.call('HINCRBY', KEYS[1], 'probes', -1) end
  return false
end
return {redis.call('HINCRBY', KEYS[1], 'results', 1),
  redis.call('HINCRBY', KEYS[1], 'failures', tonumber(ARGV[3])),
  redis.call('HINCRBY', KEYS[1], 'slow', tonumber(ARGV[4]))}
"""


@dataclass
class FleetUpstream:
    """What the store shares of one upstream: its breaker, its budget, and bookkeeping."""

    name: str
    breaker: CircuitBreaker
    budget: RetryBudget
    probe_timeout: float  # seconds a probe can take at most: the upstream's call deadline
    bulkhead: Limiter | None = None  # its calls in flight are shown on the status page
    record_key: str = ""
    counts_key: str = ""
    # The record (epoch, generation) this process last adopted or published.
    epoch: str = ""
    gen: int = 0
    last_entry: str = ""
    peers: tuple[int, int, int] = (0, 0, 0)
    # A transition this process decided while Redis was away, published on return:
    # "manual" (an operator's, which wins), "auto" (the breaker's own), or "".
    dirty: str = ""
    # The breaker's manual_seq when this process last published its state: an operator's
    # action taken since is not undone by adopting another process's decision.
    manual_seen: int = 0
    unsubscribe: Any = None
    active: bool = field(default=False)


@dataclass(frozen=True)
class _Entry:
    """One process's counts entry for one upstream, as the last sync read it."""

    gen: int
    calls: int
    failures: int
    slow: int
    in_flight: int | None  # None: written by a process that does not share it
    stamp: int  # Redis server time (ms) of the write


@dataclass(frozen=True)
class _View:
    """What the last sync read of the fleet: the status page's fleet table."""

    now_ms: int  # Redis server time of the read
    at: float  # time.monotonic() here at the read
    entries: dict[str, dict[str, _Entry]]  # upstream -> process id -> entry


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(value: str) -> _Entry | None:
    # gen|calls|failures|slow|budget calls|budget retries|recent calls|recent retries
    # [|in flight]|stamp: the stamp (added by SYNC) is always last.
    parts = value.split("|")
    if len(parts) not in (9, 10):
        return None
    try:
        return _Entry(
            gen=int(parts[0]),
            calls=int(parts[1]),
            failures=int(parts[2]),
            slow=int(parts[3]),
            in_flight=int(parts[8]) if len(parts) == 10 else None,
            stamp=int(parts[-1]),
        )
    except ValueError:
        return None


def _who(me: str) -> tuple[str, int | None, str]:
    """(host, pid, short id) of a process's field name ``host:pid:random``."""
    host, _, rest = me.rpartition(":")
    host, _, pid = host.rpartition(":")
    return host, int(pid) if pid.isdigit() else None, rest


def _load(raw: Any) -> dict[str, Any] | None:
    # An entry of SHARE_ERRORS: "time|record".
    try:
        record = json.loads(_text(raw).partition("|")[2])
    except (ValueError, UnicodeDecodeError):
        return None
    return record if isinstance(record, dict) else None


def _record(flat: Iterable[Any]) -> dict[str, str]:
    items = [_text(v) for v in flat]
    return dict(zip(items[::2], items[1::2], strict=True))


class FleetStore:
    """Shares breakers and budgets through Redis; see the module docstring.

    Build it with the upstreams, then :meth:`start`; :meth:`close` stops its threads.
    """

    def __init__(
        self,
        settings: StateSettings,
        service: str,
        upstreams: Iterable[FleetUpstream],
        recent: RecentErrors | None = None,
    ) -> None:
        self._settings = settings
        prefix = settings.key_prefix or f"gateway_guard:{service}"
        self._channel = f"{prefix}:events"
        self._errors_key = f"{prefix}:errors"
        self._error_index_key = f"{prefix}:errors:index"
        self._members: dict[str, FleetUpstream] = {}
        for member in upstreams:
            member.record_key = f"{prefix}:breaker:{member.name}"
            member.counts_key = f"{prefix}:counts:{member.name}"
            self._members[member.name] = member
        self._started = False
        self._init_process()
        _fork.register(self)
        for member in self._members.values():
            member.manual_seen = member.breaker.manual_seq
            member.unsubscribe = member.breaker.subscribe(self._on_transition)
            member.breaker.attach_fleet(self)
        self._recent = recent
        if recent is not None:
            recent.sink = self._error_recorded

    def _init_process(self) -> None:
        # Everything a process must have of its own (also re-made in a forked child).
        self._me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._resync = threading.Event()
        self._tasks: deque[tuple[str, FleetUpstream | None, Any]] = deque(maxlen=MAX_TASKS)
        self._up = False
        self._warned = False
        self._client: redis.Redis | None = None
        self._probe_client: redis.Redis | None = None
        # The status page's: its reads are an operator's, never a visitor's.
        self._page_client: redis.Redis | None = None
        self._page_pause_until = 0.0
        self._view: _View | None = None
        self._errors: deque[ErrorRecord] = deque(maxlen=ERRORS_QUEUED)
        self._unsent: list[ErrorRecord] = []  # the sync thread's own
        self._errors_dropped = 0
        self._threads: list[threading.Thread] = []
        self._scripts: dict[str, Any] = {}
        for member in self._members.values():
            member.epoch, member.gen, member.last_entry = "", 0, ""
            member.peers, member.dirty, member.active = (0, 0, 0), "", False

    def _after_fork(self) -> None:
        # A forked child shares the parent's sockets and has none of its threads.
        self._init_process()
        if self._started:
            self._started = False
            self.start()

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Connect in the background (a request never waits for it) and start sharing."""
        if self._started:
            return
        self._started = True
        for target, name in ((self._run, "sync"), (self._listen, "listen")):
            thread = threading.Thread(
                target=target, name=f"gateway-guard-fleet-{name}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def close(self) -> None:
        """Stop the threads and let go of the breakers (they are local again)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(5.0)
        self._threads = []
        self._started = False
        for member in self._members.values():
            if member.unsubscribe is not None:
                member.unsubscribe()
                member.unsubscribe = None
            member.breaker.attach_fleet(None)
            member.budget.set_peer_counts(0, 0, 0.0, 0.0)
        if self._recent is not None and self._recent.sink == self._error_recorded:
            self._recent.sink = None
        self._up = False
        self._view = None
        for client in (self._client, self._probe_client, self._page_client):
            if client is not None:
                client.close()

    @property
    def connected(self) -> bool:
        """Whether the store is sharing now (False: every process on its own)."""
        return self._up

    def _make_client(self, timeout: float, connect_timeout: float | None = None) -> redis.Redis:
        return redis.Redis.from_url(
            self._settings.redis_url,
            socket_connect_timeout=connect_timeout or self._settings.connect_timeout,
            socket_timeout=timeout,
            # Never retried inside redis-py (some versions retry with backoff by default):
            # this store has its own reconnection, and a probe must not wait for one.
            retry=Retry(NoBackoff(), 0),
            retry_on_timeout=False,
            health_check_interval=0,
        )

    def _clients(self) -> redis.Redis:
        client = self._client
        if client is None:
            client = self._client = self._make_client(self._settings.command_timeout)
            # A probe waits on this one: connecting is bounded as tightly as a command.
            cap = min(self._settings.command_timeout, PROBE_TIMEOUT_CAP)
            self._probe_client = self._make_client(cap, min(self._settings.connect_timeout, cap))
            timeout = self._settings.command_timeout
            self._page_client = self._make_client(
                timeout, min(self._settings.connect_timeout, timeout)
            )
            for name, lua in (
                ("sync", SYNC),
                ("transition", TRANSITION),
                ("take_probe", TAKE_PROBE),
                ("report", REPORT),
                ("share_errors", SHARE_ERRORS),
            ):
                self._scripts[name] = client.register_script(lua)
        return client

    # --- the breaker's hook (FleetHook) -----------------------------------------------------

    def take_probe(self, upstream: str) -> bool | None:
        if not self._up or self._probe_client is None:
            return None
        member = self._members[upstream]
        limit = member.breaker.policy.half_open_calls
        try:
            answer = self._scripts["take_probe"](
                keys=[member.record_key],
                args=[limit, int(member.probe_timeout * 1000)],
                client=self._probe_client,
            )
        except (RedisError, OSError) as exc:
            # Decide locally now; the background thread finds out what is wrong.
            self._task("check", member, repr(exc))
            return None
        answer = int(answer)
        return None if answer < 0 else answer == 1

    def probe_reported(self, upstream: str, failed: bool, slow: bool) -> None:
        member = self._members[upstream]
        self._task("report", member, (member.gen, int(failed), int(slow)))

    def probe_returned(self, upstream: str) -> None:
        member = self._members[upstream]
        self._task("return", member, member.gen)

    def manual(self, upstream: str, reason: str) -> None:
        state = self._members[upstream].breaker.state
        self._on_transition(Transition(upstream, state, state, reason, time.time()))

    def _on_transition(self, transition: Transition) -> None:
        # On the thread that made the change, after the breaker let go of its lock: only
        # queue it. Adopted changes ("fleet") are the fleet's already.
        if transition.reason not in PUBLISHED:
            return
        member = self._members.get(transition.upstream)
        if member is None:
            return
        if not self._up:
            _mark_dirty(member, transition.reason)
            return
        self._task("transition", member, transition)

    def _task(self, kind: str, member: FleetUpstream | None, payload: Any) -> None:
        self._tasks.append((kind, member, payload))
        self._wake.set()

    # --- recent gateway errors, fleet-wide --------------------------------------------------

    def _error_recorded(self, record: ErrorRecord) -> None:
        # RecentErrors.sink, on the error path (maybe in a finaliser): one append to a
        # bounded deque, which drops the oldest itself; no lock and no wake-up (the sync
        # thread looks every TICK). The drop count may miss one when two threads drop at
        # once: it is a hint, not a ledger.
        queue = self._errors
        if len(queue) == ERRORS_QUEUED:
            self._errors_dropped += 1
        queue.append(record)

    def _share_errors(self) -> None:
        queue = self._errors
        if not queue and not self._unsent:
            return
        # What a failed call could not send goes first, then the queue; the newest
        # ERRORS_QUEUED of them when there are more.
        batch, self._unsent = self._unsent, []
        for _ in range(ERRORS_QUEUED):
            try:
                batch.append(queue.popleft())
            except IndexError:
                break
        if len(batch) > ERRORS_QUEUED:
            self._errors_dropped += len(batch) - ERRORS_QUEUED
            batch = batch[-ERRORS_QUEUED:]
        args: list[Any] = [ERRORS_KEPT, ERRORS_TTL]
        for record in batch:
            shown = json.dumps(record.as_json(), separators=(",", ":"))
            args += [record.reference, repr(record.time), shown]
        try:
            self._scripts["share_errors"](
                keys=[self._errors_key, self._error_index_key], args=args, client=self._clients()
            )
        except (RedisError, OSError):
            self._unsent = batch  # sent again once Redis is back
            raise

    def _page_ready(self) -> redis.Redis | None:
        # Not while the store is down, nor for a while after a page read failed: an
        # operator reloading the page must not wait command_timeout each time (on an
        # ASGI server that wait holds the event loop).
        client = self._page_client
        if not self._up or client is None or time.monotonic() < self._page_pause_until:
            return None
        return client

    def _page_failed(self) -> None:
        self._page_pause_until = time.monotonic() + HEARTBEAT
        self._task("check", None, None)  # the sync thread finds out what is wrong

    def fleet_errors(self, count: int) -> list[dict[str, Any]] | None:
        """The fleet's newest ``count`` gateway errors, newest first, as
        :meth:`ErrorRecord.as_json` made them; None when Redis cannot say now.

        One command, bounded by ``command_timeout``; on an operator's request only."""
        client = self._page_ready()
        if client is None:
            return None
        try:
            raw = client.zrange(self._errors_key, 0, max(0, count - 1), desc=True)
        except (RedisError, OSError):
            self._page_failed()
            return None
        return [record for item in raw if (record := _load(item)) is not None]

    def find_error(self, reference: str) -> tuple[dict[str, Any] | None, bool]:
        """(the fleet's record of ``reference`` or None, whether Redis was asked): one
        command, bounded by ``command_timeout``."""
        if not reference or len(reference) > MAX_REFERENCE:
            return None, True
        client = self._page_ready()
        if client is None:
            return None, False
        try:
            raw = client.hget(self._error_index_key, reference)
        except (RedisError, OSError):
            self._page_failed()
            return None, False
        return (_load(raw) if raw is not None else None), True

    # --- the status page's fleet view --------------------------------------------------------

    def status(self, *, debug: bool) -> dict[str, Any]:
        """This process, the live processes and each upstream's fleet totals, from what the
        sync thread read last: no Redis command here.

        ``{"process": {...}, "fleet": {...}, "upstreams": {name: totals or None}}``; the
        totals add this process's live numbers to the others' of the same window (what the
        breaker judges). Hosts are named only with ``debug``: they are our own machines,
        but a name is still a map of the fleet for anyone who gets the token."""
        host, _, short = _who(self._me)
        me: dict[str, Any] = {"id": short, "pid": os.getpid()}
        if debug:
            me["host"] = host
        view = self._view
        age = time.monotonic() - view.at if view is not None else None
        note = None
        if not self._up or view is None or age is None:
            # _warned: a connection failed since the last success (or ever).
            note = "Redis is unreachable" if self._warned else "not connected to Redis yet"
        elif age * 1000 > PEER_TTL_MS:
            note = f"the last read from Redis is {age:.0f} s old"
        fleet: dict[str, Any] = {
            "available": note is None,
            "note": None if note is None else f"fleet data unavailable: {note}",
            "read_ago": None if age is None else round(age, 3),
            "processes": [],
            "errors_not_shared": self._errors_dropped,
        }
        out: dict[str, Any] = {"process": me, "fleet": fleet, "upstreams": {}}
        if note is not None or view is None or age is None:
            out["upstreams"] = dict.fromkeys(self._members)
            return out
        processes: dict[str, dict[str, Any]] = {}
        for name, member in self._members.items():
            snap = member.breaker.snapshot()
            own = member.bulkhead.in_flight if member.bulkhead is not None else 0
            mine = {"calls": snap.calls, "failures": snap.failures, "slow_calls": snap.slow}
            totals = dict(mine)
            reporting, in_flight = 1, own
            for who, entry in view.entries.get(name, {}).items():
                row = processes.get(who)
                if row is None:
                    row = processes[who] = self._process_row(who, debug)
                if who == self._me:
                    # This process's own window: never the running totals, which already
                    # hold whichever peers came before it in Redis's order.
                    row["upstreams"][name] = {**mine, "in_flight": own}
                    continue
                row["last_seen"] = min(row["last_seen"], _ago(view, entry, age))
                row["upstreams"][name] = {
                    "calls": entry.calls,
                    "failures": entry.failures,
                    "slow_calls": entry.slow,
                    "in_flight": entry.in_flight,
                }
                in_flight += entry.in_flight or 0
                if entry.gen == member.gen:
                    # An entry of an earlier generation counts a window since cleared.
                    reporting += 1
                    totals["calls"] += entry.calls
                    totals["failures"] += entry.failures
                    totals["slow_calls"] += entry.slow
            calls = totals["calls"]
            out["upstreams"][name] = {
                **totals,
                "failure_rate": round(totals["failures"] / calls, 4) if calls else 0.0,
                "slow_call_rate": round(totals["slow_calls"] / calls, 4) if calls else 0.0,
                "processes": reporting,
                "in_flight": in_flight,
            }
        if self._me not in processes:  # not written yet (a store with no upstreams)
            processes[self._me] = self._process_row(self._me, debug)
        # By host, then pid: a host's workers side by side, named or not.
        order = sorted(processes, key=lambda who: (_who(who)[0], _who(who)[1] or 0, who))
        fleet["processes"] = [processes[who] for who in order]
        return out

    def _process_row(self, who: str, debug: bool) -> dict[str, Any]:
        host, pid, short = _who(who)
        this = who == self._me
        row: dict[str, Any] = {
            "id": short,
            "pid": os.getpid() if this else pid,
            "this_process": this,
            # Others' is the newest of their entries' stamps, set as they are read.
            "last_seen": 0.0 if this else float("inf"),
            "upstreams": {},
        }
        if debug:
            row["host"] = host
        return row

    # --- the background threads -------------------------------------------------------------

    def _run(self) -> None:
        backoff = TICK / 2
        next_tick = next_full = 0.0
        while not self._stop.is_set():
            try:
                if not self._up:
                    self._connect()
                    backoff = TICK / 2
                    next_full = 0.0
                self._wake.wait(max(0.0, min(next_tick, next_full) - time.monotonic()))
                self._wake.clear()
                if self._stop.is_set():
                    break
                self._drain()
                self._share_errors()
                now = time.monotonic()
                if self._resync.is_set():
                    self._resync.clear()
                    next_full = 0.0
                if now >= next_tick or now >= next_full:
                    full = now >= next_full
                    self._sync(full=full)
                    next_tick = now + TICK
                    if full:
                        next_full = now + HEARTBEAT
            except (RedisError, OSError, ValueError) as exc:
                self._down(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except Exception:  # pragma: no cover - a bug here must not kill sharing for good
                logger.exception("gateway_guard fleet store: unexpected error")
                self._down(None)
                self._stop.wait(MAX_BACKOFF)

    def _connect(self) -> None:
        client = self._clients()
        client.ping()
        self._sync(full=True)
        with self._lock:
            self._up = True
            if self._warned:
                self._warned = False
                logger.info(
                    "gateway_guard fleet store: Redis is back; breakers and retry budgets "
                    "are shared again"
                )

    def _down(self, exc: BaseException | None) -> None:
        with self._lock:
            self._up = False
            warn = not self._warned
            self._warned = True
        self._view = None
        # Transitions still queued could not be published: publish them on return.
        while self._tasks:
            try:
                kind, member, payload = self._tasks.popleft()
            except IndexError:
                break
            if kind == "transition" and member is not None:
                _mark_dirty(member, payload.reason)
        for member in self._members.values():
            member.peers = (0, 0, 0)
            member.breaker.set_peer_counts(0, 0, 0)
            member.budget.set_peer_counts(0, 0, 0.0, 0.0)
        if warn:
            logger.warning(
                "gateway_guard fleet store: Redis at %s is unreachable (%s); breakers and "
                "retry budgets are per process until it is back",
                _safe_url(self._settings.redis_url),
                type(exc).__name__ if exc is not None else "error",
            )

    def _drain(self) -> None:
        while self._tasks:
            try:
                kind, member, payload = self._tasks.popleft()
            except IndexError:
                return
            if kind == "check" or member is None:
                self._clients().ping()
            elif kind == "transition":
                # Dirty until published: if Redis fails now, the resync publishes it.
                _mark_dirty(member, payload.reason)
                self._publish(member, payload.reason)
            elif kind == "report":
                gen, failed, slow = payload
                totals = self._scripts["report"](
                    keys=[member.record_key], args=[gen, "report", failed, slow]
                )
                if totals and member.gen == gen:
                    member.breaker.set_fleet_probes(*(int(x) for x in totals))
            elif kind == "return":
                self._scripts["report"](keys=[member.record_key], args=[payload, "return", 0, 0])

    def _publish(self, member: FleetUpstream, reason: str, expected: str | None = None) -> None:
        # Read before the snapshot: an operator's action between the two is in the snapshot
        # or still to be published, and until then no adoption may undo it (_adopt).
        seq = member.breaker.manual_seq
        snap = member.breaker.snapshot()
        state = snap.state
        wait = 0.0
        if state is BreakerState.OPEN:
            wait = snap.open_remaining or 0.0
        elif state is BreakerState.HALF_OPEN:
            state = BreakerState.OPEN  # probing starts afresh, fleet-wide, at once
        if expected is None:
            expected = "*" if reason in MANUAL else str(member.gen)
        applied, flat, now = self._scripts["transition"](
            keys=[member.record_key],
            args=[
                expected,
                state.value,
                f"{wait:.3f}",
                snap.consecutive_opens,
                self._channel,
                member.name,
                uuid.uuid4().hex[:12],
            ],
        )
        record = _record(flat)
        if not int(applied) and reason == "rebuild" and member.dirty and record:
            # Another process wrote the record back first, from its own state; a decision
            # this process made while Redis was away still goes on top of it.
            self._publish(member, "resync", expected=record.get("gen", "0"))
            return
        with self._lock:
            member.dirty = ""
            member.manual_seen = seq
            if int(applied):
                member.epoch, member.gen = record["epoch"], int(record["gen"])
                member.peers = (0, 0, 0)
                return
            # Another process decided first: take its decision on.
            self._adopt(member, record, int(now))

    def _sync(self, *, full: bool) -> None:
        members = list(self._members.values())
        entries: list[str] = []
        anything = full
        for member in members:
            snap = member.breaker.snapshot()
            calls, retries, recent_calls, recent_retries = member.budget.local_counts()
            in_flight = member.bulkhead.in_flight if member.bulkhead is not None else 0
            entry = (
                f"{member.gen}|{snap.calls}|{snap.failures}|{snap.slow}|{calls}|{retries}"
                f"|{recent_calls:.2f}|{recent_retries:.2f}|{in_flight}"
            )
            active = bool(snap.failures or snap.slow or retries or recent_retries)
            busy = active or member.active or any(member.peers)
            write = full or (entry != member.last_entry and busy)
            member.active = active
            anything = anything or busy
            entries.append(entry if write else "")
            if write:
                member.last_entry = entry
        if not anything:
            return
        keys = [key for m in members for key in (m.record_key, m.counts_key)]
        reply = self._scripts["sync"](
            keys=keys, args=[self._me, PEER_TTL_MS, *entries], client=self._clients()
        )
        now_ms = int(_text(reply[0]))
        seen: dict[str, dict[str, _Entry]] = {}
        for i, member in enumerate(members):
            record = _record(reply[1 + 2 * i])
            counts = _record(reply[2 + 2 * i])
            seen[member.name] = {
                who: parsed for who, value in counts.items() if (parsed := _entry(value))
            }
            if not record:
                # Never written, or flushed: this process's state becomes the fleet's.
                manual = member.dirty == "manual"
                self._publish(member, "rebuild", expected="*" if manual else "new")
                continue
            if member.dirty:
                # Decided here while Redis was away (or while it was failing): the fleet
                # takes it on, unless another process published a decision since we read
                # the record; an operator's action wins over the breakers' own.
                manual = member.dirty == "manual"
                self._publish(member, "resync", expected="*" if manual else record["gen"])
            else:
                with self._lock:
                    if _newer(record, member):
                        self._adopt(member, record, now_ms)
            self._peer_counts(member, counts, now_ms)
        self._view = _View(now_ms, time.monotonic(), seen)

    def _peer_counts(self, member: FleetUpstream, counts: dict[str, str], now_ms: int) -> None:
        calls = failures = slow = 0
        b_calls = b_retries = 0
        b_recent_calls = b_recent_retries = 0.0
        for who, value in counts.items():
            if who == self._me:
                continue
            parts = value.split("|")
            if len(parts) not in (9, 10) or now_ms - int(parts[-1]) > PEER_TTL_MS:
                continue
            b_calls += int(parts[4])
            b_retries += int(parts[5])
            b_recent_calls += float(parts[6])
            b_recent_retries += float(parts[7])
            if int(parts[0]) == member.gen:
                # Counts of an earlier generation belong to a window since cleared.
                calls += int(parts[1])
                failures += int(parts[2])
                slow += int(parts[3])
        peers = (calls, failures, slow)
        if peers != member.peers:
            member.peers = peers
            member.breaker.set_peer_counts(calls, failures, slow)
        member.budget.set_peer_counts(b_calls, b_retries, b_recent_calls, b_recent_retries)

    def _adopt(self, member: FleetUpstream, record: dict[str, str], now_ms: int) -> None:
        # Called with self._lock held (the breaker's lock is taken inside, never around).
        try:
            state = BreakerState(record.get("state", "closed"))
        except ValueError:  # a state this version does not know: not adopted, not re-read
            member.epoch, member.gen = record.get("epoch", ""), int(record.get("gen", 0))
            return
        remaining = (int(record.get("open_until", now_ms)) - now_ms) / 1000.0
        # Refused while an operator's action here is not published yet: the record (read by
        # the sync, or a message in flight) is older than that action, which the drain is
        # about to publish on top of it. Seen in the fleet e2e test under load: a force-open
        # undone 1 ms later by the sync's read of the record before it, then published as
        # "closed" (_publish sends the breaker's state as it is then).
        if not member.breaker.adopt(
            state, remaining, int(record.get("opens", 0)), manual_seq=member.manual_seen
        ):
            return
        member.epoch = record.get("epoch", "")
        member.gen = int(record.get("gen", 0))
        member.peers = (0, 0, 0)

    def _listen(self) -> None:
        backoff = TICK / 2
        while not self._stop.is_set():
            pubsub = None
            try:
                pubsub = self._make_client(self._settings.command_timeout).pubsub(
                    ignore_subscribe_messages=True
                )
                pubsub.subscribe(self._channel)
                # Messages sent while we were not listening are lost: read everything again.
                self._resync.set()
                self._wake.set()
                backoff = TICK / 2
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is not None and message.get("type") == "message":
                        self._on_message(message["data"])
            except (RedisError, OSError, ValueError):
                self._wake.set()  # the sync thread notices and reports it, once
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(RedisError, OSError):
                        pubsub.close()

    def _on_message(self, data: Any) -> None:
        event = json.loads(_text(data))
        member = self._members.get(str(event.get("u")))
        if member is None:
            return
        record = {
            "state": str(event["state"]),
            "gen": str(event["gen"]),
            "epoch": str(event["epoch"]),
            "open_until": str(event["open_until"]),
            "opens": str(event["opens"]),
        }
        with self._lock:
            # Not our own publication, nor one adopted already or overtaken since.
            if _newer(record, member):
                self._adopt(member, record, int(event["now"]))


def _ago(view: _View, entry: _Entry, age: float) -> float:
    """Seconds since the process wrote ``entry``, now."""
    return round(max(0, view.now_ms - entry.stamp) / 1000 + age, 3)


def _mark_dirty(member: FleetUpstream, reason: str) -> None:
    if member.dirty != "manual":
        member.dirty = "manual" if reason in MANUAL else "auto"


def _newer(record: dict[str, str], member: FleetUpstream) -> bool:
    """Whether ``record`` is a decision ``member`` has not adopted yet (and may).

    Not while this process has a decision of its own to publish (``dirty``): adopting
    first would overwrite the very state the resync is about to publish.

    Within one epoch (the life of a record) generations only grow, so an older one is a
    late message or a read that raced a newer one; a new epoch (Redis restarted or the
    keys were flushed, and the record was written again) is always news."""
    if member.dirty:
        return False
    if record.get("epoch") != member.epoch:
        return True
    return int(record.get("gen", 0)) > member.gen


def _safe_url(url: str) -> str:
    # The log names the server, never the password in the URL.
    parts = urlsplit(url)
    host = parts.hostname or parts.path
    return f"{parts.scheme}://{host}:{parts.port}" if parts.port else f"{parts.scheme}://{host}"
