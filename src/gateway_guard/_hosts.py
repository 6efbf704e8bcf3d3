"""Which upstream a URL belongs to: its host (and port), in time linear in the host.

An upstream owns the host and port of its ``base_url`` (and, when that URL has a path, only
the URLs under that path), and every host its ``match`` patterns name:

- ``payments.internal``: that host, any port;
- ``payments.internal:8443``: that host on that port only;
- ``*.payments.internal``: any host under that domain (one or more labels before it), any
  port; ``*.payments.internal:8443`` on that port only.

A ``match`` pattern beats a ``base_url``; among patterns an exact host beats a wildcard, a
port beats any port, and a longer domain beats a shorter one; among base URLs a longer path
beats a shorter one, and two upstreams with the same ``base_url`` (two policies for one
service) leave it to the first in the settings. Hosts compare case-insensitively and
without a trailing dot. Two upstreams whose ``match`` patterns say the same thing are
refused at startup (:class:`HostConflict`), so a URL never belongs to two by accident.

The lookup reads the URL's host once: one dict lookup for the exact host, then a walk from
its last label towards its first through a tree of the wildcard domains, each label one
dict lookup. No regular expression ever reads a URL.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

__all__ = ["HostConflict", "HostMap", "Pattern", "parse_pattern"]

_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}
# A DNS name is at most 253 characters: a longer host is no upstream's, and the work a
# lookup does stays bounded whatever a caller passes.
_MAX_HOST: Final = 253
_LABEL_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")


class HostConflict(ValueError):
    """Two upstreams claim the same host (and port, and path)."""

    def __init__(self, first: str, second: str, what: str, key: str) -> None:
        super().__init__(f"{what} is claimed by upstreams {first} and {second}")
        self.first = first  # the upstream that claimed it first
        self.second = second
        self.what = what
        self.key = key  # where the second claims it: "match.N"


@dataclass(frozen=True, slots=True)
class Pattern:
    """One ``match`` entry, parsed: ``host`` (without ``*.``), ``wildcard``, ``port``."""

    host: str
    wildcard: bool
    port: int | None


def _normal_host(host: str) -> str:
    return host.lower().removesuffix(".")


def parse_pattern(text: str) -> Pattern:
    """Parse ``host``, ``host:port``, ``*.domain`` or ``*.domain:port``; raise ValueError
    saying what is wrong."""
    if not text or len(text) > _MAX_HOST + 8:
        raise ValueError(f"must be a host name of 1-{_MAX_HOST} characters, got {text!r}")
    host, port = text, None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unbalanced '[' in {text!r}")
        host, rest = text[: end + 1], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected ':port' after the address in {text!r}")
            port = _port(rest[1:], text)
        inner = host[1:-1].lower()
        if not inner or any(c not in "0123456789abcdef:." for c in inner):
            raise ValueError(f"bad IPv6 address in {text!r}")
        return Pattern(inner, False, port)  # as URL parsers give it: without brackets
    if ":" in text:
        host, _, raw_port = text.rpartition(":")
        port = _port(raw_port, text)
    wildcard = host.startswith("*.")
    if wildcard:
        host = host[2:]
    host = _normal_host(host)
    labels = host.split(".")
    if not host or any(not label or set(label) - _LABEL_CHARS for label in labels):
        raise ValueError(
            f"must be a host name (letters, digits, '-', '.'), optionally '*.' before it "
            f"and ':port' after it, got {text!r}"
        )
    if "*" in host:
        raise ValueError(f"'*' may only stand first, as '*.domain', got {text!r}")
    return Pattern(host, wildcard, port)


def _port(raw: str, text: str) -> int:
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ValueError(f"port must be 1-65535, got {text!r}")
    return int(raw)


class _Node:
    __slots__ = ("children", "owners")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        # port (None: any) -> upstream, for "*.<the labels down to here>"
        self.owners: dict[int | None, str] = {}


class HostMap:
    """URL -> upstream name, built once from each upstream's ``base_url`` and ``match``."""

    __slots__ = ("_base", "_exact", "_paths", "_root", "empty", "has_paths", "names", "tops")

    def __init__(self, upstreams: Mapping[str, tuple[str | None, Iterable[str]]]) -> None:
        """``upstreams``: name -> (base_url, match patterns). Raises ValueError for a bad
        pattern and :class:`HostConflict` when two upstreams' ``match`` name the same
        thing. Two upstreams may share a ``base_url`` (two policies for one service): the
        first one in the settings owns it, unless a ``match`` pattern claims it."""
        # (host, port or None) -> upstream: exact match patterns.
        self._exact: dict[tuple[str, int | None], str] = {}
        # (host, port) -> upstream: base_urls without a path.
        self._base: dict[tuple[str, int], str] = {}
        # (host, port) -> [(path prefix, upstream)]: base_urls with one, longest first.
        self._paths: dict[tuple[str, int], list[tuple[str, str]]] = {}
        self._root = _Node()
        claims: dict[object, str] = {}

        def claim(claimed: object, name: str, what: str, key: str) -> None:
            other = claims.setdefault(claimed, name)
            if other != name:
                raise HostConflict(other, name, what, key)

        for name, (base_url, patterns) in upstreams.items():
            if base_url:
                parts = urlsplit(base_url)
                host = _normal_host(parts.hostname or "")
                port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)
                prefix = parts.path.rstrip("/")
                if host and prefix:
                    entries = self._paths.setdefault((host, port), [])
                    if all(known != prefix for known, _ in entries):
                        entries.append((prefix, name))
                elif host:
                    self._base.setdefault((host, port), name)
            for i, text in enumerate(patterns):
                pattern = parse_pattern(text)
                shown, key = text.lower(), f"match.{i}"
                if not pattern.wildcard:
                    claim(("exact", pattern.host, pattern.port), name, shown, key)
                    self._exact.setdefault((pattern.host, pattern.port), name)
                    continue
                claim(("wild", pattern.host, pattern.port), name, shown, key)
                node = self._root
                for label in reversed(pattern.host.split(".")):
                    node = node.children.setdefault(label, _Node())
                node.owners[pattern.port] = name
        for entries in self._paths.values():
            entries.sort(key=lambda entry: len(entry[0]), reverse=True)
        self.empty = not (self._exact or self._base or self._paths or self._root.children)
        self.has_paths = bool(self._paths)
        # A first test that rejects almost every other host with one or two set lookups:
        # the exact hosts, and the last label of each wildcard domain. "" sends a host
        # with a trailing dot to the full lookup.
        exact = {h for h, _ in self._exact} | {h for h, _ in self._base}
        exact |= {h for h, _ in self._paths}
        self.names = frozenset(exact | {host + "." for host in exact})
        self.tops = frozenset(self._root.children) | ({""} if self._root.children else set())

    def maybe(self, host: str) -> bool:
        """False when ``host`` (lower case) surely belongs to no upstream: the cheap test
        to run before :meth:`lookup`."""
        if host in self.names:
            return True
        tops = self.tops
        return bool(tops) and host[host.rfind(".") + 1 :] in tops

    def lookup(
        self, host: str, port: int | None, scheme: str = "http", path: str = "/"
    ) -> str | None:
        """The upstream that ``scheme://host:port/path`` belongs to, or None. ``port`` None
        is the scheme's default; ``host`` as a URL parser gives it (lower case)."""
        if len(host) > _MAX_HOST:
            return None
        if host.endswith("."):
            host = host[:-1]
        if port is None:
            port = _DEFAULT_PORTS.get(scheme, 0)
        # Explicit match patterns first (exact, then wildcard), then base_urls.
        exact = self._exact
        if exact:
            name = exact.get((host, port)) or exact.get((host, None))
            if name is not None:
                return name
        if self._root.children:
            name = self._wildcard(host, port)
            if name is not None:
                return name
        if self._paths:
            entries = self._paths.get((host, port))
            if entries is not None:
                for prefix, owner in entries:
                    if path.startswith(prefix) and path[len(prefix) : len(prefix) + 1] in ("", "/"):
                        return owner
        return self._base.get((host, port))

    def _wildcard(self, host: str, port: int) -> str | None:
        node = self._root
        found: str | None = None
        end = len(host)
        # From the last label towards the first; a wildcard needs a label before its domain.
        while True:
            dot = host.rfind(".", 0, end)
            child = node.children.get(host[dot + 1 : end])
            if child is None or dot < 0:
                break
            node = child
            owners = node.owners
            if owners:
                found = owners.get(port) or owners.get(None) or found
            end = dot
        return found

    def lookup_url(self, url: str) -> str | None:
        """The upstream that ``url`` (an absolute http(s) URL) belongs to, or None."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            return None
        host = parts.hostname
        if not host:
            return None
        return self.lookup(host, port, parts.scheme.lower(), parts.path or "/")
