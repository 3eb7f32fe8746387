"""The drain state machine under any interleaving (hypothesis, stateful), in memory
(tests/controller/memory.py: no moto, no HTTP).

Three instances of one group, each a container instance of the cluster with a daemon task.
Rules interleave what happens to them: agent tasks placed and jobs started (only where the
service and the coordinator would: an ACTIVE instance, an agent neither paused nor stopping),
scale-in (into a warm pool or not), warm-pool reuse, spot warnings, rebalance
recommendations, AWS Health scheduled changes, stops and terminations from outside the group,
stale and replayed lifecycle tokens, replayed and late events, agents whose task stops on its
own, ticks of another drain, crashes (an invocation dies after n port calls; its event comes
again 5 s later), and time passing. Events may arrive up to 20 s late (reordering).

After every step, the world must not have seen (``World.violations``):

- a hook completed while a job still ran on its instance (before its force time, the only
  way a job can still run there is a drain that did not wait);
- a job lost: its instance went down (spot deadline, scheduled change, stop, termination)
  with the job neither finished nor reported, i.e. a spot or stopping instance not forced
  before its deadline;
- a job cancelled although its instance was not going yet (a stale token, an old budget);
- a lifecycle action timing out although the controller had its token, or a live token left
  unanswered by a drain that ended;
- a drain that moved backwards (episode, phase, forced_at, force_at later).

At the end, the world is left to settle: every drain ends and every token given to the
controller has been answered.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from fleetdrain.controller.drain.signals import LifecycleSignal, Signal, TickSignal
from tests.controller.memory import World

# Slow: hypothesis runs hundreds of drain sequences (~15 s).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

INSTANCES = 3
#: Crashes per run at most: a world where every invocation dies loses everything.
MAX_CRASHES = 2

instance = st.integers(0, INSTANCES - 1)
late = st.sampled_from([0, 0, 0, 2, 20])


class Drains(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.w = World(INSTANCES)
        self.iids = list(self.w.instances)
        self.sent: list[Signal] = []
        self.crashes = 0

    def send(self, signal: Signal, delay: float = 0.0) -> None:
        self.sent.append(signal)
        self.w.send(signal, delay)
        self.w.pump()

    def running(self, i: int) -> bool:
        inst = self.w.instances[self.iids[i]]
        return inst.state == "running" and inst.registered

    @initialize(busy=st.lists(st.integers(30, 1500), max_size=INSTANCES, min_size=INSTANCES))
    def agents(self, busy: list[int]) -> None:
        for iid, seconds in zip(self.iids, busy, strict=True):
            self.w.busy_agent(iid, seconds)

    # ------------------------------------------------------------------ the fleet

    @rule(i=instance)
    def place_agent(self, i: int) -> None:
        if self.w.can_place(self.iids[i]):
            self.w.place(self.iids[i])

    @rule(i=instance, seconds=st.integers(10, 1500))
    def start_job(self, i: int, seconds: int) -> None:
        for agent in self.w.agents.values():
            if self.w.tasks[agent.task].instance == self.iids[i] and self.w.can_start(agent):
                self.w.start_job(agent, seconds)
                return

    @rule(i=instance)
    def agent_exits(self, i: int) -> None:
        """An idle agent's task stops on its own (its process ended)."""
        for agent in self.w.agents.values():
            task = self.w.tasks[agent.task]
            if task.instance == self.iids[i] and task.status == "RUNNING" and agent.job is None:
                self.w._exit(task, 0)
                self.w.pump()
                return

    # ------------------------------------------------------------------ what AWS sends

    @rule(i=instance, warm=st.booleans(), delay=late)
    def scale_in(self, i: int, warm: bool, delay: int) -> None:
        iid = self.iids[i]
        waiting = any(a.instance == iid and a.state == "waiting" for a in self.w.actions.values())
        if self.running(i) and not waiting and self.w.instances[iid].down_at is None:
            self.send(self.w.scale_in(iid, warm_pool=warm), delay)

    @precondition(lambda self: any(s.state == "stopped" for s in self.w.instances.values()))
    @rule(i=instance)
    def warm_pool_reuse(self, i: int) -> None:
        inst = self.w.instances[self.iids[i]]
        if inst.state == "stopped" and inst.registered:
            self.w.reuse(inst.id)

    @rule(i=instance, delay=late)
    def spot(self, i: int, delay: int) -> None:
        if self.running(i):
            self.send(self.w.spot(self.iids[i]), delay)

    @rule(picks=st.lists(instance, min_size=2, max_size=INSTANCES, unique=True), spot=st.booleans())
    def notices_together(self, picks: list[int], spot: bool) -> None:
        """A storm's spot warnings, or a scale-in's lifecycle actions, in one SQS batch: their
        first steps share their calls (and a crash can fall between the batch's DRAINING, its
        ticks and its records)."""
        signals = []
        for i in picks:
            iid = self.iids[i]
            if not self.running(i) or self.w.instances[iid].down_at is not None:
                continue
            if spot:
                signals.append(self.w.spot(iid))
            elif not any(
                a.instance == iid and a.state == "waiting" for a in self.w.actions.values()
            ):
                signals.append(self.w.scale_in(iid))
        if signals:
            self.sent.extend(signals)
            self.w.deliver_batch(signals)

    @rule(i=instance, delay=late)
    def rebalance(self, i: int, delay: int) -> None:
        if self.running(i):
            self.send(self.w.rebalance(self.iids[i]), delay)

    @rule(i=instance, start_in=st.integers(120, 4000), delay=late)
    def scheduled_change(self, i: int, start_in: int, delay: int) -> None:
        if self.running(i):
            self.send(self.w.maintenance(self.iids[i], start_in), delay)

    @rule(i=instance, state=st.sampled_from(["stopping", "shutting-down"]))
    def stopped_outside_the_group(self, i: int, state: str) -> None:
        if self.running(i) and self.w.instances[self.iids[i]].state == "running":
            self.send(self.w.stop(self.iids[i], state))

    @rule(i=instance, old=st.booleans(), delay=late)
    def stale_token(self, i: int, old: bool, delay: int) -> None:
        """A token that is not live: one of the instance's that is over (an archive replay, a
        late SQS redelivery, a warm pool's), or one AWS never issued."""
        iid = self.iids[i]
        spent = [
            a.token for a in self.w.actions.values() if a.instance == iid and a.state != "waiting"
        ]
        token = spent[-1] if old and spent else None
        self.send(self.w.stale_token(iid, token), delay)

    @precondition(lambda self: bool(self.sent))
    @rule(k=st.integers(0, 10_000), delay=late)
    def replayed_event(self, k: int, delay: int) -> None:
        """An event again (at-least-once delivery, replay), possibly late."""
        self.send(self.sent[k % len(self.sent)], delay)

    @rule(i=instance)
    def tick_of_another_drain(self, i: int) -> None:
        self.send(TickSignal(self.iids[i], "not-this-drain", "t-0"))

    @precondition(lambda self: self.crashes < MAX_CRASHES)
    @rule(n=st.integers(0, 12))
    def crash(self, n: int) -> None:
        self.crashes += 1
        self.w.crash(n)

    @rule(seconds=st.sampled_from([1, 5, 20, 60, 120, 300]))
    def wait(self, seconds: int) -> None:
        self.w.advance(seconds)

    # ------------------------------------------------------------------ what must hold

    @invariant()
    def nothing_went_wrong(self) -> None:
        self.w.ok()

    def teardown(self) -> None:
        if self.w.violations:
            return  # the invariant has said so
        self.w.settle()
        self.w.ok()
        assert not self.w.store.in_flight(), self.w.store.in_flight()
        given = {s.token for s, _ in self.w.results if isinstance(s, LifecycleSignal)}
        waiting = [a for a in self.w.actions.values() if a.token in given and a.state == "waiting"]
        assert not waiting, waiting
        # What the runs covered (--hypothesis-show-statistics).
        for rec in self.w.store.records.values():
            for past in [*rec.history, rec]:
                event(f"episode ended {past.outcome}")
            event(f"episodes on an instance: {rec.episode}")
        for job in self.w.jobs.values():
            event(f"job {job.state}")


def test_a_stop_whose_first_step_died_is_forced_by_its_redelivery_not_its_old_tick() -> None:
    """Found by the machine above (CI, 2026-12-04): a soft drain (rebalance) waits on a long
    job; the instance is stopped from outside; the step that merges the stop (force now, 30 s
    before the instance goes) dies after its claim. Its redelivery 5 s later is a duplicate,
    and a duplicate stepped only when no tick was pending: the pending one was the soft
    drain's, after the instance had gone, and the job was lost with it."""
    state = Drains()
    state.agents(busy=[30, 91, 30])
    state.nothing_went_wrong()
    state.rebalance(delay=0, i=1)
    state.wait(seconds=60)
    state.nothing_went_wrong()
    state.crash(n=5)
    state.stopped_outside_the_group(i=1, state="stopping")
    state.nothing_went_wrong()
    state.wait(seconds=60)
    state.nothing_went_wrong()
    rec = state.w.store.records[state.iids[1]]
    assert rec.forced_at is not None and rec.force_at is not None
    assert rec.forced_at <= rec.force_at + 5, "forced by the redelivered event"
    state.w.settle()
    state.w.ok()
    assert not state.w.store.in_flight()


Drains.TestCase.settings = settings(
    max_examples=500,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_drains_hold_under_any_interleaving = Drains.TestCase


def test_a_spot_notice_does_not_force_the_run_after_the_instance_stopped_and_came_back() -> None:
    """Found by the machine above (2026-12-04): a spot notice, then the instance is stopped from
    outside (its drain forces and ends), a warm pool starts it again, it takes a job, and the
    group scales it in. The new episode took on the old notice's deadline, 100 s after the
    notice, and forced the new run's job: cut short on an instance that was not going then.
    The same when the notice came late, after the stop's drain had ended (second half)."""
    state = Drains()
    state.agents(busy=[30, 30, 30])
    state.spot(i=0, delay=0)
    state.stopped_outside_the_group(i=0, state="stopping")
    state.wait(seconds=60)
    state.nothing_went_wrong()
    state.warm_pool_reuse(i=0)
    state.place_agent(i=0)
    state.start_job(i=0, seconds=42)
    state.scale_in(delay=0, i=0, warm=False)
    state.wait(seconds=60)
    state.nothing_went_wrong()
    rec = state.w.store.records[state.iids[0]]
    assert rec.episode == 2 and rec.reasons == ["scale_in"] and rec.forced_at is None
    state.w.settle()
    state.w.ok()
    assert not state.w.store.in_flight()
    # The notices in one batch that dies; delivered again after the stop's drain has ended.
    state = Drains()
    state.agents(busy=[30, 30, 30])
    state.crash(n=0)
    state.notices_together(picks=[0, 1], spot=True)
    state.stopped_outside_the_group(i=1, state="stopping")
    state.wait(seconds=60)
    state.nothing_went_wrong()
    state.warm_pool_reuse(i=1)
    state.place_agent(i=1)
    state.start_job(i=1, seconds=42)
    state.scale_in(delay=0, i=1, warm=False)
    state.wait(seconds=60)
    state.nothing_went_wrong()
    rec = state.w.store.records[state.iids[1]]
    assert rec.reasons == ["scale_in"] and rec.forced_at is None
    state.w.settle()
    state.w.ok()
