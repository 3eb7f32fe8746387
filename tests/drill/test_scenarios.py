"""A short local drill (a few scenarios, compressed time) judged by its report: builds passed,
retried and lost, the "before" cases' loss, and the timeline the HTML report draws."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetdrain.agent.buildkite.models import RegisterRequest
from fleetdrain.drill.coordinator import Coordinator, Fault
from fleetdrain.drill.report.model import DrillReport, ScenarioReport
from fleetdrain.drill.runner import SCENARIOS, run_local_drill
from fleetdrain.drill.world.processes import pid_namespaces_available

pytestmark = [pytest.mark.slow, pytest.mark.pid1, pytest.mark.timeout(120)]

NAMES = ["stop-task", "deploy", "scale-in", "rebalance", "shell-pid1", "heartbeat-stops"]


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> DrillReport:
    ok, why = pid_namespaces_available()
    if not ok:
        pytest.skip(f"the drill's agents run as PID 1: {why}")
    messages: list[str] = []
    result = run_local_drill(
        NAMES,
        workdir=tmp_path_factory.mktemp("drill"),
        time_scale=0.5,  # twice the default pace: 20 drill seconds per wall second
        progress=messages.append,
    )
    assert any(m.startswith("stop-task: ") for m in messages), "the live view is fed"
    return result


def by_name(report: DrillReport, name: str) -> ScenarioReport:
    (scenario,) = [s for s in report.scenarios if s.name == name]
    return scenario


def whats(s: ScenarioReport, kind: str, subject: str | None = None) -> list[str]:
    return [e.what for e in s.timeline if e.kind == kind and subject in (None, e.subject)]


def test_the_report_covers_the_scenarios_asked_for(report: DrillReport) -> None:
    assert [s.name for s in report.scenarios] == NAMES
    assert report.mode == "local" and report.time_scale == 0.5 and report.pid_namespaces
    assert [s.kind for s in report.scenarios] == [SCENARIOS[n][0] for n in NAMES]
    assert report.ok, [(s.name, s.notes) for s in report.scenarios]


def test_stop_task_finishes_the_build_where_it_ran(report: DrillReport) -> None:
    s = by_name(report, "stop-task")
    assert s.ok and (s.jobs_run, s.passed, s.retried, s.lost) == (1, 1, 0, 0)
    assert whats(s, "signal", "stop-task-a1") == ["SIGTERM"]
    # The agent's own state (its /status): it heard SIGTERM and drained the running build.
    states = whats(s, "agent", "stop-task-a1")
    assert states.index("busy") < states.index("draining")
    assert "exited 0" in whats(s, "task", "stop-task-a1")
    assert "finished exit 0" in whats(s, "job", "stop-task #1")
    # The task's STOPPED event went through the deployed rule to the drain monitor.
    assert any(e.subject == "DrainMonitorFunction" for e in s.timeline if e.kind == "controller")
    assert s.max_heartbeat_gap_intervals is not None and s.max_heartbeat_gap_intervals < 2.0
    # The drain outlived the stop signal by the rest of the build, far from stopTimeout.
    assert s.longest_drain_seconds is not None and s.longest_drain_seconds < 60


def test_scale_in_lets_a_long_build_finish_then_completes_the_hook(report: DrillReport) -> None:
    s = by_name(report, "scale-in")
    assert s.ok and (s.passed, s.retried, s.lost) == (1, 0, 0)
    controller = whats(s, "controller", "LifecycleHookFunction")
    assert controller and controller[0] == "started (soft)"
    hook = whats(s, "hook")
    assert "heartbeat 1" in hook, "the action was kept alive while the build ran"
    assert hook[-1] == "hook completed (CONTINUE)"
    # The build (200 s) outlasted stopTimeout (120 s): only the soft phase made that possible.
    assert s.longest_drain_seconds is not None and s.longest_drain_seconds > 120
    assert s.hook_completion_latency_seconds is not None
    assert s.hook_completion_latency_seconds < 20
    # Agents were SIGTERMed only after the build had finished (the hard phase).
    t_finished = next(e.t for e in s.timeline if e.what == "finished exit 0")
    t_sigterm = min(e.t for e in s.timeline if e.kind == "signal" and e.what == "SIGTERM")
    assert t_sigterm > t_finished


def test_a_deployment_waits_for_the_protected_busy_task(report: DrillReport) -> None:
    s = by_name(report, "deploy")
    assert s.ok and (s.passed, s.retried, s.lost) == (1, 0, 0)
    # The idle old task went at once; the busy one only once its build was done.
    busy = next(e.detail["agent"] for e in s.timeline if e.what == "finished exit 0")
    idle = ({"deploy-old-1", "deploy-old-2"} - {busy}).pop()
    t_finished = next(e.t for e in s.timeline if e.what == "finished exit 0")
    sigterm = {e.subject: e.t for e in s.timeline if e.kind == "signal" and e.what == "SIGTERM"}
    assert sigterm[idle] < t_finished < sigterm[busy]
    assert "protection on" in whats(s, "task", busy)


def test_rebalance_is_a_soft_drain_that_retires_the_instance(report: DrillReport) -> None:
    s = by_name(report, "rebalance")
    assert s.ok and (s.passed, s.retried, s.lost) == (1, 0, 0)
    drain = [e.what for e in s.timeline if e.subject.startswith("drain ")]
    assert drain[0] == "phase soft" and "forced" not in drain
    assert drain[-1] == "phase done (drained)" and "DRAINING" in drain
    assert "paused" in whats(s, "agent", "rebalance-a1")


def test_shell_as_pid1_shows_the_lost_build(report: DrillReport) -> None:
    s = by_name(report, "shell-pid1")
    assert s.kind == "before" and s.ok and s.verdict == "loss shown"
    assert s.lost >= 1
    signals = whats(s, "signal", "shell-pid1-a1")
    assert signals == ["SIGTERM", "SIGKILL"], "SIGTERM unheard, SIGKILL at stopTimeout"
    states = whats(s, "agent", "shell-pid1-a1")
    assert "busy" in states and "draining" not in states, "the agent never knew"
    assert "exited 137 (SIGKILL)" in whats(s, "task", "shell-pid1-a1")
    assert "lost" in whats(s, "agent", "shell-pid1-a1")
    assert "lost" in whats(s, "job", "shell-pid1 #1")


def test_heartbeats_that_stop_while_draining_lose_the_build(report: DrillReport) -> None:
    s = by_name(report, "heartbeat-stops")
    assert s.kind == "before" and s.ok and s.lost >= 1
    agent = whats(s, "agent", "heartbeat-stops-a1")
    assert agent.index("paused") < agent.index("lost"), "lost during the drain"
    assert s.max_heartbeat_gap_intervals is not None and s.max_heartbeat_gap_intervals > 5


def test_a_fault_can_wait_for_the_drain() -> None:
    coord = Coordinator()
    reg = coord.register(coord.registration_token, RegisterRequest(name="a"))
    coord.connect(reg.access_token, {})
    coord.faults.add(Fault("heartbeat", "ignore", while_draining=True))
    assert coord.take_fault("heartbeat", reg.id) is None, "not draining yet"
    coord.pause_agent(reg.id)
    fault = coord.take_fault("heartbeat", reg.id)
    assert fault is not None and fault.kind == "ignore"


def test_unknown_scenarios_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="nope"):
        run_local_drill(["nope"], workdir=tmp_path)


def test_the_cli_lists_exactly_the_scenarios_that_exist() -> None:
    from fleetdrain.drill.scenarios import SPECS

    # local_drill.SCENARIOS stays import-light for the CLI; it must not drift from the bodies.
    assert list(SCENARIOS) == list(SPECS)
    assert {n: (s.kind, s.description) for n, s in SPECS.items()} == SCENARIOS
