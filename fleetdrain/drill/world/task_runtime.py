"""The local task runtime: every ECS task the drill runs is a real ``fleetdrain-agent`` process.

What the ECS container agent and EC2 do on a real host, done on this machine:

- :meth:`TaskRuntime.run_task` starts the task in moto (``StartTask`` on the instance's
  container instance) and then its process: ``fleetdrain-agent start`` (the agent image's
  entry point), or the container definition's own ``entryPoint`` + ``command`` (e.g.
  ``fleetdrain-agent wrap -- ...``), as PID 1 of its own PID
  namespace where the machine allows it, with ``ECS_CONTAINER_METADATA_URI_V4`` and
  ``ECS_AGENT_URI`` pointing at an :class:`~fleetdrain.drill.aws.endpoints.EcsAgentStandIn` that
  serves its metadata and task protection; protection it sets reaches ECS
  (:attr:`~fleetdrain.drill.aws.gaps.AwsGaps.protection`, what ``GetTaskProtection`` answers).
- ``StopTask`` and ``DRAINING`` reach the runtime through :attr:`AwsGaps.on_sigterm`: SIGTERM
  to the task's process, then SIGKILL when the task definition's ``stopTimeout`` has passed.
- A process that exits marks its task STOPPED with its exit code, and ECS's ``Task State
  Change`` event goes out (:meth:`AwsGaps.task_exited`).
- :meth:`TaskRuntime.scale_in` puts the instance in ``Terminating:Wait`` and emits the
  lifecycle event; once the action is completed (or expires) the instance is terminated and
  whatever still runs on it is killed. :meth:`TaskRuntime.spot_interruption` emits the
  warning and kills the instance's processes when the two minutes are up.
- No task process outlives the runtime's process: each is started by
  :func:`~fleetdrain.drill.world.processes.spawn_agent` (it dies with this process, and its
  PID namespace with it), and :meth:`TaskRuntime.close` kills every one, with its job.

Durations of the task definition and of AWS (stopTimeout, the spot notice) are *drill*
seconds; :class:`DrillClock` turns them into wall seconds by the time scale.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shlex
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fleetdrain.drill.aws.endpoints import EcsAgentStandIn, ImdsStandIn
from fleetdrain.drill.aws.gaps import AwsGaps
from fleetdrain.drill.world.processes import AgentProcess, agent_command, spawn_agent

log = logging.getLogger("fleetdrain.drill.runtime")

SPOT_NOTICE_SECONDS = 120.0
#: How often (wall seconds) each agent's /status is read for the timeline.
STATUS_POLL_INTERVAL = 0.15


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


#: (kind, subject, what, detail[, at]) -> None: where the runtime reports what it did; ``at``
#: (a ``time.monotonic()`` stamp) dates an entry other than now (a deadline ahead).
Recorder = Callable[..., None]


class DrillClock:
    """Drill time: epoch seconds that run ``scale`` times faster than the wall clock.

    Everything that AWS or the controller measures (event times, lifecycle heartbeat
    timeouts, spot deadlines, drain budgets) runs on this clock; :meth:`wall` converts a drill
    duration into the wall seconds to actually wait.
    """

    def __init__(self, scale: float = 1.0, wall: Callable[[], float] = time.time) -> None:
        if scale <= 0:
            raise ValueError("the time scale must be > 0")
        self.scale = scale
        self._wall = wall
        self._origin = wall()

    def __call__(self) -> float:
        return self._origin + (self._wall() - self._origin) * self.scale

    def now_datetime(self) -> datetime:
        """Drill time as an aware datetime (the ECS stand-in's clock)."""
        return datetime.fromtimestamp(self(), UTC)

    def wall(self, drill_seconds: float) -> float:
        """How many wall seconds ``drill_seconds`` take."""
        return drill_seconds / self.scale

    def wall_ceil(self, drill_seconds: int) -> int:
        """:meth:`wall` rounded up to whole seconds (SQS delays and visibility timeouts)."""
        return max(0, math.ceil(drill_seconds / self.scale)) if drill_seconds > 0 else 0


#: The program name images put on PATH; in the drill it runs this checkout's agent.
AGENT_PROGRAM = "fleetdrain-agent"
#: ``{port:NAME}`` in a container's environment: a loopback port of the task's own.
_PORT = re.compile(r"\{port:([a-z0-9_-]+)\}")
#: ``{task:arn}`` and ``{task:instance-id}`` in a container's environment: the task's ARN and
#: its instance (ECS has no such substitution: the drill's way of giving an agent what it would
#: read from task metadata, e.g. the Go agent's tags, see :mod:`fleetdrain.drill.wrapped_agent`).
_TASK = re.compile(r"\{task:(arn|instance-id)\}")


@dataclass(frozen=True)
class TaskDefinition:
    """What the runtime needs of a task definition (the agent's container).

    Two ways to say what the container runs:

    - ``entry_point`` None: the agent image's own ``ENTRYPOINT ["fleetdrain-agent", "start"]``
      (infra/agent.Dockerfile) with flags the runtime adds (name, endpoint, health address, scaled
      stop timeout) and ``agent_args``.
    - ``entry_point`` (and ``command``): the container definition's ``entryPoint`` and
      ``command``, run as written (exec form: ``entry_point[0]`` is PID 1), as a task
      definition for another image (infra/wrap.Dockerfile's) registers them. Per-task values
      come in the environment, as ECS gives them: see :meth:`TaskRuntime.task_environment`.
    """

    family: str
    stop_timeout: float = 120.0  # drill seconds, the container's stopTimeout
    #: Extra ``fleetdrain-agent start`` flags (the container's command).
    agent_args: tuple[str, ...] = ()
    #: A shell-form entrypoint: ``/bin/sh -c "<agent start ...>; ..."`` as PID 1 (the
    #: anti-pattern that never forwards SIGTERM). False: exec form, the agent is PID 1.
    shell_entrypoint: bool = False
    container_name: str = "agent"
    entry_point: tuple[str, ...] | None = None
    command: tuple[str, ...] = ()
    #: The container's ``environment``. ``{port:NAME}`` in a value becomes a loopback port of
    #: the task's own: on ECS each task has its own network namespace and can use fixed ports
    #: (3901, 3902); here the tasks share one, as with dynamic host ports. ``{task:arn}`` and
    #: ``{task:instance-id}`` become the task's ARN and instance id.
    environment: tuple[tuple[str, str], ...] = ()
    #: Which ``{port:NAME}`` serves the task's PID 1 ``/status`` (the drill's timeline).
    status_port: str = "agent"


@dataclass
class RunningTask:
    """One task and its process."""

    arn: str
    task_id: str
    instance_id: str
    family: str
    group: str
    name: str
    process: AgentProcess
    definition: TaskDefinition
    sigterm_at: float | None = None  # wall, monotonic
    sigterm_drill: float | None = None  # the same moment on the drill clock
    sigkilled: bool = False
    exit_code: int | None = None
    stopped_at: float | None = None  # wall, monotonic
    stopped: threading.Event = field(default_factory=threading.Event)
    #: The loopback ports the task was given (``{port:NAME}``; ``agent`` for the agent image).
    ports: dict[str, int] = field(default_factory=dict)


class TaskRuntime:
    """Runs the cluster's tasks as processes and plays ECS's and EC2's part in stopping them.

    ``lock`` guards every call into moto (its backends are not thread-safe); the event router
    and the scenario use the same one.
    """

    def __init__(
        self,
        *,
        gaps: AwsGaps,
        ecs: Any,
        cluster: str,
        standin: EcsAgentStandIn,
        clock: DrillClock,
        coordinator_endpoint: str,
        registration_token: str,
        workdir: Path,
        lock: threading.RLock,
        pid1: bool,
        record: Recorder = lambda *_a: None,
        agent_env: Mapping[str, str] | None = None,
        imds: ImdsStandIn | None = None,
        sqs: Any = None,
        notification_queue_url: str | None = None,
    ) -> None:
        """``imds``: each instance's metadata (the agents' ``--tags-from-ec2-meta-data``, and
        the spot notice and target lifecycle state that IMDS publishes).
        ``notification_queue_url``: the Auto Scaling group's lifecycle notification target
        (an SQS queue, sent to with ``sqs``), if it has one besides EventBridge."""
        self.gaps = gaps
        self.ecs = ecs
        self.cluster = cluster
        self.standin = standin
        self.clock = clock
        self.endpoint = coordinator_endpoint
        self.registration_token = registration_token
        self.workdir = workdir
        self.lock = lock
        self.pid1 = pid1
        self.record = record
        self.agent_env = dict(agent_env or {})
        self.imds = imds
        self.sqs = sqs
        self.notification_queue_url = notification_queue_url
        self.definitions: dict[str, TaskDefinition] = {}
        self.tasks: dict[str, RunningTask] = {}
        self.container_instances: dict[str, str] = {}  # instance id -> container instance ARN
        self.terminated: set[str] = set()
        self._names = 0
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        gaps.on_sigterm = self._on_sigterm
        standin.on_protection = self._on_protection

    # ------------------------------------------------------------------ setup

    def register(self, definition: TaskDefinition) -> None:
        """Register the task definition with ECS (moto) and remember its runtime details."""
        container: dict[str, Any] = {
            "name": definition.container_name,
            "image": "fleetdrain-agent:latest",
            "memory": 512,
            "essential": True,
            "stopTimeout": int(definition.stop_timeout),
        }
        if definition.entry_point is not None:
            container["entryPoint"] = list(definition.entry_point)
            container["command"] = list(definition.command)
            container["environment"] = [{"name": k, "value": v} for k, v in definition.environment]
        with self.lock:
            self.ecs.register_task_definition(
                family=definition.family, containerDefinitions=[container]
            )
        self.definitions[definition.family] = definition

    def add_instance(self, instance_id: str) -> str:
        """Register the EC2 instance as a container instance of the cluster; its ARN."""
        with self.lock:
            out = self.ecs.register_container_instance(
                cluster=self.cluster,
                instanceIdentityDocument=json.dumps({"instanceId": instance_id}),
            )
        arn = str(out["containerInstance"]["containerInstanceArn"])
        self.container_instances[instance_id] = arn
        if self.imds is not None:
            with contextlib.suppress(ValueError):  # the stand-in's first instance exists
                self.imds.add_instance(instance_id, life_cycle="spot")
        return arn

    # ------------------------------------------------------------------ tasks

    def run_task(
        self,
        instance_id: str,
        family: str,
        *,
        group: str | None = None,
        name: str | None = None,
    ) -> RunningTask:
        """``StartTask`` on the instance, then the task's process. ``group`` defaults to the
        family's service (``service:<family>``): ECS service tasks, what DRAINING stops."""
        definition = self.definitions[family]
        group = group or f"service:{family}"
        with self.lock:
            out = self.ecs.start_task(
                cluster=self.cluster,
                taskDefinition=family,
                containerInstances=[self.container_instances[instance_id]],
                group=group,
                startedBy="fleetdrain-drill",
            )
        arn = str(out["tasks"][0]["taskArn"])
        task_id = arn.rsplit("/", 1)[-1]
        service = group.split(":", 1)[1] if group.startswith("service:") else None
        self.standin.add_task(
            task_id,
            family=family,
            service_name=service,
            container_name=definition.container_name,
        )
        self._names += 1
        name = name or f"{family}-{self._names}"
        ports: dict[str, int] = {}
        if definition.entry_point is None:
            ports["agent"] = _free_port()
            process = self._spawn(definition, name, task_id, instance_id, ports["agent"])
        else:
            process = self._spawn_container(definition, name, task_id, instance_id, ports)
        port = ports.get(definition.status_port)
        task = RunningTask(arn, task_id, instance_id, family, group, name, process, definition)
        task.ports = ports
        self.tasks[arn] = task
        self.record("task", name, "RUNNING", {"task_arn": arn, "instance": instance_id})
        self._thread(self._watch, task, name=f"watch-{name}")
        if port is not None:
            self._thread(self._watch_status, task, port, name=f"status-{name}")
        return task

    def _watch_status(self, task: RunningTask, port: int) -> None:
        """Put the agent's own state (its ``/status``: idle, busy, draining, stopping...) on
        the timeline as it changes; ``holding`` for a wrapper that stays up after a soft drain
        (its worker gone, waiting for ECS to stop the task)."""
        import httpx

        last: str | None = None
        seen: set[str] = set()
        with httpx.Client(timeout=1.0) as http:
            while not task.stopped.is_set() and not self._closed.is_set():
                try:
                    body = http.get(f"http://127.0.0.1:{port}/status").json()
                except (httpx.HTTPError, ValueError):
                    body = None
                state = body.get("state") if isinstance(body, dict) else None
                if isinstance(body, dict) and body.get("holding") is True:
                    state = "holding"
                if isinstance(state, str) and state != last:
                    last = state
                    detail = {"deadline_in_seconds": body.get("deadline_in_seconds")}
                    self.record("agent", task.name, state, detail)
                # wrap's IMDS watch: what it saw (a spot notice, lifecycle Terminated) and when.
                notices = body.get("imds_notices") if isinstance(body, dict) else None
                for notice in notices if isinstance(notices, list) else []:
                    if notice not in seen:
                        seen.add(notice)
                        self.record("agent", task.name, f"IMDS {notice}", {})
                task.stopped.wait(STATUS_POLL_INTERVAL)

    def _spawn(
        self, definition: TaskDefinition, name: str, task_id: str, instance_id: str, port: int
    ) -> AgentProcess:
        args = [
            "start",
            "--token",
            self.registration_token,
            "--endpoint",
            self.endpoint,
            "--name",
            name,
            "--build-path",
            str(self.workdir / "builds" / name),
            "--tags-from-ecs-meta-data",
            *(["--tags-from-ec2-meta-data"] if self.imds is not None else []),
            "--stop-timeout",
            f"{self.clock.wall(definition.stop_timeout):.3f}",
            # infra/ serves it on 127.0.0.1:3901; here the agents share one network namespace.
            "--health-check-addr",
            f"127.0.0.1:{port}",
            *definition.agent_args,
        ]
        env = {**self.agent_env, **self.standin.env_for(task_id)}
        if self.imds is not None:
            env["FLEETDRAIN_IMDS_ENDPOINT"] = self.imds.base_url_for(instance_id)
        log_path = self.workdir / f"{name}.log"
        if definition.shell_entrypoint:
            # ENTRYPOINT in shell form: /bin/sh is PID 1, runs the agent as a child and never
            # passes SIGTERM on (the trailing commands keep sh from exec'ing the agent).
            agent = shlex.join([*agent_command(), *args])
            script = f'{agent}; status=$?; echo "agent exited $status"; exit $status'
            return spawn_agent([], log_path=log_path, env=env, pid1=self.pid1,
                               command=["/bin/sh", "-c", script])  # fmt: skip
        return spawn_agent(args, log_path=log_path, env=env, pid1=self.pid1)

    def task_environment(
        self, definition: TaskDefinition, name: str, task_id: str, instance_id: str
    ) -> tuple[dict[str, str], dict[str, int]]:
        """A container's environment as ECS would give it (and the ports it was given).

        The container definition's own ``environment`` (its ``{port:NAME}`` filled in), plus
        what ECS and the task's secrets supply per task: the metadata and agent URIs, the
        agent token and endpoint, a name, a build path, and ``FLEETDRAIN_STOP_TIMEOUT`` equal
        to the container's stopTimeout (in wall seconds at the drill's pace), as infra/ sets
        it.
        """
        ports: dict[str, int] = {}

        def port(match: re.Match[str]) -> str:
            return str(ports.setdefault(match.group(1), _free_port()))

        known = {"arn": self.standin.task(task_id).task_arn, "instance-id": instance_id}

        def task_value(match: re.Match[str]) -> str:
            return known[match.group(1)]

        env = {
            **self.agent_env,
            **self.standin.env_for(task_id),
            "BUILDKITE_AGENT_TOKEN": self.registration_token,
            "BUILDKITE_AGENT_ENDPOINT": self.endpoint,
            "BUILDKITE_AGENT_NAME": name,
            "BUILDKITE_BUILD_PATH": str(self.workdir / "builds" / name),
            "FLEETDRAIN_STOP_TIMEOUT": f"{self.clock.wall(definition.stop_timeout):.3f}",
            # Not an ECS variable: the name the drill's timeline knows this task by.
            "DRILL_TASK_NAME": name,
        }
        if self.imds is not None:
            env["FLEETDRAIN_IMDS_ENDPOINT"] = self.imds.base_url_for(instance_id)
        for key, value in definition.environment:
            env[key] = _TASK.sub(task_value, _PORT.sub(port, value))
        return env, ports

    def _spawn_container(
        self,
        definition: TaskDefinition,
        name: str,
        task_id: str,
        instance_id: str,
        ports: dict[str, int],
    ) -> AgentProcess:
        """Run the container's ``entryPoint`` + ``command`` as written, exec form: the first
        word is PID 1. ``fleetdrain-agent`` is on the container's PATH (:meth:`_image_path`)."""
        assert definition.entry_point is not None
        env, given = self.task_environment(definition, name, task_id, instance_id)
        ports.update(given)
        env["PATH"] = os.pathsep.join([str(self._image_path()), os.environ.get("PATH", "")])
        argv = [*definition.entry_point, *definition.command]
        log_path = self.workdir / f"{name}.log"
        return spawn_agent([], log_path=log_path, env=env, pid1=self.pid1, command=argv)

    def _image_path(self) -> Path:
        """A PATH directory with ``fleetdrain-agent`` in it, the image's console script: this
        interpreter running this checkout's agent (``exec``: no process of its own)."""
        bin_dir = self.workdir / "bin"
        shim = bin_dir / AGENT_PROGRAM
        if not shim.exists():
            bin_dir.mkdir(parents=True, exist_ok=True)
            shim.write_text(f'#!/bin/sh\nexec {shlex.join(agent_command())} "$@"\n')
            shim.chmod(0o755)
        return bin_dir

    def _watch(self, task: RunningTask) -> None:
        code = task.process.popen.wait()
        if not task.process.pid1:
            # Without a PID namespace nothing ends the task's other processes when its main
            # process exits, as the kernel does in a container: the process group it leads
            # (started as a new session) goes with it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(task.process.popen.pid, signal.SIGKILL)
        code = 128 - code if code < 0 else code
        if task.sigkilled:
            code = 137
        task.exit_code = code
        task.stopped_at = time.monotonic()
        if self._closed.is_set():
            task.stopped.set()  # torn down with the fleet: no longer part of the scenario
            return
        what = f"exited {code}" + (" (SIGKILL)" if code == 137 else "")
        self.record("task", task.name, what, {"exit_code": code})
        with self.lock:
            try:
                self.gaps.task_exited(task.arn, code)
            except (ValueError, KeyError) as exc:
                log.warning("task %s: %s", task.name, exc)
        self.record("task", task.name, "STOPPED", {"exit_code": code, "task_arn": task.arn})
        task.stopped.set()

    def _on_sigterm(self, task_arn: str, reason: str) -> None:
        # Called by AwsGaps inside StopTask / DRAINING (the lock is held): never block here.
        task = self.tasks.get(task_arn)
        if task is None:
            self._thread(self._exit_unknown, task_arn, name="exit-unknown")
            return
        self.sigterm(task, reason)

    def _exit_unknown(self, task_arn: str) -> None:
        with self.lock, contextlib.suppress(ValueError, KeyError):
            self.gaps.task_exited(task_arn, 0)

    def sigterm(self, task: RunningTask, reason: str) -> None:
        """What ECS does to stop a task: SIGTERM now, SIGKILL after its stopTimeout."""
        if task.sigterm_at is not None or task.stopped.is_set():
            return
        task.sigterm_at = time.monotonic()
        task.sigterm_drill = self.clock()
        self.record("signal", task.name, "SIGTERM", {"reason": reason})
        with contextlib.suppress(ProcessLookupError, RuntimeError):
            task.process.send(signal.SIGTERM)
        stop_timeout = task.definition.stop_timeout
        self.record(
            "deadline",
            task.name,
            f"SIGKILL (stopTimeout {stop_timeout:.0f}s)",
            {"reason": reason},
            task.sigterm_at + self.clock.wall(stop_timeout),
        )
        self._thread(self._kill_at, task, self.clock.wall(stop_timeout), "stopTimeout")

    def _kill_at(self, task: RunningTask, wall_seconds: float, why: str) -> None:
        if task.stopped.wait(wall_seconds) or self._closed.is_set():
            return
        self.kill(task, why)

    def kill(self, task: RunningTask, why: str) -> None:
        """SIGKILL the task's process (its whole PID namespace dies with it)."""
        if task.stopped.is_set() or not task.process.alive():
            return
        task.sigkilled = True
        self.record("signal", task.name, "SIGKILL", {"why": why})
        task.process.kill()

    def _on_protection(self, task_arn: str, enabled: bool, expires: datetime | None) -> None:
        minutes = None
        if enabled and expires is not None:
            minutes = max(0.0, (expires.timestamp() - self.clock()) / 60)
        with self.lock:
            self.gaps.set_protection(task_arn, enabled, minutes)
        task = self.tasks.get(task_arn)
        if task is not None:
            self.record("task", task.name, f"protection {'on' if enabled else 'off'}", {})

    # ------------------------------------------------------------------ instances

    def tasks_on(self, instance_id: str) -> list[RunningTask]:
        """The tasks started on ``instance_id`` that have not stopped."""
        return [
            t
            for t in self.tasks.values()
            if t.instance_id == instance_id and not t.stopped.is_set()
        ]

    def terminate_instance(self, instance_id: str, why: str) -> None:
        """The instance is gone: everything still running on it dies at once."""
        if instance_id in self.terminated:
            return
        self.terminated.add(instance_id)
        self.record("instance", instance_id, "terminated", {"why": why})
        for task in self.tasks_on(instance_id):
            self.kill(task, f"instance terminated ({why})")

    def scale_in(self, instance_id: str) -> dict[str, Any]:
        """ASG scale-in of the instance: ``Terminating:Wait`` and the lifecycle action event.

        The instance is terminated when the action is completed or times out (watched here).
        """
        with self.lock:
            event = self.gaps.begin_termination(instance_id)
            if self.notification_queue_url is not None:
                # The group's notification target gets the same action (moto sends none).
                self.sqs.send_message(
                    QueueUrl=self.notification_queue_url,
                    MessageBody=json.dumps(AwsGaps.sqs_body(event)),
                )
        if self.imds is not None:
            self.imds.set_target_lifecycle_state("Terminated", instance_id=instance_id)
        self.record("instance", instance_id, "Terminating:Wait", {})
        self._thread(self._watch_action, instance_id, name=f"hook-{instance_id}")
        return event

    def _watch_action(self, instance_id: str) -> None:
        heartbeats = 0
        while not self._closed.is_set():
            with self.lock:
                expired = self.gaps.expire_lifecycle_actions()
                action = self.gaps.actions.get(instance_id)
                state = None if action is None else action.state
                result = None if action is None else action.result
                beats = 0 if action is None else action.heartbeats
            while heartbeats < beats:
                heartbeats += 1
                self.record("hook", instance_id, f"heartbeat {heartbeats}", {})
            if instance_id in expired or state in ("completed", "expired"):
                what = f"hook {state} ({result})"
                self.record("hook", instance_id, what, {"result": result})
                self.terminate_instance(instance_id, what)
                return
            time.sleep(0.05)

    def spot_interruption(self, instance_id: str) -> dict[str, Any]:
        """The two-minute warning: the event now, the instance reclaimed when it runs out."""
        with self.lock:
            event = self.gaps.spot_interruption(instance_id)
        wall = self.clock.wall(SPOT_NOTICE_SECONDS)
        if self.imds is not None:
            # The notice's time is read by processes against their own clock, the wall clock:
            # in the agents' frame the instance goes in two minutes of drill time, ``wall``.
            when = datetime.fromtimestamp(time.time() + wall, UTC)
            self.imds.set_spot_action(when, instance_id=instance_id)
        self.record("instance", instance_id, "spot interruption notice", {})
        self.record(
            "deadline", instance_id, "instance reclaimed (spot 120s)", {}, time.monotonic() + wall
        )
        self._thread(self._reclaim, instance_id, wall, name=f"spot-{instance_id}")
        return event

    def _reclaim(self, instance_id: str, wall: float) -> None:
        if not self._closed.wait(wall):
            self.terminate_instance(instance_id, "spot reclaim")

    def rebalance_recommendation(self, instance_id: str) -> dict[str, Any]:
        """EC2's rebalance recommendation for the instance (no deadline comes with it)."""
        with self.lock:
            event = self.gaps.rebalance_recommendation(instance_id)
        self.record("instance", instance_id, "rebalance recommendation", {})
        return event

    # ------------------------------------------------------------------ helpers

    def _thread(self, target: Callable[..., None], *args: Any, name: str = "runtime") -> None:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        self._threads.append(thread)
        thread.start()

    def wait_stopped(self, tasks: Sequence[RunningTask], timeout: float) -> bool:
        """Wait (wall seconds) until every task has stopped."""
        deadline = time.monotonic() + timeout
        return all(task.stopped.wait(max(0.0, deadline - time.monotonic())) for task in tasks)

    def close(self) -> None:
        """Kill every process that still runs and stop the watchers."""
        self._closed.set()
        for task in list(self.tasks.values()):
            with contextlib.suppress(Exception):
                task.process.kill()
        for task in list(self.tasks.values()):
            with contextlib.suppress(Exception):
                task.process.popen.wait(5)
        for thread in self._threads:
            thread.join(1)
