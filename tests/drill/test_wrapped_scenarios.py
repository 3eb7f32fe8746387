"""The drill's wrapped scenarios (issue 6): stop-task, scale-in and spot with every agent behind
``fleetdrain-agent wrap``, and scale-in under a queue worker that is not a Buildkite agent,
judged by their reports. Plus the queue worker on its own behind wrap: a unit it is allowed to
finish completes, a unit it is forced to abandon counts as lost.

The drill runs at a calibrated pace (twice the default on an idle machine, slower on a busy
one), and the assertions are on the scenario's own clock (AWS seconds: the order of events,
deadlines, margins in AWS seconds that scale with the pace); a scenario that was inconclusive
skips its test, with the cause.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fleetdrain.drill.report.model import DrillReport, ScenarioReport
from fleetdrain.drill.runner import run_local_drill
from fleetdrain.drill.world.processes import agent_command, pid_namespaces_available, spawn_agent
from fleetdrain.drill.world.queue_worker import WorkQueue

pytestmark = [pytest.mark.slow, pytest.mark.pid1, pytest.mark.timeout(900)]

NAMES = ["wrapped-stop-task", "wrapped-scale-in", "wrapped-spot", "wrapped-worker-scale-in"]


def require_pid1() -> None:
    ok, why = pid_namespaces_available()
    if not ok:
        pytest.skip(f"the drill's tasks run as PID 1: {why}")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> DrillReport:
    require_pid1()
    return run_local_drill(
        NAMES,
        workdir=tmp_path_factory.mktemp("wrapped"),
        base_time_scale=0.5,  # twice the default pace on an idle machine, calibrated from there
    )


def by_name(report: DrillReport, name: str) -> ScenarioReport:
    """The scenario's report; the test skips if it was inconclusive (it cannot tell)."""
    (scenario,) = [s for s in report.scenarios if s.name == name]
    if scenario.inconclusive:
        pytest.skip(f"{name} was inconclusive: {scenario.cause}")
    return scenario


def whats(s: ScenarioReport, kind: str, subject: str | None = None) -> list[str]:
    return [e.what for e in s.timeline if e.kind == kind and subject in (None, e.subject)]


def first_t(s: ScenarioReport, kind: str, subject: str, what: str) -> float:
    return next(e.t for e in s.timeline if (e.kind, e.subject, e.what) == (kind, subject, what))


def test_every_wrapped_scenario_loses_nothing(report: DrillReport) -> None:
    assert [s.name for s in report.scenarios] == NAMES
    assert all(s.kind == "after" for s in report.scenarios)
    assert not report.failed, [(s.name, s.cause, s.notes) for s in report.failed]
    assert all(s.lost == 0 for s in report.scenarios)


def test_wrapped_stop_task_finishes_the_build_where_it_ran(report: DrillReport) -> None:
    s = by_name(report, "wrapped-stop-task")
    agent = "wrapped-stop-task-a1"
    assert (s.jobs_run, s.passed, s.retried, s.lost) == (1, 1, 0, 0)
    assert whats(s, "signal", agent) == ["SIGTERM"], "wrap exited before stopTimeout's SIGKILL"
    # wrap's own state (its /status): the worker went busy with the job, then drained.
    states = whats(s, "agent", agent)
    assert states.index("busy") < states.index("draining")
    assert "exited 0" in whats(s, "task", agent), "wrap passed the agent's exit status on"
    assert "finished exit 0" in whats(s, "job", "wrapped-stop-task #1")
    # Protection came from wrap, and only once the job ran (an always-busy source would turn it
    # on before the agent had even registered).
    protection = whats(s, "task", agent)
    assert protection.index("protection on") < protection.index("protection off")
    assert first_t(s, "job", "wrapped-stop-task #1", "running on " + agent) <= first_t(
        s, "task", agent, "protection on"
    )


def test_wrapped_scale_in_holds_the_tasks_up_until_the_hard_drain(report: DrillReport) -> None:
    s = by_name(report, "wrapped-scale-in")
    busy, idle = "wrapped-scale-in-a1", "wrapped-scale-in-a2"
    assert (s.jobs_run, s.passed, s.retried, s.lost) == (1, 1, 0, 0)
    assert whats(s, "hook")[-1] == "hook completed (CONTINUE)"
    drain = [e.what for e in s.timeline if e.subject.startswith("drain ")]
    assert drain[0] == "phase soft" and "forced" not in drain
    # The build (200 s) outlasted stopTimeout: only a soft drain lets it finish.
    assert s.longest_drain_seconds is not None and s.longest_drain_seconds > 120
    assert s.hook_completion_latency_seconds is not None
    assert s.hook_completion_latency_seconds < 20
    # IMDS said Terminated: the idle agent's wrap drained it and then held the task up, idle,
    # until DRAINING's SIGTERM; the busy one did the same once its build had finished.
    assert "holding" in whats(s, "agent", idle)
    for task in (busy, idle):
        assert "IMDS lifecycle-terminated:Terminated" in whats(s, "agent", task)
    t_finished = first_t(s, "job", "wrapped-scale-in #1", "finished exit 0")
    assert first_t(s, "signal", busy, "SIGTERM") > t_finished
    assert first_t(s, "signal", idle, "SIGTERM") > t_finished
    for task in (busy, idle):
        assert whats(s, "signal", task) == ["SIGTERM"]
        # Neither task ended by itself when its agent had drained: only ECS's SIGTERM ended it
        # (the busy one's wrap may have held for a moment or not at all, as the controller's
        # tick fell; the idle one held for the whole build).
        assert first_t(s, "signal", task, "SIGTERM") < first_t(s, "task", task, "exited 0")
    assert "protection on" not in whats(s, "task", idle), "an idle agent was protected"


def test_wrapped_spot_forces_agent_stop_before_the_notice_runs_out(report: DrillReport) -> None:
    s = by_name(report, "wrapped-spot")
    doomed = "wrapped-spot-a1"
    assert (s.jobs_run, s.passed, s.retried, s.lost) == (2, 1, 1, 0)
    assert "finished exit 143 (agent_stop)" in whats(s, "job", "wrapped-spot #1")
    assert "finished exit 0" in whats(s, "job", "wrapped-spot #2")
    assert "running on wrapped-spot-b1" in whats(s, "job", "wrapped-spot #2")
    # wrap read the notice from IMDS itself (its deadline is the notice's), and the build was
    # cancelled and reported before the instance was reclaimed (by the controller's forced stop
    # or wrap's SIGQUIT: they are 5 s apart, and which is first is not the point here).
    assert "IMDS spot:terminate" in whats(s, "agent", doomed)
    t_notice = next(e.t for e in s.timeline if e.what == "spot interruption notice")
    t_finish = first_t(s, "job", "wrapped-spot #1", "finished exit 143 (agent_stop)")
    t_reclaim = next(e.t for e in s.timeline if e.what.startswith("instance reclaimed"))
    # On the scenario's clock: the reclaim two minutes after the notice, the build cancelled
    # and reported before it (the controller forces at 100 s, wrap at the notice's time minus
    # its cancel grace and drain margin: 15 s, more where the drill may not compress them).
    assert t_reclaim - t_notice == pytest.approx(120, abs=1)
    assert t_notice < t_finish < t_reclaim
    assert "SIGKILL" not in whats(s, "signal", doomed)
    assert "exited 0" in whats(s, "task", doomed)


def test_wrapped_worker_scale_in_sees_the_worker_busy_through_protection(
    report: DrillReport,
) -> None:
    s = by_name(report, "wrapped-worker-scale-in")
    assert (s.jobs_run, s.passed, s.retried, s.lost) == (3, 3, 0, 0)
    assert whats(s, "job", "unit-1") == ["running on worker-a1", "completed on worker-a1"]
    for unit in ("unit-2", "unit-3"):  # submitted during the drain: the other instance's
        assert whats(s, "job", unit) == ["running on worker-b1", "completed on worker-b1"]
    # Busy from its children: protection on while the unit ran, off once it completed.
    t_claimed = first_t(s, "job", "unit-1", "running on worker-a1")
    t_done = first_t(s, "job", "unit-1", "completed on worker-a1")
    t_scale_in = next(e.t for e in s.timeline if e.what == "Terminating:Wait")
    on = [e.t for e in s.timeline if (e.subject, e.what) == ("worker-a1", "protection on")]
    off = [e.t for e in s.timeline if (e.subject, e.what) == ("worker-a1", "protection off")]
    # Margins in AWS seconds (wrap's busy poll is 1 s of it): wall margins that scale with the
    # pace, 0.5 s at the tests' idle pace.
    margin = 10.0
    assert any(t_claimed - margin <= t < t_scale_in for t in on)
    assert not [t for t in off if t_scale_in < t < t_done - margin], "protection dropped mid-unit"
    # The controller had no coordinator agent to ask: the soft phase held on protection alone,
    # and DRAINING came only after the unit had completed (the unit is 200 s, stopTimeout 120).
    drain = [e.what for e in s.timeline if e.subject.startswith("drain ")]
    assert drain[0] == "phase soft" and "forced" not in drain
    assert "fallback to StopTask" not in drain
    assert "phase done (drained)" in drain
    assert next(e.t for e in s.timeline if e.what == "DRAINING") > t_done
    assert "heartbeat 1" in whats(s, "hook")
    assert whats(s, "hook")[-1] == "hook completed (CONTINUE)"
    # wrap drained the worker on IMDS's Terminated, then held the task up until DRAINING.
    states = whats(s, "agent", "worker-a1")
    assert states.index("busy") < states.index("draining")
    signal_t = first_t(s, "signal", "worker-a1", "SIGTERM")
    assert t_done < signal_t < first_t(s, "task", "worker-a1", "exited 0")
    assert "IMDS lifecycle-terminated:Terminated" in states
    assert whats(s, "signal", "worker-a1") == ["SIGTERM"]
    assert "exited 0" in whats(s, "task", "worker-a1")
    assert s.max_heartbeat_gap_intervals is None, "no coordinator agent in this scenario"


# ------------------------------------------------------------------ the queue worker itself


def _wait(predicate: Callable[[], bool], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("stop", "completes", "status"),
    [(signal.SIGTERM, True, 0), (signal.SIGQUIT, False, 3)],
)
def test_the_queue_worker_behind_wrap_finishes_or_loses_its_unit(
    tmp_path: Path, stop: signal.Signals, completes: bool, status: int
) -> None:
    """SIGTERM to wrap: the worker finishes the unit in hand and takes no more. SIGQUIT: wrap's
    force signal, the worker abandons the unit, which then counts as lost."""
    require_pid1()
    work = WorkQueue(tmp_path / "work")
    log = tmp_path / "w1.log"
    env = dict(work.environment(0.05))
    env["DRILL_TASK_NAME"] = "w1"
    wrap = [*agent_command(), "wrap", "--busy-interval", "0.05", "--"]
    proc = spawn_agent(
        [], command=[*wrap, "/bin/bash", str(work.script)], log_path=log, env=env, pid1=True
    )
    try:
        work.submit("u1", 1.5)
        _wait(lambda: work.unit("u1").claimed_by == "w1", 10, log)
        work.submit("u2", 0.1)
        proc.send(stop)
        code = proc.wait(15)
    finally:
        proc.kill()
    unit = work.unit("u1")
    assert (unit.done_by == "w1") == completes, log.read_text()
    assert unit.lost == (not completes)
    assert work.unit("u2").claimed_by is None, "a draining worker took new work"
    assert code == status, log.read_text()
