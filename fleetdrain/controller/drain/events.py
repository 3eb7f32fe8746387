"""Every event the controller consumes, as pydantic models, parsed into their normal form (the
signals of :mod:`~fleetdrain.controller.drain.signals`).

EventBridge events share one envelope with the fields of Powertools' ``EventBridgeModel``
(declared here: importing that model imports every Powertools parser model, about 0.35 s of a
cold start); the Auto Scaling notification bodies (SQS or SNS-over-SQS) and our own ticks are
plain models. Every model keeps unknown
fields (``extra="allow"``): AWS adds fields over time, and an extra field is never an error.
A missing or mistyped field we need is: :func:`parse_event` and :func:`parse_message` raise
:class:`MalformedEvent` with one line that says what was wrong, and the handlers drop such
events (logged, counted, alarmed) instead of failing, so a poison event never turns into a retry
storm.

Real-world variants that mean no harm are taken as they come (samples in
``tests/events/real/``): an envelope ``version`` sent as a number, or none at all; an empty
``time`` (aws-node-termination-handler's test events: taken as now, as it does); a lifecycle
notification without ``Time`` (now); an ``autoscaling:TEST_NOTIFICATION`` in an EventBridge
envelope (ignored).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fleetdrain.controller.drain.ports import DrainRecord
from fleetdrain.controller.drain.signals import (
    Ignored,
    InstanceDrainingSignal,
    LifecycleSignal,
    MaintenanceSignal,
    RebalanceSignal,
    Several,
    Signal,
    SpotSignal,
    StoppingSignal,
    TaskStoppedSignal,
    TickSignal,
)

TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
TEST_NOTIFICATION = "autoscaling:TEST_NOTIFICATION"
TICK_KIND = "fleetdrain.tick"
#: EC2 instance states in which the instance is going (stopped or terminated, by anyone).
STOPPING_STATES = frozenset({"stopping", "shutting-down"})


class MalformedEvent(ValueError):
    """An event we cannot act on; never worth a retry."""


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


def _blank_is_none(value: Any) -> Any:
    return None if isinstance(value, str) and not value.strip() else value


class _OpenEventBridge(_Open):
    """The EventBridge envelope (Powertools' ``EventBridgeModel``'s fields), as lenient as
    real events need: ``version`` may be a number or missing, ``time`` may be empty (None:
    the consumer takes now)."""

    version: str | None = None
    id: str
    source: str
    account: str
    time: datetime | None
    region: str
    resources: list[str] = Field(default_factory=list)
    detail_type: str = Field(alias="detail-type")
    detail: Any
    replay_name: str | None = Field(None, alias="replay-name")

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int | float) else value

    @field_validator("time", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        return _blank_is_none(value)


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
    #: When the action began; some senders leave it out (taken as now).
    Time: datetime | None = None
    RequestId: str | None = None
    NotificationMetadata: str | None = None

    @field_validator("Time", mode="before")
    @classmethod
    def _time(cls, value: Any) -> Any:
        return _blank_is_none(value)


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


class InstanceStateDetail(_Open):
    # ``instance-id`` as EC2 sends it; ``instance_id`` in some published samples.
    instance_id: str = Field(alias="instance-id")
    state: str

    @classmethod
    def _aliases(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and "instance-id" not in raw and "instance_id" in raw:
            raw = {**raw, "instance-id": raw["instance_id"]}
        return raw


class InstanceStateChangeEvent(_OpenEventBridge):
    """``EC2 Instance State-change Notification`` (the rule selects stopping/shutting-down)."""

    source: Literal["aws.ec2"]
    detail_type: Literal["EC2 Instance State-change Notification"] = Field(alias="detail-type")
    detail: InstanceStateDetail

    @field_validator("detail", mode="before")
    @classmethod
    def _detail(cls, value: Any) -> Any:
        return InstanceStateDetail._aliases(value)


# ------------------------------------------------------------------ AWS Health


def _health_time(value: Any) -> Any:
    """AWS Health times: RFC 1123 (``Sat, 05 Jun 2016 15:10:09 GMT``) or ISO 8601."""
    value = _blank_is_none(value)
    if isinstance(value, str) and not value[:4].isdigit():
        try:
            return parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return value  # pydantic says what is wrong with it
    return value


class HealthEntity(_Open):
    entityValue: str


class HealthDetail(_Open):
    eventArn: str | None = None
    service: str
    eventTypeCode: str
    eventTypeCategory: str
    statusCode: str | None = None
    startTime: datetime | None = None
    endTime: datetime | None = None
    affectedEntities: list[HealthEntity] = Field(default_factory=list)

    @field_validator("startTime", "endTime", mode="before")
    @classmethod
    def _times(cls, value: Any) -> Any:
        return _health_time(value)


class HealthEvent(_OpenEventBridge):
    """``AWS Health Event`` (the rule selects EC2 scheduled changes)."""

    source: Literal["aws.health"]
    detail_type: Literal["AWS Health Event"] = Field(alias="detail-type")
    detail: HealthDetail


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
    #: The drain record as the step that sent the tick saved it (``state.record_to_doc``).
    record: str | None = None


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'event'}: {err['msg']}" for err in exc.errors()
    )


def _aware(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _maybe_aware(value: datetime | None) -> datetime | None:
    return None if value is None else _aware(value)


def _instance_of(value: str) -> str | None:
    """``i-...`` from an instance id or an instance ARN; None for anything else."""
    tail = value.rsplit("/", 1)[-1]
    return tail if tail.startswith("i-") else None


def parse_event(raw: Any) -> Signal | Several:
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
        "EC2 Instance State-change Notification": InstanceStateChangeEvent,
        "AWS Health Event": HealthEvent,
        "ECS Task State Change": TaskStateChangeEvent,
        "ECS Container Instance State Change": ContainerInstanceStateChangeEvent,
    }
    model = models.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise MalformedEvent(f"unknown detail-type {kind!r}")
    if model is LifecycleActionEvent:
        # A test notification or another transition in the lifecycle envelope has none of a
        # termination's fields: say what it is rather than what it lacks.
        detail = raw.get("detail")
        if isinstance(detail, dict):
            what = detail.get("LifecycleTransition") or detail.get("Event")
            if isinstance(what, str) and what != TERMINATING:
                return Ignored(f"lifecycle transition {what}")
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
            _maybe_aware(event.time),
            event.id,
        )
    if isinstance(event, SpotInterruptionEvent):
        return SpotSignal(
            event.detail.instance_id,
            _maybe_aware(event.time),
            event.detail.instance_action,
            event.id,
        )
    if isinstance(event, RebalanceEvent):
        return RebalanceSignal(
            event.detail.instance_id, _aware(event.time or datetime.now(UTC)), event.id
        )
    if isinstance(event, InstanceStateChangeEvent):
        d2 = event.detail
        if d2.state not in STOPPING_STATES:
            return Ignored(f"instance state {d2.state}")
        return StoppingSignal(d2.instance_id, d2.state, _maybe_aware(event.time), event.id)
    if isinstance(event, HealthEvent):
        return _health(event)
    if isinstance(event, TaskStateChangeEvent):
        t = event.detail
        if t.lastStatus != "STOPPED":
            return Ignored(f"task state {t.lastStatus}")
        return TaskStoppedSignal(
            t.clusterArn,
            t.containerInstanceArn,
            t.taskArn,
            _aware(t.stoppedAt or event.time or datetime.now(UTC)),
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


def _health(event: HealthEvent) -> Signal | Several:
    """An AWS Health event: a drain for each instance of an EC2 scheduled change."""
    h = event.detail
    if h.service != "EC2" or h.eventTypeCategory != "scheduledChange":
        return Ignored(f"health event {h.service} {h.eventTypeCategory}")
    if (h.statusCode or "").lower() == "closed":
        return Ignored(f"health event {h.eventTypeCode} is closed")
    entities = [e.entityValue for e in h.affectedEntities] or list(event.resources)
    instances = list(dict.fromkeys(i for i in map(_instance_of, entities) if i))
    if not instances:
        return Ignored(f"health event {h.eventTypeCode} names no instance")
    start = _maybe_aware(h.startTime)
    # One id for every update of the same change (AWS Health sends a new event at each), unless
    # it moves: a change rescheduled earlier must be news.
    key = h.eventArn or event.id
    event_id = f"{key}@{start.isoformat() if start else ''}"
    signals = tuple(MaintenanceSignal(i, start, h.eventTypeCode, event_id) for i in instances)
    return signals[0] if len(signals) == 1 else Several(signals)


def parse_message(body: str) -> Signal | Several:
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


def _carried(doc: str | None, tick: TickMessage) -> DrainRecord | None:
    """The record a tick carries, or None when it carries none we can read (the step then
    reads the record: an unreadable copy is no reason to drop the tick)."""
    if doc is None:
        return None
    from fleetdrain.controller.drain.state import record_from_doc

    try:
        record = record_from_doc(doc)
    except ValidationError:
        return None
    if (record.instance_id, record.drain_id) != (tick.instance_id, tick.drain_id):
        return None
    return record


def _parse_body_object(data: dict[str, Any]) -> Signal:
    try:
        if data.get("kind") == TICK_KIND:
            tick = TickMessage.model_validate(data)
            return TickSignal(
                tick.instance_id, tick.drain_id, tick.tick_id, _carried(tick.record, tick)
            )
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
                _maybe_aware(n.Time),
                n.RequestId or n.LifecycleActionToken,
            )
    except ValidationError as exc:
        raise MalformedEvent(_problems(exc)) from exc
    keys = ", ".join(sorted(str(k) for k in data)[:8]) or "none"
    raise MalformedEvent(f"not an event the controller knows (keys: {keys})")
