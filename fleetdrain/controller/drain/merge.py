"""How an event merges into its drain record: pure (no port is called, the input record is never
changed), so :meth:`~fleetdrain.controller.drain.core.DrainController.handle` can re-apply it
after a lost write race.

A record is per instance *episode*. The rules:

- A duplicate (the same event id, a lifecycle token the record knows, a spot notice no earlier
  than the one known, a rebalance already noted, our own DRAINING) changes nothing and steps
  only if no tick is pending (a crash may have lost it).
- In flight, a late event can only add (a reason, a token to answer, an earlier deadline),
  never move a drain backwards: ``force_at`` only ever moves earlier. A spot notice or a
  ``stopping`` instance moves the phase to ``hard`` (no time for the soft phase).
- A drain that ended does not swallow an event that needs action: a spot notice, a scheduled
  change, a stopping instance, a rebalance after another reason, or a lifecycle token it has
  not seen start the instance's next *episode*: a new ``drain_id`` with its own phase and
  deadline (a spot deadline still ahead is the instance's and carries over), the events seen
  and the spent tokens carried. An instance shutting down (terminating) whose drain left it
  DRAINING a moment ago (:data:`SETTLE_SECONDS`) goes as that drain left it: no episode
  (unless that drain was for a stop: the instance may be back from a warm pool, running jobs).
- A lifecycle token is a claim until AWS accepts it (the step heartbeats it first): its budget
  counts only from then, and a token that came while another was pending never replaces it;
  it is answered too, and AWS says which one is live. Spent tokens (completed, or refused)
  are never answered again.
- A spot notice, a rebalance, a scheduled change or a stopping instance starts an episode only
  if the instance is in the cluster: that lookup is the caller's (:attr:`Merge.in_cluster_only`).
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fleetdrain.controller.drain.config import Settings
from fleetdrain.controller.drain.ports import MAX_HISTORY, DrainRecord, PastEpisode, TokenRef
from fleetdrain.controller.drain.signals import (
    InstanceDrainingSignal,
    LifecycleSignal,
    MaintenanceSignal,
    RebalanceSignal,
    Signal,
    SpotSignal,
    StoppingSignal,
    TaskStoppedSignal,
    TickSignal,
)

SPOT_NOTICE_SECONDS = 120.0
#: The oldest a lifecycle action AWS still accepts can be (its global timeout: at most 48 h).
MAX_ACTION_AGE = 172800.0
#: A pending tick older than this is taken as lost and replaced.
LOST_TICK_SLACK = 120.0
#: An instance that shuts down (terminates) this soon after its drain ended with it DRAINING
#: goes as that drain left it (the scale-in it completed, the spot notice it drained for): no
#: new episode. Nothing can be placed on a DRAINING instance, and a terminated one never comes
#: back. Not for ``stopping``, nor after a drain for a stop: a stopped instance can come back
#: (a warm pool), ACTIVE, and take tasks.
SETTLE_SECONDS = 900.0


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
    if isinstance(signal, MaintenanceSignal):
        return _merge_maintenance(rec, signal, now, settings, new_id)
    if isinstance(signal, StoppingSignal):
        return _merge_stopping(rec, signal, now, settings, new_id)
    if isinstance(signal, InstanceDrainingSignal):
        # The controller only learns the link from it (see DrainController.handle): whose
        # DRAINING it was changes nothing a drain does.
        return Merge(None, "ignored", detail="a DRAINING event changes no drain")
    if rec is None or rec.phase == "done":
        return Merge(None, "ignored", detail="no drain in flight")
    if isinstance(signal, TickSignal):
        if signal.drain_id != rec.drain_id:
            return Merge(None, "ignored", detail="tick of another drain")
        rec = copy.deepcopy(rec)
        if rec.tick_id == signal.tick_id:
            rec.tick_id = rec.tick_due = None
        return Merge(rec, "stepped")
    assert isinstance(signal, TaskStoppedSignal)
    if rec.saw(signal.event_id):
        return duplicate(rec, now)
    rec = copy.deepcopy(rec)
    rec.remember(signal.event_id)
    stopped = signal.stopped_at.timestamp()
    rec.last_task_stopped_at = max(rec.last_task_stopped_at or 0.0, stopped)
    return Merge(rec, "stepped")


def duplicate(rec: DrainRecord, now: float) -> Merge:
    """An event already merged: nothing changes; step only if no tick is pending (a crash may
    have lost it), or if the pending one comes after the drain's force: a step that merged
    this event (a stop, a spot notice: the force moved earlier) and died before it acted left
    the tick of the old schedule, and only this delivery can force in time (a tick is never
    scheduled past the force: see ``DrainController._schedule_tick``; 1 s is its rounding)."""
    pending = rec.tick_due is not None and rec.tick_due > now - LOST_TICK_SLACK
    late = (
        rec.tick_due is not None
        and rec.force_at is not None
        and rec.forced_at is None
        and rec.tick_due > rec.force_at + 1
    )
    step = rec.phase != "done" and (not pending or late)
    return Merge(rec, "duplicate", changed=False, step=step)


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


def next_episode(
    rec: DrainRecord | None,
    settings: Settings,
    new_id: Callable[[], str],
    instance_id: str,
    now: float,
    event_id: str,
    **fields: Any,
) -> DrainRecord:
    """The instance's next drain: its first (``rec`` None) or the one after ``rec`` (done).

    A new ``drain_id`` (ticks of the last episode are ignored), its own phase and deadline;
    carried over: the events seen, the spent tokens, one line of history, and a spot deadline
    still ahead (the instance dies then, whatever drains it next), unless a drain for a stop
    ended at or after the notice: the run the notice was about stopped, and what is drained
    now is the instance started again (a warm pool's), which a notice of its own would name.
    """
    if rec is None:
        fresh = _new(settings, new_id, instance_id, now, **fields)
    else:
        past = PastEpisode(
            drain_id=rec.drain_id,
            episode=rec.episode,
            reasons=list(rec.reasons),
            started_at=rec.started_at,
            completed_at=rec.completed_at,
            outcome=rec.outcome,
        )
        fresh = _new(
            settings,
            new_id,
            instance_id,
            now,
            version=rec.version,
            episode=rec.episode + 1,
            seen_events=list(rec.seen_events),
            dead_tokens=list(rec.dead_tokens),
            history=[*copy.deepcopy(rec.history), past][-MAX_HISTORY:],
            listing_pages=rec.listing_pages,
            **fields,
        )
        if (
            rec.spot_deadline is not None
            and rec.spot_deadline > now
            and not _stopped_since(rec, rec.spot_deadline - SPOT_NOTICE_SECONDS)
        ):
            if "spot" not in fresh.reasons:
                fresh.reasons.append("spot")
            fresh.spot_deadline = min(fresh.spot_deadline or rec.spot_deadline, rec.spot_deadline)
            fresh.force_at = _earlier(fresh.force_at, rec.spot_deadline)
            fresh.phase = "hard"
    fresh.remember(event_id)
    return fresh


def _stopped_since(rec: DrainRecord, when: float) -> bool:
    """Whether a drain of the instance for a stop (the instance stopping) ended at or after
    ``when``: its run was over then, or being stopped."""
    ended = [(e.reasons, e.completed_at) for e in rec.history]
    ended.append((rec.reasons, rec.completed_at))
    return any("stopping" in reasons and at is not None and at >= when for reasons, at in ended)


def _earlier(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def _started(rec: DrainRecord | None, fresh: DrainRecord, **kw: Any) -> Merge:
    detail = "" if rec is None else f"episode {fresh.episode} (the last one ended {rec.outcome})"
    return Merge(fresh, "started", detail=detail, **kw)


def settled(rec: DrainRecord, now: float) -> bool:
    """Whether ``rec`` ended with the instance DRAINING within :data:`SETTLE_SECONDS`, for a
    reason that does not bring it back (a drain for a stop does not settle it: a warm pool
    starts the instance again, ACTIVE, and it takes tasks that a shutdown must drain)."""
    return (
        rec.phase == "done"
        and "stopping" not in rec.reasons
        and rec.draining_at is not None
        and rec.completed_at is not None
        and now - rec.completed_at <= SETTLE_SECONDS
    )


def _merge_lifecycle(
    rec: DrainRecord | None,
    s: LifecycleSignal,
    now: float,
    settings: Settings,
    new_id: Callable[[], str],
) -> Merge:
    # The action began when it was sent (its hook's timeout runs from then), but never later
    # than now: a clock ahead of ours must not push the budget out. Not said, or older than
    # any action AWS still accepts (test data, a wrong clock): now.
    sent = now if s.time is None else min(now, s.time.timestamp())
    if sent < now - MAX_ACTION_AGE:
        sent = now
    if rec is not None and (rec.saw(s.event_id) or rec.knows_token(s.token)):
        return duplicate(rec, now)
    token: dict[str, Any] = {
        "asg_name": s.asg_name,
        "hook_name": s.hook_name,
        "lifecycle_token": s.token,
        "lifecycle_state": "pending",
        "lifecycle_verified": False,
        "token_sent_at": sent,
        "last_heartbeat_at": None,
    }
    if rec is None or rec.phase == "done":
        # Its budget starts once AWS has accepted the token (the step's first heartbeat).
        fresh = next_episode(
            rec, settings, new_id, s.instance_id, now, s.event_id, reasons=["scale_in"], **token
        )
        return _started(rec, fresh)
    rec = copy.deepcopy(rec)
    rec.remember(s.event_id)
    if rec.lifecycle_state == "pending" and rec.lifecycle_token:
        # Which one is live is AWS's to say: answer both until it refuses one.
        rec.other_tokens.append(
            TokenRef(token=s.token, asg_name=s.asg_name, hook_name=s.hook_name, sent_at=sent)
        )
        return Merge(rec, "joined", detail="another lifecycle token: answered too")
    for name, value in token.items():
        setattr(rec, name, value)
    return Merge(rec, "joined")


def _merge_spot(
    rec: DrainRecord | None,
    s: SpotSignal,
    now: float,
    settings: Settings,
    new_id: Callable[[], str],
) -> Merge:
    sent = now if s.time is None else s.time.timestamp()
    deadline = sent + SPOT_NOTICE_SECONDS - settings.spot_margin
    if rec is None or rec.phase == "done":
        if rec is not None and (
            rec.saw(s.event_id)
            or (
                rec.spot_deadline is not None
                and deadline <= rec.spot_deadline + SPOT_NOTICE_SECONDS
            )
        ):
            return duplicate(rec, now)  # the interruption that drain was for
        # Unlike a lifecycle action, an EC2 notice has no hook that waits for an answer: for an
        # instance of another cluster it is simply not ours.
        fresh = next_episode(
            rec,
            settings,
            new_id,
            s.instance_id,
            now,
            s.event_id,
            reasons=["spot"],
            phase="hard",
            force_at=deadline,
            spot_deadline=deadline,
        )
        return _started(rec, fresh, in_cluster_only=True)
    if rec.saw(s.event_id) or (rec.spot_deadline is not None and rec.spot_deadline <= deadline):
        return duplicate(rec, now)
    rec = copy.deepcopy(rec)
    rec.remember(s.event_id)
    if "spot" not in rec.reasons:
        rec.reasons.append("spot")
    rec.spot_deadline = deadline
    rec.force_at = _earlier(rec.force_at, deadline)
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
    if rec is not None and (rec.saw(s.event_id) or "rebalance" in rec.reasons):
        return duplicate(rec, now)
    if rec is None or rec.phase == "done":
        fresh = next_episode(
            rec, settings, new_id, s.instance_id, now, s.event_id, reasons=["rebalance"]
        )
        return _started(rec, fresh, in_cluster_only=True)
    rec = copy.deepcopy(rec)
    rec.remember(s.event_id)
    rec.reasons.append("rebalance")
    return Merge(rec, "joined", step=False)


def _merge_maintenance(
    rec: DrainRecord | None,
    s: MaintenanceSignal,
    now: float,
    settings: Settings,
    new_id: Callable[[], str],
) -> Merge:
    start = None if s.start is None else s.start.timestamp()
    deadline = None if start is None else start - settings.maintenance_margin
    if rec is not None and rec.saw(s.event_id):
        return duplicate(rec, now)
    if rec is None or rec.phase == "done":
        fresh = next_episode(
            rec,
            settings,
            new_id,
            s.instance_id,
            now,
            s.event_id,
            reasons=["maintenance"],
            force_at=deadline,
            maintenance_at=start,
        )
        return _started(rec, fresh, in_cluster_only=True)
    known = rec.maintenance_at
    if "maintenance" in rec.reasons and (start is None or (known is not None and known <= start)):
        return duplicate(rec, now)
    rec = copy.deepcopy(rec)
    rec.remember(s.event_id)
    if "maintenance" not in rec.reasons:
        rec.reasons.append("maintenance")
    rec.maintenance_at = _earlier(known, start)
    rec.force_at = _earlier(rec.force_at, deadline)
    return Merge(rec, "joined", detail="scheduled change: forced before it starts")


def _merge_stopping(
    rec: DrainRecord | None,
    s: StoppingSignal,
    now: float,
    settings: Settings,
    new_id: Callable[[], str],
) -> Merge:
    terminating = s.state == "shutting-down"
    if rec is not None and (rec.saw(s.event_id) or (terminating and settled(rec, now))):
        return duplicate(rec, now)
    if rec is None or rec.phase == "done":
        fresh = next_episode(
            rec,
            settings,
            new_id,
            s.instance_id,
            now,
            s.event_id,
            reasons=["stopping"],
            phase="hard",
            force_at=now,
        )
        return _started(rec, fresh, in_cluster_only=True)
    if "stopping" in rec.reasons:
        return duplicate(rec, now)
    rec = copy.deepcopy(rec)
    rec.remember(s.event_id)
    rec.reasons.append("stopping")
    rec.force_at = _earlier(rec.force_at, now)
    rec.phase = "hard"
    return Merge(rec, "joined", detail=f"instance {s.state}: forced now")
