"""Buildkite's REST rate limit, as the embedded coordinator enforces it.

Buildkite allows an organization 200 REST requests a minute, all users together, and says so on
every answer (https://buildkite.com/docs/apis/rest-api/limits):

- ``RateLimit-Remaining``: requests still allowed in the current window;
- ``RateLimit-Limit``: the organization's limit;
- ``RateLimit-Reset``: seconds until a new window starts.

Beyond the limit every request is answered 429 with ``RateLimit-Remaining: 0`` until the window
resets. Windows are fixed (Buildkite's rate-limit endpoint shows a REST window resetting on the
minute, ``reset_at: ...T05:30:00Z``): here they are whole multiples of ``window`` on the
coordinator's clock, so a test or the drill that moves that clock moves the windows.

The agent API (v3) is not limited by this; only ``/v2`` routes are. :class:`RestRateLimit`
decides and counts; :mod:`~fleetdrain.drill.coordinator.app` answers. Every request that
reaches it is remembered (its time on the clock and whether it was refused) so that a bench can
read the peak of any 60 s: :meth:`RestRateLimit.stats`.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Buildkite's REST limit: requests a minute for an organization.
DEFAULT_REST_RATE_LIMIT = 200
#: Its window, in seconds.
DEFAULT_REST_RATE_WINDOW = 60.0
#: Buildkite's GraphQL limit: complexity points in 5 minutes for an organization
#: (https://buildkite.com/docs/apis/graphql/graphql-resource-limits).
DEFAULT_GRAPHQL_RATE_LIMIT = 20_000
DEFAULT_GRAPHQL_RATE_WINDOW = 300.0


@dataclass(frozen=True)
class RateDecision:
    """What one request met: allowed or not, and the three headers' values."""

    allowed: bool
    limit: int
    remaining: int
    #: Whole seconds until the window resets (at least 1).
    reset: int

    def headers(self) -> dict[str, str]:
        """Buildkite's ``RateLimit-*`` headers for this answer."""
        return {
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Reset": str(self.reset),
        }


@dataclass(frozen=True)
class RateStats:
    """What the REST limit saw, for a bench or a report."""

    #: The limit (None: not enforced, counted only) and its window in seconds.
    limit: int | None
    window: float
    #: REST requests that reached the limit (allowed and refused).
    requests: int
    #: Refused with 429.
    limited: int
    #: The most requests (allowed and refused) in any ``window`` seconds, and the most allowed
    #: (sliding: across two fixed windows up to twice the limit can be allowed).
    peak: int
    peak_allowed: int
    #: The most requests (allowed and refused) in one fixed window: what the limit counts.
    window_peak: int = 0


class RestRateLimit:
    """A fixed-window request limit for one organization (thread-safe).

    ``limit`` None (or 0) counts requests without refusing any and adds no headers.
    """

    def __init__(
        self,
        limit: int | None = DEFAULT_REST_RATE_LIMIT,
        window: float = DEFAULT_REST_RATE_WINDOW,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if window <= 0:
            raise ValueError("the rate-limit window must be > 0 seconds")
        if limit is not None and limit < 0:
            raise ValueError("the rate limit must be None or >= 0")
        self.limit: int | None = limit or None
        self.window = float(window)
        self._clock = clock or time.monotonic
        self._lock = threading.Lock()
        self._window_index: int | None = None
        self._used = 0
        #: Every request: (its time on the clock, refused).
        self._log: list[tuple[float, bool]] = []

    def take(self, cost: int = 1) -> RateDecision | None:
        """Count one request of ``cost`` (points: GraphQL's requests cost what they read) now;
        its decision (None when the limit is not enforced)."""
        with self._lock:
            now = self._clock()
            index = math.floor(now / self.window)
            if index != self._window_index:
                self._window_index, self._used = index, 0
            if self.limit is None:
                self._log.append((now, False))
                return None
            reset = max(1, math.ceil((index + 1) * self.window - now))
            if self._used + max(1, cost) > self.limit:
                self._log.append((now, True))
                return RateDecision(False, self.limit, max(0, self.limit - self._used), reset)
            self._used += max(1, cost)
            self._log.append((now, False))
            return RateDecision(True, self.limit, self.limit - self._used, reset)

    def stats(self) -> RateStats:
        """Requests, 429s, and the peaks over any ``window`` seconds (sliding)."""
        with self._lock:
            log = sorted(self._log)
        times = [t for t, _ in log]
        allowed = [t for t, refused in log if not refused]
        per_window: dict[int, int] = {}
        for t in times:
            index = math.floor(t / self.window)
            per_window[index] = per_window.get(index, 0) + 1
        return RateStats(
            limit=self.limit,
            window=self.window,
            requests=len(log),
            limited=len(log) - len(allowed),
            peak=_peak(times, self.window),
            peak_allowed=_peak(allowed, self.window),
            window_peak=max(per_window.values(), default=0),
        )

    def per_window(self) -> list[tuple[float, int, int]]:
        """Per fixed window that saw a request: (its start, requests, 429s), in order."""
        with self._lock:
            log = list(self._log)
        counts: dict[int, list[int]] = {}
        for t, refused in log:
            entry = counts.setdefault(math.floor(t / self.window), [0, 0])
            entry[0] += 1
            entry[1] += int(refused)
        return [(i * self.window, n, r) for i, (n, r) in sorted(counts.items())]

    def reset(self) -> None:
        """Forget every request (the window starts afresh)."""
        with self._lock:
            self._window_index, self._used = None, 0
            self._log.clear()


def _peak(times: list[float], window: float) -> int:
    """The most of ``times`` (in order) inside any half-open interval ``window`` long."""
    best = 0
    for i, start in enumerate(times):
        best = max(best, bisect.bisect_left(times, start + window, lo=i) - i)
    return best
