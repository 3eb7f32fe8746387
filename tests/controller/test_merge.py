"""The merge rules (:mod:`fleetdrain.controller.drain.merge`), in memory: no moto, no HTTP.

One table: a record as read (or none), an event, and what the merge must answer (the action,
whether it writes, whether it steps) and leave in the record. Every case also checks that the
merge never changes the record it was given, and that merging the same event again is a
duplicate. The last tests drive :class:`DrainController` on in-memory ports for the one lookup
the merge leaves to it (is the instance in the cluster?).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import KW_ONLY, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pytest

from fleetdrain.controller.drain.config import Settings
from fleetdrain.controller.drain.core import DrainController
from fleetdrain.controller.drain.merge import LOST_TICK_SLACK, Merge, merge
from fleetdrain.controller.drain.ports import (
    MAX_SEEN_EVENTS,
    ContainerInstance,
    DrainRecord,
    PastEpisode,
    TaskInfo,
    TokenRef,
)
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
from tests.controller.memory import MemoryStore

NOW = 1_770_000_000.0
IID = "i-0abc"
CI_ARN = "arn:aws:ecs:us-east-1:123456789012:container-instance/ci/1"
SETTINGS = Settings(cluster="ci", drain_budget=3600.0, spot_margin=20.0)
IGNORE_REBALANCE = Settings(cluster="ci", rebalance_action="ignore")
#: The deadline of a spot notice sent at NOW (two minutes, less the margin).
SPOT_AT_NOW = NOW + 120.0 - 20.0


def at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


def drain(**fields: Any) -> DrainRecord:
    """A drain in flight, as read from the store."""
    values: dict[str, Any] = {
        "instance_id": IID,
        "drain_id": "d-1",
        "cluster": "ci",
        "version": 3,
        "started_at": NOW - 300,
        "reasons": ["scale_in"],
        "force_at": NOW + 3300,
        "lifecycle_token": "tok-1",
        "lifecycle_state": "pending",
        "seen_events": ["e-old"],
    }
    return DrainRecord(**(values | fields))


def lifecycle(token: str = "tok-2", event_id: str = "e-2", sent: float | None = NOW - 5) -> Signal:
    when = None if sent is None else at(sent)
    return LifecycleSignal(IID, "ci-agents", "fleetdrain-terminating", token, when, event_id)


def spot(sent: float | None = NOW, event_id: str = "e-spot") -> Signal:
    return SpotSignal(IID, None if sent is None else at(sent), "terminate", event_id)


def maintenance(start: float | None = NOW + 7200, event_id: str = "arn:health/1") -> Signal:
    return MaintenanceSignal(
        IID, None if start is None else at(start), "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED", event_id
    )


def stopping(event_id: str = "e-stopping", state: str = "stopping") -> Signal:
    return StoppingSignal(IID, state, at(NOW), event_id)


def done(**fields: Any) -> DrainRecord:
    """A drain that ended (a scale-in whose hook was completed, by default)."""
    values: dict[str, Any] = {
        "phase": "done",
        "outcome": "drained",
        "completed_at": NOW - 3000,
        "lifecycle_state": "completed",
        "dead_tokens": ["tok-1"],
    }
    return drain(**(values | fields))


#: The line a finished ``drain()`` leaves in the next episode's history.
PAST = PastEpisode(
    drain_id="d-1",
    episode=1,
    reasons=["scale_in"],
    started_at=NOW - 300,
    completed_at=NOW - 3000,
    outcome="drained",
)


def rebalance(event_id: str = "e-rebalance") -> Signal:
    return RebalanceSignal(IID, at(NOW), event_id)


def tick(tick_id: str = "t-1", drain_id: str = "d-1") -> Signal:
    return TickSignal(IID, drain_id, tick_id)


def stopped(when: float = NOW - 2, event_id: str = "e-stop") -> Signal:
    return TaskStoppedSignal("arn:cluster", CI_ARN, "arn:task/1", at(when), {"agent": 0}, event_id)


def draining() -> Signal:
    return InstanceDrainingSignal("arn:cluster", CI_ARN, IID, "e-draining")


@dataclass(frozen=True)
class Case:
    name: str
    before: DrainRecord | None
    signal: Signal
    action: str
    #: Fields the merged record must have (None: the merge must return no record).
    after: dict[str, Any] | None = field(default_factory=dict)
    _: KW_ONLY
    changed: bool = True
    step: bool = True
    detail: str = ""
    in_cluster_only: bool = False
    settings: Settings = SETTINGS


CASES = [
    # ------------------------------------------------------------------ lifecycle actions
    Case(
        "a lifecycle action starts a scale-in drain",
        None,
        lifecycle(token="tok-1", event_id="e-1"),
        "started",
        {
            "instance_id": IID,
            "drain_id": "new-drain",
            "cluster": "ci",
            "version": 0,
            "phase": "soft",
            "reasons": ["scale_in"],
            "started_at": NOW,
            # The budget counts once AWS has accepted the token (the first step's heartbeat).
            "force_at": None,
            "token_sent_at": NOW - 5,
            "asg_name": "ci-agents",
            "hook_name": "fleetdrain-terminating",
            "lifecycle_token": "tok-1",
            "lifecycle_state": "pending",
            "lifecycle_verified": False,
            "last_heartbeat_at": None,
            "seen_events": ["e-1"],
            "container_instance_arn": None,
            "episode": 1,
            "history": [],
        },
    ),
    Case(
        "an action stamped later than now counts from now",
        None,
        lifecycle(sent=NOW + 30),
        "started",
        {"token_sent_at": NOW},
    ),
    Case(
        "a lifecycle event stamped older than any action AWS still accepts counts from now",
        None,
        lifecycle(sent=NOW - 3 * 86400),
        "started",
        {"token_sent_at": NOW},
    ),
    Case(
        "a lifecycle notification without a Time counts from now",
        None,
        lifecycle(sent=None),
        "started",
        {"token_sent_at": NOW, "lifecycle_token": "tok-2"},
    ),
    Case(
        "the same token again is a duplicate, and a pending tick makes a step needless",
        drain(tick_id="t-1", tick_due=NOW + 10),
        lifecycle(token="tok-1", event_id="e-new"),
        "duplicate",
        {"seen_events": ["e-old"], "lifecycle_token": "tok-1"},
        changed=False,
        step=False,
    ),
    Case(
        "a duplicate with no tick pending steps (a crash may have lost it)",
        drain(),
        lifecycle(token="tok-1"),
        "duplicate",
        changed=False,
        step=True,
    ),
    Case(
        "a duplicate whose tick is overdue by more than the slack steps",
        drain(tick_id="t-1", tick_due=NOW - LOST_TICK_SLACK - 1),
        lifecycle(token="tok-1"),
        "duplicate",
        changed=False,
        step=True,
    ),
    Case(
        "a duplicate whose tick is overdue within the slack waits for it",
        drain(tick_id="t-1", tick_due=NOW - LOST_TICK_SLACK + 1),
        lifecycle(token="tok-1"),
        "duplicate",
        changed=False,
        step=False,
    ),
    Case(
        "an event id seen before is a duplicate, whatever its token",
        drain(),
        lifecycle(token="tok-9", event_id="e-old"),
        "duplicate",
        {"lifecycle_token": "tok-1"},
        changed=False,
    ),
    Case(
        "a duplicate of a finished drain never steps",
        drain(phase="done", outcome="drained"),
        lifecycle(token="tok-1"),
        "duplicate",
        {"phase": "done"},
        changed=False,
        step=False,
    ),
    Case(
        "a spent token (completed or refused) is a duplicate, in flight or after the end",
        drain(dead_tokens=["tok-0"]),
        lifecycle(token="tok-0"),
        "duplicate",
        {"lifecycle_token": "tok-1"},
        changed=False,
    ),
    Case(
        "a token the drain answers already is a duplicate",
        drain(other_tokens=[TokenRef(token="tok-2", asg_name="g", hook_name="h", sent_at=NOW)]),
        lifecycle(token="tok-2", event_id="e-replayed"),
        "duplicate",
        changed=False,
    ),
    Case(
        "a replayed completed token never starts an episode",
        done(),
        lifecycle(token="tok-1", event_id="e-replayed"),
        "duplicate",
        {"phase": "done", "episode": 1},
        changed=False,
        step=False,
    ),
    Case(
        "a new token joins a spot drain and keeps its earlier deadline",
        drain(
            reasons=["spot"],
            phase="hard",
            force_at=NOW + 80,
            spot_deadline=NOW + 80,
            lifecycle_token=None,
            lifecycle_state="none",
        ),
        lifecycle(),
        "joined",
        {
            # "scale_in" and its budget come once AWS accepts the token (the step's probe).
            "reasons": ["spot"],
            "phase": "hard",
            "force_at": NOW + 80,
            "lifecycle_token": "tok-2",
            "lifecycle_state": "pending",
            "lifecycle_verified": False,
            "token_sent_at": NOW - 5,
            "last_heartbeat_at": None,
            "seen_events": ["e-old", "e-2"],
        },
    ),
    Case(
        "a new token joins a rebalance drain, its budget to come once AWS accepts it",
        drain(reasons=["rebalance"], force_at=None, lifecycle_token=None, lifecycle_state="none"),
        lifecycle(),
        "joined",
        {"reasons": ["rebalance"], "force_at": None, "phase": "soft", "lifecycle_token": "tok-2"},
    ),
    Case(
        "a second token while one is pending never replaces it: it is answered too",
        drain(force_at=NOW + 100, lifecycle_verified=True),
        lifecycle(),
        "joined",
        {
            "reasons": ["scale_in"],
            "force_at": NOW + 100,
            "lifecycle_token": "tok-1",
            "lifecycle_verified": True,
            "other_tokens": [
                TokenRef(
                    token="tok-2",
                    asg_name="ci-agents",
                    hook_name="fleetdrain-terminating",
                    sent_at=NOW - 5,
                )
            ],
        },
        detail="another lifecycle token: answered too",
    ),
    Case(
        "a new token after a finished drain starts the next episode, soft, with its own budget",
        drain(
            reasons=["rebalance"],
            phase="done",
            outcome="no_tasks",
            outcome_reason="no task left on the instance",
            completed_at=NOW - 10,
            lifecycle_token=None,
            lifecycle_state="none",
            force_at=None,
            forced_at=NOW - 20,
            paused_agents=["a-1"],
            container_instance_arn=CI_ARN,
            dead_tokens=["tok-0"],
        ),
        lifecycle(),
        "started",
        {
            "drain_id": "new-drain",
            "episode": 2,
            "version": 3,
            "phase": "soft",
            "reasons": ["scale_in"],
            "started_at": NOW,
            "force_at": None,
            "forced_at": None,
            "paused_agents": [],
            "outcome": None,
            "completed_at": None,
            "container_instance_arn": None,
            "lifecycle_state": "pending",
            "lifecycle_token": "tok-2",
            "token_sent_at": NOW - 5,
            "dead_tokens": ["tok-0"],
            "seen_events": ["e-old", "e-2"],
            "history": [
                PastEpisode(
                    drain_id="d-1",
                    episode=1,
                    reasons=["rebalance"],
                    started_at=NOW - 300,
                    completed_at=NOW - 10,
                    outcome="no_tasks",
                )
            ],
        },
        detail="episode 2 (the last one ended no_tasks)",
    ),
    Case(
        "a spot deadline still ahead carries over into the next episode",
        done(reasons=["spot"], spot_deadline=NOW + 60, lifecycle_state="none", dead_tokens=[]),
        lifecycle(),
        "started",
        {"reasons": ["scale_in", "spot"], "phase": "hard", "force_at": NOW + 60},
    ),
    Case(
        "a spot deadline of a run that stopped under it does not carry over",
        done(
            reasons=["spot", "stopping"],
            spot_deadline=NOW + 60,
            completed_at=NOW - 30,
            lifecycle_state="none",
            dead_tokens=[],
        ),
        lifecycle(),
        "started",
        {"reasons": ["scale_in"], "phase": "soft", "spot_deadline": None},
    ),
    Case(
        "nor one whose notice came after a stop's drain, for the run that stopped",
        done(
            reasons=["spot"],
            spot_deadline=NOW + 60,
            lifecycle_state="none",
            dead_tokens=[],
            history=[
                PastEpisode(
                    drain_id="d-1",
                    episode=1,
                    reasons=["stopping"],
                    started_at=NOW - 80,
                    completed_at=NOW - 55,
                    outcome="drained",
                )
            ],
        ),
        lifecycle(),
        "started",
        {"reasons": ["scale_in"], "phase": "soft", "spot_deadline": None},
    ),
    Case(
        "a stop that ended before the notice does not void it (the notice is the new run's)",
        done(
            reasons=["spot"],
            spot_deadline=NOW + 60,
            lifecycle_state="none",
            dead_tokens=[],
            history=[
                PastEpisode(
                    drain_id="d-1",
                    episode=1,
                    reasons=["stopping"],
                    started_at=NOW - 400,
                    completed_at=NOW - 300,
                    outcome="drained",
                )
            ],
        ),
        lifecycle(),
        "started",
        {"reasons": ["scale_in", "spot"], "phase": "hard", "force_at": NOW + 60},
    ),
    # ------------------------------------------------------------------ spot notices
    Case(
        "a spot notice starts a hard drain, for an instance of the cluster",
        None,
        spot(),
        "started",
        {
            "drain_id": "new-drain",
            "phase": "hard",
            "reasons": ["spot"],
            "force_at": SPOT_AT_NOW,
            "spot_deadline": SPOT_AT_NOW,
            "lifecycle_state": "none",
            "seen_events": ["e-spot"],
        },
        in_cluster_only=True,
    ),
    Case(
        "a spot notice during a scale-in drain forces earlier, and hard at once",
        drain(phase="soft"),
        spot(),
        "joined",
        {
            "phase": "hard",
            "reasons": ["scale_in", "spot"],
            "force_at": SPOT_AT_NOW,
            "spot_deadline": SPOT_AT_NOW,
            "seen_events": ["e-old", "e-spot"],
        },
        detail="spot notice: deadline moved earlier",
    ),
    Case(
        "a spot notice never moves force_at later",
        drain(force_at=NOW + 10),
        spot(),
        "joined",
        {"force_at": NOW + 10, "spot_deadline": SPOT_AT_NOW, "phase": "hard"},
        detail="spot notice: deadline moved earlier",
    ),
    Case(
        "a spot notice no earlier than the one known is a duplicate",
        drain(reasons=["spot"], phase="hard", spot_deadline=SPOT_AT_NOW, force_at=SPOT_AT_NOW),
        spot(sent=NOW + 5, event_id="e-spot-2"),
        "duplicate",
        {"spot_deadline": SPOT_AT_NOW, "seen_events": ["e-old"]},
        changed=False,
    ),
    Case(
        "the same notice under another event id is a duplicate",
        drain(reasons=["spot"], phase="hard", spot_deadline=SPOT_AT_NOW, force_at=SPOT_AT_NOW),
        spot(event_id="e-spot-2"),
        "duplicate",
        {"seen_events": ["e-old"]},
        changed=False,
    ),
    Case(
        "an earlier spot notice moves the deadline earlier",
        drain(reasons=["spot"], phase="hard", spot_deadline=SPOT_AT_NOW, force_at=SPOT_AT_NOW),
        spot(sent=NOW - 10, event_id="e-spot-2"),
        "joined",
        {"reasons": ["spot"], "spot_deadline": SPOT_AT_NOW - 10, "force_at": SPOT_AT_NOW - 10},
        detail="spot notice: deadline moved earlier",
    ),
    Case(
        "a spot notice seen before is a duplicate",
        drain(seen_events=["e-spot"]),
        spot(),
        "duplicate",
        {"spot_deadline": None, "phase": "soft"},
        changed=False,
    ),
    Case(
        "a spot notice after a finished drain starts the next episode, hard",
        done(),
        spot(),
        "started",
        {
            "drain_id": "new-drain",
            "episode": 2,
            "phase": "hard",
            "reasons": ["spot"],
            "force_at": SPOT_AT_NOW,
            "spot_deadline": SPOT_AT_NOW,
            "lifecycle_token": None,
            "lifecycle_state": "none",
            "dead_tokens": ["tok-1"],
            "history": [PAST],
            "seen_events": ["e-old", "e-spot"],
        },
        detail="episode 2",
        in_cluster_only=True,
    ),
    Case(
        "a spot notice of the interruption a finished drain was for is a duplicate",
        done(reasons=["spot"], spot_deadline=SPOT_AT_NOW - 30),
        spot(event_id="e-spot-again"),
        "duplicate",
        changed=False,
        step=False,
    ),
    Case(
        "a spot warning with no time counts from now",
        None,
        spot(sent=None),
        "started",
        {"force_at": SPOT_AT_NOW, "spot_deadline": SPOT_AT_NOW},
        in_cluster_only=True,
    ),
    # ------------------------------------------------------------------ rebalance
    Case(
        "a rebalance starts a soft drain, for an instance of the cluster",
        None,
        rebalance(),
        "started",
        {
            "phase": "soft",
            "reasons": ["rebalance"],
            "force_at": None,
            "seen_events": ["e-rebalance"],
        },
        in_cluster_only=True,
    ),
    Case(
        "a rebalance only adds a reason to a drain in flight",
        drain(phase="soft"),
        rebalance(),
        "joined",
        {"reasons": ["scale_in", "rebalance"], "phase": "soft", "force_at": NOW + 3300},
        step=False,
    ),
    Case(
        "a second rebalance is a duplicate",
        drain(reasons=["rebalance"]),
        rebalance(event_id="e-rebalance-2"),
        "duplicate",
        changed=False,
    ),
    Case(
        "a rebalance after a finished rebalance drain is a duplicate that never steps",
        done(reasons=["rebalance"], lifecycle_state="none"),
        rebalance(event_id="e-rebalance-2"),
        "duplicate",
        changed=False,
        step=False,
    ),
    Case(
        "a rebalance after another finished drain starts a soft episode",
        done(),
        rebalance(),
        "started",
        {"episode": 2, "phase": "soft", "reasons": ["rebalance"], "force_at": None},
        detail="episode 2",
        in_cluster_only=True,
    ),
    Case(
        "rebalance recommendations can be ignored",
        None,
        rebalance(),
        "ignored",
        None,
        detail="rebalance recommendations are ignored",
        settings=IGNORE_REBALANCE,
    ),
    Case(
        "ignored rebalance recommendations do not touch a drain in flight either",
        drain(),
        rebalance(),
        "ignored",
        None,
        settings=IGNORE_REBALANCE,
    ),
    # ------------------------------------------------------------------ scheduled changes
    Case(
        "a scheduled change starts a soft drain forced before it starts",
        None,
        maintenance(),
        "started",
        {
            "phase": "soft",
            "reasons": ["maintenance"],
            "maintenance_at": NOW + 7200,
            "force_at": NOW + 7200 - 300,
            "seen_events": ["arn:health/1"],
        },
        in_cluster_only=True,
    ),
    Case(
        "a scheduled change with no start time is a soft drain that never forces",
        None,
        maintenance(start=None),
        "started",
        {"phase": "soft", "force_at": None, "maintenance_at": None},
        in_cluster_only=True,
    ),
    Case(
        "a scheduled change during a scale-in forces before it, never later than the budget",
        drain(force_at=NOW + 600),
        maintenance(start=NOW + 3600),
        "joined",
        {"reasons": ["scale_in", "maintenance"], "force_at": NOW + 600, "phase": "soft"},
        detail="scheduled change",
    ),
    Case(
        "a rescheduled change moves the deadline earlier",
        drain(reasons=["maintenance"], maintenance_at=NOW + 7200, force_at=NOW + 6900),
        maintenance(start=NOW + 1000, event_id="arn:health/1@earlier"),
        "joined",
        {"maintenance_at": NOW + 1000, "force_at": NOW + 700},
        detail="scheduled change",
    ),
    Case(
        "a scheduled change no earlier than the one known is a duplicate",
        drain(reasons=["maintenance"], maintenance_at=NOW + 7200, force_at=NOW + 6900),
        maintenance(start=NOW + 9000, event_id="arn:health/2"),
        "duplicate",
        changed=False,
    ),
    Case(
        "a scheduled change after a finished drain starts the next episode",
        done(),
        maintenance(),
        "started",
        {"episode": 2, "phase": "soft", "reasons": ["maintenance"], "force_at": NOW + 6900},
        detail="episode 2",
        in_cluster_only=True,
    ),
    # ------------------------------------------------------------------ stopping instances
    Case(
        "a stopping instance is forced at once",
        None,
        stopping(),
        "started",
        {"phase": "hard", "reasons": ["stopping"], "force_at": NOW},
        in_cluster_only=True,
    ),
    Case(
        "a stopping instance during a soft drain is forced now",
        drain(phase="soft"),
        stopping(state="shutting-down"),
        "joined",
        {"phase": "hard", "reasons": ["scale_in", "stopping"], "force_at": NOW},
        detail="instance shutting-down: forced now",
    ),
    Case(
        "a second state change of a stopping instance is a duplicate",
        drain(reasons=["stopping"], phase="hard", force_at=NOW - 5),
        stopping(event_id="e-shutting-down", state="shutting-down"),
        "duplicate",
        changed=False,
    ),
    Case(
        "an instance shutting down just after its drain left it DRAINING goes as it was left",
        done(draining_at=NOW - 100, completed_at=NOW - 60),
        stopping(state="shutting-down"),
        "duplicate",
        changed=False,
        step=False,
    ),
    Case(
        "an instance stopping just after its drain is looked at again (a warm pool brings it back)",
        done(draining_at=NOW - 100, completed_at=NOW - 60),
        stopping(),
        "started",
        {"episode": 2, "phase": "hard", "force_at": NOW},
        detail="episode 2",
        in_cluster_only=True,
    ),
    Case(
        "an instance stopping long after its drain ended starts a forced episode",
        done(draining_at=NOW - 5000),
        stopping(),
        "started",
        {"episode": 2, "phase": "hard", "force_at": NOW, "reasons": ["stopping"]},
        detail="episode 2",
        in_cluster_only=True,
    ),
    Case(
        "an instance stopping after a drain that left it ACTIVE starts a forced episode",
        done(reasons=["rebalance"], outcome="no_tasks", completed_at=NOW - 30),
        stopping(),
        "started",
        {"episode": 2, "phase": "hard", "force_at": NOW},
        detail="episode 2",
        in_cluster_only=True,
    ),
    # ------------------------------------------------------------------ ticks
    Case(
        "a tick with no drain is ignored",
        None,
        tick(),
        "ignored",
        None,
        detail="no drain in flight",
    ),
    Case("a tick of a finished drain is ignored", drain(phase="done"), tick(), "ignored", None),
    Case(
        "a tick of another drain is ignored",
        drain(),
        tick(drain_id="d-0"),
        "ignored",
        None,
        detail="tick of another drain",
    ),
    Case(
        "the pending tick clears itself and steps",
        drain(tick_id="t-1", tick_due=NOW),
        tick(),
        "stepped",
        {"tick_id": None, "tick_due": None},
    ),
    Case(
        "an older tick steps and leaves the pending one",
        drain(tick_id="t-2", tick_due=NOW + 15),
        tick("t-1"),
        "stepped",
        {"tick_id": "t-2", "tick_due": NOW + 15},
    ),
    # ------------------------------------------------------------------ ECS events
    Case(
        "a stopped task is noted and steps",
        drain(),
        stopped(),
        "stepped",
        {"last_task_stopped_at": NOW - 2, "seen_events": ["e-old", "e-stop"]},
    ),
    Case(
        "an earlier stop never moves the last stop back",
        drain(last_task_stopped_at=NOW),
        stopped(when=NOW - 30),
        "stepped",
        {"last_task_stopped_at": NOW},
    ),
    Case(
        "a stopped task seen before is a duplicate",
        drain(seen_events=["e-stop"]),
        stopped(),
        "duplicate",
        {"last_task_stopped_at": None},
        changed=False,
    ),
    Case("a stopped task with no drain is ignored", None, stopped(), "ignored", None),
    Case(
        "a duplicate whose pending tick comes after the force steps (its first step died)",
        drain(seen_events=["e-stop"], force_at=NOW, tick_id="t-1", tick_due=NOW + 30),
        stopped(),
        "duplicate",
        {"force_at": NOW},
        changed=False,
        step=True,
    ),
    Case(
        "a duplicate whose pending tick comes by the force waits for it",
        drain(seen_events=["e-stop"], force_at=NOW + 30, tick_id="t-1", tick_due=NOW + 30),
        stopped(),
        "duplicate",
        {"force_at": NOW + 30},
        changed=False,
        step=False,
    ),
    Case(
        "a DRAINING event changes no drain (ours or someone else's)",
        drain(),
        draining(),
        "ignored",
        None,
    ),
    Case(
        "a DRAINING event changes no drain, DRAINING already",
        drain(draining_at=NOW - 20, tick_id="t-1", tick_due=NOW + 5),
        draining(),
        "ignored",
        None,
    ),
]


def run(case: Case, before: DrainRecord | None) -> Merge:
    return merge(before, case.signal, NOW, case.settings, new_id=lambda: "new-drain")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_merge(case: Case) -> None:
    before = copy.deepcopy(case.before)
    result = run(case, before)
    assert before == case.before, "the merge changed the record it was given"
    assert result.action == case.action
    assert result.detail.startswith(case.detail)
    if case.after is None:
        assert result.record is None
        return
    assert result.record is not None
    assert (result.changed, result.step) == (case.changed, case.step)
    assert result.in_cluster_only == case.in_cluster_only
    got = {name: getattr(result.record, name) for name in case.after}
    assert got == case.after
    if case.before is not None and not case.changed:
        assert result.record == case.before  # "no write" must mean nothing changed


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_changed_record_shares_nothing_with_the_one_given(case: Case) -> None:
    # The caller may re-merge the record it read after a lost race: it must still be as read.
    before = copy.deepcopy(case.before)
    result = run(case, before)
    if result.record is not None and before is not None and result.changed:
        assert result.record is not before
        assert result.record.reasons is not before.reasons
        assert result.record.seen_events is not before.seen_events
        assert result.record.agent_ids is not before.agent_ids


ADDING = [
    c
    for c in CASES
    if c.action in ("started", "joined")
    or (c.action == "stepped" and isinstance(c.signal, TaskStoppedSignal))
]


@pytest.mark.parametrize("case", ADDING, ids=[c.name for c in ADDING])
def test_the_same_event_merged_twice_is_a_duplicate(case: Case) -> None:
    first = run(case, copy.deepcopy(case.before))
    assert first.record is not None
    again = run(case, first.record)
    assert again.action == "duplicate"
    assert not again.changed
    assert again.record == first.record


def test_a_record_remembers_the_last_events_only() -> None:
    rec = drain(seen_events=[])
    for n in range(MAX_SEEN_EVENTS + 8):
        rec.remember(f"e-{n}")
    rec.remember("e-39")  # known: not added twice
    rec.remember("")  # no id: nothing to remember
    assert rec.seen_events == [f"e-{n}" for n in range(8, MAX_SEEN_EVENTS + 8)]
    assert rec.saw("e-39") and not rec.saw("e-0") and not rec.saw("")


def test_a_lease_holds_until_it_expires() -> None:
    assert not drain().leased(NOW)
    held = drain(lease_id="step-1", lease_until=NOW + 1)
    assert held.leased(NOW) and not held.leased(NOW + 1)


# ------------------------------------------------------------------ the core on in-memory ports


class EmptyCluster:
    """``EcsPort``: the instances of the cluster, with no task on them."""

    def __init__(self, members: dict[str, str]) -> None:
        self.members = members
        self.draining: list[str] = []

    def find_container_instance(self, instance_id: str) -> ContainerInstance | None:
        arn = self.members.get(instance_id)
        return ContainerInstance(arn, instance_id, "ACTIVE") if arn else None

    def tasks_on(
        self, container_instance_arn: str, known: Sequence[TaskInfo] = (), exact: bool = False
    ) -> list[TaskInfo]:
        return []

    def saw_stopped(self, container_instance_arn: str, task_arn: str) -> None:
        raise AssertionError("no task event in these tests")

    def set_draining(self, arn: str) -> None:
        self.draining.append(arn)

    def stop_task(self, task_arn: str, reason: str) -> None:
        raise AssertionError("no task to stop")

    def protected(self, task_arns: list[str]) -> set[str]:
        return set()


class NoLifecycle:
    def heartbeat(self, asg_name: str, hook_name: str, token: str, instance_id: str) -> None:
        raise AssertionError("no lifecycle action")

    def complete(
        self, asg_name: str, hook_name: str, token: str, instance_id: str, result: str = ""
    ) -> None:
        raise AssertionError("no lifecycle action")


class NoTicks:
    def schedule(
        self,
        instance_id: str,
        drain_id: str,
        tick_id: str,
        delay: int,
        record: DrainRecord | None = None,
    ) -> None:
        raise AssertionError("a finished drain schedules no tick")


def controller(members: dict[str, str]) -> tuple[DrainController, MemoryStore]:
    store = MemoryStore()
    ctl = DrainController(
        SETTINGS, store, EmptyCluster(members), None, NoLifecycle(), NoTicks(), clock=lambda: NOW
    )
    return ctl, store


@pytest.mark.parametrize("signal", [spot(), rebalance()], ids=["spot", "rebalance"])
def test_an_ec2_notice_for_an_instance_of_another_cluster_is_ignored(signal: Signal) -> None:
    ctl, store = controller({})
    result = ctl.handle(signal)
    assert (result.action, result.detail) == ("ignored", "instance is not in the cluster")
    assert store.records == {}


@pytest.mark.parametrize("signal", [spot(), rebalance()], ids=["spot", "rebalance"])
def test_an_ec2_notice_for_an_instance_of_the_cluster_starts_its_drain_there(
    signal: Signal,
) -> None:
    ctl, store = controller({IID: CI_ARN})
    result = ctl.handle(signal)
    assert result.action == "started"
    rec = store.records[IID]
    assert rec.container_instance_arn == CI_ARN
    assert store.links == {CI_ARN: IID}
    # Nothing runs on it: the first step ends the drain.
    assert (rec.phase, rec.outcome, rec.lease_id) == ("done", "no_tasks", None)
