"""The drill's report: what each scenario showed, as data (``--json``) and as a timeline.

This module is the contract between the parts of the drill: the scenarios fill it in, the
terminal table, ``--json`` and ``--html`` render it, and ``fleetdrain drill --aws`` fills in the
same shape from a real game day.

One clock: times on a timeline (``t``) and the report's durations are *AWS seconds* since the
scenario started, the clock every deadline is on (a 120 s ``stopTimeout`` is 120 whatever the
pace; on ``--aws`` they are wall seconds, which are AWS's). The local drill adds each event's
wall-clock time beside it (``wall``), and each scenario's wall seconds.

Outcomes: ``passed``, ``failed`` (a build was lost, or the scenario showed what it must not),
and ``inconclusive``: the scenario ran out of time, or failed without losing a build while its
machine was too slow for it (a ``cause`` says which, with the pace to retry at). Inconclusive
is never a pass and never a loss; :attr:`DrillReport.exit_status` gives it a status of its own.

Which agent ran: the local drill's wrapped scenarios run the Go ``buildkite-agent`` behind
``wrap`` when one is installed, else fleetdrain's agent as its stand-in; the report says which
(:attr:`DrillReport.wrapped_agent`, and each wrapped scenario's :attr:`ScenarioReport.agent`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, computed_field, model_validator

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

#: What a scenario came to (see the module docstring).
Outcome = Literal["passed", "failed", "inconclusive"]

#: ``fleetdrain drill``'s exit statuses.
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INCONCLUSIVE = 3


class TimelineEvent(BaseModel):
    """One thing that happened during a scenario."""

    t: float = Field(description="AWS seconds since the scenario started (the drill's clock)")
    kind: EventKind
    subject: str = Field(description="agent name, job id, task id, instance id or 'controller'")
    what: str = Field(description="short label, e.g. 'SIGTERM', 'finished exit 0', 'CONTINUE'")
    detail: dict[str, object] = Field(default_factory=dict)
    wall: float | None = Field(
        default=None, description="wall-clock seconds since the scenario started (local drill)"
    )


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
    wall_seconds: float = Field(default=0.0, description="wall-clock seconds it took")
    aws_seconds: float | None = Field(
        default=None, description="AWS seconds it covered (its timeline's clock)"
    )
    ok: bool = False
    #: None when built from ``ok`` alone: filled in from it (``passed`` / ``failed``).
    outcome: Outcome | None = None
    cause: str | None = Field(
        default=None, description="why it failed or is inconclusive, in one line"
    )
    load: float | None = Field(
        default=None, description="the highest 1-minute load average seen while it ran"
    )
    max_stall_seconds: float | None = Field(
        default=None, description="the longest its process was kept from running (wall s)"
    )
    retry_time_scale: float | None = Field(
        default=None, description="inconclusive: the --time-scale to retry it at"
    )
    agent: str | None = Field(
        default=None,
        description="the Buildkite agent behind wrap, in a wrapped scenario: "
        "'buildkite-agent 3.135.0' or 'fleetdrain-agent start (stand-in)'",
    )
    notes: list[str] = Field(default_factory=list)
    timeline: list[TimelineEvent] = Field(default_factory=list)

    @model_validator(mode="after")
    def _outcome_from_ok(self) -> ScenarioReport:
        if self.outcome is None:
            self.outcome = "passed" if self.ok else "failed"
        self.ok = self.outcome == "passed"
        return self

    def judge(self, outcome: Outcome, cause: str | None = None) -> None:
        """Set the outcome (and ``ok`` with it) and its cause."""
        self.outcome = outcome
        self.ok = outcome == "passed"
        self.cause = cause

    @property
    def inconclusive(self) -> bool:
        return self.outcome == "inconclusive"

    @property
    def verdict(self) -> str:
        """``ok`` / ``FAILED`` / ``inconclusive``, with what a ``before`` case means in words."""
        if self.outcome == "inconclusive":
            return "inconclusive"
        if self.kind == "before":
            return "loss shown" if self.ok else "FAILED: no loss seen"
        return "ok" if self.ok else "FAILED"


#: What a :class:`WrappedAgent` is: the Go agent, or fleetdrain's agent in its place.
WrappedProgram = Literal["buildkite-agent", "fleetdrain-agent start"]


class WrappedAgent(BaseModel):
    """What the local drill's wrapped scenarios ran as the Buildkite agent behind ``wrap``
    (:mod:`fleetdrain.drill.wrapped_agent` chooses it), and why."""

    program: WrappedProgram
    path: str | None = Field(default=None, description="the buildkite-agent binary run")
    version: str | None = Field(
        default=None, description="what its --version said (None: unknown, or the stand-in)"
    )
    why: str = Field(
        description="how it was chosen, in words: 'found on PATH', '--buildkite-agent', "
        "'none on PATH; --buildkite-agent PATH to use one', ..."
    )
    version_error: str | None = Field(
        default=None, description="why the version is unknown (its --version failed)"
    )

    @property
    def go(self) -> bool:
        """Whether the Go agent runs (not the stand-in)."""
        return self.program == "buildkite-agent"

    @property
    def label(self) -> str:
        """``buildkite-agent 3.135.0``, ``buildkite-agent (version unknown)`` or
        ``fleetdrain-agent start (stand-in)``: a scenario's :attr:`ScenarioReport.agent`."""
        if not self.go:
            return "fleetdrain-agent start (stand-in)"
        return f"buildkite-agent {self.version or '(version unknown)'}"

    @computed_field  # type: ignore[prop-decorator]
    @property
    def summary(self) -> str:
        """The report's line: which agent the wrapped scenarios ran, and why."""
        return self.sentence("ran")

    def sentence(self, verb: str) -> str:
        """``wrapped scenarios <verb> buildkite-agent 3.135.0 (/usr/local/bin/buildkite-agent,
        found on PATH)``, or ``... fleetdrain-agent start as the stand-in for buildkite-agent
        (none on PATH; ...)``."""
        if not self.go:
            return (
                f"wrapped scenarios {verb} fleetdrain-agent start as the stand-in for "
                f"buildkite-agent ({self.why})"
            )
        version = f" {self.version}" if self.version else ""
        unknown = "" if self.version else f", version unknown: {self.version_error or '?'}"
        where = f"{self.path}, {self.why}{unknown}"
        return f"wrapped scenarios {verb} buildkite-agent{version} ({where})"


class DrillReport(BaseModel):
    """A whole drill run (local or ``--aws``)."""

    mode: Literal["local", "aws"] = "local"
    started_at: str = Field(description="ISO 8601, UTC")
    wall_seconds: float = 0.0
    time_scale: float = 1.0
    pace: str = Field(default="", description="how the pace was chosen, in one line")
    cores: int | None = None
    load: float | None = Field(default=None, description="the load average at the start")
    concurrency: int | None = Field(default=None, description="scenarios run side by side")
    pid_namespaces: bool = False
    pid_namespaces_reason: str = ""
    wrapped_agent: WrappedAgent | None = Field(
        default=None, description="the Buildkite agent behind wrap (local drill)"
    )
    scenarios: list[ScenarioReport] = Field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every ``after`` scenario lost nothing and every ``before`` showed a loss."""
        return all(s.ok for s in self.scenarios)

    @property
    def failed(self) -> list[ScenarioReport]:
        return [s for s in self.scenarios if s.outcome == "failed"]

    @property
    def inconclusive(self) -> list[ScenarioReport]:
        return [s for s in self.scenarios if s.outcome == "inconclusive"]

    @property
    def verdict(self) -> str:
        """``OK``, ``FAILED``, or ``INCONCLUSIVE`` (nothing failed, something could not tell)."""
        if self.failed:
            return "FAILED"
        return "INCONCLUSIVE" if self.inconclusive else "OK"

    @property
    def exit_status(self) -> int:
        """0 when OK, 1 when a scenario failed, 3 when none failed but one was inconclusive."""
        if self.failed:
            return EXIT_FAILED
        return EXIT_INCONCLUSIVE if self.inconclusive else EXIT_OK

    def write_json(self, path: Path) -> None:
        """Write the report as JSON (the ``--json`` file)."""
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def read_json(cls, path: Path) -> DrillReport:
        """Read a report written by :meth:`write_json`."""
        return cls.model_validate_json(path.read_text())
