"""``fleetdrain drill`` without ``--aws``: the scenarios, run on this machine, as a DrillReport.

Interim: runs the agent-level scenarios of :mod:`drill.agent_drill` (real agents as PID 1
against the embedded coordinator). The whole fleet (moto, the task runtime, the Lambda
controller, scale-in, spot, rebalance, faults and the "before" cases) replaces their insides
in the drill issue; this function's signature is what the CLI and the tests rely on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from drill.agent_drill import SCENARIOS as _AGENT_SCENARIOS
from drill.agent_drill import ScenarioResult, run_agent_drill
from drill.processes import pid_namespaces_available
from drill.report import DrillReport, ScenarioKind, ScenarioReport

#: Scenario name -> (kind, one-line description), in the order they run by default.
SCENARIOS: dict[str, tuple[ScenarioKind, str]] = {
    "stop-task": ("after", "SIGTERM while a build runs: it finishes on the same agent"),
    "deadline": ("after", "SIGTERM under a build longer than stopTimeout: cancelled, retried"),
}
assert set(SCENARIOS) == set(_AGENT_SCENARIOS)


def _convert(r: ScenarioResult) -> ScenarioReport:
    gap = None
    if r.max_heartbeat_gap is not None and r.heartbeat_interval:
        gap = r.max_heartbeat_gap / r.heartbeat_interval
    return ScenarioReport(
        name=r.name,
        description=r.description,
        kind=SCENARIOS[r.name][0],
        jobs_run=r.jobs_run,
        passed=r.passed,
        retried=r.retried,
        lost=r.lost,
        longest_drain_seconds=r.drain_seconds,
        max_heartbeat_gap_intervals=gap,
        ok=r.ok,
        notes=list(r.notes),
    )


def run_local_drill(
    scenarios: list[str] | None = None,
    *,
    workdir: Path | None = None,
    time_scale: float = 1.0,
    progress: Callable[[str], None] = lambda _msg: None,
) -> DrillReport:
    """Run the named scenarios (all by default) on this machine; the report."""
    started = time.monotonic()
    pid1, reason = pid_namespaces_available()
    report = DrillReport(
        mode="local",
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        time_scale=time_scale,
        pid_namespaces=pid1,
        pid_namespaces_reason=reason,
    )
    results, _fleet = run_agent_drill(scenarios, workdir, progress=progress)
    report.scenarios = [_convert(r) for r in results]
    report.wall_seconds = time.monotonic() - started
    return report
