"""``wrap -- fleetdrain-agent start ...`` as PID 1 against the coordinator on loopback.

The project's own agent stands in for the Go agent behind ``wrap``: it drains on SIGTERM, and
on SIGQUIT cancels its job and finishes it as ``agent_stop``. wrap adds nothing of the protocol;
what it must show is that the drain still loses nothing, with the deadline now on wrap's clock.
"""

from __future__ import annotations

import signal
import time

import pytest

from fleetdrain.drill.aws.endpoints import EcsAgentStandIn
from fleetdrain.drill.coordinator import RetryRule
from fleetdrain.drill.world.processes import agent_command, spawn_agent
from tests.agent.wrap_support import Wrapped, free_addr, require_pid1, wait_until, wrap_command

pytestmark = [pytest.mark.slow, pytest.mark.pid1]

RETRY = [RetryRule(exit_status="-1", limit=2), RetryRule(signal_reason="agent_stop", limit=2)]
COUNTING_JOB = 'for i in $(seq 1 10); do echo "line $i"; sleep 0.1; done; echo all-done'


def _wrapped_agent(
    fleet, name: str, *wrap_options: str, env: dict[str, str] | None = None
) -> Wrapped:
    require_pid1()
    addr = free_addr()
    start = [
        *agent_command(),
        "start",
        "--token",
        fleet.coord.registration_token,
        "--endpoint",
        fleet.server.agent_endpoint,
        "--name",
        name,
        "--build-path",
        str(fleet.tmp / "builds"),
        # Its own clock must not matter: wrap's deadline drives it with SIGQUIT.
        "--stop-timeout",
        "600",
        "--no-task-protection",  # protection is wrap's job here
    ]
    proc = spawn_agent(
        [],
        command=wrap_command(
            "--health-check-addr", addr, "--busy-interval", "0.1", *wrap_options, "--", *start
        ),
        log_path=fleet.tmp / f"{name}.log",
        env=env,
        pid1=True,
    )
    fleet.agents.append(proc)
    return Wrapped(proc, None, addr)


def test_drain_mid_job_finishes_the_job_and_exits_with_the_agents_status(make_fleet):
    fleet = make_fleet()
    ecs = EcsAgentStandIn()
    ecs.add_task("task-1")
    with ecs.serve():
        w = _wrapped_agent(fleet, "wrapped-1", env=ecs.env_for("task-1"))
        agent_id = fleet.agent_id("wrapped-1")
        job = fleet.coord.add_job(COUNTING_JOB, retry=RETRY)
        fleet.wait_job_state(job.id, ("running",))
        # Busy from the worker's children (the agent runs the job as one): protection on.
        wait_until(lambda: w.status()["busy"], 3, w.output)
        wait_until(lambda: ecs.protection("task-1").enabled, 3, w.output)
        w.send(signal.SIGTERM)
        assert w.wait(20) == 0, w.output()
    done = fleet.coord.job(job.id)
    assert done.state == "finished" and done.exit_status == "0"
    assert done.signal_reason is None and not done.retried
    assert "all-done" in done.log.decode()
    finished = fleet.coord.events_of("finish", job_id=job.id)[-1].time
    disconnected = fleet.coord.events_of("disconnect", agent_id=agent_id)[-1].time
    assert 0 <= disconnected - finished < 1.0
    assert fleet.coord.heartbeat_gaps(agent_id) < 0.5 * 1.5 + 0.1
    assert w.output().count("sending SIGTERM to the worker") == 1
    assert "sending SIGQUIT" not in w.output()
    enables = [p.enabled for p in ecs.puts("task-1") if p.status == 200]
    assert enables[:1] == [True], enables


def test_deadline_forces_agent_stop_and_the_retry_runs_elsewhere(make_fleet):
    fleet = make_fleet()
    stop_timeout, grace, margin = 6.0, 2.0, 1.0
    w = _wrapped_agent(
        fleet,
        "wrapped-a",
        "--stop-timeout",
        str(stop_timeout),
        "--cancel-grace-period",
        str(grace),
        "--drain-margin",
        str(margin),
    )
    fleet.agent_id("wrapped-a")
    job = fleet.coord.add_job(
        'echo "on $BUILDKITE_AGENT_NAME"; '
        'if [ "$BUILDKITE_AGENT_NAME" = wrapped-a ]; then sleep 60; fi; echo passed',
        retry=RETRY,
        key="long-build",
    )
    fleet.wait_job_state(job.id, ("running",))
    sigterm_at = time.monotonic()
    w.send(signal.SIGTERM)
    # The service places a new task elsewhere: another wrapped agent.
    _wrapped_agent(fleet, "wrapped-b")
    fleet.agent_id("wrapped-b")
    assert w.wait(stop_timeout + 5) == 0, w.output()
    exited_after = time.monotonic() - sigterm_at
    assert exited_after < stop_timeout, f"outlived the stop timeout: {exited_after:.1f}s"
    first = fleet.coord.job(job.id)
    assert first.signal_reason == "agent_stop" and first.retried, first
    finish = fleet.coord.events_of("finish", job_id=job.id)[-1].time - sigterm_at
    force_at = stop_timeout - grace - margin
    assert force_at - 0.3 < finish < stop_timeout - margin, finish
    assert "sending SIGQUIT to the worker" in w.output()
    assert fleet.coord.wait_for(lambda c: c.step("long-build").outcome == "passed", 15)
    step = fleet.coord.step("long-build")
    assert step.attempts[-1].agent_id == fleet.coord.agent_named("wrapped-b").id
    assert step.lost_attempts == 0


def test_idle_agent_exits_at_once(make_fleet):
    fleet = make_fleet()
    w = _wrapped_agent(fleet, "wrapped-idle")
    agent_id = fleet.agent_id("wrapped-idle")
    wait_until(lambda: w.status()["state"] == "idle", 3, w.output)
    sent = w.send(signal.SIGTERM)
    assert w.wait(5) == 0, w.output()
    took = w.exited_at - sent
    assert took < 1.0, f"idle wrapped agent took {took:.2f}s to exit"
    assert fleet.coord.agent(agent_id).connection_state == "disconnected"
