"""The coordinator's records: what it keeps about agents, jobs and steps, and retry rules.

Plain data, no locking: :class:`~fleetdrain.drill.coordinator.state.Coordinator` owns the live
records behind its lock and hands out deep copies; the pipelines
(:mod:`~fleetdrain.drill.coordinator.builds`) read those copies. Kept apart from the
coordinator so that both build on these types without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def parse_tags(items: list[str]) -> dict[str, str]:
    """Parse ``key=value`` tag strings; an entry without ``=`` maps to ``""``."""
    out: dict[str, str] = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


@dataclass(frozen=True)
class RetryRule:
    """An automatic retry rule of a step (``retry: automatic: [...]`` in a pipeline).

    ``exit_status``: ``None`` matches any, ``"*"`` any non-zero, else the exact status (an int
    is accepted and normalised, as pipelines write ``-1``). ``signal_reason``: ``None`` matches
    any, ``"*"`` any present reason, ``"none"`` an absent one, else the exact reason. ``limit``
    counts the retries this rule may cause for one step (key).
    """

    exit_status: str | None = None
    signal_reason: str | None = None
    limit: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.exit_status, int) and not isinstance(self.exit_status, bool):
            object.__setattr__(self, "exit_status", str(self.exit_status))
        if self.limit < 0:
            raise ValueError("limit must be >= 0")

    def matches(self, exit_status: str | None, signal_reason: str | None) -> bool:
        """Whether a job that finished with these values is retried by this rule."""
        if self.exit_status == "*":
            if exit_status is None or exit_status == "0":
                return False
        elif self.exit_status is not None and self.exit_status != exit_status:
            return False
        if self.signal_reason is None:
            return True
        if self.signal_reason == "*":
            return signal_reason is not None
        if self.signal_reason == "none":
            return signal_reason is None
        return self.signal_reason == signal_reason


@dataclass(frozen=True)
class Event:
    """Something that happened, stamped with the coordinator's clock."""

    time: float
    kind: str
    agent_id: str | None = None
    job_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobRecord:
    """One attempt of a step. ``chunks`` maps sequence to ``(offset, size, bytes)``.

    ``build_id`` / ``build_number`` / ``pipeline`` name the build the job belongs to (a
    pipeline's build, or for a job added on its own, a build of its step): every attempt of a
    step is in the same build, and the build's meta-data is shared by its jobs.
    """

    id: str
    key: str
    attempt: int
    retry_of: str | None
    command: str
    env: dict[str, str]
    agent_query_rules: list[str]
    retry_rules: list[RetryRule]
    token: str
    build_id: str = ""
    build_number: int = 0
    pipeline: str = ""
    state: str = "scheduled"
    agent_id: str | None = None
    exit_status: str | None = None
    signal: str | None = None
    signal_reason: str | None = None
    chunks_failed_count: int = 0
    chunks: dict[int, tuple[int, int, bytes]] = field(default_factory=dict)
    created_at: float = 0.0
    assigned_at: float | None = None
    accepted_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    canceled_at: float | None = None
    cancel_reason: str | None = None
    lost: bool = False
    retried: bool = False
    retried_by: str | None = None
    finish_body: dict[str, Any] | None = None

    @property
    def log(self) -> bytes:
        """The uploaded log, chunks in offset order (overlaps kept once; see log_complete)."""
        out = bytearray()
        for offset, _size, data in sorted(self.chunks.values(), key=lambda c: (c[0], c[1])):
            if offset >= len(out):
                out += data
            else:
                out += data[len(out) - offset :]
        return bytes(out)

    @property
    def log_complete(self) -> bool:
        """True when the chunks tile the log from offset 0 with no gap and no overlap."""
        end = 0
        for offset, size, _data in sorted(self.chunks.values(), key=lambda c: (c[0], c[1])):
            if offset != end:
                return False
            end += size
        return True

    @property
    def passed(self) -> bool:
        """Finished with exit status 0."""
        return self.state == "finished" and self.exit_status == "0"


@dataclass
class AgentRecord:
    """A registered agent as the coordinator sees it."""

    id: str
    name: str
    access_token: str
    hostname: str = ""
    version: str = ""
    priority: int | None = None
    meta_data: list[str] = field(default_factory=list)
    connection_state: str = "registered"
    paused: bool = False
    paused_until: float | None = None
    pause_note: str | None = None
    stop_requested: bool = False
    stop_force: bool = False
    job_id: str | None = None
    heartbeats: list[float] = field(default_factory=list)
    registered_at: float = 0.0
    connected_at: float | None = None
    disconnected_at: float | None = None
    lost_at: float | None = None
    last_job_finished_at: str | None = None
    requests: int = 0
    request_headers_missing: int = 0

    @property
    def last_heartbeat(self) -> float | None:
        """Time of the latest recorded heartbeat."""
        return self.heartbeats[-1] if self.heartbeats else None

    @property
    def tags(self) -> dict[str, str]:
        """``meta_data`` as a dict."""
        return parse_tags(self.meta_data)


@dataclass
class StepRecord:
    """Every attempt of one logical step (job ``key``) and the step's outcome.

    ``outcome``: ``passed`` (some attempt exited 0), ``scheduled`` or ``running`` (the latest
    attempt is waiting or in progress), ``lost`` (the latest attempt was lost), ``canceled``,
    else ``failed``.
    """

    key: str
    attempts: list[JobRecord]
    outcome: str

    @property
    def retries(self) -> int:
        """How many attempts beyond the first."""
        return len(self.attempts) - 1

    @property
    def lost_attempts(self) -> int:
        """How many attempts the server gave up on (agent lost or gone)."""
        return sum(1 for a in self.attempts if a.lost)
