"""``fleetdrain drill --aws``: the game day against a real deployment.

1. Start a build of ``--pipeline`` (Buildkite REST: ``POST /v2/organizations/{org}/pipelines/
   {pipeline}/builds``).
2. Wait until one of its jobs runs on an agent; read that agent (``GET .../agents/{id}``) for
   its ``ecs:task-arn`` tag (the agent sets it from ECS task metadata), and check with ECS that
   the task is in ``--cluster`` (and ``--service``).
3. Kill under it: ``StopTask`` (SIGTERM now, SIGKILL after the task's ``stopTimeout``) or
   ``TerminateInstanceInAutoScalingGroup`` on its container instance (the lifecycle hook and the
   drain controller take it from there).
4. Wait for the build to finish, watching the build, the task, the agent and the drain record
   (``--table``), each change a timeline event; pass only if the build passed, no job was lost,
   and the task was not SIGKILLed.

The result is a :class:`~fleetdrain.drill.report.model.DrillReport` with ``mode="aws"`` and one
scenario, so the table, ``--json`` and ``--html`` render it as they render the local drill. The REST
API token lives only in :class:`ApiToken` (its repr hides it) and the Authorization header.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal

from fleetdrain.drill.report.model import DrillReport, EventKind, ScenarioReport, TimelineEvent
from fleetdrain.ops.buildkite_rest import ApiError, ApiToken, BuildkiteRest, token_from_secret

if TYPE_CHECKING:
    from fleetdrain.controller.drain.ports import DrainRecord

#: Builds in these states are over.
TERMINAL_BUILD_STATES = frozenset({"passed", "failed", "canceled", "skipped", "not_run"})
#: ECS's own default when a container sets no stopTimeout (ECS_CONTAINER_STOP_TIMEOUT).
ECS_DEFAULT_STOP_TIMEOUT = 30.0
#: Reasons with which a cancelled job is *reported*, not lost (retry rules re-run it).
REPORTED_REASONS = frozenset({"agent_stop", "cancel"})

Progress = Callable[[str], None]


class GameDayError(Exception):
    """The game day could not be run (bad input, unreachable API, timeout): one line."""


@dataclass(frozen=True)
class GameDayConfig:
    """What ``fleetdrain drill --aws`` was asked to do."""

    cluster: str
    api_url: str
    org: str
    pipeline: str
    kill: Literal["task", "instance"] = "task"
    service: str | None = None
    token: ApiToken | None = None
    token_secret_arn: str | None = None
    region: str | None = None
    table: str | None = None
    branch: str = "main"
    commit: str = "HEAD"
    message: str = "fleetdrain drill --aws: game day"
    timeout: float = 1800.0
    poll: float = 5.0


def _token(raw: str) -> ApiToken:
    try:
        return ApiToken(raw)
    except ApiError as exc:
        raise GameDayError(str(exc)) from None


def config_from_args(ns: argparse.Namespace, env: dict[str, str] | None = None) -> GameDayConfig:
    """The config from ``fleetdrain drill --aws`` options (GameDayError naming what is missing)."""
    environ = dict(os.environ) if env is None else env
    missing = [
        f"--{name.replace('_', '-')}"
        for name in ("cluster", "api_url", "org", "pipeline")
        if not getattr(ns, name, None)
    ]
    if missing:
        raise GameDayError(f"--aws needs {', '.join(missing)}")
    raw_token = environ.get("FLEETDRAIN_API_TOKEN", "")
    if not ns.token_secret_arn and not raw_token.strip():
        raise GameDayError(
            "--aws needs an API token: set $FLEETDRAIN_API_TOKEN or --token-secret-arn"
        )
    api_url = str(ns.api_url).rstrip("/")
    if not api_url.startswith(("http://", "https://")):
        raise GameDayError(f"--api-url must be an http(s) URL, got {api_url!r}")
    return GameDayConfig(
        cluster=ns.cluster,
        service=ns.service,
        api_url=api_url,
        org=ns.org,
        pipeline=ns.pipeline,
        kill=ns.kill,
        token=None if ns.token_secret_arn else _token(raw_token),
        token_secret_arn=ns.token_secret_arn,
        region=ns.region,
        table=ns.table,
        branch=ns.branch,
        commit=ns.commit,
        timeout=ns.timeout,
        poll=ns.poll,
    )


@dataclass
class AwsClients:
    """The boto3 clients the game day uses (region and endpoint as boto3 resolves them)."""

    ecs: Any
    autoscaling: Any
    dynamodb: Any
    secretsmanager: Any

    @classmethod
    def create(cls, region: str | None) -> AwsClients:
        try:
            import boto3
        except ImportError:
            raise GameDayError(
                "boto3 is not installed: pip install 'fleetdrain[controller]'"
            ) from None
        from botocore.exceptions import BotoCoreError

        try:
            session = boto3.session.Session(region_name=region)
            return cls(
                ecs=session.client("ecs"),
                autoscaling=session.client("autoscaling"),
                dynamodb=session.client("dynamodb"),
                secretsmanager=session.client("secretsmanager"),
            )
        except BotoCoreError as exc:
            raise GameDayError(f"AWS: {exc}") from None


# ------------------------------------------------------------------------------ the game day


def _tags(meta_data: object) -> dict[str, str]:
    tags: dict[str, str] = {}
    if isinstance(meta_data, list):
        for item in meta_data:
            key, _, value = str(item).partition("=")
            tags[key] = value
    return tags


def _epoch(value: object) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _job_state(job: dict[str, Any]) -> tuple[str, float | None]:
    """The job's label for the timeline and when it became true as the API stamped it (its
    ``started_at`` while running, its ``finished_at`` once it has an exit status), so the
    timeline does not place it a poll late; None where the API stamped nothing."""
    state = str(job.get("state", "?"))
    agent = job.get("agent") or {}
    if state == "running" and agent:
        return f"running on {agent.get('name', agent.get('id', '?'))}", _epoch(
            job.get("started_at")
        )
    if job.get("exit_status") is not None and state not in ("running", "canceling"):
        label = f"{state} exit {job['exit_status']}"
        if job.get("signal_reason"):
            label += f" ({job['signal_reason']})"
        return label, _epoch(job.get("finished_at"))
    return state, None


def _agent_label(agent: dict[str, Any]) -> str:
    """``connected``, ``connected, paused, busy``, ``disconnected``, ``lost``..."""
    parts = [str(agent.get("connection_state", "?"))]
    if agent.get("paused"):
        parts.append("paused")
    if isinstance(agent.get("job"), dict):
        parts.append("busy")
    return ", ".join(parts)


def _lost(job: dict[str, Any]) -> bool:
    """Exit -1 without a reason: the server gave up on the agent (not a reported cancel)."""
    return job.get("exit_status") == -1 and job.get("signal_reason") not in REPORTED_REASONS


@dataclass
class _Watch:
    """The game day's observations, turned into timeline events as they change."""

    t0_wall: float
    wall: Callable[[], float]
    timeline: list[TimelineEvent] = field(default_factory=list)
    seen: dict[tuple[str, str], str] = field(default_factory=dict)

    def mark(
        self, kind: EventKind, subject: str, what: str, at: float | None = None, **detail: object
    ) -> None:
        t = (at if at is not None else self.wall()) - self.t0_wall
        self.timeline.append(
            TimelineEvent(t=round(t, 3), kind=kind, subject=subject, what=what, detail=detail)
        )

    def change(
        self,
        kind: EventKind,
        subject: str,
        what: str,
        at: float | None = None,
        **detail: object,
    ) -> bool:
        """Mark ``what`` for ``subject`` unless it is what was seen last; True if it changed."""
        if self.seen.get((kind, subject)) == what:
            return False
        self.seen[(kind, subject)] = what
        self.mark(kind, subject, what, at, **detail)
        return True


def run_game_day(
    config: GameDayConfig,
    *,
    progress: Progress = lambda _msg: None,
    aws: AwsClients | None = None,
    rest: BuildkiteRest | None = None,
    clock: Callable[[], float] = time.monotonic,
    wall: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
) -> DrillReport:
    """Run the game day (see the module docstring); GameDayError if it cannot be run."""
    started_at = datetime.fromtimestamp(wall(), UTC).isoformat(timespec="seconds")
    t0 = clock()
    aws = aws if aws is not None else AwsClients.create(config.region)
    try:
        if rest is None:
            token = config.token
            if token is None:
                assert config.token_secret_arn is not None
                progress(f"aws: reading the API token from {config.token_secret_arn}")
                token = token_from_secret(aws.secretsmanager, config.token_secret_arn)
            rest = BuildkiteRest(config.api_url, config.org, token)
        day = _GameDay(config, aws, rest, progress, clock, sleep, _Watch(wall(), wall))
        try:
            scenario = day.run()
        finally:
            rest.close()
    except ApiError as exc:
        raise GameDayError(str(exc)) from None
    return DrillReport(
        mode="aws",
        started_at=started_at,
        wall_seconds=clock() - t0,
        scenarios=[scenario],
    )


class _GameDay:
    def __init__(
        self,
        config: GameDayConfig,
        aws: AwsClients,
        rest: BuildkiteRest,
        progress: Progress,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        watch: _Watch,
    ) -> None:
        self.c = config
        self.aws = aws
        self.rest = rest
        self.progress = progress
        self.clock = clock
        self.sleep = sleep
        self.watch = watch
        self.deadline = clock() + config.timeout
        self.notes: list[str] = []
        self.exit_code: int | None = None  # the agent task's, once STOPPED
        self.stopped_at: float | None = None  # epoch seconds
        self.drain: DrainRecord | None = None  # the instance's drain record, if any
        #: The watch gave up with the task still running or the drain still open: not a pass.
        self.unfinished = False
        self._last_progress = ""
        self._last_progress_at = 0.0

    # ------------------------------------------------------------------ helpers

    def _aws(self, what: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except ClientError as exc:
            error = exc.response.get("Error", {})
            raise GameDayError(
                f"{what}: {error.get('Code', '?')}: {error.get('Message', '')}".rstrip(": ")
            ) from None
        except BotoCoreError as exc:
            raise GameDayError(f"{what}: {exc}") from None

    def _read(self, fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any] | None:
        """One poll's read; None (and a progress line) when it failed for a passing reason.

        A game day must not be lost to one 502 while it waits: transient failures are retried
        on the next poll, until the overall timeout.
        """
        try:
            return fn(*args)
        except ApiError as exc:
            if not exc.transient:
                raise
            self.progress(f"aws: {exc} (retrying, {self._left():.0f}s left)")
            return None

    def _left(self) -> float:
        return self.deadline - self.clock()

    def _wait(self, what: str) -> None:
        if self._left() <= 0:
            raise GameDayError(f"timed out after {self.c.timeout:g}s {what}")
        self.sleep(min(self.c.poll, max(self._left(), 0.0)))

    # ------------------------------------------------------------------ steps

    def run(self) -> ScenarioReport:
        c = self.c
        self.progress(f"aws: starting a build of {c.org}/{c.pipeline} ({c.branch} {c.commit})")
        build = self.rest.create_build(
            c.pipeline, commit=c.commit, branch=c.branch, message=c.message
        )
        number = int(build["number"])
        self.watch.mark("note", f"build #{number}", "build created", web_url=build.get("web_url"))
        job, agent = self._running_job(number)
        task_arn = self._task_of(agent)
        task = self._describe_task(task_arn)
        instance_id = self._instance_of(task)
        stop_timeout = self._stop_timeout(task)
        self._observe_task(task_arn, task_arn.rsplit("/", 1)[-1])  # its state before the kill
        self._kill(task_arn, instance_id, stop_timeout)
        final = self._until_done(number, task_arn, str(agent["id"]), instance_id, stop_timeout)
        return self._scenario(number, final, job, task_arn, instance_id)

    def _watch_jobs(self, jobs: list[dict[str, Any]]) -> None:
        for job in jobs:
            label, at = _job_state(job)
            self.watch.change("job", str(job.get("id")), label, at)

    def _running_job(self, number: int) -> tuple[dict[str, Any], dict[str, Any]]:
        while True:
            read = self._read(self.rest.get_build, self.c.pipeline, number)
            if read is None:
                self._wait(f"waiting for a job of build #{number} to run on an agent")
                continue
            build = read
            jobs = [j for j in build.get("jobs", []) if isinstance(j, dict)]
            self._watch_jobs(jobs)
            for job in jobs:
                if job.get("state") == "running" and job.get("agent"):
                    found = self._read(self.rest.get_agent, str(job["agent"]["id"]))
                    if found is None:
                        break
                    agent = found
                    self.progress(
                        f"aws: job {job['id']} of build #{number} runs on {agent.get('name')}"
                    )
                    self.watch.change(
                        "agent", str(agent.get("name")), _agent_label(agent), id=agent.get("id")
                    )
                    return job, agent
            state = build.get("state", "?")
            if state in TERMINAL_BUILD_STATES:
                raise GameDayError(
                    f"build #{number} ended ({state}) before a job could be caught running: the "
                    "pipeline's job must run long enough to be stopped under it"
                )
            self._progress_wait(
                f"aws: waiting for a job of build #{number} to run on an agent (build {state})"
            )
            self._wait(f"waiting for a job of build #{number} to run on an agent")

    def _task_of(self, agent: dict[str, Any]) -> str:
        task_arn = _tags(agent.get("meta_data")).get("ecs:task-arn", "")
        if not task_arn:
            raise GameDayError(
                f"agent {agent.get('name')} has no ecs:task-arn tag: is it an ECS task started "
                "with --tags-from-ecs-meta-data?"
            )
        return task_arn

    def _lookup_task(self, task_arn: str) -> dict[str, Any] | None:
        """The task as ECS describes it, or None when the cluster has no such task."""
        out = self._aws(
            "ECS DescribeTasks",
            self.aws.ecs.describe_tasks,
            cluster=self.c.cluster,
            tasks=[task_arn],
        )
        tasks = out.get("tasks") or []
        return dict(tasks[0]) if tasks else None

    def _describe_task(self, task_arn: str) -> dict[str, Any]:
        task = self._lookup_task(task_arn)
        if task is None:
            raise GameDayError(f"task {task_arn} is not in cluster {self.c.cluster}")
        if self.c.service and task.get("group") != f"service:{self.c.service}":
            raise GameDayError(
                f"task {task_arn} belongs to {task.get('group')!r}, not service:{self.c.service}"
            )
        return task

    def _instance_of(self, task: dict[str, Any]) -> str | None:
        ci = task.get("containerInstanceArn")
        if not ci:
            if self.c.kill == "instance":
                raise GameDayError("--kill instance: the task has no container instance (Fargate?)")
            return None
        out = self._aws(
            "ECS DescribeContainerInstances",
            self.aws.ecs.describe_container_instances,
            cluster=self.c.cluster,
            containerInstances=[ci],
        )
        instances = out.get("containerInstances") or []
        return str(instances[0]["ec2InstanceId"]) if instances else None

    def _stop_timeout(self, task: dict[str, Any]) -> float:
        out = self._aws(
            "ECS DescribeTaskDefinition",
            self.aws.ecs.describe_task_definition,
            taskDefinition=task["taskDefinitionArn"],
        )
        values = [
            float(c["stopTimeout"])
            for c in out.get("taskDefinition", {}).get("containerDefinitions", [])
            if c.get("stopTimeout") is not None
        ]
        if not values:
            self.notes.append(
                f"the task definition sets no stopTimeout: ECS's default of "
                f"{ECS_DEFAULT_STOP_TIMEOUT:g}s applies (fleetdrain recommends 120)"
            )
            return ECS_DEFAULT_STOP_TIMEOUT
        return max(values)

    def _kill(self, task_arn: str, instance_id: str | None, stop_timeout: float) -> None:
        w = self.watch
        short = task_arn.rsplit("/", 1)[-1]
        # Stamped when the request goes out: AWS acts on it (and the controller may already
        # record the drain) before the answer comes back.
        sent = w.wall()
        if self.c.kill == "task":
            self.progress(f"aws: StopTask {short} (SIGTERM; SIGKILL after {stop_timeout:g}s)")
            self._aws(
                "ECS StopTask",
                self.aws.ecs.stop_task,
                cluster=self.c.cluster,
                task=task_arn,
                reason="fleetdrain drill --aws: game day stop-task",
            )
            w.mark("signal", short, "SIGTERM", at=sent, api="StopTask")
            w.mark(
                "deadline",
                short,
                "SIGKILL deadline",
                at=sent + stop_timeout,
                stop_timeout=stop_timeout,
            )
        else:
            assert instance_id is not None
            self.progress(f"aws: TerminateInstanceInAutoScalingGroup {instance_id}")
            self._aws(
                "Auto Scaling TerminateInstanceInAutoScalingGroup",
                self.aws.autoscaling.terminate_instance_in_auto_scaling_group,
                InstanceId=instance_id,
                ShouldDecrementDesiredCapacity=False,
            )
            w.mark("instance", instance_id, "terminate requested", at=sent)

    def _until_done(
        self,
        number: int,
        task_arn: str,
        agent_id: str,
        instance_id: str | None,
        stop_timeout: float,
    ) -> dict[str, Any]:
        short = task_arn.rsplit("/", 1)[-1]
        build: dict[str, Any] = {}
        task_stopped = False
        build_done_at: float | None = None
        agent: dict[str, Any] = {"id": agent_id}
        while True:
            read = self._read(self.rest.get_build, self.c.pipeline, number)
            if read is not None:
                build = read
            self._watch_jobs([j for j in build.get("jobs", []) if isinstance(j, dict)])
            task_stopped = self._observe_task(task_arn, short) or task_stopped
            agent = self._read(self.rest.get_agent, agent_id) or agent
            name = str(agent.get("name", agent_id))
            self.watch.change("agent", name, _agent_label(agent))
            if instance_id and self.c.table:
                self._observe_drain(instance_id)
            state = str(build.get("state", "?"))
            task_state = self.watch.seen.get(("task", short), "?")
            if state in TERMINAL_BUILD_STATES:
                # The task's exit code is part of the verdict: after the build, wait for the
                # task too (a graceful agent exits within a poll or two of its job), but no
                # longer than its stopTimeout could keep it.
                build_done_at = build_done_at if build_done_at is not None else self.clock()
                # After an instance kill the drain's end (the hook completed) is evidence too.
                drain_open = (
                    self.c.kill == "instance"
                    and self.c.table is not None
                    and (self.drain is None or self.drain.phase != "done")
                )
                if task_stopped and not drain_open:
                    self._final_status(name, agent, short, task_state)
                    return build
                if self.clock() - build_done_at > stop_timeout + 2 * self.c.poll:
                    self.unfinished = True
                    if not task_stopped:
                        self.notes.append(f"task {short} still {task_state} after the build")
                    if drain_open:
                        self.notes.append(f"the drain of {instance_id} had not ended")
                    self._final_status(name, agent, short, task_state)
                    return build
            self._progress_wait(
                f"aws: build #{number} {state}; task {short} {task_state}; agent {name} "
                f"{agent.get('connection_state', '?')}"
            )
            self._wait(f"waiting for build #{number} (last state {state})")

    def _progress_wait(self, message: str) -> None:
        # A 30-minute wait must not print 360 identical lines into a CI log: say what changed,
        # and otherwise that we are still waiting, every 30 s.
        now = self.clock()
        if message != self._last_progress or now - self._last_progress_at >= 30.0:
            self.progress(f"{message} ({self._left():.0f}s left)")
            self._last_progress, self._last_progress_at = message, now

    def _final_status(self, name: str, agent: dict[str, Any], short: str, task: str) -> None:
        paused = " (paused)" if agent.get("paused") else ""
        job = agent.get("job")
        self.notes.append(
            f"agent {name}: {agent.get('connection_state', '?')}{paused}"
            + (f", job {job.get('id')} {job.get('state')}" if isinstance(job, dict) else "")
            + f"; task {short}: {task}"
        )

    def _observe_task(self, task_arn: str, short: str) -> bool:
        task = self._lookup_task(task_arn)
        if task is None:
            return False
        status = str(task.get("lastStatus", "?"))
        if status == "STOPPED":
            codes = [c.get("exitCode") for c in task.get("containers", [])]
            code = next((c for c in codes if c is not None), None)
            label = f"STOPPED exit {code}" if code is not None else "STOPPED"
            # ECS's own stoppedAt, not when we happened to poll, places it on the timeline.
            stopped_at = _epoch(task.get("stoppedAt")) or self.watch.wall()
            if self.watch.change(
                "task",
                short,
                label,
                stopped_at,
                stop_code=task.get("stopCode"),
                stopped_reason=task.get("stoppedReason"),
            ):
                self.exit_code = int(code) if code is not None else None
                self.stopped_at = stopped_at
            return True
        self.watch.change("task", short, status)
        return False

    def _observe_drain(self, instance_id: str) -> None:
        from fleetdrain.controller.drain.state import DynamoDrainStore

        store = DynamoDrainStore(self.aws.dynamodb, str(self.c.table), time.time, 0)
        try:
            record = store.get(instance_id)
        except Exception as exc:  # the table is optional evidence, never the verdict
            self.notes.append(f"drain table {self.c.table}: {exc.__class__.__name__}: {exc}")
            self.c = _without_table(self.c)
            return
        if record is None:
            return
        self.drain = record

    def _drain_events(self, instance_id: str) -> None:
        record = self.drain
        w = self.watch
        if record is None:
            if self.c.table:
                self.notes.append(
                    f"no drain record for {instance_id} in {self.c.table}"
                    + (
                        " (a StopTask is drained by the agent alone)"
                        if self.c.kill == "task"
                        else ""
                    )
                )
            return
        steps: list[tuple[float | None, EventKind, str]] = [
            (record.started_at, "controller", "drain started: " + ", ".join(record.reasons)),
            (record.draining_at, "instance", "DRAINING"),
            (record.forced_at, "controller", "forced"),
            (record.last_task_stopped_at, "controller", "last task stopped"),
            (
                record.completed_at,
                "hook",
                f"completed ({record.outcome or record.lifecycle_state})",
            ),
        ]
        for at, kind, what in steps:
            if at is not None:
                w.mark(kind, instance_id if kind != "controller" else "controller", what, at=at)
        for at, what in ((record.force_at, "force at"), (record.spot_deadline, "spot deadline")):
            if at is not None:
                w.mark("deadline", instance_id, what, at=at)

    def _scenario(
        self,
        number: int,
        build: dict[str, Any],
        job: dict[str, Any],
        task_arn: str,
        instance_id: str | None,
    ) -> ScenarioReport:
        if instance_id:
            self._drain_events(instance_id)
        jobs = [j for j in build.get("jobs", []) if isinstance(j, dict)]
        ran = [j for j in jobs if j.get("started_at") or j.get("exit_status") is not None]
        lost = [j for j in jobs if _lost(j)]
        passed = sum(1 for j in jobs if j.get("state") == "passed")
        retried = sum(1 for j in jobs if j.get("retried"))
        code = self.exit_code
        state = str(build.get("state", "?"))
        # The build passing is not enough: the task must have stopped (and after an instance
        # kill the drain ended), or the stop under the build was never seen through.
        ok = state == "passed" and not lost and code != 137 and not self.unfinished
        if state != "passed":
            self.notes.append(f"build #{number} {state}")
        if code == 137:
            self.notes.append("the agent's task exited 137: SIGKILLed at stopTimeout")
        drain = None
        stopped_at = self.stopped_at
        kill_marks = [e for e in self.watch.timeline if e.kind == "signal"]
        if stopped_at is not None and kill_marks:
            drain = round(stopped_at - self.watch.t0_wall - kill_marks[0].t, 3)
        record = self.drain
        hook = None
        if record is not None:
            if record.completed_at is not None and record.last_task_stopped_at is not None:
                hook = round(record.completed_at - record.last_task_stopped_at, 3)
            if drain is None and record.completed_at is not None:
                drain = round(record.completed_at - record.started_at, 3)
        self.notes.insert(0, f"build #{number}: {build.get('web_url', '')}")
        self.notes.insert(1, f"stopped under job {job.get('id')}")
        return ScenarioReport(
            name=f"aws-{'stop-task' if self.c.kill == 'task' else 'terminate-instance'}",
            description=(
                f"{'StopTask' if self.c.kill == 'task' else 'TerminateInstanceInAutoScalingGroup'}"
                f" under build #{number} of {self.c.pipeline} on cluster {self.c.cluster}"
            ),
            kind="after",
            jobs_run=len(ran),
            passed=passed,
            retried=retried,
            lost=len(lost),
            longest_drain_seconds=drain,
            hook_completion_latency_seconds=hook,
            wall_seconds=round(self.watch.wall() - self.watch.t0_wall, 3),
            ok=ok,
            notes=self.notes,
            timeline=sorted(self.watch.timeline, key=lambda e: e.t),
        )


def _without_table(config: GameDayConfig) -> GameDayConfig:
    from dataclasses import replace

    return replace(config, table=None)
