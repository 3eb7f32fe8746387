"""Drill scenarios for issue 11: one instance drained more than once, and the two new ways an
instance goes. All "after": nothing may be lost.

- ``rebalance-then-spot``: a rebalance recommendation on an idle instance ends at once and
  leaves it in use; an agent is placed there and takes a build that cannot finish in two
  minutes; the spot warning then starts the instance's next drain: forced, reported
  ``agent_stop``, retried elsewhere, passes.
- ``rebalance-then-scale-in``: the same rebalance, then the scale-in that ``CapacityRebalance``
  starts once the replacement is up: a soft drain with its own budget (the busy agent is not
  SIGTERMed at once), the build finishes there, the hook completes.
- ``stopped-outside-the-group``: ``EC2 Instance State-change Notification`` ``stopping`` (the
  console, the API): forced at once, the build reported before the instance is gone (a minute
  later here), retried elsewhere, passes.
- ``scheduled-change``: an AWS Health scheduled change (instance retirement) a while ahead: a
  soft drain, the build finishes, the instance is left DRAINING and empty before it starts.

Registered by :data:`SPECS` here (the drill's own table lives in :mod:`fleetdrain.drill.scenarios`
and its runner's, which name each scenario's kind and description).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from fleetdrain.drill.scenarios import (
    Run,
    Spec,
    expect_clean_exit,
    expect_hook_continued,
)

#: How long an instance stopped from outside the group takes to go down (drill seconds): the
#: OS shuts down, Docker stops the containers.
STOP_TAKES = 60.0
#: How far ahead of its start the scheduled change is announced (drill seconds; AWS Health
#: gives days or weeks, the drill a few minutes).
CHANGE_AHEAD = 900.0


def _idle_rebalance(run: Run, instance: int) -> None:
    """A rebalance recommendation on an instance with no agent: the drain ends at once and
    the instance stays in use (ACTIVE)."""
    run.fleet.runtime.rebalance_recommendation(run.fleet.instances[instance])
    rec = run.wait_drain_done(instance, 60)
    if rec.outcome != "no_tasks":
        run.note(f"the idle rebalance ended {rec.outcome}, not no_tasks")


def _later(run: Run, drill_seconds: float, what: str, action: Callable[[], None]) -> None:
    """``action`` in ``drill_seconds`` (a thread of its own)."""
    threading.Timer(run.wall(drill_seconds), action).start()


def rebalance_then_spot(run: Run) -> None:
    run.agent_definition()
    _idle_rebalance(run, 0)
    doomed = run.start(0, "rebalance-spot-a1")  # placed after the rebalance drain ended
    job = run.job("rebalance-then-spot", 600, first_attempt_only=True)
    run.running(job, on="rebalance-spot-a1")
    run.start(1, "rebalance-spot-b1")  # where the retry can run
    run.fleet.runtime.spot_interruption(run.fleet.instances[0])
    run.outcomes(400)
    run.fleet.runtime.wait_stopped([doomed], run.wall(150))
    rec = run.drain(0)
    if rec is None or rec.episode < 2:
        run.note("the spot warning did not start a drain of its own")
    first = run.fleet.coord.job(job)
    if first.signal_reason != "agent_stop":
        run.note(f"the first attempt was reported {first.signal_reason}, not agent_stop")
    if doomed.exit_code == 137:
        run.note("the agent was SIGKILLed with the instance")


def rebalance_then_scale_in(run: Run) -> None:
    run.agent_definition()
    _idle_rebalance(run, 0)
    busy = run.start(0, "rebalance-scale-in-a1")
    job = run.job("rebalance-then-scale-in", 200, instance=0)
    run.running(job, on="rebalance-scale-in-a1")
    run.start(1, "rebalance-scale-in-b1")
    run.fleet.runtime.scale_in(run.fleet.instances[0])  # CapacityRebalance, once replaced
    run.outcomes(400)
    rec = run.wait_drain_done(0, 200)
    run.fleet.runtime.wait_stopped([busy], run.wall(60))
    expect_clean_exit(run, [busy])
    expect_hook_continued(run, 0)
    if rec.episode < 2 or rec.forced_at is not None:
        run.note(
            f"episode {rec.episode}, forced={rec.forced_at is not None}: not its own soft drain"
        )
    if run.fleet.coord.step("rebalance-then-scale-in").retries:
        run.note("the build was retried instead of finishing where it ran")


def stopped_outside_the_group(run: Run) -> None:
    run.agent_definition()
    doomed = run.start(0, "stopped-a1")
    job = run.job("stopped-outside-the-group", 600, first_attempt_only=True)
    run.running(job, on="stopped-a1")
    run.start(1, "stopped-b1")
    runtime, instance = run.fleet.runtime, run.fleet.instances[0]
    with runtime.lock:
        runtime.gaps.instance_state_change(instance, "stopping")
    runtime.record("instance", instance, "stopping (stopped from the console)", {})
    _later(
        run,
        STOP_TAKES,
        f"stop-{instance}",
        lambda: runtime.terminate_instance(instance, "stopped from the console"),
    )
    run.outcomes(400)
    run.fleet.runtime.wait_stopped([doomed], run.wall(STOP_TAKES + 30))
    first = run.fleet.coord.job(job)
    if first.signal_reason != "agent_stop":
        run.note(f"the first attempt was reported {first.signal_reason}, not agent_stop")
    if doomed.exit_code == 137:
        run.note("the agent died with the instance")
    rec = run.drain(0)
    if rec is None or rec.reasons != ["stopping"]:
        run.note("no forced drain for the stopping instance")


def scheduled_change(run: Run) -> None:
    run.agent_definition()
    busy = run.start(0, "scheduled-a1")
    job = run.job("scheduled-change", 120, instance=0)
    run.running(job, on="scheduled-a1")
    run.start(1, "scheduled-b1")
    runtime, instance = run.fleet.runtime, run.fleet.instances[0]
    start = run.fleet.clock() + CHANGE_AHEAD
    with runtime.lock:
        runtime.gaps.scheduled_change([instance], start)
    runtime.record("instance", instance, "AWS Health: instance retirement scheduled", {})
    run.outcomes(400)
    rec = run.wait_drain_done(0, 300)
    run.fleet.runtime.wait_stopped([busy], run.wall(60))
    expect_clean_exit(run, [busy])
    if rec.outcome != "drained" or rec.forced_at is not None:
        run.note(f"drain outcome {rec.outcome}, forced={rec.forced_at is not None}")
    if run.fleet.runtime.tasks_on(instance):
        run.note("tasks still run on the instance to be retired")
    if run.fleet.coord.step("scheduled-change").retries:
        run.note("the build was retried instead of finishing before the change")


SPECS: dict[str, Spec] = {
    "rebalance-then-spot": Spec(
        "after",
        "rebalance on an idle instance, an agent placed there, then the spot warning: a new "
        "drain, forced, agent_stop, retried",
        2,
        rebalance_then_spot,
    ),
    "rebalance-then-scale-in": Spec(
        "after",
        "rebalance on an idle instance, then CapacityRebalance's scale-in under a build: soft "
        "drain on its own budget, the build finishes, hook completes",
        2,
        rebalance_then_scale_in,
    ),
    "stopped-outside-the-group": Spec(
        "after",
        "instance stopped from the console under a long build: forced at once, agent_stop, retried",
        2,
        stopped_outside_the_group,
    ),
    "scheduled-change": Spec(
        "after",
        "AWS Health instance retirement ahead: soft drain, the build finishes, instance retired",
        2,
        scheduled_change,
    ),
}
