"""One local fleet: moto with template.yaml deployed, the coordinator, the controller, the
task runtime, and a timeline of what happened. Each scenario runs on a fleet of its own.

Built by :func:`local_fleet` (a context manager that tears everything down). The AWS side is
moto in this process (``mock_aws``), with :class:`~fleetdrain.drill.aws.gaps.AwsGaps`; the Auto
Scaling group, its termination lifecycle hook and the ECS cluster are what ``infra/`` makes;
the controller is deployed from ``template.yaml`` (:mod:`fleetdrain.drill.aws.world`) with the
template's default parameters, so its budgets, margins and heartbeats are the real ones, in
drill seconds. The coordinator enforces Buildkite's REST limit (200 requests a minute for the
organization, 429 beyond) on the drill clock too, so a minute of it is an AWS minute at any pace.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fleetdrain.drill.aws.endpoints import EcsAgentStandIn, ImdsStandIn
from fleetdrain.drill.aws.gaps import AwsGaps
from fleetdrain.drill.aws.world import (
    Deployment,
    EventRouter,
    Invocation,
    deploy_stack,
    stack_params,
)
from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer, RestRateLimit
from fleetdrain.drill.coordinator.rate_limit import (
    DEFAULT_REST_RATE_LIMIT,
    DEFAULT_REST_RATE_WINDOW,
)
from fleetdrain.drill.report.model import EventKind, TimelineEvent
from fleetdrain.drill.world.task_runtime import DrillClock, TaskRuntime

log = logging.getLogger("fleetdrain.drill.fleet")

REGION = "us-east-1"
CLUSTER = "ci"
ASG = "ci-agents"
HOOK = "fleetdrain-terminating"
HOOK_HEARTBEAT_TIMEOUT = 300  # infra/'s lifecycle hook
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "drill",
    "AWS_SECRET_ACCESS_KEY": "drill",
    "AWS_SESSION_TOKEN": "drill",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}
# The coordinator's agent-facing intervals are wall seconds (they are the agents' own pace,
# not AWS time); the lost-agent timeout is Buildkite's ~3 minutes, in drill time.
PING_INTERVAL = 0.3
HEARTBEAT_INTERVAL = 0.5
JOB_STATUS_INTERVAL = 0.3
LOST_AGENT_TIMEOUT = 180.0
#: Where a scenario's timeline goes as it is recorded (JSON lines, in its work directory).
TIMELINE_FILE = "timeline.jsonl"
#: The meta-data tag of an organization's agent that runs nowhere in the fleet (registered in
#: the coordinator without a process, to give the organization its size): no scenario's actor,
#: so it is neither on the timeline nor in the heartbeat figures.
BACKGROUND_TAG = "fleetdrain-drill:background=true"


def is_background(agent: Any) -> bool:
    """Whether a coordinator agent (an ``AgentRecord``) is a background agent."""
    return BACKGROUND_TAG in getattr(agent, "meta_data", ())


class Timeline:
    """Timeline events of one scenario (thread-safe), on one clock: AWS seconds since it
    started (``t``: wall seconds times ``scale``, the drill clock's drill seconds per wall
    second), with the wall seconds beside them (``wall``).

    With a ``path`` every event is also appended to it as a JSON line the moment it is
    recorded, so that a scenario stopped half-way (out of time, killed) leaves its evidence.
    """

    def __init__(
        self,
        progress: Callable[[str], None] = lambda _m: None,
        prefix: str = "",
        *,
        scale: float = 1.0,
        path: Path | None = None,
    ) -> None:
        self.t0 = time.monotonic()
        self.scale = scale
        self.events: list[TimelineEvent] = []
        self._lock = threading.Lock()
        self._progress = progress
        self._prefix = prefix
        self._file = None if path is None else open(path, "w", buffering=1)  # noqa: SIM115

    def record(
        self,
        kind: str,
        subject: str,
        what: str,
        detail: dict[str, Any] | None = None,
        at: float | None = None,
    ) -> None:
        """Add an event (``at``: a ``time.monotonic()`` stamp; default now)."""
        wall = max(0.0, (time.monotonic() if at is None else at) - self.t0)
        event = TimelineEvent(
            t=round(wall * self.scale, 3),
            kind=_kind(kind),
            subject=subject,
            what=what,
            detail=dict(detail or {}),
            wall=round(wall, 3),
        )
        with self._lock:
            self.events.append(event)
            if self._file is not None:
                with contextlib.suppress(OSError, ValueError):
                    self._file.write(event.model_dump_json() + "\n")
        live = at is None  # merged afterwards (at=...): already past, no progress line
        if live and (
            kind in ("signal", "instance", "hook", "fault")
            or (kind == "task" and what.startswith("exited"))
        ):
            self._progress(f"{self._prefix}{subject}: {what}")

    def aws(self, monotonic: float) -> float:
        """AWS seconds since the start of a ``time.monotonic()`` stamp."""
        return (monotonic - self.t0) * self.scale

    def sorted(self) -> list[TimelineEvent]:
        with self._lock:
            return sorted(self.events, key=lambda e: e.t)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                with contextlib.suppress(OSError):
                    self._file.close()
                self._file = None


def read_timeline(path: Path) -> list[TimelineEvent]:
    """The events a :class:`Timeline` appended to ``path`` (a line cut short is skipped)."""
    events: list[TimelineEvent] = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return events
    for line in lines:
        with contextlib.suppress(ValueError):
            events.append(TimelineEvent.model_validate_json(line))
    return sorted(events, key=lambda e: e.t)


def _kind(kind: str) -> EventKind:
    known = ("agent", "job", "signal", "task", "instance", "hook", "controller", "fault")
    if kind in known or kind in ("deadline", "note"):
        return kind  # type: ignore[return-value]
    return "note"


@dataclass
class Fleet:
    """Everything one scenario drives."""

    name: str
    workdir: Path
    clock: DrillClock
    gaps: AwsGaps
    coord: Coordinator
    server: CoordinatorServer
    deployment: Deployment
    router: EventRouter
    runtime: TaskRuntime
    controller: Any
    session: Any
    lock: threading.RLock
    timeline: Timeline
    instances: list[str] = field(default_factory=list)
    _clients: dict[str, Any] = field(default_factory=dict, repr=False)
    _clients_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def client(self, service: str) -> Any:
        """A boto3 client on the fleet's (moto) account (one per service: making one costs
        tens of milliseconds of CPU, and the scenarios ask in polling loops)."""
        with self._clients_lock:
            client = self._clients.get(service)
            if client is None:
                client = self._clients[service] = self.session.client(service)
            return client

    def invocations(self) -> list[Invocation]:
        """Every handler invocation so far."""
        return list(self.router.invocations)

    def wait(self, predicate: Callable[[], bool], wall_timeout: float, what: str) -> None:
        """Poll ``predicate`` until true; TimeoutError naming ``what`` otherwise."""
        deadline = time.monotonic() + wall_timeout
        while not predicate():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def drain_records(self) -> list[Any]:
        """The drain table's records (what the controller wrote)."""
        return _drain_records(
            self.session, self.deployment.outputs["DrainTableName"], self.controller, self.lock
        )


def _drain_records(session: Any, table: str, controller: Any, lock: threading.RLock) -> list[Any]:
    with lock:
        items = session.client("dynamodb").scan(TableName=table)["Items"]
        out = []
        for item in items:
            if item.get("pk", {}).get("S", "").startswith("drain#"):
                rec = controller.store.get(item["pk"]["S"].split("#", 1)[1])
                if rec is not None:
                    out.append(rec)
    return out


class DrainWatch:
    """Puts what each controller step did to a drain on the timeline (phase changes, DRAINING,
    forcing, the ECS fallback, the end), read from the drain table after every invocation."""

    def __init__(self, records: Callable[[], list[Any]], timeline: Timeline) -> None:
        self.records = records
        self.timeline = timeline
        self.seen: dict[str, dict[str, Any]] = {}

    def observe(self) -> None:
        for rec in self.records():
            now = {
                "phase": rec.phase,
                "DRAINING": rec.draining_at is not None,
                "forced": rec.forced_at is not None,
                "fallback to StopTask": rec.fallback,
                "lifecycle": rec.lifecycle_state,
            }
            before = self.seen.get(rec.instance_id, {})
            subject = f"drain {rec.instance_id}"
            for key, value in now.items():
                if before.get(key) == value:
                    continue
                if key == "phase":
                    what = f"phase {value}"
                    if value == "done":
                        what += f" ({rec.outcome})"
                elif key == "lifecycle":
                    what = f"lifecycle action {value}"
                elif value:
                    what = key
                else:
                    continue
                self.timeline.record("controller", subject, what, {"reasons": rec.reasons})
            self.seen[rec.instance_id] = now


class ScaledDelays:
    """SQS delays in drill time, exact.

    The controller asks for ``DelaySeconds`` in drill seconds (its clock is the drill clock);
    moto waits wall seconds, whole ones. The message is sent with the wall delay rounded
    down, and the router holds it back until its exact due time (:meth:`due`), so a tick
    comes when the controller asked for it, not up to a scaled second late.
    """

    def __init__(self, clock: DrillClock) -> None:
        self.clock = clock
        self._due: dict[str, float] = {}
        self._lock = threading.Lock()

    def __call__(self, params: dict[str, Any], **_kw: Any) -> None:
        # SendMessage's parameters, or each entry of a SendMessageBatch (a batch of first
        # steps sends its ticks together).
        entries = params.get("Entries")
        for message in entries if isinstance(entries, list) else [params]:
            delay = message.get("DelaySeconds")
            if isinstance(delay, int) and delay > 0:
                wall = self.clock.wall(delay)
                with self._lock:
                    self._due[str(message.get("MessageBody"))] = time.monotonic() + wall
                message["DelaySeconds"] = int(wall)

    def due(self, body: str) -> float | None:
        """When the message with this body is due (``time.monotonic()``), if it was delayed."""
        with self._lock:
            return self._due.get(body)


_QUIET = ("fleetdrain", "fleetdrain.drain", "moto", "botocore", "boto3")


def _quiet_logs() -> Callable[[], None]:
    """Silence the handlers' and moto's logs; returns what puts the levels back.

    The handlers log JSON lines (Powertools) and moto warns about what it only records: the
    drill's output is its progress view and report, the logs stay out of it. Powertools'
    logger is named after the service, ``fleetdrain``, the parent of the agent's loggers:
    the levels must come back when the fleet goes (tests run in the same process).
    """
    saved = {name: logging.getLogger(name).level for name in _QUIET}
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.CRITICAL)

    def restore() -> None:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)

    return restore


@contextlib.contextmanager
def local_fleet(
    name: str,
    *,
    workdir: Path,
    time_scale: float,
    instances: int,
    pid1: bool,
    progress: Callable[[str], None] = lambda _m: None,
    template_params: dict[str, str] | None = None,
    notification_queue: bool = False,
    graphql: bool = False,
) -> Iterator[Fleet]:
    """A fleet of ``instances`` container instances in the ASG, everything wired and running.

    ``notification_queue``: the group also sends its lifecycle notifications to an SQS queue,
    deployed as the template's ``LifecycleNotificationQueueArn``; ``graphql``: the stack's
    ``CoordinatorGraphqlUrl`` is the embedded coordinator's ``/graphql/v1`` (drains find their
    agents with GraphQL lookups). (With the queue, the lifecycle function then
    gets each action twice: from EventBridge and as an SQS batch).
    """
    import boto3
    from moto import mock_aws

    from fleetdrain.controller import runtime as lambda_runtime
    from fleetdrain.controller.drain.config import Settings

    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    restore_logs = _quiet_logs()
    # Powertools warns on every invocation that flushed no metric (most ticks).
    warnings.filterwarnings("ignore", message="No application metrics to publish")
    workdir.mkdir(parents=True, exist_ok=True)
    clock = DrillClock(time_scale)
    timeline = Timeline(
        progress, prefix=f"{name}: ", scale=clock.scale, path=workdir / TIMELINE_FILE
    )
    lock = threading.RLock()
    coord = Coordinator(
        org="fleetdrain",
        api_token="drill-api-token",
        ping_interval=PING_INTERVAL,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        job_status_interval=JOB_STATUS_INTERVAL,
        lost_agent_timeout=clock.wall(LOST_AGENT_TIMEOUT),
        chunks_interval_seconds=0.5,
    )
    # Buildkite's REST limit (200 a minute for the organization) on AWS's clock, the one the
    # drains are timed on (a 429's ``RateLimit-Reset`` sets their next tick): a minute is a
    # drill minute whatever the pace. (The controller's REST client still keeps its own budget
    # and waits on the wall clock: see fleetdrain.drill.scenarios_storm.ORG_TRAFFIC.)
    coord.rest_rate = RestRateLimit(DEFAULT_REST_RATE_LIMIT, DEFAULT_REST_RATE_WINDOW, clock)
    with contextlib.ExitStack() as stack:
        stack.callback(_restore_env, saved)
        stack.callback(timeline.close)
        stack.callback(restore_logs)
        stack.enter_context(mock_aws())
        gaps = stack.enter_context(AwsGaps(clock=clock, region=REGION))
        server = stack.enter_context(CoordinatorServer(coord))
        session = boto3.session.Session(botocore_session=_botocore_session(), region_name=REGION)
        delays = ScaledDelays(clock)
        session.events.register("provide-client-params.sqs.SendMessage", delays)
        session.events.register("provide-client-params.sqs.SendMessageBatch", delays)
        ids = _build_aws(session, instances)
        secret = session.client("secretsmanager").create_secret(
            Name="fleetdrain/coordinator-token", SecretString=coord.api_token
        )
        notifications_url: str | None = None
        extra = dict(template_params or {})
        if graphql:
            extra["CoordinatorGraphqlUrl"] = f"{server.url}/graphql/v1"
        if notification_queue:
            sqs = session.client("sqs")
            notifications_url = sqs.create_queue(QueueName="ci-agents-lifecycle")["QueueUrl"]
            arn = sqs.get_queue_attributes(QueueUrl=notifications_url, AttributeNames=["QueueArn"])[
                "Attributes"
            ]["QueueArn"]
            extra["LifecycleNotificationQueueArn"] = arn
        params = stack_params(
            cluster=CLUSTER,
            asg_name=ASG,
            hook_name=HOOK,
            coordinator_url=server.url,
            coordinator_org=coord.org,
            token_secret_arn=secret["ARN"],
            extra=extra,
        )
        deployment = deploy_stack(params, session=session)
        logging.getLogger("moto").setLevel(logging.CRITICAL)  # deploy_stack sets its own
        settings = Settings.from_env(deployment.function("DrainMonitorFunction").environment)
        controller = lambda_runtime.build_controller(
            settings, session, clock=clock, sleep=lambda s: time.sleep(clock.wall(s))
        )
        lambda_runtime.set_controller(controller)
        stack.callback(lambda_runtime.set_controller, None)

        def on_invocation(inv: Invocation) -> None:
            response = inv.response if isinstance(inv.response, dict) else {}
            what = str(response.get("status", "error" if inv.error else "ok"))
            if "batchItemFailures" in response:
                what = f"batch of {len(inv.event.get('Records', []))}"
                if response["batchItemFailures"]:
                    what += f", {len(response['batchItemFailures'])} failed"
            if response.get("phase"):
                what += f" ({response['phase']})"
            detail = {
                "function": inv.function,
                "source": inv.source,
                "detail": response.get("detail"),
                "error": inv.error,
                "seconds": round(inv.seconds, 3),
            }
            timeline.record("controller", inv.function, what, detail, at=inv.started)
            drains.observe()

        table = deployment.outputs["DrainTableName"]
        drains = DrainWatch(lambda: _drain_records(session, table, controller, lock), timeline)
        router = EventRouter(
            deployment,
            session=session,
            lock=lock,
            on_invocation=on_invocation,
            visibility_seconds=clock.wall_ceil,
            not_before=delays.due,
        )

        def on_event(event: dict[str, Any]) -> None:
            router.put_event(event)
            timeline.record("note", "eventbridge", event["detail-type"], {"id": event["id"]})

        gaps.on_event = on_event
        standin = EcsAgentStandIn(cluster=CLUSTER, region=REGION, clock=clock.now_datetime)
        stack.enter_context(standin.serve())
        # infra/'s task definition has the agents tag themselves from IMDS too (hop limit 2);
        # the drill's instances are spot capacity (infra/ mixes both).
        imds = ImdsStandIn(ids[0], clock=clock.now_datetime, life_cycle="spot")
        stack.enter_context(imds.serve())
        runtime = TaskRuntime(
            gaps=gaps,
            ecs=session.client("ecs"),
            cluster=CLUSTER,
            standin=standin,
            clock=clock,
            coordinator_endpoint=server.agent_endpoint,
            registration_token=coord.registration_token,
            workdir=workdir,
            lock=lock,
            pid1=pid1,
            record=timeline.record,
            imds=imds,
            sqs=session.client("sqs"),
            notification_queue_url=notifications_url,
        )
        stack.callback(runtime.close)
        for iid in ids:
            runtime.add_instance(iid)
        stack.enter_context(router.running())
        yield Fleet(
            name=name,
            workdir=workdir,
            clock=clock,
            gaps=gaps,
            coord=coord,
            server=server,
            deployment=deployment,
            router=router,
            runtime=runtime,
            controller=controller,
            session=session,
            lock=lock,
            timeline=timeline,
            instances=ids,
        )


#: The AWS services a fleet's clients (the drill's, the handlers', the deploy's) use.
AWS_SERVICES = (
    "autoscaling",
    "cloudformation",
    "dynamodb",
    "ec2",
    "ecs",
    "events",
    "iam",
    "lambda",
    "s3",
    "secretsmanager",
    "sqs",
    "sts",
)
_loader: Any = None


def preload_aws_models() -> None:
    """Load the services' models once, into a loader every fleet's session shares: a fresh
    session would read and parse them again (~2 CPU-seconds a fleet). Called before the
    scenario processes are forked, so that each starts with them."""
    global _loader
    if _loader is not None:
        return
    import boto3
    import botocore.session

    session = boto3.session.Session(region_name=REGION)
    for service in AWS_SERVICES:
        session.client(
            service, aws_access_key_id="drill", aws_secret_access_key="drill"
        )  # loads its model, paginators, waiters' index, endpoint data
    _loader = session._session.get_component("data_loader")
    assert isinstance(session._session, botocore.session.Session)
    # moto parses the same models for itself (its own cache, per process).
    from moto.core.utils import get_service_model

    for service in AWS_SERVICES:
        with contextlib.suppress(Exception):
            get_service_model(service)


def _botocore_session() -> Any:
    """A botocore session with the shared model loader (:func:`preload_aws_models`)."""
    import botocore.session

    preload_aws_models()
    bsession = botocore.session.Session()
    bsession.register_component("data_loader", _loader)
    return bsession


def _restore_env(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _build_aws(session: Any, instances: int) -> list[str]:
    """The ASG with its termination hook and the ECS cluster (what infra/ deploys)."""
    ec2 = session.client("ec2")
    asg = session.client("autoscaling")
    ecs = session.client("ecs")
    ec2.create_launch_template(
        LaunchTemplateName=ASG,
        LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "c6g.large"},
    )
    asg.create_auto_scaling_group(
        AutoScalingGroupName=ASG,
        LaunchTemplate={"LaunchTemplateName": ASG, "Version": "$Latest"},
        MinSize=0,
        MaxSize=max(10, instances),
        DesiredCapacity=instances,
        AvailabilityZones=[f"{REGION}a"],
    )
    asg.put_lifecycle_hook(
        LifecycleHookName=HOOK,
        AutoScalingGroupName=ASG,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=HOOK_HEARTBEAT_TIMEOUT,
        DefaultResult="CONTINUE",
    )
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[ASG])["AutoScalingGroups"][0]
    # Long task ARNs (cluster name in the ARN), as every account has them now.
    ecs.put_account_setting(name="taskLongArnFormat", value="enabled")
    ecs.create_cluster(clusterName=CLUSTER)
    return [i["InstanceId"] for i in group["Instances"]]
