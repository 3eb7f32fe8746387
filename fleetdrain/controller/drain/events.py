"""Every event the controller consumes, as pydantic models, parsed into their normal form (the
signals of :mod:`~fleetdrain.controller.drain.signals`).

EventBridge events share one envelope with the fields of Powertools' ``EventBridgeModel``
(declared here: importing that model imports every Powertools parser model, about 0.35 s of a
cold start); the Auto Scaling notification bodies (SQS or SNS-over-SQS) and our own ticks are
plain models. Every model keeps unknown
fields (``extra="allow"``): AWS adds fields over time, and an extra field is never an error.
A missing or mistyped field we need is: :func:`parse_event` and :func:`parse_message` raise
:class:`MalformedEvent` with one line that says what was wrong, and the handlers drop such
events (logged, counted) instead of failing, so a poison event never turns into a retry storm.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fleetdrain.controller.drain.signals import (
    Ignored,
    InstanceDrainingSignal,
    LifecycleSignal,
    RebalanceSignal,
    Signal,
    SpotSignal,
    TaskStoppedSignal,
    TickSignal,
)

TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
TEST_NOTIFICATION = "autoscaling:TEST_NOTIFICATION"
TICK_KIND = "fleetdrain.tick"


class MalformedEvent(ValueError):
    """An event we cannot act on; never worth a retry."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class _OpenEventBridge(_Open):
    """The EventBridge envelope (Powertools' ``EventBridgeModel``'s fields)."""

    version: str
    id: str
    source: str
    account: str
    time: datetime
    region: str
    resources: list[str]
    detail_type: str = Field(alias="detail-type")
    detail: Any
    replay_name: str | None = Field(None, alias="replay-name")


# ------------------------------------------------------------------ Auto Scaling


class LifecycleActionDetail(_Open):
    LifecycleActionToken: str
    AutoScalingGroupName: str
    LifecycleHookName: str
    EC2InstanceId: str
    LifecycleTransition: str
    NotificationMetadata: str | None = None


class LifecycleActionEvent(_OpenEventBridge):
    """``EC2 Instance-terminate Lifecycle Action`` from EventBridge."""

    source: Literal["aws.autoscaling"]
    detail_type: Literal["EC2 Instance-terminate Lifecycle Action"] = Field(alias="detail-type")
    detail: LifecycleActionDetail


class LifecycleNotification(_Open):
    """The same lifecycle action as the body of an SQS (or SNS) notification."""

    LifecycleActionToken: str
    AutoScalingGroupName: str
    LifecycleHookName: str
    EC2InstanceId: str
    LifecycleTransition: str
    Time: datetime
    RequestId: str | None = None
    NotificationMetadata: str | None = None


class TestNotification(_Open):
    """``autoscaling:TEST_NOTIFICATION``: sent once when a notification target is attached."""

    Event: Literal["autoscaling:TEST_NOTIFICATION"]
    AutoScalingGroupName: str | None = None


# ------------------------------------------------------------------ EC2


class SpotInterruptionDetail(_Open):
    instance_id: str = Field(alias="instance-id")
    instance_action: str = Field(alias="instance-action")


class SpotInterruptionEvent(_OpenEventBridge):
    """``EC2 Spot Instance Interruption Warning``: the instance goes in two minutes."""

    source: Literal["aws.ec2"]
    detail_type: Literal["EC2 Spot Instance Interruption Warning"] = Field(alias="detail-type")
    detail: SpotInterruptionDetail


class RebalanceDetail(_Open):
    instance_id: str = Field(alias="instance-id")


class RebalanceEvent(_OpenEventBridge):
    """``EC2 Instance Rebalance Recommendation``: elevated risk of interruption."""

    source: Literal["aws.ec2"]
    detail_type: Literal["EC2 Instance Rebalance Recommendation"] = Field(alias="detail-type")
    detail: RebalanceDetail


# ------------------------------------------------------------------ ECS


class EcsContainer(_Open):
    name: str
    exitCode: int | None = None
    lastStatus: str | None = None


class TaskStateDetail(_Open):
    clusterArn: str
    taskArn: str
    lastStatus: str
    desiredStatus: str | None = None
    containerInstanceArn: str | None = None  # none on Fargate
    containers: list[EcsContainer] = Field(default_factory=list)
    group: str | None = None
    stopCode: str | None = None
    stoppedReason: str | None = None
    stoppedAt: datetime | None = None


class TaskStateChangeEvent(_OpenEventBridge):
    """``ECS Task State Change`` (the monitor's rule selects ``lastStatus`` STOPPED)."""

    source: Literal["aws.ecs"]
    detail_type: Literal["ECS Task State Change"] = Field(alias="detail-type")
    detail: TaskStateDetail


class ContainerInstanceDetail(_Open):
    clusterArn: str
    containerInstanceArn: str
    ec2InstanceId: str | None = None
    status: str


class ContainerInstanceStateChangeEvent(_OpenEventBridge):
    """``ECS Container Instance State Change`` (someone set DRAINING): advances our drain."""

    source: Literal["aws.ecs"]
    detail_type: Literal["ECS Container Instance State Change"] = Field(alias="detail-type")
    detail: ContainerInstanceDetail


# ------------------------------------------------------------------ ours


class TickMessage(_Open):
    """A delayed SQS message of our own that wakes a drain up."""

    kind: Literal["fleetdrain.tick"]
    instance_id: str
    drain_id: str
    tick_id: str


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'event'}: {err['msg']}" for err in exc.errors()
    )


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_event(raw: Any) -> Signal:
    """An EventBridge event (or one of our messages, already decoded) in normal form."""
    if not isinstance(raw, dict):
        raise MalformedEvent(f"event is a {type(raw).__name__}, not a JSON object")
    if "detail-type" not in raw:
        return _parse_body_object(raw)
    kind = raw.get("detail-type")
    models: dict[str, type[BaseModel]] = {
        "EC2 Instance-terminate Lifecycle Action": LifecycleActionEvent,
        "EC2 Spot Instance Interruption Warning": SpotInterruptionEvent,
        "EC2 Instance Rebalance Recommendation": RebalanceEvent,
        "ECS Task State Change": TaskStateChangeEvent,
        "ECS Container Instance State Change": ContainerInstanceStateChangeEvent,
    }
    model = models.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise MalformedEvent(f"unknown detail-type {kind!r}")
    try:
        event = model.model_validate(raw)
    except ValidationError as exc:
        raise MalformedEvent(f"{kind}: {_problems(exc)}") from exc
    if isinstance(event, LifecycleActionEvent):
        d = event.detail
        if d.LifecycleTransition != TERMINATING:
            return Ignored(f"lifecycle transition {d.LifecycleTransition}")
        return LifecycleSignal(
            d.EC2InstanceId,
            d.AutoScalingGroupName,
            d.LifecycleHookName,
            d.LifecycleActionToken,
            _aware(event.time),
            event.id,
        )
    if isinstance(event, SpotInterruptionEvent):
        return SpotSignal(
            event.detail.instance_id, _aware(event.time), event.detail.instance_action, event.id
        )
    if isinstance(event, RebalanceEvent):
        return RebalanceSignal(event.detail.instance_id, _aware(event.time), event.id)
    if isinstance(event, TaskStateChangeEvent):
        t = event.detail
        if t.lastStatus != "STOPPED":
            return Ignored(f"task state {t.lastStatus}")
        return TaskStoppedSignal(
            t.clusterArn,
            t.containerInstanceArn,
            t.taskArn,
            _aware(t.stoppedAt or event.time),
            {c.name: c.exitCode for c in t.containers},
            event.id,
        )
    assert isinstance(event, ContainerInstanceStateChangeEvent)
    ci = event.detail
    if ci.status != "DRAINING":
        return Ignored(f"container instance status {ci.status}")
    return InstanceDrainingSignal(
        ci.clusterArn, ci.containerInstanceArn, ci.ec2InstanceId, event.id
    )


def parse_message(body: str) -> Signal:
    """An SQS message body: a lifecycle notification (raw or in an SNS envelope) or a tick."""
    try:
        data = json.loads(body)
    except (ValueError, TypeError) as exc:
        raise MalformedEvent(f"message body is not JSON: {exc}") from exc
    if isinstance(data, dict) and data.get("Type") == "Notification" and "Message" in data:
        message = data["Message"]
        if not isinstance(message, str):
            raise MalformedEvent("SNS envelope's Message is not a string")
        return parse_message(message)
    if isinstance(data, dict) and "detail-type" in data:
        return parse_event(data)  # an EventBridge event delivered through a queue
    if not isinstance(data, dict):
        raise MalformedEvent(f"message body is a JSON {type(data).__name__}, not an object")
    return _parse_body_object(data)


def _parse_body_object(data: dict[str, Any]) -> Signal:
    try:
        if data.get("kind") == TICK_KIND:
            tick = TickMessage.model_validate(data)
            return TickSignal(tick.instance_id, tick.drain_id, tick.tick_id)
        if data.get("Event") == TEST_NOTIFICATION:
            test = TestNotification.model_validate(data)
            return Ignored(f"test notification for {test.AutoScalingGroupName}")
        if "LifecycleTransition" in data:
            n = LifecycleNotification.model_validate(data)
            if n.LifecycleTransition != TERMINATING:
                return Ignored(f"lifecycle transition {n.LifecycleTransition}")
            return LifecycleSignal(
                n.EC2InstanceId,
                n.AutoScalingGroupName,
                n.LifecycleHookName,
                n.LifecycleActionToken,
                _aware(n.Time),
                n.RequestId or n.LifecycleActionToken,
            )
    except ValidationError as exc:
        raise MalformedEvent(_problems(exc)) from exc
    keys = ", ".join(sorted(str(k) for k in data)[:8]) or "none"
    raise MalformedEvent(f"not an event the controller knows (keys: {keys})")
