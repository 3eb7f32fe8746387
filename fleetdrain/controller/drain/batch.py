"""The first steps of several new drains that arrive together, sharing their calls.

Concern: one invocation that brings several notices (an SQS batch of spot warnings or lifecycle
actions; a Health event naming several instances) starts several drains, and their first
steps ask ECS the same things and send the same actions. Asked one drain at a time that is a
``ListContainerInstances``, a ``DescribeTasks``, an ``UpdateContainerInstancesState`` and a tick
each; here they are shared:

- reads, before the steps (:meth:`FirstSteps.look_ahead`): the container instances of every
  instance (one filtered ``ListContainerInstances`` and one ``DescribeContainerInstances`` to
  pair them) and the tasks of each (a ``ListTasks`` each, their describes in shared
  ``DescribeTasks`` calls);
- actions, after the steps (:meth:`FirstSteps.flush`), in this order: DRAINING (10 container
  instances a call), the ticks (``SendMessageBatch``, 10 a call), then each drain's record.

Invariants:

- A read handed to a step is one the step would have made itself, made less than
  :data:`AHEAD_SECONDS` ago on the drain clock, and handed out once; anything else (an exact
  read, a second read, an instance not looked at ahead) goes to ECS as it would without a batch.
- A drain's record is created only after its DRAINING and its tick went out, as a first step
  alone does it: a crash in between leaves the notice unanswered, SQS brings it back, and the
  step's actions are idempotent. A drain whose DRAINING or tick failed is not created, and its
  notice fails (:class:`~fleetdrain.controller.drain.errors.Retryable`): it comes back.
- DRAINING goes out before any lifecycle action is completed (:meth:`FirstSteps.before_completion`):
  a step that finds nothing to wait for completes at once, and nothing may be placed on the
  instance before it goes.
- Only first steps are batched (an instance with no record, each once a batch); everything
  else a batch brings runs after the flush, one by one, as it always does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from fleetdrain.controller.drain.errors import Retryable
from fleetdrain.controller.drain.ports import (
    Clock,
    ContainerInstance,
    DrainRecord,
    EcsPort,
    TaskInfo,
    Tick,
    TicksPort,
)

log = logging.getLogger("fleetdrain.drain")

#: How long a read made ahead stands in for the step's own (seconds on the drain clock): a
#: batch's steps run one after another, and one that waited for the coordinator's window must
#: not act on tasks read before it.
AHEAD_SECONDS = 5.0


@runtime_checkable
class BatchEcsPort(Protocol):
    """What an ECS adapter does for several container instances at once
    (:class:`~fleetdrain.controller.drain.ecs_fleet.EcsFleet`)."""

    def find_container_instances(
        self, instance_ids: Sequence[str]
    ) -> dict[str, ContainerInstance | None]: ...

    def tasks_on_many(
        self, container_instance_arns: Sequence[str]
    ) -> dict[str, list[TaskInfo]]: ...

    def set_draining_many(self, arns: Sequence[str]) -> dict[str, str]: ...


@runtime_checkable
class BatchTicksPort(Protocol):
    """Several ticks in one call (:class:`~fleetdrain.controller.drain.ticks.SqsTicks`)."""

    def schedule_many(self, ticks: Sequence[Tick]) -> set[str]: ...


@dataclass
class _Owned:
    """What one signal of the batch left to send."""

    draining: list[str] = field(default_factory=list)
    ticks: list[Tick] = field(default_factory=list)
    create: tuple[DrainRecord, str | None] | None = None
    failed: Exception | None = None


class AheadFleet:
    """The controller's :class:`~fleetdrain.controller.drain.ports.EcsPort` while a batch's
    first steps run: reads made ahead are handed out once; DRAINING waits for the flush while
    a step that creates its record runs (:attr:`FirstSteps.holding`; any other step's DRAINING
    goes out at once, before the save that says it did)."""

    def __init__(self, batch: FirstSteps, behind: EcsPort) -> None:
        self.batch = batch
        self.behind = behind

    def find_container_instance(self, instance_id: str) -> ContainerInstance | None:
        kept = self.batch.take_instance(instance_id)
        if not isinstance(kept, _Missing):
            return kept
        return self.behind.find_container_instance(instance_id)

    def tasks_on(
        self, container_instance_arn: str, known: Sequence[TaskInfo] = (), exact: bool = False
    ) -> list[TaskInfo]:
        if not exact and not known:
            kept = self.batch.take_tasks(container_instance_arn)
            if kept is not None:
                return kept
        return self.behind.tasks_on(container_instance_arn, known, exact=exact)

    def saw_stopped(self, container_instance_arn: str, task_arn: str) -> None:
        self.behind.saw_stopped(container_instance_arn, task_arn)

    def set_draining(self, arn: str) -> None:
        if self.batch.holding:
            self.batch.owned().draining.append(arn)
        else:
            self.behind.set_draining(arn)

    def stop_task(self, task_arn: str, reason: str) -> None:
        self.behind.stop_task(task_arn, reason)

    def protected(self, task_arns: list[str]) -> set[str]:
        return self.behind.protected(task_arns)


class _Missing:
    pass


_NONE = _Missing()


class FirstSteps:
    """One batch of first steps: the reads made ahead, and what each signal left to send."""

    def __init__(self, fleet: EcsPort, ticks: TicksPort, clock: Clock) -> None:
        #: The controller's own ports (not the batch's :class:`AheadFleet`).
        self.fleet = fleet
        self.ticks = ticks
        self.clock = clock
        self._instances: dict[str, ContainerInstance | None] = {}
        self._tasks: dict[str, list[TaskInfo]] = {}
        self._read_at = 0.0
        self._owned: dict[int, _Owned] = {}
        #: The signal whose step runs now (its index in the batch).
        self.current = 0
        #: The step running now creates its record (a first step): its DRAINING and its tick
        #: are held for the flush. Any other step sends them at once (its save comes next).
        self.holding = False

    # ------------------------------------------------------------------ reads ahead

    def look_ahead(self, instance_ids: Sequence[str]) -> None:
        """Read the container instances of ``instance_ids``, and their tasks, for the steps
        to come (nothing, when the adapter cannot read several at once)."""
        fleet = self.fleet
        if len(instance_ids) < 2 or not isinstance(fleet, BatchEcsPort):
            return
        self._read_at = self.clock()
        try:
            self._instances = fleet.find_container_instances(instance_ids)
            arns = [ci.arn for ci in self._instances.values() if ci is not None]
            if len(arns) >= 2:
                self._tasks = fleet.tasks_on_many(arns)
        except Exception as exc:
            # A read ahead only saves calls: each step reads for itself (and fails, and is
            # retried, on its own) rather than the whole batch coming back after SQS's
            # visibility timeout.
            log.warning("reads ahead of a batch failed", extra={"error": str(exc)})
            self._instances, self._tasks = {}, {}

    def _fresh(self) -> bool:
        return self.clock() - self._read_at < AHEAD_SECONDS

    def take_instance(self, instance_id: str) -> ContainerInstance | _Missing | None:
        """The container instance read ahead for ``instance_id`` (once), or ``_NONE``."""
        if instance_id not in self._instances or not self._fresh():
            return _NONE
        return self._instances.pop(instance_id)

    def take_tasks(self, container_instance_arn: str) -> list[TaskInfo] | None:
        """The tasks read ahead on the container instance (once), or None."""
        if container_instance_arn not in self._tasks or not self._fresh():
            return None
        return self._tasks.pop(container_instance_arn)

    # ------------------------------------------------------------------ actions held back

    def owned(self) -> _Owned:
        """What the signal whose step runs now has left to send."""
        return self._owned.setdefault(self.current, _Owned())

    def hold_tick(self, tick: Tick) -> None:
        """The current signal's first step's tick: sent at the flush, before its record."""
        self.owned().ticks.append(tick)

    def hold_create(self, record: DrainRecord, link: str | None) -> None:
        """The record the current signal's first step would create now: after the flush."""
        self.owned().create = (record, link)

    def before_completion(self) -> None:
        """A step is about to complete a lifecycle action: its DRAINING goes out first."""
        owned = self.owned()
        for arn in owned.draining:
            self.fleet.set_draining(arn)
        owned.draining.clear()

    def flush(self) -> dict[int, tuple[DrainRecord, str | None] | Exception]:
        """Send what the steps held back, DRAINING, then the ticks; what is left of each
        signal: the record to create now (and its link), or why it failed."""
        self._drain()
        self._tick()
        out: dict[int, tuple[DrainRecord, str | None] | Exception] = {}
        for index, owned in self._owned.items():
            if owned.failed is not None:
                out[index] = owned.failed
            elif owned.create is not None:
                out[index] = owned.create
        return out

    def _drain(self) -> None:
        wanted = {arn: i for i, o in self._owned.items() for arn in o.draining}
        if not wanted:
            return
        fleet = self.fleet
        if isinstance(fleet, BatchEcsPort):
            try:
                failed = fleet.set_draining_many(list(wanted))
            except Exception as exc:
                failed = dict.fromkeys(wanted, str(exc))
            for arn, reason in failed.items():
                if arn in wanted:
                    self._fail(wanted[arn], f"DRAINING of {arn} failed: {reason}")
            return
        for arn, index in wanted.items():
            try:
                fleet.set_draining(arn)
            except Exception as exc:
                self._fail(index, f"DRAINING of {arn} failed: {exc}")

    def _tick(self) -> None:
        wanted = {
            t.tick_id: (i, t) for i, o in self._owned.items() if o.failed is None for t in o.ticks
        }
        if not wanted:
            return
        ticks = self.ticks
        if isinstance(ticks, BatchTicksPort) and len(wanted) > 1:
            try:
                failed = ticks.schedule_many([t for _, t in wanted.values()])
            except Exception as exc:
                failed = set(wanted)
                why = str(exc)
            else:
                why = "SQS did not take it"
            for tick_id in failed:
                self._fail(wanted[tick_id][0], f"tick {tick_id} not sent: {why}")
            return
        for index, t in wanted.values():
            try:
                ticks.schedule(t.instance_id, t.drain_id, t.tick_id, t.delay, t.record)
            except Exception as exc:
                self._fail(index, f"tick {t.tick_id} not sent: {exc}")

    def _fail(self, index: int, why: str) -> None:
        owned = self._owned[index]
        if owned.failed is None:
            owned.failed = Retryable(why)
