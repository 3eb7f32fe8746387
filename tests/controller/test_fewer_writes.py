"""The drain record costs fewer calls (issue 12's idle drains): a first event is written without
a read, once, by its step after it acted (the record and its link to the container instance in
one write; a rebalance or a scheduled change writes before it acts), a tick of a drain that
ended needs no read, and a task-STOPPED event claims the record in the write that
reads it (``UpdateItem`` answering with the record, claimed or not).

The tests also show the cases where the shortcut would be wrong and is not taken: a record that
is there after all, a notice that an empty record would ignore. (The step that ends a drain
still claims the record before it completes the action, now in that one write: two steps
racing at the end must not both complete it; ``test_drains``' racing test pins that.)

The world is ``test_drains``' (moto, the gap fillers, the embedded coordinator, the real
handlers); the controller's store is wrapped to count its reads and writes.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber

from fleetdrain.controller import runtime
from fleetdrain.controller.drain import core
from fleetdrain.controller.drain.errors import Conflict, Retryable
from fleetdrain.controller.drain.ports import DrainRecord
from fleetdrain.controller.drain.signals import TickSignal
from fleetdrain.controller.drain.state import DynamoDrainStore
from tests.controller.test_drains import CLUSTER, World, draining_event, make_world

# Slow as test_drains: whole drains in moto with the coordinator on loopback.
pytestmark = pytest.mark.slow


@pytest.fixture
def world(aws_env: None) -> Iterator[World]:
    with make_world() as w:
        yield w


class CountingStore:
    """The controller's store, counting its calls by method (and what each save wrote)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.calls: Counter[str] = Counter()
        self.saved: list[DrainRecord] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def peek(self, instance_id: str) -> DrainRecord:
        """The record, read past the count (the test looking, not the controller)."""
        rec = self._store.get(instance_id)
        assert rec is not None
        return rec  # type: ignore[no-any-return]

    def get(self, instance_id: str) -> DrainRecord | None:
        self.calls["get"] += 1
        return self._store.get(instance_id)  # type: ignore[no-any-return]

    def create(self, record: DrainRecord, link: str | None = None) -> DrainRecord:
        self.calls["create"] += 1
        if link is not None:
            self.calls["create with link"] += 1
        self.saved.append(record)
        return self._store.create(record, link=link)  # type: ignore[no-any-return]

    def claim(
        self, instance_id: str, lease_id: str, lease_until: float, now: float
    ) -> tuple[DrainRecord | None, bool]:
        self.calls["claim"] += 1
        return self._store.claim(instance_id, lease_id, lease_until, now)  # type: ignore[no-any-return]

    def save(
        self, record: DrainRecord, link: str | None = None, expect_tick: str | None = None
    ) -> DrainRecord:
        self.calls["save"] += 1
        if link is not None:
            self.calls["save with link"] += 1
        self.saved.append(record)
        return self._store.save(record, link=link, expect_tick=expect_tick)  # type: ignore[no-any-return]


def counted(world: World) -> CountingStore:
    store = CountingStore(world.ctl.store)
    world.ctl.store = store  # type: ignore[assignment]
    return store


def test_an_idle_drain_is_written_once_by_its_first_step_with_its_link(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    world.add_agent(a)
    world.add_agent(a)
    store = counted(world)
    lifecycle = world.gaps.begin_termination(a)
    world.cursor = len(world.gaps.events)
    world.route(lifecycle)  # alone: what it causes is delivered below
    # The first event: no read (no record of the instance here), and one write after the
    # step acted: the record created with its link.
    assert store.calls == Counter({"create": 1, "create with link": 1}), store.calls
    assert store.saved[0].draining_at is not None and store.saved[0].tick_id is not None
    link = world.ddb.get_item(TableName="drains", Key={"pk": {"S": f"ci#{world.ci_arn[a]}"}})
    assert link["Item"]["instance_id"]["S"] == a
    rec = world.record(a)
    assert rec.phase == "hard" and rec.lease_id is None
    store.calls.clear()
    world.run_until(lambda: store.peek(a).phase == "done", limit=60)
    rec = store.peek(a)
    assert (rec.outcome, world.gaps.actions[a].result) == ("drained", "CONTINUE")
    # The agents exit together. The first STOPPED event claimed the record in the write that
    # read it, found the other task STOPPED too, completed the action and saved once. (The
    # racing test in test_drains pins that the claim comes before the completion.) The second
    # event is about a task that had stopped before this container ended the drain, so it
    # makes no call at all.
    assert store.calls == Counter({"claim": 1, "save": 1}), store.calls
    old_news = "the task stopped before the drain ended"
    assert [r.get("detail") for r in world.results].count(old_news) == 1, world.results
    assert store.saved[-1].lease_id is None and store.peek(a).lease_id is None, "released"
    assert world.gaps.calls["CompleteLifecycleAction"] == 1
    assert world.metrics.counts[core.DRAINS_COMPLETED] == 1
    # The drain's last tick comes later: this controller saw the drain end, so no read.
    store.calls.clear()
    tick = TickSignal(a, rec.drain_id, rec.tick_id or "t-late")
    result = world.ctl.handle(tick)
    assert (result.action, result.detail) == ("ignored", "the drain ended")
    assert store.calls == Counter()


def test_a_draining_event_teaches_the_link_and_steps_nothing(world: World) -> None:
    """Whose DRAINING it was changes nothing a drain does: someone else's during a soft drain
    (an operator, ECS managed draining) costs no read and no step, and the drain still ends as
    it should, at its own pace; ours, repeated by ECS at every task that stops, neither."""
    a, b = world.build(instances=2)
    world.controller()
    agent = world.add_agent(a, job_seconds=30)
    world.emit(world.gaps.begin_termination(a))
    rec = world.record(a)
    assert rec.phase == "soft"
    world.controller()  # another container: it knows neither the record nor the link
    store = counted(world)
    world.ecs.update_container_instances_state(
        cluster=CLUSTER, containerInstances=[world.ci_arn[a]], status="DRAINING"
    )
    out = world.route(draining_event(world, a))
    assert [(r["status"], r["detail"]) for r in out] == [("ignored", "DRAINING: link learned")]
    assert store.calls == Counter(), "no read, no write"
    # The link it taught: the task events that follow name only the container instance.
    assert world.ctl.store.instance_for(world.ci_arn[a]) == a
    assert store.calls == Counter()
    assert world.record(a).version == rec.version
    world.run_until(lambda: world.record(a).phase == "done", limit=120)
    assert world.record(a).outcome == "drained"
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.coord.job(agent.job_id or "").passed
    # Ours, repeated: the same. An instance with no drain: the same.
    version = world.record(a).version
    assert [r["status"] for r in world.route(draining_event(world, a))] == ["ignored"]
    assert [r["status"] for r in world.route(draining_event(world, b))] == ["ignored"]
    assert world.record(a).version == version


def test_a_monitor_that_saw_the_draining_event_finds_the_drain_of_a_stopped_task_unread(
    world: World,
) -> None:
    """Task events name only the container instance; the DRAINING event before them names the
    EC2 instance too, so the monitor learns the link from it and reads no link item."""
    (a,) = world.build(instances=1)
    world.controller()
    world.add_agent(a)
    sigterms: list[str] = []
    world.gaps.on_sigterm = lambda arn, reason: sigterms.append(arn)  # it exits below
    world.cursor = len(world.gaps.events)
    world.route(world.gaps.begin_termination(a))
    world.cursor = len(world.gaps.events)  # what the first step caused is sent below
    world.controller()  # the monitor: another container, it knows no link
    links: list[str] = []
    ddb = world.ctl.store._ddb  # type: ignore[attr-defined]

    def note(params: dict[str, Any], **_: Any) -> None:
        key = params.get("Key", {}).get("pk", {}).get("S", "")
        if key.startswith("ci#"):
            links.append(key)

    ddb.meta.events.register("provide-client-params.dynamodb.GetItem", note)
    world.route(draining_event(world, a))
    world.gaps.task_exited(sigterms[0], 0)
    world.pump()
    assert world.record(a).outcome == "drained"
    assert links == [], "the link came with the DRAINING event"


def test_a_task_that_stops_after_a_drain_ended_wakes_the_next_one(world: World) -> None:
    """The shortcut above is only for news older than the drain's end: a task that stops in
    the instance's next episode ends that drain at once (not at its tick)."""
    (a,) = world.build(instances=1)
    world.controller()
    world.emit(world.gaps.rebalance_recommendation(a))  # episode 1: no task, ended
    assert world.record(a).outcome == "no_tasks"
    world.clock.advance(5)
    world.add_agent(a)
    world.emit(world.gaps.begin_termination(a))  # episode 2: its agent exits on SIGTERM
    rec = world.record(a)
    assert (rec.episode, rec.phase, rec.outcome) == (2, "done", "drained"), rec
    assert world.gaps.actions[a].result == "CONTINUE"
    assert all(r.get("detail") != "the task stopped before the drain ended" for r in world.results)


def test_a_tick_carries_the_record_and_a_stale_copy_is_caught_by_its_write(world: World) -> None:
    """A waiting drain's tick brings the record as its step saved it: no read. A copy that is
    old (another container wrote the record since) fails its conditional write, and the step
    reads the record and runs as any step does."""
    (a,) = world.build(instances=1)
    world.controller(tick_interval=20)
    world.add_agent(a, job_seconds=600)
    world.emit(world.gaps.begin_termination(a))
    assert world.record(a).phase == "soft"
    store = counted(world)
    steps = store.peek(a).steps
    world.advance(60)
    assert store.peek(a).steps >= steps + 2, "ticks stepped"
    assert store.calls["get"] == 0 and store.calls["save"] >= 2, store.calls
    # Another container writes the record (its own step): the pending tick's copy is old.
    other = DynamoDrainStore(world.ddb, "drains", world.clock, 3600)
    rec = other.get(a)
    assert rec is not None
    other.save(dataclasses.replace(rec, seen_events=[*rec.seen_events, "elsewhere"]))
    store.calls.clear()
    before = store.peek(a).steps
    world.run_until(lambda: store.peek(a).steps > before, limit=90)  # the next tick's step
    after = store.peek(a)
    assert store.calls["get"] >= 1, "the old copy's write failed and the step read the record"
    assert after.steps > before and "elsewhere" in after.seen_events
    assert after.tick_id is not None and after.phase == "soft"


def test_a_tick_of_an_earlier_episode_is_ignored_and_the_new_one_steps(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    world.emit(world.gaps.rebalance_recommendation(a))
    first = world.record(a)
    assert first.outcome == "no_tasks"
    world.add_agent(a, job_seconds=300)
    world.emit(world.gaps.begin_termination(a))
    second = world.record(a)
    assert second.episode == 2 and second.drain_id != first.drain_id
    store = counted(world)
    old = world.ctl.handle(TickSignal(a, first.drain_id, "t-old"))
    assert (old.action, old.detail) == ("ignored", "the drain ended")
    assert store.calls == Counter(), "known ended: no read"
    new = world.ctl.handle(TickSignal(a, second.drain_id, "t-new"))
    assert new.action == "stepped" and store.calls["get"] == 1


def test_a_first_event_for_an_instance_with_a_record_is_merged_as_if_it_had_been_read(
    world: World,
) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    world.emit(world.gaps.rebalance_recommendation(a))  # episode 1, ended: no task
    agent = world.add_agent(a, job_seconds=300)
    world.controller()  # another Lambda container: it has seen no record of ``a``
    store = counted(world)
    out = world.emit(world.gaps.begin_termination(a))
    assert out[0]["status"] == "started"
    # The guess (create) lost to the record that is there; it was read and merged.
    assert store.calls["create"] == 1 and store.calls["get"] == 1
    rec = world.record(a)
    assert (rec.episode, rec.phase) == (2, "soft")
    assert world.coord.agent(agent.agent_id).paused


def test_two_first_steps_of_one_instance_that_race_act_and_keep_one_record(world: World) -> None:
    """Two containers take the same lifecycle action at once (its SNS notification and its
    EventBridge event): both first steps act before their write; one creates the record, the
    other's create is a Conflict, and it reads that record and finds its event merged."""
    (a,) = world.build(instances=1)
    world.add_agent(a)
    world.add_agent(a)
    sigterms: list[str] = []
    world.gaps.on_sigterm = lambda arn, reason: sigterms.append(arn)  # they exit below
    event = world.gaps.begin_termination(a)
    world.cursor = len(world.gaps.events)
    first = world.controller()
    second = world.controller()
    real_create = first.store.create
    inner: list[list[dict[str, Any]]] = []

    def create_after_the_other(record: DrainRecord, link: str | None = None) -> DrainRecord:
        # The other container's whole first step runs between this step's acts and its write.
        runtime.set_controller(second)
        inner.append(world.route(event))
        runtime.set_controller(first)
        return real_create(record, link=link)  # type: ignore[no-any-return]

    first.store.create = create_after_the_other  # type: ignore[method-assign]
    runtime.set_controller(first)
    out = world.route(event)
    assert inner[0][0]["status"] == "started" and out[0]["status"] == "duplicate", (inner, out)
    # Both acted: the token heartbeated twice (harmless), DRAINING once it was already set.
    assert world.gaps.calls["RecordLifecycleActionHeartbeat"] == 2
    rec = world.record(a)
    assert (rec.episode, rec.phase, rec.steps) == (1, "hard", 1)
    world.pump()
    for arn in dict.fromkeys(sigterms):
        world.gaps.task_exited(arn, 0)
        world.pump()
    world.run_until(lambda: world.record(a).phase == "done", limit=60)
    assert world.record(a).outcome == "drained"
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.gaps.calls["CompleteLifecycleAction"] == 1


def test_a_rebalance_new_to_a_container_is_written_before_anything_acts(world: World) -> None:
    """A rebalance recommendation that the record would find a duplicate of must not drain:
    a container that has not seen the record writes first (the Conflict reads it), as before.
    (A spot notice or a lifecycle action is acted on first: see the race above.)"""
    (a,) = world.build(instances=1)
    world.controller()
    world.add_agent(a, job_seconds=600)
    notice = world.gaps.rebalance_recommendation(a)
    world.emit(notice)
    assert world.record(a).phase == "soft"
    world.controller()  # a container that has not seen the record
    store = counted(world)
    looks: list[str] = []
    fleet: Any = world.ctl.fleet
    real = fleet.tasks_on
    fleet.tasks_on = lambda arn, *rest: looks.append(arn) or real(arn, *rest)
    out = world.route(notice)  # EventBridge delivers at least once
    assert out[0]["status"] == "duplicate", out
    assert (store.calls["create"], store.calls["get"]) == (1, 1), store.calls
    assert looks == [], "no step looked at the instance before the write found the record"


def test_a_notice_for_a_drain_whose_instance_ecs_no_longer_lists_is_not_ignored(
    world: World,
) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    world.add_agent(a, job_seconds=600)
    world.emit(world.gaps.begin_termination(a))
    assert world.record(a).phase == "soft"
    world.controller()  # a container that has not seen the record
    # ECS no longer lists the container instance (deregistering) while the drain runs.
    world.ctl.fleet.find_container_instance = lambda iid: None  # type: ignore[method-assign]
    store = counted(world)
    out = world.emit(world.gaps.spot_interruption(a))
    # Without a record the notice would be "not in the cluster": the record was read instead.
    assert out[0]["status"] == "joined", out
    assert store.calls["get"] >= 1
    rec = world.record(a)
    assert "spot" in rec.reasons and rec.phase == "hard"


def test_a_save_with_a_link_is_one_write_or_none(ddb: Any) -> None:
    store = DynamoDrainStore(ddb, "drains", lambda: 1000.0, 60)
    rec = store.create(DrainRecord(instance_id="i-1", drain_id="d-1", cluster="ci", started_at=1.0))
    stale = rec
    rec = store.save(rec)
    with pytest.raises(Conflict):
        store.save(stale, link="arn:ci/1")
    assert "Item" not in ddb.get_item(TableName="drains", Key={"pk": {"S": "ci#arn:ci/1"}})
    saved = store.save(rec, link="arn:ci/1")
    assert saved.version == 3
    fresh = DynamoDrainStore(ddb, "drains", lambda: 1000.0, 60)
    assert fresh.instance_for("arn:ci/1") == "i-1"
    item = ddb.get_item(TableName="drains", Key={"pk": {"S": "drain#i-1"}})["Item"]
    assert json.loads(item["doc"]["S"])["drain_id"] == "d-1"
    assert item["version"]["N"] == "3"


def test_a_claim_is_one_write_that_reads_the_record_whether_it_takes_or_not(ddb: Any) -> None:
    store = DynamoDrainStore(ddb, "drains", lambda: 1000.0, 60)
    assert store.claim("i-1", "L1", 1030.0, 1000.0) == (None, False), "no record"
    rec = store.create(DrainRecord(instance_id="i-1", drain_id="d-1", cluster="ci", started_at=1.0))
    claimed, took = store.claim("i-1", "L1", 1030.0, 1000.0)
    assert took and claimed is not None
    assert (claimed.version, claimed.lease_id, claimed.lease_until) == (2, "L1", 1030.0)
    assert claimed.drain_id == "d-1"
    # Held: a second claim takes nothing, and is given the record as it is.
    held, took = store.claim("i-1", "L2", 1040.0, 1010.0)
    assert not took and held is not None and (held.lease_id, held.version) == ("L1", 2)
    with pytest.raises(Conflict):
        store.save(rec)  # a writer that read before the claim loses to it
    # A lease that ran out is taken over.
    later, took = store.claim("i-1", "L3", 1070.0, 1031.0)
    assert took and later is not None and (later.version, later.lease_id) == (3, "L3")
    # The save that releases it drops the lease from the item; one that leases keeps it.
    released = store.save(dataclasses.replace(later, lease_id=None, lease_until=None))
    item = ddb.get_item(TableName="drains", Key={"pk": {"S": "drain#i-1"}})["Item"]
    assert "lease_id" not in item and "lease_until" not in item
    leased = store.save(dataclasses.replace(released, lease_id="L9", lease_until=2000.0))
    seen, took = store.claim("i-1", "L4", 1600.0, 1500.0)
    assert not took and seen is not None and seen.lease_id == "L9"
    ended = store.save(dataclasses.replace(leased, phase="done", lease_id=None, lease_until=None))
    final, took = store.claim("i-1", "L5", 3030.0, 3000.0)
    assert not took and final is not None
    assert (final.phase, final.version) == ("done", ended.version), "a done drain stays"


def test_a_throttled_transaction_is_retryable() -> None:
    ddb = boto3.client("dynamodb", region_name="us-east-1")
    store = DynamoDrainStore(ddb, "drains", lambda: 0.0, 60)
    rec = DrainRecord(instance_id="i-1", drain_id="d-1", cluster="ci", started_at=1.0, version=1)
    with Stubber(ddb) as stub:
        stub.add_client_error(
            "transact_write_items",
            service_error_code="TransactionCanceledException",
            modeled_fields={"CancellationReasons": [{"Code": "ThrottlingError"}, {"Code": "None"}]},
        )
        with pytest.raises(Retryable):
            store.save(rec, link="arn:ci/1")
        stub.add_client_error(
            "transact_write_items",
            service_error_code="TransactionCanceledException",
            modeled_fields={
                "CancellationReasons": [{"Code": "ConditionalCheckFailed"}, {"Code": "None"}]
            },
        )
        with pytest.raises(Conflict):
            store.save(rec, link="arn:ci/1")
