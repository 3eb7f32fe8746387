"""How an event merges into its drain record: pure (no port is called, the input record is never
changed), so :meth:`~fleetdrain.controller.drain.core.DrainController.handle` can re-apply it
after a lost write race.

The rules: a duplicate (the same event id, the same lifecycle token, a spot notice no earlier
than the one known, a rebalance already noted, our own DRAINING) changes nothing and steps only
if no tick is pending (a crash may have lost it). A late event can only add (a reason, a token,
an earlier deadline), never move a drain backwards: ``force_at`` only ever moves earlier. A spot
notice moves the phase to ``hard`` (no time for the soft phase). A new lifecycle token reopens a
finished drain (``hard``) so that its action gets completed. A spot notice or a rebalance for an
instance without a drain starts one only if the instance is in the cluster: that lookup is the
caller's (:attr:`Merge.in_cluster_only`).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetdrain.controller.drain.config import Settings
from fleetdrain.controller.drain.ports import DrainRecord
from fleetdrain.controller.drain.signals import (
    InstanceDrainingSignal,
    LifecycleSignal,
    RebalanceSignal,
    Signal,
    SpotSignal,
    TaskStoppedSignal,
    TickSignal,
)

SPOT_NOTICE_SECONDS = 120.0
#: A pending tick older than this is taken as lost and replaced.
LOST_TICK_SLACK = 120.0


@dataclass(frozen=True)
class Merge:
    """What merging one event does to a drain."""

    #: The record to write (a new one, or a changed copy); None: nothing to do.
    record: DrainRecord | None
    action: str  # started | joined | stepped | duplicate | ignored
    #: Whether ``record`` differs from the one read (a write is needed even without a step).
    changed: bool = True
    #: Whether the drain should step now.
    step: bool = True
    detail: str = ""
    #: ``record`` is a new drain for an instance that may not be in the cluster: the caller
    #: looks its container instance up, sets it, or ignores the event if there is none.
    in_cluster_only: bool = False


def new_drain_id() -> str:
    """A fresh drain id (16 hex characters)."""
    return uuid.uuid4().hex[:16]


def merge(
    rec: DrainRecord | None,
    signal: Signal,
    now: float,
    settings: Settings,
    new_id: Callable[[], str] = new_drain_id,
) -> Merge:
    """Merge ``signal`` into ``rec`` (the instance's record as read, or None) at ``now``.

    ``signal`` is any but ``Ignored``; a task or DRAINING event must already have been matched
    to the instance of ``rec``. ``new_id`` names a drain that starts.
    """
    if isinstance(signal, LifecycleSignal):
        return _merge_lifecycle(rec, signal, now, settings, new_id)
    if isinstance(signal, SpotSignal):
        return _merge_spot(rec, signal, now, settings, new_id)
    if isinstance(signal, RebalanceSignal):
        return _merge_rebalance(rec, signal, now, settings, new_id)
    if rec is None or rec.phase == "done":
        return Merge(None, "ignored", detail="no drain in flight")
    if isinstance(signal, TickSignal):
        if signal.drain_id != rec.drain_id:
            return Merge(None, "ignored", detail="tick of another drain")
        rec = copy.deepcopy(rec)
        if rec.tick_id == signal.tick_id:
            rec.tick_id = rec.tick_due = None
        return Merge(rec, "stepped")
    if isinstance(signal, TaskStoppedSignal):
        if rec.saw(signal.event_id):
            return duplicate(rec, now)
        rec = copy.deepcopy(rec)
        rec.remember(signal.event_id)
        stopped = signal.stopped_at.timestamp()
        rec.last_task_stopped_at = max(rec.last_task_stopped_at or 0.0, stopped)
        return Merge(rec, "stepped")
    assert isinstance(signal, InstanceDrainingSignal)
    if rec.draining_at is not None:
        # Our own DRAINING (ECS repeats the event at every task that stops): no news.
        return duplicate(rec, now)
    return Merge(rec, "stepped", changed=False)


def duplicate(rec: DrainRecord, now: float) -> Merge:
    """An event already merged: nothing changes; step only if no tick is pending (a crash may
    have lost it)."""
    pending = rec.tick_due is not None and rec.tick_due > now - LOST_TICK_SLACK
    return Merge(rec, "duplicate", changed=False, step=rec.phase != "done" and not pending)


def _new(
    settings: Settings, new_id: Callable[[], str], instance_id: str, now: float, **fields: Any
) -> DrainRecord:
    return DrainRecord(
        instance_id=instance_id,
        drain_id=new_id(),
        cluster=settings.cluster,
        started_at=now,
        **fields,
    )


def _merge_lifecycle(
    rec: DrainRecord | None,
    s: LifecycleSignal,
    now: float,
    settings: Settings,
    new_id: Callable[[], str],
) -> Merge:
    # The action began when it was sent (its hook's timeout runs from then), but never later
    # than now: a clock ahead of ours must not push the budget out.
    started = min(now, s.time.timestamp())
    budget_end = started + settings.drain_budget
    if rec is None:
        return Merge(
            _new(
                settings,
                new_id,
                s.instance_id,
                now,
                reasons=["scale_in"],
                phase="soft",
                force_at=budget_end,
                asg_name=s.asg_name,
                hook_name=s.hook_name,
                lifecycle_token=s.token,
                lifecycle_state="pending",
                last_heartbeat_at=started,
                seen_events=[s.event_id],
            ),
            "started",
        )
    if rec.lifecycle_token == s.token or rec.saw(s.event_id):
        return duplicate(rec, now)
    rec = copy.deepcopy(rec)
    rec.remember(s.event_id)
    rec.asg_name, rec.hook_name, rec.lifecycle_token = s.asg_name, s.hook_name, s.token
    rec.lifecycle_state = "pending"
    rec.last_heartbeat_at = started
    if "scale_in" not in rec.reasons:
        rec.reasons.append("scale_in")
    rec.force_at = budget_end if rec.force_at is None else min(rec.force_at, budget_end)
    if rec.phase == "done":
        # Drained already (a rebalance, a spot notice): only the action is left to complete.
        rec.phase, rec.outcome, rec.outcome_reason = "hard", None, None
        rec.completed_at = None
        return Merge(rec, "joined", detail="reopened to complete the lifecycle action")
    return Merge(rec, "joined")


def _merge_spot(
    rec: DrainRecord | None,
    s: SpotSignal,
    now: float,
    settings: Settings,
    new_id: Callable[[], str],
) -> Merge:
    deadline = s.time.timestamp() + SPOT_NOTICE_SECONDS - settings.spot_margin
    if rec is None:
        # Unlike a lifecycle action, an EC2 notice has no hook that waits for an answer: for an
        # instance of another cluster it is simply not ours.
        return Merge(
            _new(
                settings,
                new_id,
                s.instance_id,
                now,
                reasons=["spot"],
                phase="hard",
                force_at=deadline,
                spot_deadline=deadline,
                seen_events=[s.event_id],
            ),
            "started",
            in_cluster_only=True,
        )
    if rec.phase == "done":
        return Merge(None, "ignored", detail="drain already done")
    if rec.saw(s.event_id) or (rec.spot_deadline is not None and rec.spot_deadline <= deadline):
        return duplicate(rec, now)
    rec = copy.deepcopy(rec)
    rec.remember(s.event_id)
    if "spot" not in rec.reasons:
        rec.reasons.append("spot")
    rec.spot_deadline = deadline
    rec.force_at = deadline if rec.force_at is None else min(rec.force_at, deadline)
    rec.phase = "hard"  # no time for the soft phase
    return Merge(rec, "joined", detail="spot notice: deadline moved earlier")


def _merge_rebalance(
    rec: DrainRecord | None,
    s: RebalanceSignal,
    now: float,
    settings: Settings,
    new_id: Callable[[], str],
) -> Merge:
    if settings.rebalance_action == "ignore":
        return Merge(None, "ignored", detail="rebalance recommendations are ignored")
    if rec is None:
        return Merge(
            _new(
                settings,
                new_id,
                s.instance_id,
                now,
                reasons=["rebalance"],
                phase="soft",
                seen_events=[s.event_id],
            ),
            "started",
            in_cluster_only=True,
        )
    if rec.phase == "done" or "rebalance" in rec.reasons or rec.saw(s.event_id):
        return duplicate(rec, now)
    rec = copy.deepcopy(rec)
    rec.remember(s.event_id)
    rec.reasons.append("rebalance")
    return Merge(rec, "joined", step=False)
