"""The normal form of every event the controller consumes: what the core's entry point takes.

Plain frozen dataclasses (standard library only); :mod:`~fleetdrain.controller.drain.events`
parses the wire formats (pydantic) into these, so the core never imports pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime


@dataclass(frozen=True)
class LifecycleSignal:
    """An instance is terminating and its lifecycle action waits for us."""

    instance_id: str
    asg_name: str
    hook_name: str
    token: str
    time: datetime
    event_id: str


@dataclass(frozen=True)
class SpotSignal:
    """A spot interruption warning: the instance goes two minutes after ``time``."""

    instance_id: str
    time: datetime
    action: str
    event_id: str


@dataclass(frozen=True)
class RebalanceSignal:
    """A rebalance recommendation: elevated risk of interruption."""

    instance_id: str
    time: datetime
    event_id: str


@dataclass(frozen=True)
class TaskStoppedSignal:
    """An ECS task stopped (with its containers' exit codes)."""

    cluster_arn: str
    container_instance_arn: str | None
    task_arn: str
    stopped_at: datetime
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    event_id: str = ""


@dataclass(frozen=True)
class InstanceDrainingSignal:
    """A container instance went DRAINING (by us, or by someone else)."""

    cluster_arn: str
    container_instance_arn: str
    instance_id: str | None
    event_id: str


@dataclass(frozen=True)
class TickSignal:
    """One of our own delayed ticks."""

    instance_id: str
    drain_id: str
    tick_id: str


@dataclass(frozen=True)
class Ignored:
    """An event that is well-formed and deliberately not acted on (with the reason)."""

    reason: str


Signal = (
    LifecycleSignal
    | SpotSignal
    | RebalanceSignal
    | TaskStoppedSignal
    | InstanceDrainingSignal
    | TickSignal
    | Ignored
)
