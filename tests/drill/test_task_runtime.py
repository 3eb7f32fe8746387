"""The drill's local task runtime: ECS tasks as real agent processes (PID 1 where possible),
StopTask -> SIGTERM -> SIGKILL after stopTimeout, STOPPED with the exit code, the ECS event
routed to the deployed drain monitor, and task protection reaching GetTaskProtection."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from fleetdrain.drill.world.fleet import CLUSTER, Fleet, local_fleet
from fleetdrain.drill.world.processes import pid_namespaces_available
from fleetdrain.drill.world.task_runtime import TaskDefinition

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

SCALE = 10.0  # drill seconds per wall second
WORKER = (
    'echo "I am $DRILL_TASK_NAME, pid $$, wrap on $FLEETDRAIN_HEALTH_CHECK_ADDR"; exec sleep 30'
)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    ok, _why = pid_namespaces_available()
    with local_fleet(
        "runtime",
        workdir=tmp_path_factory.mktemp("runtime"),
        time_scale=SCALE,
        instances=1,
        pid1=ok,
    ) as f:
        f.runtime.register(
            TaskDefinition("agents", 120.0, ("--cancel-grace-period", "1", "--drain-margin", "0.5"))
        )
        # A shell-form entrypoint with a 20 s (drill) stopTimeout: SIGTERM never reaches the agent.
        f.runtime.register(TaskDefinition("shell", 20.0, shell_entrypoint=True))
        # A container definition with its own entryPoint and command (wrap in front of a shell
        # worker), and an environment with a port of the task's own.
        f.runtime.register(
            TaskDefinition(
                "wrapped-sh",
                120.0,
                entry_point=("fleetdrain-agent", "wrap", "--"),
                command=("/bin/sh", "-c", WORKER),
                environment=(("FLEETDRAIN_HEALTH_CHECK_ADDR", "127.0.0.1:{port:wrap}"),),
                status_port="wrap",
            )
        )
        yield f


def stopped_events(fleet: Fleet, task_arn: str) -> list[dict]:
    return [
        e
        for e in fleet.gaps.events
        if e["detail-type"] == "ECS Task State Change" and e["detail"]["taskArn"] == task_arn
    ]


def stop_task(fleet: Fleet, task_arn: str) -> None:
    with fleet.lock:
        fleet.client("ecs").stop_task(cluster=CLUSTER, task=task_arn, reason="drill test")


def wait_connected(fleet: Fleet, name: str) -> str:
    fleet.wait(
        lambda: (
            (a := fleet.coord.agent_named(name)) is not None and a.connection_state == "connected"
        ),
        20,
        f"{name} to connect",
    )
    agent = fleet.coord.agent_named(name)
    assert agent is not None
    return agent.id


def test_an_idle_agent_task_stops_at_once_with_exit_0(fleet: Fleet) -> None:
    task = fleet.runtime.run_task(fleet.instances[0], "agents", name="idle-1")
    agent_id = wait_connected(fleet, "idle-1")
    # The agent's tags came from the stand-in's task metadata: the ARN moto gave the task.
    tags = fleet.coord.agent(agent_id).meta_data
    assert f"ecs:task-arn={task.arn}" in tags
    # ...and from its instance's IMDS (infra/ runs the agents with --tags-from-ec2-meta-data).
    assert f"aws:instance-id={fleet.instances[0]}" in tags
    started = time.monotonic()
    stop_task(fleet, task.arn)
    assert task.stopped.wait(10)
    assert time.monotonic() - started < 3.0
    assert task.exit_code == 0
    (event,) = stopped_events(fleet, task.arn)
    assert event["detail"]["containers"][0]["exitCode"] == 0
    with fleet.lock:
        described = fleet.client("ecs").describe_tasks(cluster=CLUSTER, tasks=[task.arn])
    assert described["tasks"][0]["lastStatus"] == "STOPPED"
    # The event went through the deployed rule to the drain monitor (no drain: ignored).
    fleet.wait(
        lambda: any(
            i.function == "DrainMonitorFunction" and i.event.get("id") == event["id"]
            for i in fleet.invocations()
        ),
        5,
        "the drain monitor to get the STOPPED event",
    )


def test_a_busy_agent_is_protected_while_its_job_runs(fleet: Fleet) -> None:
    task = fleet.runtime.run_task(fleet.instances[0], "agents", name="busy-1")
    wait_connected(fleet, "busy-1")
    job = fleet.coord.add_job("sleep 1.5; echo done", key="busy-1")
    ecs = fleet.client("ecs")

    def protected() -> bool:
        with fleet.lock:
            out = ecs.get_task_protection(cluster=CLUSTER, tasks=[task.arn])
        return bool(out["protectedTasks"][0]["protectionEnabled"])

    fleet.wait(protected, 10, "protection on while the job runs")
    fleet.wait(lambda: fleet.coord.job(job.id).passed, 10, "the job to pass")
    fleet.wait(lambda: not protected(), 10, "protection off when idle")
    stop_task(fleet, task.arn)
    assert task.stopped.wait(10) and task.exit_code == 0


def test_sigterm_that_is_never_heard_ends_in_sigkill_at_stop_timeout(fleet: Fleet) -> None:
    if not fleet.runtime.pid1:
        pytest.skip("a shell as PID 1 needs a PID namespace")
    task = fleet.runtime.run_task(fleet.instances[0], "shell", name="shell-1")
    wait_connected(fleet, "shell-1")
    started = time.monotonic()
    stop_task(fleet, task.arn)
    assert not task.stopped.wait(1.0), "sh as PID 1 ignores SIGTERM"
    assert task.stopped.wait(10)
    waited = time.monotonic() - started
    # stopTimeout 20 drill seconds = 2 wall seconds at this scale.
    assert 1.9 <= waited < 4.0, waited
    assert task.exit_code == 137
    (event,) = stopped_events(fleet, task.arn)
    assert event["detail"]["containers"][0]["exitCode"] == 137
    whats = [(e.kind, e.what) for e in fleet.timeline.sorted() if e.subject == "shell-1"]
    assert ("signal", "SIGTERM") in whats and ("signal", "SIGKILL") in whats
    assert whats.index(("signal", "SIGTERM")) < whats.index(("signal", "SIGKILL"))


def test_a_container_runs_its_entry_point_and_command_as_registered(fleet: Fleet) -> None:
    if not fleet.runtime.pid1:
        pytest.skip("the entry point is PID 1 only in a PID namespace")
    with fleet.lock:
        registered = fleet.client("ecs").describe_task_definition(taskDefinition="wrapped-sh")
    (container,) = registered["taskDefinition"]["containerDefinitions"]
    # What infra/ would register: the definition's words, as written.
    assert container["entryPoint"] == ["fleetdrain-agent", "wrap", "--"]
    assert container["command"] == ["/bin/sh", "-c", WORKER]
    assert container["environment"] == [
        {"name": "FLEETDRAIN_HEALTH_CHECK_ADDR", "value": "127.0.0.1:{port:wrap}"}
    ]
    task = fleet.runtime.run_task(fleet.instances[0], "wrapped-sh", name="wrapped-sh-1")
    port = task.ports["wrap"]
    fleet.wait(lambda: "I am wrapped-sh-1" in task.process.output(), 10, "the worker to start")
    # The entry point is PID 1 (wrap), the command its child (pid 2); the port was filled in.
    assert f"pid 2, wrap on 127.0.0.1:{port}" in task.process.output()

    def states() -> list[str]:
        return [
            e.what for e in fleet.timeline.sorted() if (e.kind, e.subject) == ("agent", task.name)
        ]

    fleet.wait(lambda: "idle" in states(), 10, "wrap's /status on the timeline")
    stop_task(fleet, task.arn)
    assert task.stopped.wait(10)
    # sh has no SIGTERM handler: it died of wrap's graceful signal, and wrap passed that on.
    assert task.exit_code == 143, task.process.output()
    assert "sending SIGTERM to the worker" in task.process.output()


def test_the_fleet_gives_logging_back() -> None:
    import logging

    from fleetdrain.drill.world.fleet import _quiet_logs

    agent_log = logging.getLogger("fleetdrain.ecs")
    before = agent_log.getEffectiveLevel()
    restore = _quiet_logs()
    assert agent_log.getEffectiveLevel() == logging.CRITICAL
    restore()
    assert agent_log.getEffectiveLevel() == before, "later tests read the agent's logs"
