"""What a scenario showed, measured from the fleet once it is over: builds passed, retried and
lost (the coordinator's record), drain and hook latencies (AWS's and the controller's record,
drill seconds), heartbeat gaps, and the coordinator's events merged into the timeline; and the
verdict (:func:`judge`).

The verdict's rule: an "after" scenario fails when a build was lost, or when it showed what it
must not (its notes) on a machine that kept up with it; a "before" case passes when it showed
its loss. Anything else that went wrong on a machine too slow for the scenario (its process
stalled for a good part of its tightest window, or the load was far above the cores:
:func:`fleetdrain.drill.pace.too_slow`), and a scenario that ran out of time, is
*inconclusive*, with the pace to retry at: never a pass, never a lost build. A note that starts
with :data:`FIGURES` is what a scenario measured (requests, peaks), not something it showed
that it must not: it never fails a scenario. Background agents (the organization's padding,
:data:`~fleetdrain.drill.world.fleet.BACKGROUND_TAG`) are left out of the timeline and the
heartbeat figures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetdrain.drill.pace import retry_scale, too_slow
from fleetdrain.drill.world.fleet import HEARTBEAT_INTERVAL, is_background

if TYPE_CHECKING:
    from fleetdrain.drill.pace import Pace
    from fleetdrain.drill.report.model import ScenarioReport
    from fleetdrain.drill.scenarios import Run

#: The start of a note that gives a scenario's figures (informational: see the module docstring).
FIGURES = "figures: "


def fill_report(run: Run) -> None:
    """Fill ``run.report``'s counts, figures, notes and timeline (:func:`judge` gives the
    verdict)."""
    fleet, report = run.fleet, run.report
    coord = fleet.coord
    for key in run.keys:
        step = coord.step(key)
        report.jobs_run += len(step.attempts)
        report.retried += step.retries
        report.lost += step.lost_attempts
        report.passed += 1 if step.outcome == "passed" else 0
        if step.outcome != "passed" and report.kind == "after":
            report.notes.append(f"build {key}: {step.outcome}")
    units = run.work.units() if run.work is not None else []
    for unit in units:
        # A non-Buildkite worker's unit of work counts as a build: run once claimed, passed
        # once its completion marker exists, lost when claimed and killed before that.
        report.jobs_run += 1 if unit.claimed_by else 0
        report.passed += 1 if unit.done_by else 0
        report.lost += 1 if unit.lost else 0
        if not unit.done_by and report.kind == "after":
            report.notes.append(f"unit {unit.name}: {'lost' if unit.lost else 'never taken'}")
    report.longest_drain_seconds = _longest_drain(run)
    report.hook_completion_latency_seconds = _hook_latency(run)
    gaps = [
        coord.heartbeat_gaps(a.id)
        for a in coord.agents()
        if a.connected_at is not None and not is_background(a)
    ]
    if gaps:
        # The interval the agents were given (whole seconds when a Go agent runs).
        interval = coord.wire_seconds(HEARTBEAT_INTERVAL)
        report.max_heartbeat_gap_intervals = round(max(gaps) / interval, 2)
    run.expected = len(run.keys) + len(units)
    _merge_coordinator_events(run)
    report.timeline = fleet.timeline.sorted()


def _machine(report: ScenarioReport, cores: int, window: float | None = None) -> str:
    """``load 3.1 on 2 cores, stalls up to 0.84 s against a 1.00 s window``."""
    text = f"load {report.load if report.load is not None else 0:.1f} on {cores} cores"
    if report.max_stall_seconds is not None:
        text += f", stalls up to {report.max_stall_seconds:.2f} s"
        if window is not None:
            text += f" against a {window:.2f} s window"
    return text


def out_of_time_cause(report: ScenarioReport, cores: int, wall: float) -> str:
    """The cause of a scenario that ran out of time (its retry pace already set)."""
    return (
        f"machine too slow ({_machine(report, cores)}): out of time after {wall:.0f} s wall; "
        f"retry with --time-scale {report.retry_time_scale:g}"
    )


def judge(
    report: ScenarioReport,
    *,
    pace: Pace,
    window: float,
    timed_out: str | None = None,
    expected: int | None = None,
) -> None:
    """The scenario's outcome and its cause (see the module docstring).

    ``window``: the tightest wall-clock window the scenario gave (an agent's forced stop to
    its SIGKILL); ``timed_out``: why, when it ran out of time; ``expected``: the builds (and
    units) it ran, which must all pass in an "after" scenario."""
    cores = pace.machine.cores
    slow = too_slow(
        stall=report.max_stall_seconds, load_seen=report.load, n_cores=cores, window=window
    )
    retry = retry_scale(pace.time_scale, stall=report.max_stall_seconds, window=window)
    if timed_out:
        report.notes.append(timed_out)

    def inconclusive(what: str) -> None:
        report.retry_time_scale = retry
        report.judge(
            "inconclusive",
            f"machine too slow ({_machine(report, cores, window)}): {what}; "
            f"retry with --time-scale {retry:g}",
        )

    if report.kind == "before":
        if report.lost > 0:
            report.judge("passed")
        elif timed_out or slow:
            inconclusive(timed_out or "no build was lost")
        else:
            report.notes.append("no build was lost: the drill could not see the failure")
            report.judge("failed", "no build was lost: the drill could not see the failure")
        return
    shown = [n for n in report.notes if not n.startswith(FIGURES)]
    if report.lost > 0:
        what = f"{report.lost} build(s) lost"
        report.judge("failed", what + (f"; {shown[0]}" if shown else ""))
        return
    clean = bool(expected) and report.passed == expected and not shown
    if clean:
        report.judge("passed")
    elif timed_out or slow:
        inconclusive(timed_out or (shown[0] if shown else "not every build passed"))
    else:
        report.judge("failed", shown[0] if shown else "not every build passed")


def _longest_drain(run: Run) -> float | None:
    """Drill seconds: each controller drain (start to done), and each task from SIGTERM to
    its exit."""
    fleet = run.fleet
    spans: list[float] = []
    for rec in fleet.drain_records():
        if rec.completed_at is not None:
            spans.append(rec.completed_at - rec.started_at)
    for task in fleet.runtime.tasks.values():
        if task.sigterm_at is not None and task.stopped_at is not None:
            spans.append((task.stopped_at - task.sigterm_at) * fleet.clock.scale)
    return round(max(spans), 2) if spans else None


def _hook_latency(run: Run) -> float | None:
    """Drill seconds from the instance's last task exit to the hook's completion."""
    fleet = run.fleet
    latencies: list[float] = []
    for iid, action in fleet.gaps.actions.items():
        if action.state != "completed" or action.completed_at is None:
            continue
        arns = {t.arn for t in fleet.runtime.tasks.values() if t.instance_id == iid}
        exits = [e.stopped_at for arn, e in fleet.gaps.exits.items() if arn in arns]
        if exits:
            latencies.append(max(0.0, action.completed_at - max(exits)))
    return round(max(latencies), 2) if latencies else None


_AGENT_EVENTS = {
    "register": "registered",
    "connect": "connected",
    "pause": "paused",
    "resume": "resumed",
    "disconnect": "disconnected",
}


def _merge_coordinator_events(run: Run) -> None:
    fleet = run.fleet
    coord = fleet.coord
    agents = coord.agents()
    names = {a.id: a.name for a in agents}
    jobs = {j.id: j for j in coord.jobs()}

    def job_label(job_id: str | None) -> str:
        job = jobs.get(job_id or "")
        return str(job_id) if job is None else f"{job.key} #{job.attempt}"

    background = {a.id for a in agents if is_background(a)}
    record = fleet.timeline.record
    for e in coord.events:
        if e.agent_id in background:
            continue
        agent = names.get(e.agent_id or "", e.agent_id or "coordinator")
        d: dict[str, Any] = dict(e.detail)
        if e.kind in _AGENT_EVENTS and e.job_id is None:
            record("agent", agent, _AGENT_EVENTS[e.kind], {}, at=e.time)
        elif e.kind == "stop":
            record("agent", agent, "stop (force)" if d.get("force") else "stop", {}, at=e.time)
        elif e.kind == "lost" and e.job_id is None:
            record("agent", agent, "lost", {}, at=e.time)
        elif e.kind == "lost":
            record("job", job_label(e.job_id), "lost", {"agent": agent}, at=e.time)
        elif e.kind == "schedule" and e.job_id:
            record("job", job_label(e.job_id), "scheduled", {}, at=e.time)
        elif e.kind == "start" and e.job_id:
            record("job", job_label(e.job_id), f"running on {agent}", {}, at=e.time)
        elif e.kind == "cancel" and e.job_id:
            record("job", job_label(e.job_id), f"canceling ({d.get('reason')})", {}, at=e.time)
        elif e.kind == "finish" and e.job_id:
            what = f"finished exit {d.get('exit_status')}"
            if d.get("signal_reason"):
                what += f" ({d['signal_reason']})"
            record("job", job_label(e.job_id), what, {"agent": agent}, at=e.time)
        elif e.kind == "retry" and e.job_id:
            record(
                "job", job_label(e.job_id), f"retried (attempt {d.get('attempt')})", {}, at=e.time
            )
        elif e.kind == "fault":
            what = f"{d.get('endpoint')} {d.get('fault_kind')}"
            if d.get("status"):
                what += f" {d['status']}"
            record("fault", agent, what, {}, at=e.time)
