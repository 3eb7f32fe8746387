"""The agent's half of the game day: real agents as PID 1 against the embedded coordinator.

Two scenarios that lose builds in real fleets, run for real on this machine:

- ``stop-task``: SIGTERM (what ``ecs stop-task`` delivers) while a build runs: the agent keeps
  heartbeating, lets the job finish, disconnects and exits 0.
- ``deadline``: SIGTERM under a job longer than ``stopTimeout``: the agent cancels it before
  SIGKILL could come, reports it ``agent_stop``, the retry rule re-runs it on another agent,
  and it passes there.

The whole fleet (moto, the Lambda controller, scale-in and spot) joins these in the drill issue.
"""

from __future__ import annotations

import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from drill.coordinator import Coordinator, CoordinatorServer, RetryRule
from drill.processes import AgentProcess, pid_namespaces_available, spawn_agent

RETRY = [RetryRule(exit_status="-1", limit=2), RetryRule(signal_reason="agent_stop", limit=2)]


@dataclass
class ScenarioResult:
    """What one scenario showed."""

    name: str
    description: str
    jobs_run: int = 0
    passed: int = 0
    retried: int = 0
    lost: int = 0
    drain_seconds: float | None = None
    exit_after_job_seconds: float | None = None
    max_heartbeat_gap: float | None = None
    heartbeat_interval: float | None = None
    agent_exit_codes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ok: bool = False


class LocalFleet:
    """A coordinator on loopback and the agent processes started against it."""

    def __init__(self, workdir: Path, coord: Coordinator, server: CoordinatorServer) -> None:
        self.workdir = workdir
        self.coord = coord
        self.server = server
        self.pid1, self.pid1_reason = pid_namespaces_available()
        self.processes: list[AgentProcess] = []

    def start_agent(self, name: str, *extra: str) -> AgentProcess:
        """Start a real agent process (PID 1 of its own namespace where possible)."""
        proc = spawn_agent(
            [
                "start",
                "--token",
                self.coord.registration_token,
                "--endpoint",
                self.server.agent_endpoint,
                "--name",
                name,
                "--build-path",
                str(self.workdir / "builds"),
                *extra,
            ],
            log_path=self.workdir / f"{name}.log",
            pid1=self.pid1,
        )
        self.processes.append(proc)
        return proc

    def wait(self, predicate: Callable[[Coordinator], bool], timeout: float, what: str) -> None:
        """Wait for the coordinator to show ``what``; RuntimeError with the agents' logs if not."""
        if not self.coord.wait_for(predicate, timeout):
            tails = "\n".join(f"--- {p.log_path}\n{p.output()[-2000:]}" for p in self.processes)
            raise RuntimeError(f"timed out waiting for {what}\n{tails}")

    def agent_id(self, name: str, timeout: float = 15.0) -> str:
        """Wait until ``name`` is connected; its id."""
        self.wait(
            lambda c: (a := c.agent_named(name)) is not None and a.connection_state == "connected",
            timeout,
            f"{name} to connect",
        )
        agent = self.coord.agent_named(name)
        assert agent is not None
        return agent.id

    def close(self) -> None:
        """Kill whatever is still running."""
        for proc in self.processes:
            proc.kill()


def _tally(result: ScenarioResult, coord: Coordinator, key: str) -> None:
    step = coord.step(key)
    result.jobs_run += len(step.attempts)
    result.retried += step.retries
    result.lost += step.lost_attempts
    result.passed += 1 if step.outcome == "passed" else 0


def scenario_stop_task(fleet: LocalFleet) -> ScenarioResult:
    """SIGTERM mid-build: the build finishes on the same agent, nothing is retried or lost."""
    result = ScenarioResult("stop-task", "SIGTERM while a 3 s build runs")
    coord = fleet.coord
    proc = fleet.start_agent("stop-task-1")
    agent_id = fleet.agent_id("stop-task-1")
    job = coord.add_job(
        'for i in $(seq 1 30); do echo "step $i"; sleep 0.1; done', retry=RETRY, key="stop-task"
    )
    fleet.wait(lambda c: c.job(job.id).state == "running", 15, "the build to start")
    time.sleep(0.5)
    sigterm = time.monotonic()
    proc.send(signal.SIGTERM)
    code = proc.wait(timeout=60)
    result.agent_exit_codes.append(code)
    result.drain_seconds = time.monotonic() - sigterm
    finishes = coord.events_of("finish", job_id=job.id)
    if finishes:
        result.exit_after_job_seconds = max(0.0, time.monotonic() - finishes[-1].time)
    result.max_heartbeat_gap = coord.heartbeat_gaps(agent_id)
    result.heartbeat_interval = coord.heartbeat_interval
    _tally(result, coord, "stop-task")
    done = coord.job(job.id)
    if b"step 30" not in done.log:
        result.notes.append("the log is incomplete")
    result.ok = result.passed == 1 and result.lost == 0 and code == 0 and b"step 30" in done.log
    return result


def scenario_deadline(fleet: LocalFleet, stop_timeout: float = 8.0) -> ScenarioResult:
    """SIGTERM under a build longer than stopTimeout: cancelled, reported, retried, passes."""
    result = ScenarioResult(
        "deadline", f"SIGTERM under a build longer than stopTimeout ({stop_timeout:.0f}s)"
    )
    coord = fleet.coord
    proc = fleet.start_agent(
        "deadline-1",
        "--stop-timeout",
        str(stop_timeout),
        "--cancel-grace-period",
        "2",
        "--drain-margin",
        "1",
    )
    agent_id = fleet.agent_id("deadline-1")
    job = coord.add_job(
        'echo "on $BUILDKITE_AGENT_NAME"; '
        'if [ "$BUILDKITE_AGENT_NAME" = deadline-1 ]; then sleep 600; fi; echo built',
        retry=RETRY,
        key="deadline",
    )
    fleet.wait(lambda c: c.job(job.id).state == "running", 15, "the long build to start")
    sigterm = time.monotonic()
    proc.send(signal.SIGTERM)
    fleet.start_agent("deadline-2")
    code = proc.wait(timeout=stop_timeout + 10)
    result.agent_exit_codes.append(code)
    result.drain_seconds = time.monotonic() - sigterm
    if result.drain_seconds >= stop_timeout:
        result.notes.append("the agent outlived stopTimeout: ECS would have SIGKILLed it")
    fleet.wait(lambda c: c.step("deadline").outcome in ("passed", "failed"), 30, "the retry")
    result.max_heartbeat_gap = coord.heartbeat_gaps(agent_id)
    result.heartbeat_interval = coord.heartbeat_interval
    _tally(result, coord, "deadline")
    first = coord.job(job.id)
    if first.signal_reason != "agent_stop":
        result.notes.append(f"first attempt reported signal_reason={first.signal_reason}")
    result.ok = (
        result.passed == 1
        and result.lost == 0
        and code == 0
        and first.signal_reason == "agent_stop"
        and result.drain_seconds < stop_timeout
    )
    return result


SCENARIOS: dict[str, Callable[[LocalFleet], ScenarioResult]] = {
    "stop-task": scenario_stop_task,
    "deadline": scenario_deadline,
}


def run_agent_drill(
    names: list[str] | None = None,
    workdir: Path | None = None,
    progress: Callable[[str], None] = lambda _msg: None,
) -> tuple[list[ScenarioResult], LocalFleet]:
    """Run the named scenarios (all by default), each on a fresh coordinator."""
    base = workdir or Path(tempfile.mkdtemp(prefix="fleetdrain-drill-"))
    results: list[ScenarioResult] = []
    fleet: LocalFleet | None = None
    for name in names or list(SCENARIOS):
        coord = Coordinator(
            ping_interval=0.3,
            heartbeat_interval=0.5,
            job_status_interval=0.3,
            lost_agent_timeout=5.0,
            chunks_interval_seconds=0.5,
        )
        with CoordinatorServer(coord) as server:
            fleet = LocalFleet(base / name, coord, server)
            progress(f"{name}: running")
            try:
                results.append(SCENARIOS[name](fleet))
            finally:
                fleet.close()
            progress(f"{name}: {'ok' if results[-1].ok else 'FAILED'}")
    assert fleet is not None
    return results, fleet
