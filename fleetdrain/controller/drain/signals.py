"""The normal form of every event the controller consumes: what the core's entry point takes.

Plain frozen dataclasses (standard library only); :mod:`~fleetdrain.controller.drain.events`
parses the wire formats (pydantic) into these, so the core never imports pydantic.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from fleetdrain.controller.drain.ports import DrainRecord


@dataclass(frozen=True)
class LifecycleSignal:
    """An instance is terminating and its lifecycle action waits for us (``time``: when the
    action began; None when the notification did not say: taken as now)."""

    instance_id: str
    asg_name: str
    hook_name: str
    token: str
    time: datetime | None
    event_id: str


@dataclass(frozen=True)
class SpotSignal:
    """A spot interruption warning: the instance goes two minutes after ``time`` (None when the
    event did not say: taken as now, as aws-node-termination-handler does)."""

    instance_id: str
    time: datetime | None
    action: str
    event_id: str


@dataclass(frozen=True)
class MaintenanceSignal:
    """An AWS Health scheduled change of the instance (retirement, scheduled stop, reboot
    maintenance): it goes at ``start`` (None: not said, a soft drain that never forces)."""

    instance_id: str
    start: datetime | None
    kind: str
    event_id: str


@dataclass(frozen=True)
class StoppingSignal:
    """EC2 instance state change to ``stopping`` or ``shutting-down``: the instance goes now
    (stopped or terminated outside the group: the console, the API)."""

    instance_id: str
    state: str
    time: datetime | None
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
    """A container instance went DRAINING (by us, or by someone else): the controller learns
    the container instance's EC2 instance from it, and nothing else."""

    cluster_arn: str
    container_instance_arn: str
    instance_id: str | None
    event_id: str


@dataclass(frozen=True)
class TickSignal:
    """One of our own delayed ticks; ``record``: the drain record it carries (as the step that
    sent it saved it), or None (read it)."""

    instance_id: str
    drain_id: str
    tick_id: str
    record: DrainRecord | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Ignored:
    """An event that is well-formed and deliberately not acted on (with the reason)."""

    reason: str


Signal = (
    LifecycleSignal
    | SpotSignal
    | RebalanceSignal
    | MaintenanceSignal
    | StoppingSignal
    | TaskStoppedSignal
    | InstanceDrainingSignal
    | TickSignal
    | Ignored
)


@dataclass(frozen=True)
class Several:
    """One event about several instances (an AWS Health event names every instance it
    affects): each signal is handled on its own."""

    signals: tuple[Signal, ...]
