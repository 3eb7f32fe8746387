"""Test-support gap fillers for moto: what the drain controller needs and moto 5.2 lacks.

moto models EC2, ECS, Auto Scaling, DynamoDB, SQS and Secrets Manager well enough for the
controller's calls, but not:

- **Lifecycle actions**: no ``Terminating:Wait``, no ``RecordLifecycleActionHeartbeat`` or
  ``CompleteLifecycleAction``, no heartbeat timeout. :meth:`AwsGaps.begin_termination` puts an
  instance in ``Terminating:Wait`` and returns the EventBridge event AWS would send (so does
  ``TerminateInstanceInAutoScalingGroup`` when the group has a termination hook); the two
  API calls are served (same wire errors as AWS: ``ValidationError: No active Lifecycle Action
  found with token ...``); :meth:`AwsGaps.expire_lifecycle_actions` applies the heartbeat
  timeout (the default result, the token then dead).
- **Task protection**: ``GetTaskProtection`` / ``UpdateTaskProtection`` are served from
  :attr:`AwsGaps.protection` (what an agent sets through the ECS agent endpoint).
- **The effects of DRAINING and StopTask**: in moto a stopped task is STOPPED at once, and
  DRAINING stops nothing. Here both deliver a *SIGTERM* to the task runtime
  (:attr:`AwsGaps.on_sigterm`; the default stops the task at once with exit 0, an idle agent),
  and the task is STOPPED only when the runtime says so (:meth:`AwsGaps.task_exited`), with its
  exit code. DRAINING SIGTERMs the service tasks on the instance (not daemon ones), as ECS does.
- **ECS page sizes**: ``ListTasks`` pages at ``maxResults`` (default and at most 100) with a
  ``nextToken``, and ``DescribeTasks`` refuses more than 100 tasks, as ECS does (moto returns
  and takes any number).
- **The cluster query language** of ``ListContainerInstances``: the ``ec2InstanceId == <id>``
  (and ``ec2InstanceId in [...]``) filter is applied, as ECS does (moto ignores ``filter``
  and lists every container instance); other expressions are refused (InvalidParameter), so a
  caller that relies on one is found out. ``ListContainerInstances`` and
  ``DescribeContainerInstances`` are counted in :attr:`AwsGaps.calls`.
- **Throttling** (moto never throttles): :meth:`AwsGaps.throttle` makes ECS
  ``DescribeTasks`` / ``ListTasks`` / ``DescribeContainerInstances`` and Auto Scaling
  ``RecordLifecycleActionHeartbeat`` answer ``ThrottlingException`` (HTTP 400, what AWS
  answers and botocore retries) at a given rate, for a window on the clock, or a number of
  times; :attr:`AwsGaps.throttled` counts the refusals.
- **Tasks that change state on their own**: ``ecs::task`` is set to manual progression, so a
  task stays RUNNING until something stops it.
- **Atomic conditional writes**: DynamoDB checks a write's condition and writes in one step;
  moto reads, checks and writes in several, so two threads can both pass one condition (two
  steps both claiming one drain record). ``PutItem``, ``UpdateItem``, ``DeleteItem`` and
  ``TransactWriteItems`` are served one at a time here.
- **Events**: the Auto Scaling lifecycle action, spot interruption, rebalance recommendation,
  EC2 instance state change, AWS Health scheduled change, ECS task state change and ECS
  container instance state change events are built with the field names AWS sends (see
  ``tests/events/``) and appended to :attr:`AwsGaps.events` (and passed to ``on_event``). A
  container instance's event comes when it goes DRAINING and, while it is DRAINING, after each
  of its tasks' STOPPED event (ECS sends one at every change of what runs on it).

Use inside ``moto.mock_aws()``: ``with AwsGaps(clock=...) as gaps: ...``. The patches are
class-level (they also work against a moto server in this process); one :class:`AwsGaps` is
active at a time.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from moto.autoscaling.exceptions import ValidationError
from moto.autoscaling.models import (
    AutoScalingBackend,
    TerminateInstanceActivity,
    autoscaling_backends,
)
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.exceptions import ServiceException
from moto.core.responses import ActionResult, EmptyResult
from moto.dynamodb.responses import DynamoHandler
from moto.ecs.exceptions import InvalidParameterException
from moto.ecs.models import EC2ContainerServiceBackend, ecs_backends
from moto.ecs.responses import EC2ContainerServiceResponse
from moto.moto_api import state_manager

from fleetdrain.drill.aws.template import ACCOUNT, REGION

TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"

Event = dict[str, Any]

_active: AwsGaps | None = None
_lock = threading.RLock()


def _iso(ts: float, millis: bool = False) -> str:
    dt = datetime.fromtimestamp(ts, UTC)
    if millis:
        return dt.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    return dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def _gaps() -> AwsGaps:
    if _active is None:
        raise RuntimeError("fleetdrain.drill.aws.gaps.AwsGaps is not installed")
    return _active


@dataclass
class LifecycleAction:
    """One instance waiting in ``Terminating:Wait``."""

    instance_id: str
    asg_name: str
    hook_name: str
    token: str
    heartbeat_timeout: float
    default_result: str
    started_at: float
    last_heartbeat_at: float
    global_timeout_at: float
    state: str = "waiting"  # waiting | completed | expired
    result: str | None = None
    completed_at: float | None = None
    heartbeats: int = 0

    @property
    def waiting(self) -> bool:
        return self.state == "waiting"


@dataclass
class Protection:
    enabled: bool
    expires_at: float | None = None


#: The operations :meth:`AwsGaps.throttle` can refuse, and the service each belongs to.
THROTTLE_SERVICES: dict[str, str] = {
    "DescribeTasks": "ecs",
    "ListTasks": "ecs",
    "DescribeContainerInstances": "ecs",
    "ListContainerInstances": "ecs",
    "RecordLifecycleActionHeartbeat": "autoscaling",
}
THROTTLEABLE: frozenset[str] = frozenset(THROTTLE_SERVICES)


@dataclass
class Throttle:
    """One :meth:`AwsGaps.throttle`: which operations, how often, when, how many times."""

    operations: frozenset[str]
    rate: float = 1.0
    start: float | None = None
    until: float | None = None
    count: int | None = None
    code: str = "ThrottlingException"
    #: Calls it refused.
    fired: int = 0
    #: Calls it saw (inside its window), and the refusals they have earned so far.
    seen: int = 0
    _credit: float = 0.0

    def active(self, now: float) -> bool:
        return (
            (self.start is None or now >= self.start)
            and (self.until is None or now < self.until)
            and (self.count is None or self.fired < self.count)
        )

    def takes(self, operation: str, now: float) -> bool:
        """Whether this call of ``operation`` at ``now`` is refused (and count it)."""
        if operation not in self.operations or not self.active(now):
            return False
        self.seen += 1
        self._credit += self.rate
        if self._credit < 1.0 - 1e-9:
            return False
        self._credit -= 1.0
        self.fired += 1
        return True


@dataclass
class TaskExit:
    task_arn: str
    exit_code: int
    stopped_at: float
    reason: str


@dataclass
class AwsGaps:
    """The gap fillers' state; ``clock`` is epoch seconds (inject a fake one to move time)."""

    clock: Callable[[], float] = time.time
    region: str = REGION
    account: str = ACCOUNT
    on_event: Callable[[Event], None] | None = None
    #: Called with (task_arn, reason) when ECS would SIGTERM a task; None: exit 0 at once.
    on_sigterm: Callable[[str, str], None] | None = None
    actions: dict[str, LifecycleAction] = field(default_factory=dict)
    protection: dict[str, Protection] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    sigterms: list[tuple[str, str]] = field(default_factory=list)
    exits: dict[str, TaskExit] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    #: Active throttles (:meth:`throttle`), and the calls they refused, by operation.
    throttles: list[Throttle] = field(default_factory=list)
    throttled: dict[str, int] = field(default_factory=dict)
    _saved: dict[str, Any] = field(default_factory=dict)
    _originals: list[tuple[type, str, Any]] = field(default_factory=list)

    # ------------------------------------------------------------------ install

    def install(self) -> AwsGaps:
        global _active
        with _lock:
            if _active is not None:
                raise RuntimeError("another AwsGaps is installed")
            self._originals = [(cls, name, cls.__dict__.get(name)) for cls, name, _ in _PATCHES]
            self._saved = {
                "ecs_update_state": EC2ContainerServiceBackend.update_container_instances_state,
                "ecs_stop_task": EC2ContainerServiceBackend.stop_task,
            }
            for cls, name, fn in _PATCHES:
                setattr(cls, name, fn)
            state_manager.set_transition("ecs::task", {"progression": "manual", "times": 10**12})
            _active = self
        return self

    def uninstall(self) -> None:
        global _active
        with _lock:
            if _active is not self:
                return
            for cls, name, original in self._originals:
                if original is None:
                    delattr(cls, name)
                else:
                    setattr(cls, name, original)
            state_manager.unset_transition("ecs::task")
            _active = None

    def __enter__(self) -> AwsGaps:
        return self.install()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    # ------------------------------------------------------------------ throttling

    def throttle(
        self,
        *operations: str,
        rate: float = 1.0,
        start: float | None = None,
        until: float | None = None,
        count: int | None = None,
        code: str = "ThrottlingException",
    ) -> Throttle:
        """Make ``operations`` (names from :data:`THROTTLEABLE`; none: all of them) answer
        ``code`` (HTTP 400, "Rate exceeded"), as AWS does when an account's request rate for
        the API is spent.

        ``rate`` is the share of calls refused, spread evenly (0.25: every fourth call), from
        ``start`` to ``until`` on :attr:`clock` (None: from now, and for as long as it is
        active), at most ``count`` times. Each call botocore makes counts, retries too (so with
        ``rate=1`` its retries give up; with a lower rate they get through). The last throttle
        added that applies decides; :meth:`unthrottle` removes one.
        """
        unknown = set(operations) - THROTTLEABLE
        if unknown:
            raise ValueError(f"not throttleable here: {sorted(unknown)} (see THROTTLEABLE)")
        if not 0.0 < rate <= 1.0:
            raise ValueError("rate must be in (0, 1]")
        t = Throttle(frozenset(operations or THROTTLEABLE), rate, start, until, count, code=code)
        with _lock:
            self.throttles.append(t)
        return t

    def unthrottle(self, throttle: Throttle | None = None) -> None:
        """Remove ``throttle`` (None: every throttle)."""
        with _lock:
            self.throttles = (
                [] if throttle is None else [t for t in self.throttles if t is not throttle]
            )

    def _throttle(self, operation: str) -> Throttle | None:
        """The throttle that refuses this call of ``operation`` (counted), or None."""
        now = self.clock()
        with _lock:
            for t in reversed(self.throttles):
                if t.takes(operation, now):
                    self.throttled[operation] = self.throttled.get(operation, 0) + 1
                    return t
        return None

    def _count(self, name: str) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1

    def _emit(self, event: Event) -> Event:
        self.events.append(event)
        if self.on_event is not None:
            self.on_event(event)
        return event

    def _envelope(self, detail_type: str, source: str, resources: list[str], detail: Any) -> Event:
        return {
            "version": "0",
            "id": str(uuid.uuid4()),
            "detail-type": detail_type,
            "source": source,
            "account": self.account,
            "time": _iso(self.clock()),
            "region": self.region,
            "resources": resources,
            "detail": detail,
        }

    # ------------------------------------------------------------------ Auto Scaling

    def _asg_backend(self) -> Any:
        return autoscaling_backends[self.account][self.region]

    def begin_termination(self, instance_id: str) -> Event:
        """Scale-in of ``instance_id``: ``Terminating:Wait`` and the lifecycle action event.

        The instance's group must have a termination lifecycle hook (the event names it).
        """
        backend = self._asg_backend()
        for group in backend.autoscaling_groups.values():
            for state in group.instance_states:
                if state.instance.id == instance_id:
                    break
            else:
                continue
            hooks = _termination_hooks(backend, group.name)
            if not hooks:
                raise ValueError(f"group {group.name} has no termination lifecycle hook")
            hook = hooks[0]
            timeout = float(hook.heartbeat_timeout or 3600)
            now = self.clock()
            action = LifecycleAction(
                instance_id=instance_id,
                asg_name=group.name,
                hook_name=hook.name,
                token=str(uuid.uuid4()),
                heartbeat_timeout=timeout,
                default_result=hook.default_result or "ABANDON",
                started_at=now,
                last_heartbeat_at=now,
                global_timeout_at=now + min(100 * timeout, 172800.0),
            )
            self.actions[instance_id] = action
            state.lifecycle_state = "Terminating:Wait"
            return self._emit(
                self._envelope(
                    "EC2 Instance-terminate Lifecycle Action",
                    "aws.autoscaling",
                    [group.arn],
                    {
                        "LifecycleActionToken": action.token,
                        "AutoScalingGroupName": group.name,
                        "LifecycleHookName": hook.name,
                        "EC2InstanceId": instance_id,
                        "LifecycleTransition": TERMINATING,
                        "NotificationMetadata": "",
                        "Origin": "AutoScalingGroup",
                        "Destination": "EC2",
                    },
                )
            )
        raise ValueError(f"instance {instance_id} is in no Auto Scaling group")

    @staticmethod
    def sqs_body(event: Event) -> dict[str, Any]:
        """The lifecycle event as an SQS/SNS notification target receives it."""
        d = event["detail"]
        return {
            "Origin": "AutoScalingGroup",
            "Destination": "EC2",
            "Service": "AWS Auto Scaling",
            "Time": event["time"],
            "AccountId": event["account"],
            "LifecycleTransition": d["LifecycleTransition"],
            "RequestId": str(uuid.uuid4()),
            "LifecycleActionToken": d["LifecycleActionToken"],
            "EC2InstanceId": d["EC2InstanceId"],
            "LifecycleHookName": d["LifecycleHookName"],
            "AutoScalingGroupName": d["AutoScalingGroupName"],
            "NotificationMetadata": d.get("NotificationMetadata", ""),
        }

    def expire_lifecycle_actions(self) -> list[str]:
        """Apply the heartbeat and global timeouts now; return the instances that timed out."""
        now = self.clock()
        expired = []
        for action in self.actions.values():
            if action.waiting and (
                now >= action.last_heartbeat_at + action.heartbeat_timeout
                or now >= action.global_timeout_at
            ):
                self._end_action(action, "expired", action.default_result)
                expired.append(action.instance_id)
        return expired

    def _find_action(
        self, asg_name: str, hook_name: str, token: str | None, instance_id: str | None
    ) -> LifecycleAction:
        self.expire_lifecycle_actions()
        for action in self.actions.values():
            if not action.waiting or action.asg_name != asg_name or action.hook_name != hook_name:
                continue
            if token and action.token == token:
                return action
            if not token and instance_id and action.instance_id == instance_id:
                return action
        if token:
            raise ValidationError(f"No active Lifecycle Action found with token {token}")
        raise ValidationError(f"No active Lifecycle Action found with instance ID {instance_id}")

    def heartbeat(
        self, asg_name: str, hook_name: str, token: str | None, instance_id: str | None
    ) -> None:
        self._count("RecordLifecycleActionHeartbeat")
        action = self._find_action(asg_name, hook_name, token, instance_id)
        action.last_heartbeat_at = self.clock()
        action.heartbeats += 1

    def complete(
        self,
        asg_name: str,
        hook_name: str,
        token: str | None,
        instance_id: str | None,
        result: str,
    ) -> None:
        self._count("CompleteLifecycleAction")
        if result not in ("CONTINUE", "ABANDON"):
            raise ValidationError(f"Invalid LifecycleActionResult: {result}")
        action = self._find_action(asg_name, hook_name, token, instance_id)
        self._end_action(action, "completed", result)

    def _end_action(self, action: LifecycleAction, state: str, result: str) -> None:
        action.state = state
        action.result = result
        action.completed_at = self.clock()
        # Either result terminates a terminating instance.
        backend = self._asg_backend()
        group = backend.autoscaling_groups.get(action.asg_name)
        if group is not None:
            group.instance_states = [
                s for s in group.instance_states if s.instance.id != action.instance_id
            ]
            if group.desired_capacity and group.desired_capacity > len(group.instance_states):
                group.desired_capacity = len(group.instance_states)
        backend.ec2_backend.terminate_instances([action.instance_id])

    # ------------------------------------------------------------------ EC2 events

    def spot_interruption(self, instance_id: str, action: str = "terminate") -> Event:
        return self._emit(
            self._envelope(
                "EC2 Spot Instance Interruption Warning",
                "aws.ec2",
                [f"arn:aws:ec2:{self.region}:{self.account}:instance/{instance_id}"],
                {"instance-id": instance_id, "instance-action": action},
            )
        )

    def instance_state_change(self, instance_id: str, state: str) -> Event:
        """``EC2 Instance State-change Notification`` (``stopping``, ``shutting-down``, ...): the
        event only (the instance itself is left as it is)."""
        return self._emit(
            self._envelope(
                "EC2 Instance State-change Notification",
                "aws.ec2",
                [f"arn:aws:ec2:{self.region}:{self.account}:instance/{instance_id}"],
                {"instance-id": instance_id, "state": state},
            )
        )

    def scheduled_change(
        self,
        instance_ids: list[str],
        start: float,
        code: str = "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED",
        status: str = "upcoming",
    ) -> Event:
        """An AWS Health ``scheduledChange`` for EC2 instances, starting at ``start`` (epoch
        seconds; written in RFC 1123 form, as AWS Health does)."""
        from email.utils import formatdate

        arn = f"arn:aws:health:{self.region}::event/EC2/{code}/{code}_{uuid.uuid4().hex[:8]}"
        return self._emit(
            self._envelope(
                "AWS Health Event",
                "aws.health",
                list(instance_ids),
                {
                    "eventArn": arn,
                    "service": "EC2",
                    "eventTypeCode": code,
                    "eventTypeCategory": "scheduledChange",
                    "eventScopeCode": "ACCOUNT_SPECIFIC",
                    "statusCode": status,
                    "eventRegion": self.region,
                    "startTime": formatdate(start, usegmt=True),
                    "endTime": formatdate(start + 7200, usegmt=True),
                    "lastUpdatedTime": formatdate(self.clock(), usegmt=True),
                    "eventDescription": [
                        {"language": "en_US", "latestDescription": f"{code} (fleetdrain drill)"}
                    ],
                    "affectedEntities": [{"entityValue": i} for i in instance_ids],
                },
            )
        )

    def rebalance_recommendation(self, instance_id: str) -> Event:
        return self._emit(
            self._envelope(
                "EC2 Instance Rebalance Recommendation",
                "aws.ec2",
                [f"arn:aws:ec2:{self.region}:{self.account}:instance/{instance_id}"],
                {"instance-id": instance_id},
            )
        )

    # ------------------------------------------------------------------ ECS

    def _ecs_backend(self) -> EC2ContainerServiceBackend:
        return ecs_backends[self.account][self.region]

    def _task(self, task_arn: str) -> Any:
        for tasks in self._ecs_backend().tasks.values():
            for arn, task in tasks.items():
                if arn == task_arn or task.task_arn == task_arn:
                    return task
        raise KeyError(task_arn)

    def sigterm(self, task_arn: str, reason: str) -> None:
        """ECS stops a task: desired STOPPED now, the runtime decides when it has exited."""
        task = self._task(task_arn)
        if task.last_status == "STOPPED" or task.desired_status == "STOPPED":
            return
        task.desired_status = "STOPPED"
        task.stopped_reason = reason
        self.sigterms.append((task.task_arn, reason))
        if self.on_sigterm is None:
            self.task_exited(task.task_arn, 0)
        else:
            self.on_sigterm(task.task_arn, reason)

    def task_exited(self, task_arn: str, exit_code: int = 0, reason: str | None = None) -> Event:
        """The task's process ended: STOPPED (moto's bookkeeping) and the ECS event."""
        task = self._task(task_arn)
        if task.last_status == "STOPPED":
            raise ValueError(f"task {task_arn} already stopped")
        why = reason or task.stopped_reason or "Essential container in task exited"
        cluster = task.cluster_name
        saved = self._saved["ecs_stop_task"]
        saved(self._ecs_backend(), cluster, task.task_arn, why)
        for container in task.containers:
            container.exitCode = exit_code
            container.last_status = "STOPPED"
        now = self.clock()
        self.exits[task.task_arn] = TaskExit(task.task_arn, exit_code, now, why)
        self.protection.pop(task.task_arn, None)
        event = self._emit(self._task_event(task, exit_code, now, why))
        instance = self._container_instance(cluster, task.container_instance_arn or "")
        if instance is not None and instance.status == "DRAINING":
            self._emit(self._instance_event(instance))
        return event

    def _container_instance(self, cluster: str, arn: str) -> Any:
        by_id = self._ecs_backend().container_instances.get(cluster.split("/")[-1], {})
        return by_id.get(arn.split("/")[-1])

    def _instance_event(self, instance: Any) -> Event:
        """``ECS Container Instance State Change`` for ``instance`` as it is now."""
        detail = {
            "agentConnected": True,
            "attributes": [],
            "clusterArn": self._ecs_backend().clusters[instance.cluster_name].arn,
            "containerInstanceArn": instance.container_instance_arn,
            "ec2InstanceId": instance.ec2_instance_id,
            "registeredResources": [],
            "remainingResources": [],
            "status": instance.status,
            "version": 1,
            "versionInfo": {},
            "updatedAt": _iso(self.clock(), millis=True),
        }
        return self._envelope(
            "ECS Container Instance State Change",
            "aws.ecs",
            [instance.container_instance_arn],
            detail,
        )

    def _task_event(self, task: Any, exit_code: int, now: float, reason: str) -> Event:
        detail = {
            "attachments": [],
            "clusterArn": task.cluster_arn,
            "containerInstanceArn": task.container_instance_arn,
            "containers": [
                {
                    "containerArn": c.container_arn,
                    "exitCode": exit_code,
                    "lastStatus": "STOPPED",
                    "name": c.name,
                    "taskArn": task.task_arn,
                }
                for c in task.containers
            ],
            "desiredStatus": "STOPPED",
            "group": task.group,
            "lastStatus": "STOPPED",
            "launchType": task.launch_type or "EC2",
            "stoppedAt": _iso(now, millis=True),
            "stoppedReason": reason,
            "stopCode": "ServiceSchedulerInitiated"
            if task.group.startswith("service:")
            else "UserInitiated",
            "taskArn": task.task_arn,
            "taskDefinitionArn": task.task_definition_arn,
            "updatedAt": _iso(now, millis=True),
            "version": 5,
        }
        return self._envelope("ECS Task State Change", "aws.ecs", [task.task_arn], detail)

    def set_protection(self, task_arn: str, enabled: bool, minutes: float | None = None) -> None:
        """What an agent does through ``$ECS_AGENT_URI/task-protection/v1/state``."""
        expires = self.clock() + minutes * 60 if enabled and minutes else None
        self.protection[task_arn] = Protection(enabled, expires)

    def _protection_view(self, task_arn: str) -> dict[str, Any]:
        p = self.protection.get(task_arn)
        enabled = (
            p is not None and p.enabled and (p.expires_at is None or p.expires_at > self.clock())
        )
        view: dict[str, Any] = {"taskArn": task_arn, "protectionEnabled": enabled}
        if enabled and p is not None and p.expires_at is not None:
            view["expirationDate"] = datetime.fromtimestamp(p.expires_at, UTC)
        return view

    def _draining(
        self, backend: EC2ContainerServiceBackend, cluster: str, ci_ids: list[str]
    ) -> None:
        ids = {c.split("/")[-1] for c in ci_ids}
        targets = []
        for tasks in backend.tasks.values():
            for task in tasks.values():
                ci = task.container_instance_arn or ""
                if ci.split("/")[-1] not in ids or not task.group.startswith("service:"):
                    continue
                if task.last_status == "STOPPED" or task.desired_status == "STOPPED":
                    continue
                service = task.group.split(":", 1)[1]
                strategy = next(
                    (s.scheduling_strategy for s in backend.services.values() if s.name == service),
                    "REPLICA",
                )
                if strategy == "DAEMON":
                    continue
                targets.append(
                    (task.task_arn, f"Service {service}: container instance is in DRAINING state")
                )
        for arn, reason in targets:
            self.sigterm(arn, reason)


# ---------------------------------------------------------------------- patched moto methods


def _complete_lifecycle_action(self: AutoScalingResponse) -> EmptyResult:
    _gaps().complete(
        self._get_param("AutoScalingGroupName"),
        self._get_param("LifecycleHookName"),
        self._get_param("LifecycleActionToken"),
        self._get_param("InstanceId"),
        self._get_param("LifecycleActionResult"),
    )
    return EmptyResult()


def _record_heartbeat(self: AutoScalingResponse) -> EmptyResult:
    _gaps().heartbeat(
        self._get_param("AutoScalingGroupName"),
        self._get_param("LifecycleHookName"),
        self._get_param("LifecycleActionToken"),
        self._get_param("InstanceId"),
    )
    return EmptyResult()


def _get_task_protection(self: EC2ContainerServiceResponse) -> ActionResult:
    gaps = _gaps()
    gaps._count("GetTaskProtection")
    tasks = self._get_param("tasks", []) or []
    if len(tasks) > 10:
        raise InvalidParameterException("tasks can have at most 10 items")
    known = []
    failures = []
    for arn in tasks:
        try:
            task = gaps._task(arn)
        except KeyError:
            failures.append({"arn": arn, "reason": "MISSING"})
            continue
        known.append(gaps._protection_view(task.task_arn))
    return ActionResult({"protectedTasks": known, "failures": failures})


def _update_task_protection(self: EC2ContainerServiceResponse) -> ActionResult:
    gaps = _gaps()
    gaps._count("UpdateTaskProtection")
    enabled = bool(self._get_param("protectionEnabled"))
    minutes = self._get_param("expiresInMinutes") or 120
    out = []
    for arn in self._get_param("tasks", []) or []:
        task = gaps._task(arn)
        gaps.set_protection(task.task_arn, enabled, float(minutes))
        out.append(gaps._protection_view(task.task_arn))
    return ActionResult({"protectedTasks": out, "failures": []})


def _update_state(
    self: EC2ContainerServiceBackend, cluster_str: str, ids: list[str], status: str
) -> Any:
    gaps = _gaps()
    gaps._count("UpdateContainerInstancesState")
    result = gaps._saved["ecs_update_state"](self, cluster_str, ids, status)
    if status.upper() == "DRAINING":
        for ci in ids:
            instance = gaps._container_instance(cluster_str, ci)
            if instance is not None:
                gaps._emit(gaps._instance_event(instance))
        gaps._draining(self, cluster_str, ids)
    return result


def _stop_task(
    self: EC2ContainerServiceBackend, cluster_str: str, task_str: str, reason: str
) -> Any:
    gaps = _gaps()
    gaps._count("StopTask")
    self._get_cluster(cluster_str)
    task = None
    for tasks in self.tasks.values():
        for arn, candidate in tasks.items():
            if arn == task_str or arn.endswith("/" + task_str.split("/")[-1]):
                task = candidate
    if task is None:
        raise InvalidParameterException(f"The referenced task was not found: {task_str}")
    gaps.sigterm(task.task_arn, reason or "Task stopped by user")
    return task


_moto_describe_tasks = EC2ContainerServiceResponse.describe_tasks


def _list_tasks(self: EC2ContainerServiceResponse) -> ActionResult:
    tasks = self.ecs_backend.list_tasks(
        self._get_param("cluster", "default"),
        self._get_param("containerInstance"),
        self._get_param("family"),
        self._get_param("startedBy"),
        self._get_param("serviceName"),
        self._get_param("desiredStatus"),
    )
    arns = [t.task_arn for t in tasks]
    limit = int(self._get_param("maxResults") or 100)
    if not 1 <= limit <= 100:
        raise InvalidParameterException("maxResults must be between 1 and 100")
    token = self._get_param("nextToken")
    if token is not None and not str(token).isdigit():
        raise InvalidParameterException("Invalid nextToken")
    start = int(token or 0)
    out: dict[str, Any] = {"taskArns": arns[start : start + limit]}
    if start + limit < len(arns):
        out["nextToken"] = str(start + limit)
    return ActionResult(out)


def _describe_tasks(self: EC2ContainerServiceResponse) -> ActionResult:
    if len(self._get_param("tasks", []) or []) > 100:
        raise InvalidParameterException("Tasks cannot be longer than 100.")
    return _moto_describe_tasks(self)


_moto_describe_container_instances = EC2ContainerServiceResponse.describe_container_instances
_FILTER = re.compile(
    r"^\s*ec2InstanceId\s*(?:==\s*(?P<one>[\w-]+)|in\s*\[(?P<many>[\w\s,-]*)\])\s*$"
)


def _list_container_instances(self: EC2ContainerServiceResponse) -> ActionResult:
    gaps = _gaps()
    gaps._count("ListContainerInstances")
    cluster = self._get_param("cluster", "default")
    arns = self.ecs_backend.list_container_instances(cluster, status=self._get_param("status"))
    expression = self._get_param("filter")
    if expression:
        match = _FILTER.match(expression)
        if match is None:
            raise InvalidParameterException(f"Unsupported filter expression: {expression}")
        wanted = (
            {match["one"]}
            if match["one"]
            else {w.strip() for w in (match["many"] or "").split(",") if w.strip()}
        )
        found, _ = (
            self.ecs_backend.describe_container_instances(cluster, arns) if arns else ([], [])
        )
        arns = sorted(ci.container_instance_arn for ci in found if ci.ec2_instance_id in wanted)
    return ActionResult({"containerInstanceArns": arns})


def _describe_container_instances(self: EC2ContainerServiceResponse) -> ActionResult:
    _gaps()._count("DescribeContainerInstances")
    return _moto_describe_container_instances(self)


_moto_terminate_instance = AutoScalingBackend.terminate_instance


def _termination_hooks(backend: Any, group_name: str) -> list[Any]:
    return [
        h
        for h in backend.lifecycle_hooks.values()
        if h.auto_scaling_group_name == group_name and h.lifecycle_transition == TERMINATING
    ]


def _terminate_instance(
    self: AutoScalingBackend, instance_id: str, should_decrement: bool
) -> TerminateInstanceActivity:
    # TerminateInstanceInAutoScalingGroup: moto terminates at once whatever the group's hooks;
    # AWS puts an instance whose group has a termination hook in Terminating:Wait and emits the
    # lifecycle event (begin_termination), and terminates it when the action is completed.
    for group in self.autoscaling_groups.values():
        for state in group.instance_states:
            if state.instance.id == instance_id and _termination_hooks(self, group.name):
                _gaps().begin_termination(instance_id)
                return TerminateInstanceActivity(state.instance, group.desired_capacity or 0)
    return _moto_terminate_instance(self, instance_id, should_decrement)


class _Throttled(ServiceException):
    """A throttled call's error (defined here, not in moto: moto would look its code up in a
    service model of its own package name)."""


def _throttling(original: Callable[..., Any]) -> Callable[..., Any]:
    """A response class's ``call_action`` that first asks the active throttles: a refused
    call is answered as the service answers a throttled one (its protocol's error body,
    HTTP 400), and never reaches moto or the gap fillers."""

    def call_action(self: Any) -> Any:
        operation = self._get_action()
        throttle = _gaps()._throttle(operation) if operation in THROTTLEABLE else None
        if throttle is None:
            return original(self)
        # As moto's own call_action answers a ServiceException.
        error = _Throttled(throttle.code, "Rate exceeded")
        with warnings.catch_warnings():  # "does not match an error shape": a common error
            warnings.simplefilter("ignore")
            status, error_headers, body = self.serialized(ActionResult(error))
        error_headers["status"] = status
        status, headers, body = self._transform_response(
            self.response_headers, (body, error_headers)
        )
        return (status, *self._enrich_response(headers, body))

    return call_action


#: DynamoDB writes, one at a time (see the module's "Atomic conditional writes").
_write_lock = threading.Lock()


def _atomic(original: Callable[..., Any]) -> Callable[..., Any]:
    def write(self: Any) -> Any:
        with _write_lock:
            return original(self)

    return write


_PATCHES: tuple[tuple[type, str, Callable[..., Any]], ...] = (
    *(
        (DynamoHandler, name, _atomic(getattr(DynamoHandler, name)))
        for name in ("put_item", "update_item", "delete_item", "transact_write_items")
    ),
    (
        EC2ContainerServiceResponse,
        "call_action",
        _throttling(EC2ContainerServiceResponse.call_action),
    ),
    (AutoScalingResponse, "call_action", _throttling(AutoScalingResponse.call_action)),
    (AutoScalingBackend, "terminate_instance", _terminate_instance),
    (EC2ContainerServiceResponse, "list_tasks", _list_tasks),
    (EC2ContainerServiceResponse, "describe_tasks", _describe_tasks),
    (EC2ContainerServiceResponse, "list_container_instances", _list_container_instances),
    (EC2ContainerServiceResponse, "describe_container_instances", _describe_container_instances),
    (AutoScalingResponse, "complete_lifecycle_action", _complete_lifecycle_action),
    (AutoScalingResponse, "record_lifecycle_action_heartbeat", _record_heartbeat),
    (EC2ContainerServiceResponse, "get_task_protection", _get_task_protection),
    (EC2ContainerServiceResponse, "update_task_protection", _update_task_protection),
    (EC2ContainerServiceBackend, "update_container_instances_state", _update_state),
    (EC2ContainerServiceBackend, "stop_task", _stop_task),
)
