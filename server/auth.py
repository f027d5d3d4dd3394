"""Bearer tokens → client grants, with per-token rate limits and daily image quotas.

A grant binds a token to one client of the run, its handoff level and its limits: the caller
cannot ask for another client's level. Tokens are never stored or logged; the store keeps
their sha256 digests and compares digests in constant time against every entry.
"""
from __future__ import annotations

import hmac
import math
import time
from dataclasses import dataclass, field
from typing import Callable

from collafuse_edge.schedule import client_level_count

from .config import ServerConfig, TokenEntry, hash_token
from .errors import ApiError, ServerConfigError

Clock = Callable[[], float]


class TokenBucket:
    """``rate`` requests per minute, at most ``burst`` at once."""

    def __init__(self, per_minute: float, burst: int, clock: Clock = time.monotonic):
        self.rate = per_minute / 60.0
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.clock = clock
        self.stamp = clock()

    def take(self) -> float:
        """Take one request; returns 0 when allowed, else the seconds until one is available."""
        now = self.clock()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class DailyQuota:
    """Images per UTC day. Counted per server process (see docs: several workers → several quotas)."""

    def __init__(self, per_day: int, clock: Clock = time.time):
        self.per_day = per_day
        self.clock = clock
        self.day = int(clock() // 86400)
        self.used = 0

    def take(self, n: int) -> int:
        """Charge ``n`` images; returns how many remain, or raises when ``n`` would exceed the quota."""
        day = int(self.clock() // 86400)
        if day != self.day:
            self.day, self.used = day, 0
        if self.used + n > self.per_day:
            left = self.per_day - self.used
            raise ApiError(429, "quota_exceeded",
                           f"this token's quota of {self.per_day} images per day is used up "
                           f"({left} left, {n} asked); it resets at 00:00 UTC",
                           {"Retry-After": str(int(86400 - self.clock() % 86400) + 1)})
        self.used += n
        return self.per_day - self.used


@dataclass
class Grant:
    """What a valid token allows."""

    name: str
    client: int
    cut_ratio: float
    client_levels: int  # k: the client runs k-1 … 0, the server T-1 … k
    max_n: int
    disabled: bool = False
    min_handoff_level: int | None = None  # uploads below this level are refused (403 handoff_below_minimum)
    bucket: TokenBucket | None = field(default=None, repr=False)
    quota: DailyQuota | None = field(default=None, repr=False)

    @property
    def handoff_level(self) -> int:
        return self.client_levels - 1


def make_grant(entry: TokenEntry, cfg: ServerConfig, run_cut_ratios: tuple[float, ...], T: int,
               clock: Clock = time.monotonic, wall_clock: Clock = time.time) -> Grant:
    """Resolve a token entry against the served run: client index, level, limits."""
    n_clients = len(run_cut_ratios)
    if entry.client >= n_clients:
        raise ServerConfigError(f"token {entry.name!r}: client {entry.client} does not exist; the run has "
                                f"{n_clients} clients (0 … {n_clients - 1})")
    cut = run_cut_ratios[entry.client] if entry.cut_ratio is None else float(entry.cut_ratio)
    k = client_level_count(cut, T)
    run_levels = sorted({client_level_count(c, T) for c in run_cut_ratios})
    if k not in run_levels:
        raise ServerConfigError(
            f"token {entry.name!r}: cut_ratio {cut} gives handoff level {k - 1}, which is not one of the "
            f"run's handoff levels {[x - 1 for x in run_levels]}; the server model was trained only there"
        )
    if entry.min_handoff_level is not None and entry.min_handoff_level > T - 1:
        raise ServerConfigError(f"token {entry.name!r}: min_handoff_level {entry.min_handoff_level} lies beyond the "
                                f"run's last level {T - 1}; use a level in [0, {T - 1}]")
    bucket = None
    if entry.requests_per_minute is not None:
        burst = entry.burst or max(1, math.ceil(entry.requests_per_minute / 6))
        bucket = TokenBucket(entry.requests_per_minute, burst, clock)
    quota = DailyQuota(entry.images_per_day, wall_clock) if entry.images_per_day is not None else None
    return Grant(entry.name, entry.client, cut, k, entry.max_n or cfg.max_n, entry.disabled,
                 entry.min_handoff_level, bucket, quota)


class TokenStore:
    """sha256 digest → Grant; lookups compare against every digest with hmac.compare_digest."""

    def __init__(self, grants: dict[str, Grant], entries: dict[str, TokenEntry] | None = None):
        self._items = [(bytes.fromhex(d), g) for d, g in grants.items()]
        self._entries = dict(entries or {})  # digest → the entry its grant came from (for reloads)

    @classmethod
    def from_config(cls, cfg: ServerConfig, run_cut_ratios: tuple[float, ...], T: int,
                    previous: "TokenStore | None" = None) -> "TokenStore":
        """The store of ``cfg.tokens``. With ``previous`` (a token reload), a token whose entry did not
        change keeps its grant, so its rate-limit bucket and daily quota carry over."""
        if not cfg.tokens:
            raise ServerConfigError(
                "no client tokens are configured, so every /v1/ request would be refused; pass "
                "--config FILE with [[tokens]] entries (`collafuse serve --new-token K` makes one)"
            )
        old = previous._grants_by_digest() if previous is not None else {}
        grants = {}
        for t in cfg.tokens:
            kept = old.get(t.sha256)
            same = kept is not None and previous._entries.get(t.sha256) == t
            grants[t.sha256] = kept if same else make_grant(t, cfg, run_cut_ratios, T)
        return cls(grants, {t.sha256: t for t in cfg.tokens})

    def _grants_by_digest(self) -> dict[str, Grant]:
        return {d.hex(): g for d, g in self._items}

    def names(self) -> list[str]:
        """The grants' names (for logs; never the tokens or their digests)."""
        return sorted(g.name for _, g in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def lookup(self, token: str) -> Grant | None:
        digest = bytes.fromhex(hash_token(token))
        found = None
        for d, g in self._items:  # no early exit: the time does not depend on which entry matched
            if hmac.compare_digest(d, digest):
                found = g
        return found

    def authenticate(self, authorization: str | None) -> Grant:
        """The grant of an ``Authorization: Bearer TOKEN`` header; ApiError 401/403 otherwise."""
        challenge = {"WWW-Authenticate": 'Bearer realm="collafuse"'}
        if not authorization:
            raise ApiError(401, "unauthorized",
                           "missing Authorization header; send 'Authorization: Bearer <token>'", challenge)
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "unauthorized",
                           "the Authorization header must be 'Bearer <token>'", challenge)
        grant = self.lookup(token)
        if grant is None:
            raise ApiError(401, "unauthorized", "the bearer token is not valid for this server", challenge)
        if grant.disabled:
            raise ApiError(403, "forbidden", f"the token of {grant.name!r} has been disabled by the operator")
        return grant


def charge(grant: Grant, n: int) -> None:
    """Apply the grant's rate limit and quota to a request for ``n`` images (ApiError 429)."""
    if grant.bucket is not None:
        wait = grant.bucket.take()
        if wait > 0:
            raise ApiError(429, "rate_limited",
                           f"too many requests for {grant.name!r}: the limit is "
                           f"{grant.bucket.rate * 60:g} per minute; retry in {wait:.1f} s",
                           {"Retry-After": str(max(1, math.ceil(wait)))})
    if grant.quota is not None:
        grant.quota.take(n)
