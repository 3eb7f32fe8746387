"""The real agent (as PID 1) against stand-ins of the ECS agent's endpoints and IMDS.

Tags from task metadata v4 and EC2 metadata reach the coordinator; task scale-in protection is
on exactly while a job runs; ``/health``, ``/status`` and ``fleetdrain-agent health`` tell the
truth about heartbeats.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from fleetdrain.drill.aws.endpoints import EcsAgentStandIn, ImdsStandIn
from fleetdrain.drill.coordinator import Fault

pytestmark = [pytest.mark.slow, pytest.mark.pid1]


def _health_exit(addr: str) -> int:
    return subprocess.run(
        [sys.executable, "-m", "fleetdrain.agent.cli", "health", "--addr", addr],
        capture_output=True,
        timeout=10,
    ).returncode


def _get(addr: str, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=3) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def test_tags_protection_and_health_on_ecs(make_fleet):
    fleet = make_fleet(heartbeat_interval=0.4)
    ecs = EcsAgentStandIn(cluster="ci-cluster")
    imds = ImdsStandIn("i-0abc", life_cycle="spot")
    with ecs.serve(), imds.serve():
        task = ecs.add_task("task-1")
        env = {**ecs.env_for("task-1"), "FLEETDRAIN_IMDS_ENDPOINT": imds.base_url_for("i-0abc")}
        proc, name, addr = fleet.agent(
            "--tags-from-ecs-meta-data",
            "--tags-from-ec2-meta-data",
            "--tags",
            "queue=default",
            env=env,
            health=True,
        )
        agent_id = fleet.agent_id(name)
        assert addr is not None

        tags = fleet.coord.agent(agent_id).tags
        assert tags["ecs:task-arn"] == task.task_arn
        assert tags["ecs:cluster"].endswith("ci-cluster")
        assert tags["aws:instance-id"] == "i-0abc"
        assert tags["aws:instance-life-cycle"] == "spot"
        assert tags["queue"] == "default"

        # Idle: healthy, unprotected.
        time.sleep(0.5)
        assert _get(addr, "/health")[0] == 200
        assert _health_exit(addr) == 0
        assert not ecs.protection("task-1").enabled
        assert _get(addr, "/status")[1]["aggregate_status"] == "idle"

        job = fleet.coord.add_job("echo working; sleep 1.5; echo done")
        fleet.wait_job_state(job.id, ("running",))
        assert fleet.coord.wait_for(lambda _c: ecs.protection("task-1").enabled, 2), (
            "protection did not follow the job"
        )
        status = _get(addr, "/status")[1]
        assert status["state"] == "busy"
        assert status["aggregate_status"] == "busy"  # what `wrap --busy-probe` reads
        assert status["job"]["id"] == job.id
        assert status["task_protection"]["enabled"] is True

        fleet.wait_job_state(job.id, ("finished",))
        assert fleet.coord.wait_for(lambda _c: not ecs.protection("task-1").enabled, 2), (
            "protection stayed on after the job"
        )
        puts = [p.enabled for p in ecs.puts("task-1") if p.status == 200]
        assert puts == [True, False], puts

        # Heartbeats stop reaching the server: unhealthy after 2 x the interval.
        fleet.coord.faults.add(Fault(endpoint="heartbeat", kind="status", status=503))
        assert fleet.coord.wait_for(lambda _c: _get(addr, "/health")[0] == 503, 5)
        assert _health_exit(addr) == 1
        fleet.coord.faults.clear()
        assert fleet.coord.wait_for(lambda _c: _get(addr, "/health")[0] == 200, 5)

        proc.send(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_protection_failures_do_not_stop_the_job(make_fleet, tmp_path):
    fleet = make_fleet()
    ecs = EcsAgentStandIn()
    gate = tmp_path / "protected"
    with ecs.serve():
        ecs.add_task("task-2")
        ecs.fail_next(2, 500, task_id="task-2")
        proc, name, _ = fleet.agent(env=ecs.env_for("task-2"))  # protection on: ECS_AGENT_URI
        fleet.agent_id(name)
        # The job runs until the test has seen protection on: the order is what is judged,
        # not how fast a loaded machine retries.
        job = fleet.coord.add_job(f"echo ok; while [ ! -e {gate} ]; do sleep 0.05; done")
        fleet.wait_job_state(job.id, ("running",))
        # Two failed PUTs, then retried: the job, still running, is protected.
        assert fleet.coord.wait_for(lambda _c: ecs.protection("task-2").enabled, 30)
        assert fleet.coord.job(job.id).state == "running"
        gate.touch()
        fleet.wait_job_state(job.id, ("finished",))
        assert fleet.coord.job(job.id).exit_status == "0"
        proc.send(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert [(p.status, p.enabled) for p in ecs.puts("task-2")] == [
            (500, True),
            (500, True),
            (200, True),
            (200, False),
        ]


def test_health_command_fails_without_an_agent():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert _health_exit(f"127.0.0.1:{port}") == 1


def test_sigterm_during_start_up_metadata_lookup_exits_at_once(make_fleet):
    """As PID 1 a signal without a handler is dropped: start-up must not be deaf to SIGTERM."""
    fleet = make_fleet()
    with socket.socket() as silent:  # accepts, never answers: a metadata endpoint that hangs
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(10)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}/v4/abc"
        proc, name, _ = fleet.agent(
            "--tags-from-ecs-meta-data", env={"ECS_CONTAINER_METADATA_URI_V4": uri}
        )
        conn, _ = silent.accept()  # the agent is now waiting on the metadata endpoint
        with conn:
            sent = time.monotonic()
            proc.send(signal.SIGTERM)
            code = proc.wait(timeout=5)
            took = time.monotonic() - sent
    assert code == 0, proc.output()
    assert took < 0.5, f"took {took:.2f}s"
    assert fleet.coord.agent_named(name) is None  # never registered
