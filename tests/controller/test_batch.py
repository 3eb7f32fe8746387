"""Notices that arrive together (one SQS batch, one event about several instances): their first
steps share ECS and SQS calls (``fleetdrain.controller.drain.batch``), in moto, through the
handlers as Lambda calls them, with the simulated agents of test_drains.

What each test holds to: the shared calls are made once for the batch (counted at botocore),
a record is created only after its DRAINING and its tick went out, DRAINING goes out before a
lifecycle action is completed, a notice whose DRAINING failed is not recorded and comes back,
and every drain still ends with its jobs passed.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from fleetdrain.controller.drain.batch import AHEAD_SECONDS, FirstSteps
from fleetdrain.controller.drain.errors import Retryable
from fleetdrain.controller.drain.ports import ContainerInstance, TaskInfo, Tick
from tests.controller.test_drains import FakeTicks, World, make_world, sqs_event

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def world(aws_env: None) -> Iterator[World]:
    with make_world() as w:
        yield w


class Calls:
    """Every AWS call of the clients it is attached to, in order: (operation, parameters)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, dict[str, Any]]] = []

    def attach(self, client: Any) -> None:
        client.meta.events.register("before-parameter-build", self._on_call)

    def _on_call(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.log.append((model.name, params))

    def count(self) -> Counter[str]:
        return Counter(op for op, _ in self.log)

    def index(self, op: str, where: Any = None) -> int:
        """The position of the first ``op`` call (whose parameters satisfy ``where``)."""
        for n, (name, params) in enumerate(self.log):
            if name == op and (where is None or where(params)):
                return n
        raise AssertionError(f"no {op} call")


class BatchTicks(FakeTicks):
    """The world's ticks, taking several in one call as SqsTicks' SendMessageBatch does; each
    call is logged in the calls' order as ``SendMessageBatch`` (or ``SendMessage``)."""

    def __init__(self, world: World, calls: Calls, refuse: Sequence[str] = ()) -> None:
        super().__init__(world.clock)
        self.calls = calls
        self.batches: list[int] = []
        #: Instances whose tick SQS does not take.
        self.refuse = set(refuse)

    def schedule(self, *args: Any, **kwargs: Any) -> None:
        self.calls.log.append(("SendMessage", {"instance_id": args[0]}))
        super().schedule(*args, **kwargs)

    def schedule_many(self, ticks: Sequence[Tick]) -> set[str]:
        self.calls.log.append(("SendMessageBatch", {"ids": [t.instance_id for t in ticks]}))
        self.batches.append(len(ticks))
        for t in ticks:
            if t.instance_id not in self.refuse:
                FakeTicks.schedule(self, t.instance_id, t.drain_id, t.tick_id, t.delay, t.record)
        return {t.tick_id for t in ticks if t.instance_id in self.refuse}


def counted(world: World, **overrides: Any) -> tuple[Any, Calls]:
    ctl = world.controller(**overrides)
    calls = Calls()
    for client in (ctl.fleet._ecs, ctl.store._ddb, ctl.lifecycle._asg):
        calls.attach(client)
    world.ticks = ctl.ticks = BatchTicks(world, calls)
    return ctl, calls


def deliver(world: World, function: str, events: list[dict[str, Any]]) -> dict[str, Any]:
    """``events`` (just emitted by the gaps) to ``function`` as one SQS batch (what they cause
    is delivered by the next ``world.pump()``)."""
    world.cursor = len(world.gaps.events)
    return world.invoke(function, sqs_event(*(json.dumps(e) for e in events)))


def test_a_storm_batch_shares_its_first_steps_calls(world: World) -> None:
    ids = world.build(instances=6)
    _, calls = counted(world, spot_margin=20)
    agents = [world.add_agent(iid) for iid in ids]
    out = deliver(world, "SpotInterruptionFunction", [world.gaps.spot_interruption(i) for i in ids])
    assert out == {"batchItemFailures": []}
    n = calls.count()
    # One instance at a time: 6 of each. Together: one lookup (and one describe to pair the
    # ARNs with their instances), one describe of all their tasks, one DRAINING, one batch of
    # ticks; the task listings and the records stay one an instance.
    assert n["ListContainerInstances"] == 1 and n["DescribeContainerInstances"] == 1
    assert n["DescribeTasks"] == 1 and n["UpdateContainerInstancesState"] == 1
    assert n["ListTasks"] == 6 and n["TransactWriteItems"] == 6
    assert world.ticks.batches == [6] and n["SendMessage"] == 0  # type: ignore[attr-defined]
    # Every record is created after the DRAINING and the ticks it depends on.
    first_create = calls.index("TransactWriteItems")
    assert calls.index("UpdateContainerInstancesState") < first_create
    assert calls.index("SendMessageBatch") < first_create
    for iid in ids:
        assert world.ci_status(iid) == "DRAINING"
        rec = world.record(iid)
        assert rec.tick_id is not None or rec.phase == "done"
    world.pump()
    world.run_until(lambda: all(world.record(i).phase == "done" for i in ids), limit=60)
    assert all(world.record(i).outcome == "drained" for i in ids)
    assert all(a.exited for a in agents)


def test_a_scale_in_batch_heartbeats_each_token_and_completes_every_hook(world: World) -> None:
    ids = world.build(instances=4)
    _, calls = counted(world)
    busy = world.add_agent(ids[0], job_seconds=40)
    for iid in ids[1:]:
        world.add_agent(iid)
    out = deliver(world, "LifecycleHookFunction", [world.gaps.begin_termination(i) for i in ids])
    assert out == {"batchItemFailures": []}
    n = calls.count()
    assert n["RecordLifecycleActionHeartbeat"] == 4  # each token proven live before it acts
    assert n["ListContainerInstances"] == 1 and n["DescribeTasks"] == 1
    # The busy instance stays soft (no DRAINING): three in one call.
    assert n["UpdateContainerInstancesState"] == 1
    assert world.ci_status(ids[0]) == "ACTIVE"
    world.pump()
    world.run_until(lambda: not any(world.gaps.actions[i].waiting for i in ids), limit=120)
    assert all(world.gaps.actions[i].state == "completed" for i in ids)
    assert world.coord.job(busy.job_id or "").passed


def test_a_batch_step_that_completes_at_once_sets_draining_first(world: World) -> None:
    ids = world.build(instances=3)
    _, calls = counted(world)
    empty = ids[0]  # only its daemon: nothing to wait for
    for iid in ids[1:]:
        world.add_agent(iid)
    deliver(world, "LifecycleHookFunction", [world.gaps.begin_termination(i) for i in ids])
    assert world.record(empty).outcome == "no_tasks"
    arn = world.ci_arn[empty]
    draining = calls.index(
        "UpdateContainerInstancesState", lambda p: arn in p.get("containerInstances", [])
    )
    completed = calls.index("CompleteLifecycleAction", lambda p: p.get("InstanceId") == empty)
    assert draining < completed, "nothing may be placed on an instance let go"
    assert world.gaps.actions[empty].state == "completed"


class DrainingRefused:
    """The fleet whose DRAINING of one container instance fails: in a batch (ECS's
    ``failures``) and alone (throttled, what the retries gave up on)."""

    def __init__(self, fleet: Any, arn: str) -> None:
        self._fleet, self.arn = fleet, arn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fleet, name)

    def set_draining_many(self, arns: Sequence[str]) -> dict[str, str]:
        ok = [a for a in arns if a != self.arn]
        failed = self._fleet.set_draining_many(ok) if ok else {}
        return {**failed, self.arn: "MISSING"} if self.arn in arns else failed

    def set_draining(self, arn: str) -> None:
        if arn == self.arn:
            raise Retryable("ECS UpdateContainerInstancesState: ThrottlingException")
        self._fleet.set_draining(arn)


def test_a_notice_whose_draining_failed_steps_alone_and_claims_nothing(world: World) -> None:
    ids = world.build(instances=3)
    ctl, calls = counted(world, spot_margin=20)
    for iid in ids:
        world.add_agent(iid)
    bad = ids[1]
    ctl.fleet = DrainingRefused(ctl.fleet, world.ci_arn[bad])
    notices = [world.gaps.spot_interruption(i) for i in ids]
    world.cursor = len(world.gaps.events)
    event = sqs_event(*(json.dumps(e) for e in notices))
    out = world.invoke("SpotInterruptionFunction", event)
    # The batch's DRAINING failed for it, so it stepped on its own at once, and failed again:
    # its notice comes back, and its record (written as the drain was merged) claims no
    # DRAINING and holds no lease; the retry tick 30 s later steps it again.
    failed = [f["itemIdentifier"] for f in out["batchItemFailures"]]
    assert failed == [event["Records"][1]["messageId"]]
    assert calls.count()["UpdateContainerInstancesState"] == 1  # the refused one never went
    rec = world.record(bad)
    assert rec.draining_at is None and rec.lease_id is None
    assert world.ci_status(bad) == "ACTIVE"
    assert all(world.ci_status(i) == "DRAINING" for i in ids if i != bad)
    ctl.fleet = ctl.fleet._fleet  # ECS takes it now
    world.pump()
    world.advance(31)
    assert world.ci_status(bad) == "DRAINING"
    world.run_until(lambda: all(world.record(i).phase == "done" for i in ids), limit=60)
    assert all(world.record(i).outcome == "drained" for i in ids)


def test_a_notice_whose_tick_was_not_taken_sends_it_alone_before_its_record(
    world: World,
) -> None:
    ids = world.build(instances=3)
    _, calls = counted(world, spot_margin=20)
    for iid in ids:
        world.add_agent(iid, job_seconds=30)  # busy: their drains wait, a tick pending
    world.ticks.refuse = {ids[2]}  # type: ignore[attr-defined]
    out = deliver(world, "SpotInterruptionFunction", [world.gaps.spot_interruption(i) for i in ids])
    assert out == {"batchItemFailures": []}
    # Not created with the batch (a record without its tick would lose its safety net): it
    # stepped alone, its tick sent on its own before its record was created.
    alone = calls.index("SendMessage", lambda p: p.get("instance_id") == ids[2])
    created = [n for n, (op, _) in enumerate(calls.log) if op == "TransactWriteItems"]
    assert calls.index("SendMessageBatch") < created[0] and len(created) == 3
    assert created[1] < alone < created[2]
    assert world.record(ids[2]).tick_id is not None
    world.pump()
    world.run_until(lambda: all(world.record(i).phase == "done" for i in ids), limit=60)
    assert all(world.coord.job(a.job_id or "").passed for a in world.agents.values() if a.job_id)


def test_the_same_instance_twice_and_one_not_in_the_cluster(world: World) -> None:
    ids = world.build(instances=3)
    _, calls = counted(world, spot_margin=20)
    for iid in ids:
        world.add_agent(iid)
    notices = [world.gaps.spot_interruption(i) for i in ids]
    notices.append(world.gaps.spot_interruption(ids[0]))  # a second notice of one instance
    notices.append(world.gaps.spot_interruption("i-0123456789abcdef0"))  # not in the cluster
    out = deliver(world, "SpotInterruptionFunction", notices)
    assert out == {"batchItemFailures": []}
    n = calls.count()
    # The four first steps share one lookup; the second notice runs after, on the record.
    assert n["ListContainerInstances"] == 1
    assert world.record(ids[0]).episode == 1
    assert all(world.ci_status(i) == "DRAINING" for i in ids)
    world.pump()
    world.run_until(lambda: all(world.record(i).phase == "done" for i in ids), limit=60)


def test_an_event_about_several_instances_is_one_batch(world: World) -> None:
    """An AWS Health scheduled change names every instance it affects: one event, their first
    steps together (through EventBridge, no queue)."""
    ids = world.build(instances=3)
    _, calls = counted(world, maintenance_margin=60)
    for iid in ids:
        world.add_agent(iid, job_seconds=600)  # busy: the drains stay soft
    event = world.gaps.scheduled_change(ids, start=world.clock() + 3600)
    world.cursor = len(world.gaps.events)
    out = world.invoke("SpotInterruptionFunction", event)
    assert out["status"] == "started"
    assert calls.count()["ListContainerInstances"] == 1
    assert all(world.record(i).phase == "soft" for i in ids)


# ------------------------------------------------------------------ the batch alone


class FakeFleet:
    """Answers reads of several instances at once, counting them."""

    def __init__(self) -> None:
        self.reads: Counter[str] = Counter()

    def find_container_instances(self, ids: Sequence[str]) -> dict[str, ContainerInstance | None]:
        self.reads["instances"] += 1
        return {i: ContainerInstance(f"ci/{i}", i, "ACTIVE") for i in ids}

    def tasks_on_many(self, arns: Sequence[str]) -> dict[str, list[TaskInfo]]:
        self.reads["tasks"] += 1
        return {a: [TaskInfo(f"{a}/t", "service:s", "RUNNING", "RUNNING", False)] for a in arns}

    def set_draining_many(self, arns: Sequence[str]) -> dict[str, str]:
        return {}

    def find_container_instance(self, iid: str) -> ContainerInstance | None:
        self.reads["instance"] += 1
        return ContainerInstance(f"ci/{iid}", iid, "ACTIVE")

    def tasks_on(self, arn: str, known: Any = (), exact: bool = False) -> list[TaskInfo]:
        self.reads["task"] += 1
        return []


def test_reads_ahead_are_handed_out_once_and_only_while_fresh() -> None:
    now = [100.0]
    fleet = FakeFleet()
    batch = FirstSteps(fleet, FakeTicks(lambda: now[0]), lambda: now[0])  # type: ignore[arg-type]
    batch.look_ahead(["i-1", "i-2", "i-3"])
    assert fleet.reads == {"instances": 1, "tasks": 1}
    assert batch.take_tasks("ci/i-1") is not None
    assert batch.take_tasks("ci/i-1") is None  # once: a second read goes to ECS
    now[0] += AHEAD_SECONDS
    assert batch.take_tasks("ci/i-2") is None  # too old for a step to act on
    # One instance is no batch: nothing is read ahead.
    alone = FirstSteps(fleet, FakeTicks(lambda: now[0]), lambda: now[0])  # type: ignore[arg-type]
    alone.look_ahead(["i-9"])
    assert fleet.reads == {"instances": 1, "tasks": 1}
