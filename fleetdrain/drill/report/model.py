"""The drill's report: what each scenario showed, as data (``--json``) and as a timeline.

This module is the contract between the parts of the drill: the scenarios fill it in, the
terminal table, ``--json`` and ``--html`` render it, and ``fleetdrain drill --aws`` fills in the
same shape from a real game day. Times on a timeline are seconds since the scenario started,
wall-clock (not scaled by ``--time-scale``); ``time_scale`` says how much drill time each one is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

#: What a timeline entry is about; the HTML timeline draws one lane per ``subject``, coloured
#: by ``kind``.
EventKind = Literal[
    "agent",  # an agent's state: registered, paused, draining, disconnected, lost, exited
    "job",  # a job's state: scheduled, running, finished (exit), canceled, retried, lost
    "signal",  # a signal delivered to a task: SIGTERM, SIGQUIT, SIGKILL
    "task",  # an ECS task: RUNNING, STOPPED (exit code), protection on/off
    "instance",  # an instance: Terminating:Wait, DRAINING, spot notice, terminated
    "hook",  # the lifecycle action: heartbeat recorded, completed (result)
    "controller",  # a handler invocation and what the drain did (phase change, force, fallback)
    "fault",  # a fault injected at the coordinator or in the events
    "deadline",  # a SIGKILL deadline (stopTimeout or spot) that a drain had to beat
    "note",
]

#: ``after``: fleetdrain's behaviour, must lose nothing. ``before``: the anti-patterns fleets
#: run today, must show the loss (or the drill could not see one).
ScenarioKind = Literal["after", "before"]


class TimelineEvent(BaseModel):
    """One thing that happened during a scenario."""

    t: float = Field(description="seconds since the scenario started (wall clock)")
    kind: EventKind
    subject: str = Field(description="agent name, job id, task id, instance id or 'controller'")
    what: str = Field(description="short label, e.g. 'SIGTERM', 'finished exit 0', 'CONTINUE'")
    detail: dict[str, object] = Field(default_factory=dict)


class ScenarioReport(BaseModel):
    """One scenario's outcome."""

    name: str
    description: str
    kind: ScenarioKind = "after"
    jobs_run: int = 0
    passed: int = 0
    retried: int = 0
    lost: int = 0
    longest_drain_seconds: float | None = None
    hook_completion_latency_seconds: float | None = None
    max_heartbeat_gap_intervals: float | None = Field(
        default=None, description="longest time without a heartbeat, in heartbeat intervals"
    )
    wall_seconds: float = 0.0
    ok: bool = False
    notes: list[str] = Field(default_factory=list)
    timeline: list[TimelineEvent] = Field(default_factory=list)

    @property
    def verdict(self) -> str:
        """``ok`` / ``FAILED``, with what a ``before`` case means in words."""
        if self.kind == "before":
            return "loss shown" if self.ok else "FAILED: no loss seen"
        return "ok" if self.ok else "FAILED"


class DrillReport(BaseModel):
    """A whole drill run (local or ``--aws``)."""

    mode: Literal["local", "aws"] = "local"
    started_at: str = Field(description="ISO 8601, UTC")
    wall_seconds: float = 0.0
    time_scale: float = 1.0
    pid_namespaces: bool = False
    pid_namespaces_reason: str = ""
    scenarios: list[ScenarioReport] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every ``after`` scenario lost nothing and every ``before`` showed a loss."""
        return all(s.ok for s in self.scenarios)

    def write_json(self, path: Path) -> None:
        """Write the report as JSON (the ``--json`` file)."""
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def read_json(cls, path: Path) -> DrillReport:
        """Read a report written by :meth:`write_json`."""
        return cls.model_validate_json(path.read_text())
