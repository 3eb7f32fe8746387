"""The drain state machine: one record per EC2 instance, two phases, every step idempotent.

Phases (``DrainRecord.phase``):

- ``soft``: the instance's agents are paused through the coordinator (they finish their job and
  take no new one, but stay up); the lifecycle action is kept alive with heartbeats. When no
  agent is busy (coordinator: no job; agents without a coordinator record: task protection
  off), the drain moves to ``hard``.
- ``hard``: the container instance is ``DRAINING`` (ECS SIGTERMs the service tasks, idle by now)
  and tasks that no service owns get ``StopTask``. When no non-daemon task is left, the
  lifecycle action is completed (``CONTINUE``) and the drain is ``done``.
- ``done``: the episode is over; ``outcome`` says how (``drained``, ``no_tasks``,
  ``not_in_cluster``, ``lifecycle_gone``, ``stale_token``). The record stays, and an event that
  needs action (a spot notice, a lifecycle token it has not seen, a scheduled change, a stopping
  instance) starts the instance's next episode (see :mod:`~fleetdrain.controller.drain.merge`).

Lifecycle tokens: a token is a claim until AWS accepts it, so a step heartbeats every token it
has not seen accepted before it acts on it. A token AWS refuses ("No active Lifecycle Action")
is dead, not the drain: it is remembered as spent and the drain goes on for its other reasons
and tokens; a drain whose only reason was a refused token ends (``stale_token``) having done
nothing. Only when a token AWS had accepted is refused and no other is left has the action
ended without us (it expired, or someone completed it): the instance is going, so the drain
forces and ends ``lifecycle_gone``. When a drain ends, every token still pending is completed.

An instance that goes (scale-in, spot, scheduled change, stopping) is left DRAINING when its
drain ends, even with no task on it, so nothing is placed there before it goes.

At ``force_at`` (scale-in: the start plus the budget; spot: the notice's time plus 120 s minus a
margin) the drain forces: hard at once, and every agent is stopped with ``force`` through the
coordinator, so running jobs are cancelled and reported (``agent_stop``) before the instance
dies. If the coordinator cannot be reached (for longer than ``coordinator_grace`` in the soft
phase, at once otherwise) the drain falls back to ``StopTask`` for every task: the agents' own
deadline-aware drain does the rest.

Events merge into the record (:meth:`DrainController.handle`) and then a step runs. Merging is
pure (:mod:`~fleetdrain.controller.drain.merge` has the rules) and the write that follows is
conditional on the record's version: a duplicate event (same event id, same lifecycle token, a
spot notice already known) changes nothing, a late one can only add (a token, an earlier
deadline), never move a drain backwards, and a spot warning during a scale-in drain moves
``force_at`` earlier and the phase to ``hard``. A step re-reads the world (tasks, agents)
and acts only on what is not done yet, so running it twice, or after a crash half-way, is safe;
each drain keeps one delayed tick pending as the safety net. Two steps never run at once on
one drain: a step claims the record (a lease, in the conditional write that merges its event)
and releases it with its own save; an event that finds the record held waits for it. The one
exception is an instance's first step (no record yet, after a spot notice or a lifecycle
action): it acts and then creates the record, so two first events that race may both act
(idempotently) before one record is kept.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import uuid
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

from fleetdrain.controller.drain.batch import AheadFleet, FirstSteps
from fleetdrain.controller.drain.config import Settings
from fleetdrain.controller.drain.errors import (
    Conflict,
    CoordinatorUnavailable,
    LifecycleGone,
    RateLimited,
    Retryable,
)
from fleetdrain.controller.drain.look import LookedCoordinator, LookedFleet
from fleetdrain.controller.drain.merge import LOST_TICK_SLACK, Merge, merge
from fleetdrain.controller.drain.ports import (
    AgentView,
    Clock,
    CoordinatorPort,
    DrainRecord,
    DrainStorePort,
    EcsPort,
    LifecyclePort,
    MetricsPort,
    Sleep,
    TaskInfo,
    Tick,
    TicksPort,
    TokenRef,
)
from fleetdrain.controller.drain.signals import (
    Ignored,
    InstanceDrainingSignal,
    LifecycleSignal,
    MaintenanceSignal,
    RebalanceSignal,
    Signal,
    SpotSignal,
    TaskStoppedSignal,
    TickSignal,
)

log = logging.getLogger("fleetdrain.drain")

#: Events that begin a drain (a stopping instance is left out: it is most often one whose drain
#: just ended, and its record is there).
_STARTS = (LifecycleSignal, SpotSignal, RebalanceSignal, MaintenanceSignal)


class _Unread:
    """The record has not been read yet (``None`` means there is none)."""


_UNREAD = _Unread()

MAX_RACES = 5
#: A step that failed on throttling is retried by a tick this many seconds later.
RETRY_TICK = 30
#: A soft drain's look reads the instance's tasks from ECS at least this often (seconds); in
#: between, a look whose agents are all as the last read left them (each connected, in its
#: task) takes the tasks as they were: a task that ends sends its own event, and a task placed
#: on the instance meanwhile is found (and its agent paused) this much later at most.
TASKS_LOOK_EVERY = 120.0
#: A step that finds the record held by another step looks again after this, doubling up
#: to LEASE_POLL_MAX (a step takes well under a second; a long wait need not read 200 times).
LEASE_POLL = 0.05
LEASE_POLL_MAX = 1.0
#: What one controller (one Lambda container) remembers of the drains it saw, at most this
#: many of each: the drains that ended (a tick of one needs no read: a drain id is never
#: reused, every episode has its own) and the instances whose record it has seen (a first
#: event of any other is written without a read).
MAX_REMEMBERED = 4096

# Metric names (EMF, namespace set by the handler layer).
DRAINS_STARTED = "DrainsStarted"
DRAINS_COMPLETED = "DrainsCompleted"
DRAINS_ABANDONED = "DrainsAbandoned"
DRAINS_FORCED = "DrainsForced"
DRAIN_SECONDS = "DrainSeconds"
HOOK_COMPLETION_LATENCY = "HookCompletionLatency"
JOBS_FORCE_CANCELLED = "JobsForceCancelled"
AGENTS_SIGKILLED = "AgentsSigkilled"
COORDINATOR_FALLBACKS = "CoordinatorFallbacks"
EVENTS_REJECTED = "EventsRejected"


class NullMetrics:
    """A :class:`MetricsPort` that drops everything (the default)."""

    def count(self, name: str, value: float = 1.0) -> None:
        pass

    def seconds(self, name: str, value: float) -> None:
        pass


@dataclass(frozen=True)
class Result:
    """What one :meth:`DrainController.handle` did (for the handler's log line and tests)."""

    action: str  # started | joined | stepped | duplicate | ignored
    instance_id: str | None = None
    drain_id: str | None = None
    phase: str | None = None
    detail: str = ""


class _MustAct(Exception):
    """A look found something to do: claim the record, then act (see ``DrainController._step``)."""


class _Leased(Exception):
    """The drain record of ``drain_id`` is held by another step (until ``until``)."""

    def __init__(self, until: float, drain_id: str) -> None:
        super().__init__(until)
        self.until = until
        self.drain_id = drain_id


class DrainController:
    """Applies signals to drain records and advances drains. Knows nothing of Lambda: every
    side effect goes through a port of :mod:`~fleetdrain.controller.drain.ports`."""

    def __init__(
        self,
        settings: Settings,
        store: DrainStorePort,
        fleet: EcsPort,
        coordinator: CoordinatorPort | None,
        lifecycle: LifecyclePort,
        ticks: TicksPort,
        metrics: MetricsPort | None = None,
        clock: Clock | None = None,
        coordinator_grace: float = 30.0,
        sleep: Sleep | None = None,
        lease_wait: float = 20.0,
    ) -> None:
        import time

        #: How the wait for another step's lease sleeps, and for how long at most.
        self.sleep = sleep or time.sleep
        self.lease_wait = lease_wait
        self.settings = settings
        self.store = store
        self.fleet = fleet
        self.coordinator = coordinator
        self.lifecycle = lifecycle
        self.ticks = ticks
        self.metrics: MetricsPort = metrics or NullMetrics()
        self.clock = clock or time.time
        self.coordinator_grace = coordinator_grace
        self._ended: dict[str, str] = {}
        #: While a tick's carried record is used: (instance, its version, its tick id).
        self._expect: tuple[str, int, str | None] | None = None
        #: The newest version of each instance's record this container has seen.
        self._versions: dict[str, int] = {}
        #: Instances whose drain this container saw end: (drain id, when it ended).
        self._ended_at: dict[str, tuple[str, float]] = {}
        self._seen: dict[str, None] = {}
        #: While :meth:`handle_batch` runs its first steps: what they share.
        self._batch: FirstSteps | None = None

    # ------------------------------------------------------------------ entry point

    def handle_batch(self, signals: Sequence[Signal]) -> list[Result | Exception]:
        """:meth:`handle` each of ``signals`` (one invocation's), the first steps of the new
        drains among them sharing their calls (:mod:`~fleetdrain.controller.drain.batch`): each
        signal's result, or what it raised (its notice is to be retried). Signals of an
        instance whose record this controller has seen, a second signal of an instance, and
        everything that starts no drain, run afterwards, one by one."""
        out: list[Result | Exception | None] = [None] * len(signals)
        firsts: dict[str, int] = {}
        for index, signal in enumerate(signals):
            iid = getattr(signal, "instance_id", "")
            if (
                isinstance(signal, _STARTS)
                and iid
                and iid not in firsts
                and iid not in self._seen
                and not (isinstance(signal, LifecycleSignal) and self._not_ours(signal))
            ):
                firsts[iid] = index
        if len(firsts) >= 2:
            self._first_steps(signals, firsts, out)
        return [self._handled(s) if r is None else r for s, r in zip(signals, out, strict=True)]

    def _first_steps(
        self,
        signals: Sequence[Signal],
        firsts: dict[str, int],
        out: list[Result | Exception | None],
    ) -> None:
        """Run the batch's first steps (``firsts``: instance -> index), then send what they
        held back and create their records; fill ``out`` for them."""
        fleet = self.fleet
        batch = FirstSteps(fleet, self.ticks, self.clock)
        batch.look_ahead(list(firsts))
        self.fleet, self._batch = AheadFleet(batch, fleet), batch
        stepped_failed: set[int] = set()
        try:
            for index in firsts.values():
                batch.current = index
                out[index] = result = self._handled(signals[index])
                if isinstance(result, Exception):
                    batch.owned().failed = result
                    stepped_failed.add(index)
        finally:
            self.fleet, self._batch = fleet, None
        for index, left in batch.flush().items():
            if isinstance(left, Exception):
                if index not in stepped_failed:
                    # Its DRAINING or its tick did not go out with the batch's: it takes the
                    # one-drain path now (whose failure leaves a record and a retry tick in
                    # 30 s), rather than wait for SQS's visibility timeout to bring it back.
                    log.warning(
                        "a batched action failed: the drain steps on its own",
                        extra={
                            "instance_id": getattr(signals[index], "instance_id", ""),
                            "error": str(left),
                        },
                    )
                    out[index] = self._handled(signals[index])
                else:
                    out[index] = left
                continue
            record, link = left
            try:
                self._remember(self.store.create(record, link=link))
            except Conflict:
                # Another event's step created it meanwhile: this one merges as any event.
                out[index] = self._handled(signals[index])
            except Exception as exc:
                out[index] = exc

    def _handled(self, signal: Signal) -> Result | Exception:
        try:
            return self.handle(signal)
        except Exception as exc:
            return exc

    def handle(self, signal: Signal) -> Result:
        """Merge ``signal`` into its drain and step it. Raises :class:`Retryable` on trouble
        that a retry can fix; everything else that is wrong with the world ends the drain
        cleanly with a logged reason."""
        if isinstance(signal, Ignored):
            return Result("ignored", detail=signal.reason)
        if isinstance(signal, TaskStoppedSignal):
            self._count_sigkills(signal)
            if not signal.container_instance_arn:
                return Result("ignored", detail="task without a container instance")
            instance_id = self.store.instance_for(signal.container_instance_arn)
            if instance_id is None:
                return Result("ignored", detail="no drain on that container instance")
            # STOPPED is final: the step this event wakes need not describe the task again.
            self.fleet.saw_stopped(signal.container_instance_arn, signal.task_arn)
            ended = self._ended_at.get(instance_id)
            if ended is not None and signal.stopped_at.timestamp() <= ended[1]:
                # This container ended the instance's drain after the task had stopped (the
                # step read it STOPPED): old news, for that drain and for any later one.
                return Result(
                    "ignored",
                    instance_id,
                    ended[0],
                    "done",
                    "the task stopped before the drain ended",
                )
        elif isinstance(signal, InstanceDrainingSignal):
            # What the event is for: the task events that follow name only the container
            # instance, and this one names its EC2 instance too. Whose DRAINING it was changes
            # nothing a drain does (ours: no news; an operator's or ECS managed draining's
            # during a soft drain: ECS is stopping the agents' tasks already, and the agents
            # drain themselves; the drain's next look or task event sees it), so it costs no
            # read and steps nothing. ECS repeats it at every task change on the instance.
            if signal.instance_id and signal.container_instance_arn:
                self.store.learn_link(signal.container_instance_arn, signal.instance_id)
                return Result("ignored", signal.instance_id, detail="DRAINING: link learned")
            return Result("ignored", detail="DRAINING without its EC2 instance")
        else:
            instance_id = signal.instance_id
        if isinstance(signal, LifecycleSignal):
            why = self._not_ours(signal)
            if why:
                log.info(
                    "lifecycle action ignored", extra={"instance_id": instance_id, "reason": why}
                )
                return Result("ignored", instance_id, detail=why)
        if isinstance(signal, TickSignal) and self._ended.get(instance_id) == signal.drain_id:
            return Result("ignored", instance_id, signal.drain_id, "done", "the drain ended")
        # An instance this controller has not seen a record of is most often one whose first
        # event this is: write its drain without reading first (a record that is there after
        # all makes that write a Conflict, and then it is read as usual).
        guess_new = isinstance(signal, _STARTS) and instance_id not in self._seen
        # A task that stopped is the news that most often ends a drain: its step acts, so it
        # claims the record in the write that reads it (once: a claim that finds the record
        # held, done or missing reads it as any event does).
        claim_first = isinstance(signal, TaskStoppedSignal)
        # A tick carries the record as its sender saved it: taken as read, once (a write it
        # leads to is conditional on that version; a Conflict reads it as any event does).
        carried = signal.record if isinstance(signal, TickSignal) else None
        if carried is not None and carried.version < self._versions.get(instance_id, 0):
            # This container has seen the record written since the tick was sent (a task
            # event's step that kept the pending tick): the copy is old, read it.
            carried = None
        races = polls = 0
        waited = 0.0
        while True:
            try:
                if claim_first:
                    claim_first = False
                    claimed, read = self._claim_first(instance_id, signal)
                    if claimed is not None:
                        return claimed
                    return self._handle_once(instance_id, signal, current=read)
                if carried is not None:
                    current, carried = carried, None
                    # Its writes are conditional on its pending tick too (see _save).
                    self._expect = (instance_id, current.version, current.tick_id)
                    try:
                        return self._handle_once(instance_id, signal, current=current)
                    finally:
                        self._expect = None
                return self._handle_once(instance_id, signal, guess_new)
            except Conflict:
                if guess_new:
                    guess_new = False
                    continue
                races += 1
                if races >= MAX_RACES:
                    raise Retryable(
                        f"drain record of {instance_id} kept changing under us"
                    ) from None
            except _Leased as leased:
                # Another step holds the record: it is short (a few API calls), so wait for
                # it here rather than hand the event back to a retry that comes much later.
                if waited >= self.lease_wait:
                    self._tick_after_lease(instance_id, leased)
                    raise Retryable(
                        f"drain record of {instance_id} held by another step "
                        f"(lease until {leased.until:.0f})"
                    ) from None
                pause = min(LEASE_POLL_MAX, LEASE_POLL * 2**polls)
                polls += 1
                self.sleep(pause)
                waited += pause

    def _not_ours(self, s: LifecycleSignal) -> str:
        want_asg, want_hook = self.settings.asg_name, self.settings.hook_name
        if want_asg and s.asg_name != want_asg:
            return f"lifecycle action of group {s.asg_name!r}, not ours ({want_asg!r})"
        if want_hook and s.hook_name != want_hook:
            return f"lifecycle action of hook {s.hook_name!r}, not ours ({want_hook!r})"
        return ""

    def _handle_once(
        self,
        instance_id: str,
        signal: Signal,
        guess_new: bool = False,
        *,
        current: DrainRecord | _Unread | None = _UNREAD,
    ) -> Result:
        """One merge and step of ``signal``; ``current``: the record as a failed claim read it
        (else it is read here, unless ``guess_new``)."""
        now = self.clock()
        if isinstance(current, _Unread):
            current = None if guess_new else self.store.get(instance_id)
        if current is not None:
            self._remember(current)
        merged = self._merge(current, signal, now)
        record = merged.record
        if record is None:
            if guess_new and self.store.get(instance_id) is not None:
                # What the record makes of it can differ (a notice for a drain in flight on an
                # instance ECS no longer lists): merge it with the record, read.
                raise Conflict("guessed")
            return Result(merged.action, instance_id, detail=merged.detail)
        step = merged.step and record.phase != "done"
        if current is not None and current.leased(now) and (merged.changed or step):
            # Only the lease holder writes while it steps; we merge again once it is done.
            raise _Leased(current.lease_until or now, current.drain_id)
        # A step of a drain under way looks before it claims (most only wait, and save once);
        # a new episode claims in the write that merges it; a new record is written once, by
        # its first step, after it acted (see _run_step's ``fresh``).
        look_first = step and current is not None and merged.action != "started"
        # Acting before the write that would find a record after all is safe for an event
        # that drains rightly whatever the record says (a spot notice: the instance dies; a
        # lifecycle action: its token is heartbeated before anything acts on it, and a
        # refused one does nothing); a rebalance or a scheduled change that the record would
        # have found a duplicate of could drain an instance that is staying.
        fresh = (
            step
            and current is None
            and (not guess_new or isinstance(signal, (LifecycleSignal, SpotSignal)))
        )
        if step and not look_first and not fresh:
            # Claim the record in the same conditional write that merges the event: of two
            # steps that race, one claims and acts, the other waits and then sees its work.
            record = self._claimed(record, now)
        if current is None and not fresh:
            record = self.store.create(record)
            self._remember(record)
        elif (merged.changed or step) and not look_first and not fresh:
            record = self._save(record)
        if merged.action == "started":
            self.metrics.count(DRAINS_STARTED)
            self._log(record).info(
                "drain started",
                extra={
                    "reasons": record.reasons,
                    "phase": record.phase,
                    "episode": record.episode,
                },
            )
        if step:
            # Only a tick may take the tasks as the last read left them: any other event is
            # news of the instance (a task stopped, a notice), read afresh.
            record = self._step(
                record, claimed=not look_first, tick=isinstance(signal, TickSignal), fresh=fresh
            )
            self._remember(record)
        return Result(merged.action, instance_id, record.drain_id, record.phase, merged.detail)

    def _claim_first(
        self, instance_id: str, signal: Signal
    ) -> tuple[Result | None, DrainRecord | None]:
        """Claim the drain and step it, claimed, without reading it first: ``(result, _)``.
        When the claim did not take (no record, done, or held): ``(None, record as read)``, to
        be handled as any event is."""
        now = self.clock()
        claimed, took = self.store.claim(instance_id, *self._new_lease(now), now)
        if claimed is None or not took:
            return None, claimed
        self._remember(claimed)
        merged = self._merge(claimed, signal, now)
        record = merged.record
        if record is None or not merged.step or record.phase == "done":
            # Nothing to step (a duplicate event, a tick pending): give the record back, with
            # what the merge changed.
            self._release(record or claimed, self._log(claimed))
            record = claimed
        else:
            record = self._step(record, claimed=True)
            self._remember(record)
        result = Result(merged.action, instance_id, record.drain_id, record.phase, merged.detail)
        return result, None

    def _remember(self, record: DrainRecord) -> None:
        """Note that ``record`` exists (and, when it is done, that its drain ended)."""
        _bounded_put(self._seen, record.instance_id, None)
        seen = self._versions.get(record.instance_id, 0)
        _bounded_put(self._versions, record.instance_id, max(seen, record.version))
        if record.phase == "done":
            _bounded_put(self._ended, record.instance_id, record.drain_id)
            if record.completed_at is not None:
                _bounded_put(
                    self._ended_at, record.instance_id, (record.drain_id, record.completed_at)
                )

    def _new_lease(self, now: float) -> tuple[str, float]:
        """A new lease's id and end, from ``now``."""
        return uuid.uuid4().hex[:12], now + self.settings.step_lease

    def _claimed(self, record: DrainRecord, now: float) -> DrainRecord:
        """``record`` holding a new lease (to be written, conditional on its version)."""
        record = copy.deepcopy(record)
        record.lease_id, record.lease_until = self._new_lease(now)
        return record

    # ------------------------------------------------------------------ merging

    def _merge(self, rec: DrainRecord | None, signal: Signal, now: float) -> Merge:
        """:func:`~fleetdrain.controller.drain.merge.merge`, plus the one lookup it leaves to us:
        a spot notice or rebalance starts a drain only for a container instance of the cluster."""
        result = merge(rec, signal, now, self.settings)
        if not result.in_cluster_only or result.record is None:
            return result
        ci = self.fleet.find_container_instance(result.record.instance_id)
        if ci is None:
            return Merge(None, "ignored", detail="instance is not in the cluster")
        placed = dataclasses.replace(result.record, container_instance_arn=ci.arn)
        return dataclasses.replace(result, record=placed, in_cluster_only=False)

    # ------------------------------------------------------------------ the step

    def _step(
        self, record: DrainRecord, claimed: bool, tick: bool = False, fresh: bool = False
    ) -> DrainRecord:
        """Advance the drain as far as the world allows now; save (releasing the lease, if
        any); return the saved record.

        ``fresh``: ``record`` is not in the store yet (the first event of the instance): the
        step acts and then creates it, with its link, in one write (see :meth:`_run_step`).

        ``claimed``: the caller wrote ``record`` with a lease. If not, the step first only
        looks (reads, a due heartbeat): one that finds nothing to do saves once, conditional
        on the version read (a step that raced it makes that a ``Conflict``: ``handle`` reads
        again). One that must act claims the record as read and then acts on what it looked
        at (its reads are not asked again)."""
        lg = self._log(record)
        looked = (
            LookedFleet(self.fleet),
            LookedCoordinator(self.coordinator) if self.coordinator is not None else None,
        )
        if not claimed:
            held = _HeldLog(log, dict(lg.extra or {}))
            saved = self._run_step(record, held, looked, acting=False, tick=tick)
            if saved is not None:
                held.release(lg)
                return saved
            record = self._save(self._claimed(record, self.clock()))
        saved = self._run_step(record, lg, looked, acting=True, fresh=fresh)
        assert saved is not None
        return saved

    def _run_step(
        self,
        record: DrainRecord,
        lg: DrainLog,
        looked: tuple[LookedFleet, LookedCoordinator | None],
        acting: bool,
        tick: bool = False,
        fresh: bool = False,
    ) -> DrainRecord | None:
        """One run of a step on ``record`` (claimed when ``acting``): the saved record, or
        None when a look (not ``acting``) found something to do.

        ``fresh`` (acting, ``record`` not in the store): the step acts unclaimed and its
        write creates the record (a Conflict when another event's step created it
        meanwhile: ``handle`` then reads that record and merges the event into it). A lease
        could only keep out a step of another first event of the same instance, and every
        action of a step is idempotent: two such steps that race both act (DRAINING, pauses,
        heartbeats twice; a second completion is refused by AWS) and one record is kept. A
        step that fails writes the record as merged (no lease), so its retry tick finds it."""
        rec = copy.deepcopy(record)
        rec.steps += 1
        now = self.clock()
        step = _Step(self, rec, now, lg, looked, acting=acting, tick=tick)
        link = None
        batch = self._batch if fresh else None
        if batch is not None:
            batch.holding = True  # its DRAINING and its tick go out before its create
        try:
            step.run()
            if rec.container_instance_arn and step.linked:
                # In the save's own write: a step that fails before it is retried with
                # steps == 1 again, and links then.
                step.act()
                link = rec.container_instance_arn
            if rec.phase != "done":
                self._schedule_tick(
                    rec, now, step.coordinator_down_since, step.retry_at, hold=batch is not None
                )
        except _MustAct:
            if acting:
                raise AssertionError("a claimed step cannot stop to claim") from None
            return None
        except Retryable as exc:
            # Released even after a look: the merge (a tick it used up) is kept; the retry
            # tick is not recorded as pending, so the failed event steps when it comes back.
            self._release(record, lg, fresh)
            self._retry_soon(record, lg, exc)
            raise
        except BaseException:
            if acting:
                self._release(record, lg, fresh)
            raise
        finally:
            if batch is not None:
                batch.holding = False
        rec.lease_id = rec.lease_until = None
        if batch is not None:
            batch.hold_create(rec, link)
            return dataclasses.replace(rec, version=1)
        if fresh:
            return self.store.create(rec, link=link)
        return self._save(rec, link=link)

    def _save(self, record: DrainRecord, link: str | None = None) -> DrainRecord:
        """``store.save``; a write of a tick's carried copy (at its version) is conditional on
        the stored record's pending tick being that tick too: a copy of a save that never
        happened can have the version of a record written otherwise (a failed step's release,
        a retried first step)."""
        expect = self._expect
        if expect is not None and (record.instance_id, record.version) == expect[:2]:
            return self.store.save(record, link=link, expect_tick=expect[2])
        return self.store.save(record, link=link)

    def _release(self, claimed: DrainRecord, lg: DrainLog, fresh: bool = False) -> None:
        """A step failed: give the record back as it was claimed (or merged, for a look), so
        the retry need not wait for the lease to expire and the event's merge (a tick it used
        up) is kept (if this write fails too, the lease expires on its own). ``fresh``: the
        record is written for the first time, as merged."""
        try:
            released = dataclasses.replace(claimed, lease_id=None, lease_until=None)
            if fresh:
                self.store.create(released)
            else:
                self._save(released)
        except Exception as exc:
            lg.warning("could not release the drain record", extra={"error": str(exc)})

    def _tick_after_lease(self, instance_id: str, leased: _Leased) -> None:
        """We give up waiting for another step's lease: leave a tick for just after it ends. If
        that step died (its function timed out) nothing else would wake the drain before the
        event's own redelivery (an SQS tick's: after the queue's 360 s visibility timeout),
        however near its deadline."""
        delay = max(1, math.ceil(leased.until - self.clock()) + 1)
        try:
            self.ticks.schedule(instance_id, leased.drain_id, uuid.uuid4().hex[:12], delay)
        except Exception as exc:
            log.warning(
                "could not leave a tick after the lease",
                extra={"instance_id": instance_id, "error": str(exc)},
            )

    def _retry_soon(self, claimed: DrainRecord, lg: DrainLog, exc: Retryable) -> None:
        """A step failed on something that passes (throttling): leave a tick that retries it in
        :data:`RETRY_TICK` seconds. The event that failed comes back too, but an SQS tick only
        after the queue's visibility timeout (360 s), longer than a 300 s lifecycle hook waits
        for its heartbeat. Ticks of the drain are all alike, so an extra one costs a step."""
        try:
            self.ticks.schedule(
                claimed.instance_id, claimed.drain_id, uuid.uuid4().hex[:12], RETRY_TICK
            )
        except Exception as tick_exc:
            lg.warning(
                "could not leave a retry tick", extra={"error": str(tick_exc), "cause": str(exc)}
            )

    def _schedule_tick(
        self,
        rec: DrainRecord,
        now: float,
        down_since: float | None,
        retry_at: float | None = None,
        hold: bool = False,
    ) -> None:
        s = self.settings
        due = now + wait_tick(rec, now, s)
        if rec.force_at is not None and rec.forced_at is None:
            due = min(due, rec.force_at)
        if rec.lifecycle_state == "pending":
            due = min(due, (rec.last_heartbeat_at or now) + s.heartbeat_interval)
        if down_since is not None:
            due = min(due, down_since + self.coordinator_grace)
        if retry_at is not None:
            # The rate limit's window resets then: come back for what it held back.
            due = min(due, retry_at)
        delay = max(1, math.ceil(due - now))
        due = now + delay
        if (
            rec.tick_due is not None
            and now - LOST_TICK_SLACK < rec.tick_due <= due + 0.5
            and rec.tick_id is not None
        ):
            return  # the pending tick comes soon enough
        tick_id = uuid.uuid4().hex[:12]
        # The record as this step is about to save it (one version up, its lease given back):
        # the tick's step takes it as read.
        carried = dataclasses.replace(
            copy.deepcopy(rec),
            version=rec.version + 1,
            lease_id=None,
            lease_until=None,
            tick_id=tick_id,
            tick_due=due,
        )
        if hold and self._batch is not None:
            self._batch.hold_tick(Tick(rec.instance_id, rec.drain_id, tick_id, delay, carried))
        else:
            self.ticks.schedule(rec.instance_id, rec.drain_id, tick_id, delay, carried)
        rec.tick_id, rec.tick_due = tick_id, due

    # ------------------------------------------------------------------ helpers

    def _count_sigkills(self, signal: TaskStoppedSignal) -> None:
        killed = [
            name
            for name, code in signal.exit_codes.items()
            if code == 137 and name in self.settings.agent_containers
        ]
        if killed:
            self.metrics.count(AGENTS_SIGKILLED, len(killed))
            log.warning(
                "agent task was SIGKILLed (exit 137): its job was lost",
                extra={"task_arn": signal.task_arn, "containers": killed},
            )

    @staticmethod
    def _log(rec: DrainRecord) -> DrainLog:
        return DrainLog(log, {"instance_id": rec.instance_id, "drain_id": rec.drain_id})


def wait_tick(rec: DrainRecord, now: float, settings: Settings) -> float:
    """The safety-net tick's interval: ``tick_interval``, growing to half of what the drain
    has waited in its phase (since it began; since DRAINING once hard), up to
    ``max_tick_interval`` (60 s by default; 0: no growth). A long job costs a step a minute, not
    three; the drain notices its end up to that much later (an ended task sends an event at
    once: only a paused agent's job end is found by a tick), and a step that dies half-way is
    retried that much later too (the event's own retries aside)."""
    since = rec.draining_at if rec.phase == "hard" and rec.draining_at is not None else None
    waited = now - (since if since is not None else rec.started_at)
    if settings.max_tick_interval <= settings.tick_interval:
        return settings.tick_interval
    return min(settings.max_tick_interval, max(settings.tick_interval, waited / 2))


class DrainLog(logging.LoggerAdapter[logging.Logger]):
    """Puts the instance id and the drain id on every line (merged with a line's own extra)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, Any]:
        kwargs["extra"] = {**(self.extra or {}), **(kwargs.get("extra") or {})}
        return msg, kwargs


class _HeldLog(DrainLog):
    """A look's lines, held until the look is saved: a look that goes on to act is run again
    claimed, and that run says the same things once."""

    def __init__(self, logger: logging.Logger, extra: dict[str, Any]) -> None:
        super().__init__(logger, extra)
        self.held: list[tuple[int, Any, tuple[Any, ...], dict[str, Any]]] = []

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        self.held.append((level, msg, args, kwargs))

    def release(self, to: DrainLog) -> None:
        """Say the held lines through ``to``."""
        for level, msg, args, kwargs in self.held:
            to.log(level, msg, *args, **kwargs)
        self.held.clear()


def _bounded_put(memo: dict[str, Any], key: str, value: Any) -> None:
    """``memo[key] = value``, forgetting the oldest keys beyond :data:`MAX_REMEMBERED`."""
    memo.pop(key, None)
    memo[key] = value
    while len(memo) > MAX_REMEMBERED:
        memo.pop(next(iter(memo)))


class _Step:
    """One step of one drain (a fresh object each time: no state survives between steps)."""

    def __init__(
        self,
        ctl: DrainController,
        rec: DrainRecord,
        now: float,
        lg: DrainLog,
        looked: tuple[LookedFleet, LookedCoordinator | None],
        *,
        acting: bool,
        tick: bool,
    ) -> None:
        self.ctl = ctl
        self.rec = rec
        self.now = now
        self.log = lg
        #: The ports as this step sees them: each read asked once (kept for the claimed run
        #: that follows a look), every action passed through.
        self.fleet: EcsPort = looked[0]
        self.coordinator: CoordinatorPort | None = looked[1]
        #: False while the step only looks (the record not claimed): see :meth:`act`.
        self.acting = acting
        #: A tick woke the step (nothing new of the instance): see :meth:`remembered_tasks`.
        self.tick = tick
        self.linked = False
        self.coordinator_down_since: float | None = None
        #: The rate limit held a request back until then (the next tick comes no later).
        self.retry_at: float | None = None
        #: A token AWS had accepted was refused in this step.
        self.lost_live_token = False
        #: The step took its agents by the ids found earlier (``waits_hard``), not from a read.
        self.by_id = False

    def act(self) -> None:
        """The step is about to change the world (or the drain's course): a look that has not
        claimed the record stops here, and the step goes on claimed."""
        if not self.acting:
            raise _MustAct

    def run(self) -> None:
        rec, ctl = self.rec, self.ctl
        if not self.probe_tokens():
            return
        if rec.container_instance_arn is None:
            ci = self.fleet.find_container_instance(rec.instance_id)
            if ci is None:
                self.finish("not_in_cluster", f"not a container instance of {ctl.settings.cluster}")
                return
            rec.container_instance_arn = ci.arn
        self.linked = rec.steps == 1
        forcing = rec.force_at is not None and self.now >= rec.force_at and rec.forced_at is None
        tasks = self.remembered_tasks()
        agents: list[AgentView] | None = None
        if tasks is not None and self.waits_hard(tasks, forcing):
            agents, self.by_id = self.known_by_id(tasks), True
        elif tasks is not None:
            agents = self.agents(tasks, known_only=True)
        if tasks is None or agents is None:
            # A forced stop reads the stopping tasks too: an agent that is finishing a job
            # after someone else's stop is told to cancel and report it before the instance goes.
            tasks = self.read_tasks(exact=forcing)
            if tasks and self.waits_hard(tasks, forcing):
                agents, self.by_id = self.known_by_id(tasks), True
            else:
                agents = self.agents(tasks) if tasks else None
        if not tasks:
            self.act()
            drained = rec.draining_at is not None or bool(rec.paused_agents)
            if rec.going and rec.draining_at is None:
                # Nothing runs, but the instance goes: nothing may be placed on it meanwhile.
                self.fleet.set_draining(rec.container_instance_arn)
                rec.draining_at = self.now
                self.log.info("container instance DRAINING (no task on it)")
            self.finish("drained" if drained else "no_tasks", "no task left on the instance")
            return
        if forcing:
            self.force(tasks, agents)
        if rec.phase == "soft" and agents is not None:
            self.pause(agents)
            if agents is not None and not self.busy(tasks, agents):
                self.act()
                rec.phase = "hard"
                self.log.info("agents idle: hard drain")
        if rec.phase == "hard":
            if agents is not None and rec.forced_at is None:
                # The SIGTERM that follows may never reach an agent (a shell as PID 1): the
                # pause keeps it from new jobs. At the lowest priority: a tight window goes
                # without it, and keeps its requests for forced stops.
                self.pause(agents)
            self.hard(tasks)
        self.heartbeat(tasks, agents)

    # ------------------------------------------------------------------ lifecycle tokens

    def probe_tokens(self) -> bool:
        """Heartbeat the tokens AWS has not accepted yet, before anything acts on them (for a
        live action a heartbeat is harmless, for a stale one it is the answer). False when
        that ended the drain: its only reason was a token AWS refused."""
        rec = self.rec
        unseen = (rec.lifecycle_state == "pending" and not rec.lifecycle_verified) or any(
            not t.verified for t in rec.other_tokens
        )
        if not unseen:
            return True
        self.beat(only_unseen=True)
        if rec.lifecycle_state == "pending" or any(r != "scale_in" for r in rec.reasons):
            return True
        self.finish("stale_token", "AWS refused the lifecycle token (replayed or stale)")
        return False

    def beat(self, only_unseen: bool) -> None:
        """Heartbeat the drain's token and every other token it answers (``only_unseen``:
        those AWS has not accepted yet). A refused one is dead: remembered as spent, dropped; if
        the drain's own token is, a live other one takes its place."""
        rec, now = self.rec, self.now
        if (
            rec.lifecycle_state == "pending"
            and rec.lifecycle_token
            and not (only_unseen and rec.lifecycle_verified)
        ):
            ref = TokenRef(
                token=rec.lifecycle_token,
                asg_name=rec.asg_name or "",
                hook_name=rec.hook_name or "",
                sent_at=rec.token_sent_at if rec.token_sent_at is not None else rec.started_at,
                verified=rec.lifecycle_verified,
            )
            if self.answer(ref, "heartbeat"):
                rec.lifecycle_verified = True
                rec.last_heartbeat_at = now
            else:
                rec.lifecycle_state = "gone"
        live = []
        for ref in rec.other_tokens:
            if (only_unseen and ref.verified) or self.answer(ref, "heartbeat"):
                ref.verified = True
                live.append(ref)
        rec.other_tokens = live
        if rec.lifecycle_state != "pending" and live:
            ref = rec.other_tokens.pop(0)
            rec.asg_name, rec.hook_name, rec.lifecycle_token = (
                ref.asg_name,
                ref.hook_name,
                ref.token,
            )
            rec.lifecycle_state, rec.lifecycle_verified = "pending", True
            rec.token_sent_at, rec.last_heartbeat_at = ref.sent_at, now
            self.log.info("the live lifecycle token is the other one")

    def answer(self, ref: TokenRef, how: str) -> bool:
        """Heartbeat (``how``: ``heartbeat``) or complete a token; False when AWS refuses it
        (it is then spent). A token accepted for the first time starts its budget."""
        rec, ctl = self.rec, self.ctl
        if how != "heartbeat":
            self.act()
        try:
            if how == "heartbeat":
                ctl.lifecycle.heartbeat(ref.asg_name, ref.hook_name, ref.token, rec.instance_id)
            else:
                if ctl._batch is not None:
                    # DRAINING before the instance is let go (nothing may be placed there).
                    ctl._batch.before_completion()
                ctl.lifecycle.complete(
                    ref.asg_name, ref.hook_name, ref.token, rec.instance_id, "CONTINUE"
                )
        except LifecycleGone as exc:
            # A heartbeat is a look (another step may send one too: harmless); what a refusal
            # leads to is acting.
            self.act()
            rec.bury(ref.token)
            if ref.verified:
                self.lost_live_token = True
            self.log.warning(
                "lifecycle token refused: it is dead"
                + ("" if ref.verified else " (replayed or stale: it never drove this drain)"),
                extra={"error": str(exc), "was_live": ref.verified},
            )
            return False
        if how == "complete":
            rec.bury(ref.token)
        if not ref.verified:
            budget_end = ref.sent_at + ctl.settings.drain_budget
            rec.force_at = budget_end if rec.force_at is None else min(rec.force_at, budget_end)
            if "scale_in" not in rec.reasons:
                rec.reasons.append("scale_in")
        return True

    # ------------------------------------------------------------------ pieces

    def remembered_tasks(self) -> list[TaskInfo] | None:
        """The tasks as the last ECS read left them, when a look may take them so (a drain
        that only waits, read less than :data:`TASKS_LOOK_EVERY` ago, an agent known for every
        task; hard: read since DRAINING, when ECS places nothing there any more); None: read
        ECS. What a look acts on is read afresh: the claimed run that follows asks ECS."""
        rec = self.rec
        if (
            self.acting
            or not self.tick
            or rec.phase == "done"
            or rec.fallback
            or rec.coordinator_down_at is not None
            or rec.looked_at is None
            or self.now - rec.looked_at >= TASKS_LOOK_EVERY
            or (rec.phase == "hard" and rec.draining_at is None)
            or (rec.draining_at is not None and rec.looked_at < rec.draining_at)
            or not rec.looked_tasks
            or any(len(row) != 3 or row[0] not in rec.agent_ids for row in rec.looked_tasks)
            or (rec.force_at is not None and self.now >= rec.force_at)
        ):
            return None
        return [
            TaskInfo(arn, group=group, last_status="", desired_status=desired, daemon=False)
            for arn, group, desired in rec.looked_tasks
        ]

    def read_tasks(self, fleet: EcsPort | None = None, exact: bool = False) -> list[TaskInfo]:
        """The instance's tasks read from ECS (``fleet``: the step's, unless given; ``exact``:
        every stopping one too), daemons left out; what was read is kept in the record
        (daemons apart), and what the record kept from the last read is handed to the adapter
        (a look in another container)."""
        rec = self.rec
        assert rec.container_instance_arn is not None
        known = [
            TaskInfo(arn, group=group, last_status="", desired_status=desired, daemon=False)
            for arn, group, desired in (row for row in rec.looked_tasks if len(row) == 3)
        ] + [
            TaskInfo(arn, group=group, last_status="", desired_status="RUNNING", daemon=True)
            for arn, group in (row for row in rec.looked_daemons if len(row) == 2)
        ]
        read = (fleet or self.fleet).tasks_on(rec.container_instance_arn, known, exact=exact)
        tasks = [t for t in read if not t.daemon]
        rec.looked_tasks = [[t.arn, t.group, t.desired_status] for t in tasks]
        rec.looked_daemons = [[t.arn, t.group] for t in read if t.daemon]
        rec.looked_at = self.now
        return tasks

    def agents(self, tasks: list[TaskInfo], known_only: bool = False) -> list[AgentView] | None:
        """Live agents of these tasks; None once the drain has fallen back to ECS
        (``known_only``: None too when the agents known for them cannot be asked one by one as
        they were, and nothing else is tried)."""
        rec = self.rec
        if known_only:
            if rec.fallback or self.coordinator is None:
                return None
            try:
                known = self.known_agents(tasks)
                if known is not None:
                    return known
                # The listing is cheaper (or shared and fresh): it answers for every task.
                listed = self.coordinator.agents_for(t.arn for t in tasks)
            except CoordinatorUnavailable:
                return None  # rate limit or outage: the full look says which, and acts on it
            return self.as_known(tasks, {a.id: a for a in listed}.get)
        if rec.fallback:
            return None
        if self.coordinator is None:
            self.fallback(tasks, "no coordinator configured")
            return None
        try:
            agents = self.known_agents(tasks)
            if agents is None:
                agents = self.coordinator.agents_for(t.arn for t in tasks)
                rec.agent_ids.update({a.task_arn: a.id for a in agents if a.live})
                rec.listing_pages = self.coordinator.last_pages
        except RateLimited as exc:
            self.rate_limited(str(exc), exc.retry_in)
            return None
        except CoordinatorUnavailable as exc:
            self.coordinator_down(tasks, str(exc))
            return None
        rec.coordinator_down_at = None
        return [a for a in agents if a.live]

    def known_agents(self, tasks: list[TaskInfo]) -> list[AgentView] | None:
        """The tasks' agents asked one by one, when an earlier step found an agent for every
        task still here and that takes fewer requests than the listing did (a request an
        agent, instead of every page of the organization); None when the listing is cheaper or
        what we know cannot be trusted: a task with no known agent (new, or a wrapped worker),
        or a known agent that is gone while its task runs (it may have re-registered)."""
        rec, coordinator = self.rec, self.coordinator
        assert coordinator is not None
        if not tasks or len(tasks) >= coordinator.listing_cost(rec.listing_pages, rec.instance_id):
            return None
        if any(t.arn not in rec.agent_ids for t in tasks):
            return None
        return self.as_known(tasks, coordinator.agent)

    def as_known(
        self, tasks: list[TaskInfo], lookup: Callable[[str], AgentView | None]
    ) -> list[AgentView] | None:
        """The agents known for these tasks (each has one in ``agent_ids``) as ``lookup``
        (agent id -> view) shows them, asked in order; None at the first that is gone, not
        live, or in another task."""
        found = []
        for task in tasks:
            view = lookup(self.rec.agent_ids[task.arn])
            if view is None or not view.live or view.task_arn != task.arn:
                return None
            found.append(view)
        return found

    def rate_limited(self, why: str, retry_in: float) -> None:
        """The organization's rate limit held a request back: not an outage (the coordinator
        answers), so no grace runs out and nothing falls back; the next tick comes when the
        window resets."""
        at = self.now + retry_in
        self.retry_at = at if self.retry_at is None else min(self.retry_at, at)
        self.log.info("coordinator rate limit: waiting for its window", extra={"error": why})

    def coordinator_down(self, tasks: list[TaskInfo], why: str) -> None:
        """The coordinator failed us. In the soft phase wait ``coordinator_grace`` first (a
        blip is no reason to SIGTERM every agent); otherwise fall back to ECS at once."""
        rec, grace = self.rec, self.ctl.coordinator_grace
        if rec.phase == "soft" and grace > 0:
            if rec.coordinator_down_at is None:
                rec.coordinator_down_at = self.now
            if self.now - rec.coordinator_down_at < grace:
                self.coordinator_down_since = rec.coordinator_down_at
                self.log.warning("coordinator unavailable, retrying shortly", extra={"error": why})
                return
        self.fallback(tasks, why)

    def fallback(self, tasks: list[TaskInfo], why: str) -> None:
        self.act()
        rec, ctl = self.rec, self.ctl
        rec.fallback = True
        rec.phase = "hard"
        ctl.metrics.count(COORDINATOR_FALLBACKS)
        self.log.warning(
            "coordinator unavailable: falling back to ECS StopTask", extra={"error": why}
        )
        self.stop_tasks(tasks, "the coordinator is unavailable")

    def pause(self, agents: list[AgentView]) -> None:
        rec, ctl, coordinator = self.rec, self.ctl, self.coordinator
        assert coordinator is not None
        todo = [a for a in agents if a.id not in rec.paused_agents]
        if not todo:
            return
        if any(not a.paused for a in todo):
            self.act()
        end = rec.force_at if rec.force_at is not None else None
        minutes = (
            math.ceil((end - self.now) / 60) + 10 if end is not None else ctl.settings.pause_minutes
        )
        note = f"fleetdrain: draining {rec.instance_id} (drain {rec.drain_id})"
        done = []
        for agent in todo:
            try:
                if not agent.paused:
                    coordinator.pause(agent.id, note, max(1, minutes))
            except RateLimited as exc:
                # A pause only keeps new jobs away: it is the first request a tight window
                # goes without (soft: the next tick pauses the rest; hard: DRAINING's SIGTERM
                # stops the agents taking jobs anyway).
                self.rate_limited(str(exc), exc.retry_in)
                break
            except CoordinatorUnavailable as exc:
                self.fallback_now(str(exc))
                return
            rec.paused_agents.append(agent.id)
            done.append(agent.id)
        if done:
            self.log.info("agents paused", extra={"agents": done})

    def fallback_now(self, why: str) -> None:
        # Signalling failed half-way: re-read the tasks so nothing is missed.
        self.fallback(self.read_tasks(self.ctl.fleet), why)

    def busy(self, tasks: list[TaskInfo], agents: list[AgentView]) -> bool:
        if any(a.busy for a in agents):
            return True
        with_agent = {a.task_arn for a in agents}
        others = [t.arn for t in tasks if t.arn not in with_agent]
        return bool(others) and bool(self.fleet.protected(others))

    def hard(self, tasks: list[TaskInfo]) -> None:
        rec = self.rec
        assert rec.container_instance_arn is not None
        if rec.draining_at is None:
            self.act()
            self.fleet.set_draining(rec.container_instance_arn)
            rec.draining_at = self.now
            self.log.info("container instance DRAINING")
        # DRAINING stops service tasks; a task no service owns needs its own SIGTERM.
        loose = [t for t in tasks if t.service is None]
        if loose:
            self.stop_tasks(loose, "the instance is draining")

    def stop_tasks(self, tasks: list[TaskInfo], why: str) -> None:
        rec = self.rec
        todo = [
            t for t in tasks if t.arn not in rec.stopped_tasks and t.desired_status != "STOPPED"
        ]
        if todo or rec.draining_at is None:
            self.act()
        for task in todo:
            self.fleet.stop_task(task.arn, f"fleetdrain: {why} ({rec.instance_id})")
            rec.stopped_tasks.append(task.arn)
        if rec.draining_at is None and rec.container_instance_arn is not None:
            self.fleet.set_draining(rec.container_instance_arn)
            rec.draining_at = self.now

    def force(self, tasks: list[TaskInfo], agents: list[AgentView] | None) -> None:
        self.act()
        rec, ctl, coordinator = self.rec, self.ctl, self.coordinator
        rec.forced_at = self.now
        rec.phase = "hard"
        ctl.metrics.count(DRAINS_FORCED)
        cancelled = 0
        covered: set[str] = set()
        if agents is None and coordinator is not None and not rec.fallback:
            # The rate limit held the listing back: the agents an earlier step found are the
            # ones to stop (a stop of one that has gone since is refused, harmlessly).
            agents = self.known_by_id(tasks)
        if agents is not None and coordinator is not None and not rec.fallback:
            try:
                for agent in agents:
                    if agent.id in rec.stopped_agents:
                        covered.add(agent.task_arn)
                        continue
                    if coordinator.stop(agent.id, force=True) and agent.busy:
                        cancelled += 1
                    rec.stopped_agents.append(agent.id)
                    covered.add(agent.task_arn)
            except RateLimited as exc:
                # The deadline cannot wait for the window: the agents not stopped yet get
                # their SIGTERM from ECS (their own deadline cancels and reports the job).
                self.log.warning(
                    "forced stop held back by the rate limit: StopTask for the rest",
                    extra={"error": str(exc), "stopped": len(covered)},
                )
                ctl.metrics.count(COORDINATOR_FALLBACKS)
            except CoordinatorUnavailable as exc:
                self.log.warning(
                    "forced stop through the coordinator failed", extra={"error": str(exc)}
                )
                covered = set()
                rec.fallback = True
                ctl.metrics.count(COORDINATOR_FALLBACKS)
        # Tasks with no agent we could stop (wrapped workers, or no coordinator): SIGTERM.
        self.stop_tasks([t for t in tasks if t.arn not in covered], "forced drain")
        rec.jobs_force_cancelled += cancelled
        if cancelled:
            ctl.metrics.count(JOBS_FORCE_CANCELLED, cancelled)
        self.log.warning(
            "drain forced",
            extra={"jobs_force_cancelled": cancelled, "reasons": rec.reasons},
        )

    def waits_hard(self, tasks: list[TaskInfo], forcing: bool) -> bool:
        """Whether the drain only waits, hard, for these tasks to stop (or for its force), each
        with an agent an earlier step found. Nothing it does until then turns on what its
        agents are doing, so the step asks the coordinator nothing: the agents go by the ids
        found (a pause that has not gone out yet, by id). In a big organization's spot storm
        those reads would take the window the forced stops need."""
        rec = self.rec
        return (
            rec.phase == "hard"
            and rec.draining_at is not None
            and not forcing
            and not rec.fallback
            and self.coordinator is not None
            and all(t.arn in rec.agent_ids for t in tasks)
        )

    def known_by_id(self, tasks: list[TaskInfo]) -> list[AgentView]:
        """The agents an earlier step found for these tasks, by id only (their state unknown:
        taken as idle, so a job they cancel is not counted)."""
        return [
            AgentView(
                id=self.rec.agent_ids[t.arn],
                name="",
                task_arn=t.arn,
                connection_state="connected",
                job_id=None,
                job_state=None,
                paused=False,
            )
            for t in tasks
            if t.arn in self.rec.agent_ids
        ]

    def heartbeat(self, tasks: list[TaskInfo], agents: list[AgentView] | None) -> None:
        rec, ctl = self.rec, self.ctl
        if rec.phase == "done" or rec.lifecycle_state != "pending":
            return
        last = rec.last_heartbeat_at
        if last is not None and self.now - last < ctl.settings.heartbeat_interval:
            return
        self.beat(only_unseen=False)
        if rec.lifecycle_state == "pending" or not self.lost_live_token:
            return
        self.log.warning("lifecycle action gone: the instance is terminating now")
        if rec.forced_at is None:
            if self.by_id:
                # The look took its agents by id (a hard drain that only waited): the force
                # reads them, so the jobs it cancels are counted (rate-limited: by id again).
                agents = self.agents(tasks)
            self.force(tasks, agents)
        self.finish("lifecycle_gone", "the lifecycle action expired or was completed elsewhere")

    def finish(self, outcome: str, reason: str) -> None:
        self.act()
        rec, ctl = self.rec, self.ctl
        refs = rec.other_tokens
        if rec.lifecycle_state == "pending" and rec.lifecycle_token:
            own = TokenRef(
                token=rec.lifecycle_token,
                asg_name=rec.asg_name or "",
                hook_name=rec.hook_name or "",
                sent_at=rec.token_sent_at or rec.started_at,
                verified=rec.lifecycle_verified,
            )
            refs = [own, *refs]
        completed = gone = 0
        for ref in refs:
            if self.answer(ref, "complete"):
                completed += 1
            else:
                gone += 1
        rec.other_tokens = []
        if completed:
            rec.lifecycle_state, rec.lifecycle_verified = "completed", True
            done = ctl.clock()
            if rec.last_task_stopped_at is not None:
                ctl.metrics.seconds(
                    HOOK_COMPLETION_LATENCY, max(0.0, done - rec.last_task_stopped_at)
                )
        elif gone:
            rec.lifecycle_state = "gone"
            outcome = "lifecycle_gone" if outcome != "not_in_cluster" else outcome
            reason = f"{reason}; lifecycle action already gone"
        rec.phase = "done"
        rec.outcome = outcome
        rec.outcome_reason = reason
        # The moment it ended, not when the step began: the step looked at the world (and
        # maybe saw the last task stop) after its start.
        rec.completed_at = ctl.clock()
        rec.tick_id = rec.tick_due = None
        if outcome in ("drained", "no_tasks"):
            ctl.metrics.count(DRAINS_COMPLETED)
        else:
            ctl.metrics.count(DRAINS_ABANDONED)
        ctl.metrics.seconds(DRAIN_SECONDS, max(0.0, rec.completed_at - rec.started_at))
        self.log.info(
            "drain done",
            extra={
                "outcome": outcome,
                "reason": reason,
                "lifecycle": rec.lifecycle_state,
                "drain_seconds": round(rec.completed_at - rec.started_at, 3),
            },
        )
