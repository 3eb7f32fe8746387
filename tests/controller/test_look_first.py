"""A step looks before it claims (issue 12): a drain that only waits writes once a step and
reads its tasks from ECS only every ``core.TASKS_LOOK_EVERY``; what it acts on it reads afresh.

The world is ``test_drains``' (moto, the gap fillers, the embedded coordinator, the real
handlers); the controller's ECS port is wrapped to count its task reads.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from fleetdrain.controller.drain import core
from tests.controller.test_drains import World, make_world

# Slow as test_drains: whole drains in moto with the coordinator on loopback.
pytestmark = pytest.mark.slow


@pytest.fixture
def world(aws_env: None) -> Iterator[World]:
    with make_world() as w:
        yield w


class CountingFleet:
    """The controller's ECS port, counting ``tasks_on`` (each is a ListTasks and more)."""

    def __init__(self, fleet: Any) -> None:
        self._fleet = fleet
        self.task_reads: list[float] = []
        self.clock = fleet._clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fleet, name)

    def tasks_on(self, arn: str, known: Any = (), exact: bool = False) -> Any:
        self.task_reads.append(self.clock())
        return self._fleet.tasks_on(arn, known, exact=exact)


def test_a_waiting_soft_drain_writes_once_a_step_and_reads_its_tasks_every_two_minutes(
    world: World,
) -> None:
    (a,) = world.build(instances=1)
    world.controller(tick_interval=20, heartbeat_interval=60)
    world.add_agent(a, job_seconds=900)
    world.add_agent(a)
    world.emit(world.gaps.begin_termination(a))
    rec = world.record(a)
    assert rec.phase == "soft" and rec.looked_at is not None
    fleet = CountingFleet(world.ctl.fleet)
    world.ctl.fleet = fleet  # type: ignore[assignment]
    start = world.clock()
    steps, version = rec.steps, rec.version
    world.advance(300)
    rec = world.record(a)
    assert rec.phase == "soft", "the job still runs"
    waited = rec.steps - steps
    # Ticks of 20 s growing to half the wait, up to 60 s (the default): at 20, 40, 60, 90, 135,
    # 195, 255 and (a heartbeat due) one more: at most one of them missed.
    assert waited >= 7, f"the tick stepped the drain all along ({waited})"
    # No claim: each step that only waited wrote the record once.
    assert rec.version - version == waited
    # ECS was read once in each TASKS_LOOK_EVERY, not at every step.
    reads = fleet.task_reads
    assert 1 <= len(reads) <= 300 // core.TASKS_LOOK_EVERY + 1
    gaps = [later - earlier for earlier, later in itertools.pairwise(reads)]
    assert all(gap >= core.TASKS_LOOK_EVERY for gap in gaps), gaps
    assert reads[0] - start >= core.TASKS_LOOK_EVERY - 1


def test_a_task_placed_during_a_soft_drain_is_found_and_paused(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(tick_interval=20, heartbeat_interval=60)
    world.add_agent(a, job_seconds=900)
    world.emit(world.gaps.begin_termination(a))
    world.advance(30)  # a look that took the tasks as they were
    late = world.add_agent(a)  # ECS placed another agent on the instance (it is still ACTIVE)
    placed = world.clock()
    world.run_until(
        lambda: world.coord.agent(late.agent_id).paused,
        limit=core.TASKS_LOOK_EVERY + 3 * 20,
    )
    found = world.clock() - placed
    assert found <= core.TASKS_LOOK_EVERY + 20
    rec = world.record(a)
    assert late.task_arn in [row[0] for row in rec.looked_tasks] and rec.phase == "soft"


def test_a_look_that_finds_the_job_done_acts_on_a_fresh_read_of_ecs(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(tick_interval=20, heartbeat_interval=60)
    busy = world.add_agent(a, job_seconds=60)
    world.add_agent(a)
    world.emit(world.gaps.begin_termination(a))
    began = world.clock()
    fleet = CountingFleet(world.ctl.fleet)
    world.ctl.fleet = fleet  # type: ignore[assignment]
    # The job ends well inside TASKS_LOOK_EVERY: the look that sees it idle acts, and what it
    # acts on (DRAINING) it read from ECS first.
    world.run_until(lambda: world.record(a).draining_at is not None, limit=120)
    rec = world.record(a)
    assert rec.draining_at is not None and rec.draining_at - began < core.TASKS_LOOK_EVERY
    assert fleet.task_reads and fleet.task_reads[-1] == rec.looked_at
    assert world.coord.job(busy.job_id).state == "finished"


def test_a_hard_drain_waits_on_what_it_read_after_draining_and_reads_ecs_on_task_events(
    world: World,
) -> None:
    (a,) = world.build(instances=1)
    world.controller(tick_interval=20)
    busy = world.add_agent(a, job_seconds=900, ignores_sigterm=True)  # drains until forced
    idle = world.add_agent(a)
    world.emit(world.gaps.spot_interruption(a))
    rec = world.record(a)
    assert rec.phase == "hard" and rec.draining_at is not None
    assert rec.looked_at is not None and rec.looked_at >= rec.draining_at
    # The idle agent exits on its SIGTERM: its task's STOPPED event makes a step read ECS
    # (what the last read left, both tasks, would not have shown it gone).
    world.run_until(lambda: idle.exited, limit=30)
    world.pump()
    assert [row[0] for row in world.record(a).looked_tasks] == [busy.task_arn]
    fleet = CountingFleet(world.ctl.fleet)
    world.ctl.fleet = fleet  # type: ignore[assignment]
    # Then only ticks, until the force: they take the tasks as that read left them.
    steps = world.record(a).steps
    force_at = world.record(a).force_at
    assert force_at is not None
    world.advance(force_at - world.clock() - 1)
    assert world.record(a).steps >= steps + 2
    assert fleet.task_reads == [], "the ticks read no tasks"
    # The force acts: on tasks read afresh.
    world.advance(2)
    forced_at = world.record(a).forced_at
    assert forced_at is not None and fleet.task_reads[0] == forced_at
