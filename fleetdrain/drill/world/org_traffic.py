"""The organization's other REST users: requests that spend the same Buildkite rate limit as the
controller's (200 a minute for the whole organization), without being the scenario's.

:class:`OrgTraffic` takes ``per_minute`` requests an AWS minute from the coordinator's
:class:`~fleetdrain.drill.coordinator.RestRateLimit` (counted exactly as an HTTP request is,
without the HTTP), evenly spread, from a thread of its own that ends with the ``with`` block:
nothing outlives it. It counts what it sent and what the limit refused (429s), so that a
scenario can tell its controller's requests from the organization's.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from fleetdrain.drill.coordinator import RestRateLimit


@dataclass
class OrgTraffic:
    """``per_minute`` requests an AWS minute against ``limit``; ``wall_per_minute``: the wall
    seconds an AWS minute takes at the drill's pace. ``per_minute`` 0: none (a no-op)."""

    limit: RestRateLimit
    per_minute: float
    wall_per_minute: float = 60.0
    sent: int = 0
    refused: int = 0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.per_minute < 0 or self.wall_per_minute <= 0:
            raise ValueError("per_minute must be >= 0 and wall_per_minute > 0")

    @property
    def interval(self) -> float | None:
        """Wall seconds between two requests (None: no traffic)."""
        return self.wall_per_minute / self.per_minute if self.per_minute > 0 else None

    def __enter__(self) -> OrgTraffic:
        if self.interval is not None:
            self._thread = threading.Thread(target=self._run, name="org-traffic", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        interval = self.interval
        assert interval is not None
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += interval
            decision = self.limit.take()
            self.sent += 1
            if decision is not None and not decision.allowed:
                self.refused += 1
