"""Fault injection for the embedded coordinator.

A :class:`Fault` says which route misbehaves and how; a :class:`FaultSet` holds the active ones and
decides, atomically, which fault (if any) a request meets. The HTTP layer (``app.py``) carries the
fault out; this module only decides.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Route names a fault can target (``"*"`` targets every route).
FAULT_ENDPOINTS: frozenset[str] = frozenset(
    {
        "register",
        "connect",
        "ping",
        "heartbeat",
        "accept",
        "start",
        "chunks",
        "job_state",
        "finish",
        "meta_data_set",
        "meta_data_set_batch",
        "meta_data_get",
        "meta_data_exists",
        "meta_data_keys",
        "disconnect",
        "pause",
        "resume",
        "stop",
        "rest_agents",
        "rest_agent",
        "rest_stop",
        "rest_pause",
        "rest_resume",
        "graphql",
        "*",
    }
)

#: What a fault does: answer a status without processing, sleep then process, drop the
#: connection mid-response, or process and answer success while recording nothing.
FAULT_KINDS: frozenset[str] = frozenset({"status", "latency", "drop", "ignore"})


@dataclass
class Fault:
    """One fault injection rule.

    ``count`` limits how many matching requests it applies to (``None``: until removed or until
    ``until``, a time on the coordinator's clock). ``agent_id`` limits it to requests made with
    that agent's token (agent API) or about that agent (REST). ``process`` only matters for
    ``kind="drop"``: whether the request takes effect before the connection is dropped.
    ``fired`` counts how often it has applied. ``while_draining``: only while the agent is
    being drained as the coordinator sees it (paused, or asked to stop): with ``kind="ignore"``
    on ``heartbeat`` this is the 3.116.0 regression seen from the server, heartbeats that stop
    once a drain begins.
    """

    endpoint: str
    kind: str
    status: int | None = None
    count: int | None = None
    seconds: float = 0.0
    retry_after: float | None = None
    agent_id: str | None = None
    until: float | None = None
    process: bool = False
    while_draining: bool = False
    fired: int = dataclasses.field(default=0, compare=False)

    def __post_init__(self) -> None:
        if self.endpoint not in FAULT_ENDPOINTS:
            raise ValueError(f"unknown fault endpoint {self.endpoint!r}")
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.kind == "status" and (self.status is None or not 400 <= self.status <= 599):
            raise ValueError("a status fault needs status in 400..599")
        if self.kind == "latency" and self.seconds <= 0:
            raise ValueError("a latency fault needs seconds > 0")
        if self.count is not None and self.count < 1:
            raise ValueError("count must be None or >= 1")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("retry_after must be >= 0")

    def applies(
        self, endpoint: str, agent_id: str | None, now: float, draining: bool = False
    ) -> bool:
        """Whether this fault matches a request to ``endpoint`` by/about ``agent_id`` at ``now``
        (``draining``: whether that agent is being drained)."""
        if self.endpoint not in ("*", endpoint):
            return False
        if self.while_draining and not draining:
            return False
        if self.agent_id is not None and self.agent_id != agent_id:
            return False
        if self.until is not None and now >= self.until:
            return False
        return self.count is None or self.fired < self.count

    def retry_after_header(self) -> str | None:
        """The ``Retry-After`` header value, if this fault sets one."""
        if self.retry_after is None:
            return None
        return f"{self.retry_after:g}"


class FaultSet:
    """The active faults of one coordinator; every method is thread-safe."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._faults: list[Fault] = []

    def add(self, fault: Fault) -> Fault:
        """Activate ``fault`` (after those already active; the first match wins) and return it."""
        with self._lock:
            self._faults.append(fault)
        return fault

    def remove(self, fault: Fault) -> bool:
        """Deactivate ``fault``; False if it was not active."""
        with self._lock:
            for i, active in enumerate(self._faults):
                if active is fault:
                    del self._faults[i]
                    return True
        return False

    def clear(self) -> None:
        """Deactivate every fault."""
        with self._lock:
            self._faults.clear()

    def active(self) -> list[Fault]:
        """Copies of the faults that can still fire."""
        now = self._clock()
        with self._lock:
            self._prune(now)
            return [dataclasses.replace(f) for f in self._faults]

    def take(self, endpoint: str, agent_id: str | None, draining: bool = False) -> Fault | None:
        """Consume the first fault that applies to this request; a copy of it, or None.

        Matching and counting happen under one lock so that ``count=N`` fires exactly N times
        however many requests race for it.
        """
        now = self._clock()
        with self._lock:
            for fault in self._faults:
                if fault.applies(endpoint, agent_id, now, draining):
                    fault.fired += 1
                    fired = dataclasses.replace(fault)
                    self._prune(now)
                    return fired
            self._prune(now)
        return None

    def _prune(self, now: float) -> None:
        self._faults = [
            f
            for f in self._faults
            if (f.count is None or f.fired < f.count) and (f.until is None or now < f.until)
        ]
