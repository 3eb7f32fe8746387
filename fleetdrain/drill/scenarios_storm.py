"""The drill's spot storm (issue 12): many instances get their two-minute spot warning in the
same AWS second, in an organization of a thousand agents, against Buildkite's REST limit.

``spot-storm``: :data:`STORM`'s interrupted instances (one agent each) get their notices in one
AWS second; about half of them run a build that cannot finish in the two minutes, the others
idle; one survivor instance (two from 20 agents up), never interrupted, takes the retries. The
organization is padded with background agents to :data:`ORG_AGENTS` (registered and connected
in the coordinator, no process, on no instance of this fleet:
:data:`~fleetdrain.drill.world.fleet.BACKGROUND_TAG`), so a listing of it takes ten pages; the
coordinator enforces the REST limit (200 a minute, on the drill's AWS clock:
:func:`~fleetdrain.drill.world.fleet.local_fleet`). The organization's other users can spend
from the same limit (:data:`ORG_TRAFFIC`, requests an AWS minute; none by default, see there).

Sizing: every agent is a real process (and a busy one runs its job beside it), so the storm is
as big as the machine can run side by side: :data:`PROCESSES_PER_CORE` agents a core, at least
:data:`MIN_PROCESSES`, at most :data:`MAX_PROCESSES` (2 cores: 8 agents, 7 interrupted of which
3 busy, 1 survivor; 5 cores or more: 20 agents, 18 interrupted of which 9 busy, 2 survivors).
``bench/controller.py`` has the figures for 100 and 1,000 instances (simulated agents).

Verdict (an "after" scenario: nothing may be lost): each interrupted build's first attempt ends
(cancelled and reported ``agent_stop``, or finished) before its instance goes, is retried and
passes; every drain ends; no agent dies with its instance. The figures (REST requests and their
peak in a minute window against the limit, 429s, forced stops through the coordinator against
fallbacks to ECS ``StopTask``) go into a note of their own (:data:`~fleetdrain.drill.metrics.
FIGURES`) that never fails the scenario: fallbacks are the controller's budget's decision, and
allowed; a lost build or a drain left unfinished (by 429s or anything else) fails it.

Registered by :data:`SPECS` here; the runner names it in its own table (by name only, like the
issue-11 sequences: outside the default set).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from fleetdrain.agent.buildkite.models import RegisterRequest
from fleetdrain.drill.coordinator import RateStats
from fleetdrain.drill.metrics import FIGURES
from fleetdrain.drill.pace import cores
from fleetdrain.drill.scenarios import FAMILY, Run, Spec
from fleetdrain.drill.world.fleet import BACKGROUND_TAG, REGION
from fleetdrain.drill.world.org_traffic import OrgTraffic
from fleetdrain.drill.world.task_runtime import SPOT_NOTICE_SECONDS, RunningTask

NAME = "spot-storm"
#: The same storm, deployed with ``CoordinatorGraphqlUrl``.
NAME_GRAPHQL = "spot-storm-graphql"
#: Agents a core the storm runs (each a Python process; a busy one runs its job beside it), the
#: most (the issue's "20 instances at once") and the fewest (one busy, one idle, one survivor).
PROCESSES_PER_CORE = 4
MAX_PROCESSES = 20
MIN_PROCESSES = 3
#: The organization's size, every agent counted; Buildkite's REST listing gives 100 a page.
ORG_AGENTS = 1000
PAGE_SIZE = 100
#: REST requests the organization's other users make an AWS minute during the storm: 150 of
#: the 200 leaves the controller the reserves alone (a pause leaves 50, so none but the first
#: few get out; a read leaves 20; a forced stop may spend the last), as a busy organization
#: would. The controller's REST client runs on the drill's clock (its waits too), so a wait for
#: the window is AWS seconds, not wall seconds under the world's lock.
ORG_TRAFFIC = 150.0
#: A build the two minutes cannot hold (drill seconds; its retry is quick).
BUILD_SECONDS = 600.0
#: The notices go out within this many AWS seconds of each other (one second).
SAME_SECOND = 1.0


@dataclass(frozen=True)
class StormSize:
    """How big the storm is on a machine."""

    #: Instances interrupted (one agent each) and, of them, those running a build.
    storm: int
    busy: int
    #: Instances never interrupted, where the retries run (one agent each).
    survivors: int
    #: Agents in the organization, this fleet's included.
    org_agents: int = ORG_AGENTS

    @property
    def instances(self) -> int:
        """Instances (and agent processes: one an instance) the fleet has."""
        return self.storm + self.survivors

    @property
    def idle(self) -> int:
        return self.storm - self.busy

    @property
    def background(self) -> int:
        """Background agents that pad the organization to :attr:`org_agents`."""
        return max(0, self.org_agents - self.instances)

    @property
    def listing_pages(self) -> int:
        """Requests one listing of the organization takes."""
        return max(1, math.ceil(max(self.org_agents, self.instances) / PAGE_SIZE))


def storm_size(n_cores: int, org_agents: int = ORG_AGENTS) -> StormSize:
    """The storm for a machine of ``n_cores``: :data:`PROCESSES_PER_CORE` agents a core (at
    least :data:`MIN_PROCESSES`, at most :data:`MAX_PROCESSES`), one survivor for every ten
    (at least one), the rest interrupted, half of them (rounded down, at least one) busy."""
    processes = max(MIN_PROCESSES, min(MAX_PROCESSES, PROCESSES_PER_CORE * max(1, n_cores)))
    survivors = max(1, processes // 10)
    storm = processes - survivors
    busy = max(1, storm // 2)
    return StormSize(storm=storm, busy=busy, survivors=survivors, org_agents=org_agents)


#: This machine's storm (the fleet is built for it before the scenario's body runs).
STORM = storm_size(cores())


# ---------------------------------------------------------------------------- figures


@dataclass(frozen=True)
class DrainFigures:
    """What one drain of the storm did (read from its record)."""

    instance_id: str
    #: A drain of the instance started (a record exists), and it ended.
    started: bool
    done: bool
    forced: bool
    #: Agents stopped with force through the coordinator.
    coordinator_stops: int
    #: Tasks SIGTERMed with ECS StopTask by the drain (the fallback: the coordinator could not
    #: be used; DRAINING stops the service tasks without it).
    stop_tasks: int
    fallback: bool


def drain_figures(instance_id: str, rec: Any) -> DrainFigures:
    """A drain record's figures (``rec`` None: no drain started)."""
    if rec is None:
        return DrainFigures(instance_id, False, False, False, 0, 0, False)
    return DrainFigures(
        instance_id=instance_id,
        started=True,
        done=rec.phase == "done",
        forced=rec.forced_at is not None,
        coordinator_stops=len(rec.stopped_agents),
        stop_tasks=len(rec.stopped_tasks),
        fallback=bool(rec.fallback),
    )


@dataclass(frozen=True)
class StormFigures:
    """The storm's figures, for its note (:meth:`note`), its timeline and its test."""

    size: StormSize
    #: REST requests the coordinator's limit counted (allowed and refused, the organization's
    #: other users' included), the most in one fixed minute window (what the limit counts) and
    #: in any 60 s, the limit, and the 429s.
    requests: int
    window_peak: int
    sliding_peak: int
    limit: int | None
    limited: int
    drains: tuple[DrainFigures, ...]
    #: AWS seconds between the first notice and the last (0: the same second).
    notice_spread: float
    #: Of the requests and 429s, the organization's other users' (:class:`OrgTraffic`).
    others: int = 0
    others_limited: int = 0

    @property
    def controller_requests(self) -> int:
        return self.requests - self.others

    @property
    def controller_429s(self) -> int:
        return self.limited - self.others_limited

    @property
    def done(self) -> int:
        return sum(1 for d in self.drains if d.done)

    @property
    def forced(self) -> int:
        return sum(1 for d in self.drains if d.forced)

    @property
    def coordinator_stops(self) -> int:
        return sum(d.coordinator_stops for d in self.drains)

    @property
    def stop_tasks(self) -> int:
        return sum(d.stop_tasks for d in self.drains)

    @property
    def fallback_drains(self) -> int:
        return sum(1 for d in self.drains if d.fallback or d.stop_tasks)

    def per_instance(self) -> float:
        """Controller requests per interrupted instance."""
        return self.controller_requests / max(1, self.size.storm)

    def fields(self) -> dict[str, float | int | None]:
        """The figures by name (the note's, as data: the timeline's ``storm figures`` event)."""
        return {
            "instances": self.size.storm,
            "busy": self.size.busy,
            "org_agents": self.size.org_agents,
            "listing_pages": self.size.listing_pages,
            "requests": self.requests,
            "controller_requests": self.controller_requests,
            "requests_per_instance": round(self.per_instance(), 1),
            "peak_per_minute": self.window_peak,
            "sliding_peak": self.sliding_peak,
            "limit": self.limit,
            "rate_limited": self.limited,
            "controller_429s": self.controller_429s,
            "forced": self.forced,
            "coordinator_stops": self.coordinator_stops,
            "stop_task_fallbacks": self.stop_tasks,
            "fallback_drains": self.fallback_drains,
            "drains_done": self.done,
            "notice_spread": self.notice_spread,
            "other_users_requests": self.others,
        }

    def note(self) -> str:
        """One line, starting with :data:`~fleetdrain.drill.metrics.FIGURES`."""
        s = self.size
        limit = "no limit" if self.limit is None else f"limit {self.limit}"
        others = f", the org's other users' {self.others} included" if self.others else ""
        return (
            f"{FIGURES}{s.storm} instances ({s.busy} busy) interrupted within "
            f"{self.notice_spread:.0f} s in a {s.org_agents}-agent org ({s.listing_pages} pages "
            f"a listing); coordinator: {self.requests} REST requests{others} (the controller's "
            f"{self.per_instance():.1f} an instance), peak {self.window_peak} in a minute "
            f"window ({limit}; {self.sliding_peak} in any 60 s), 429s {self.limited} (the "
            f"controller's {self.controller_429s}); forced drains {self.forced}: "
            f"{self.coordinator_stops} forced stops through the coordinator, {self.stop_tasks} "
            f"fallbacks to ECS StopTask ({self.fallback_drains} drains); drains done "
            f"{self.done}/{len(self.drains)}"
        )


def storm_figures(
    size: StormSize,
    stats: RateStats,
    drains: Iterable[DrainFigures],
    notice_times: Sequence[float],
    traffic: OrgTraffic | None = None,
) -> StormFigures:
    """The figures from what the coordinator's limit counted, the drains' records, the
    notices' times (AWS epoch seconds) and the organization's other users' traffic."""
    spread = max(notice_times) - min(notice_times) if notice_times else 0.0
    return StormFigures(
        size=size,
        requests=stats.requests,
        window_peak=stats.window_peak,
        sliding_peak=stats.peak,
        limit=stats.limit,
        limited=stats.limited,
        drains=tuple(drains),
        notice_spread=spread,
        others=traffic.sent if traffic is not None else 0,
        others_limited=traffic.refused if traffic is not None else 0,
    )


# ---------------------------------------------------------------------------- the scenario


def spot_storm(run: Run, size: StormSize | None = None, org_traffic: float = ORG_TRAFFIC) -> None:
    size = size or STORM
    fleet = run.fleet
    run.agent_definition()
    storm = list(range(size.storm))
    busy, idle = storm[: size.busy], storm[size.busy :]
    survivors = list(range(size.storm, size.instances))
    # The busy agents first, alone: each takes one of the builds.
    doomed = _start_all(run, busy)
    jobs = [run.job(f"{NAME}-{n + 1}", BUILD_SECONDS, first_attempt_only=True) for n in busy]
    fleet.wait(
        lambda: all(fleet.coord.job(j).state == "running" for j in jobs),
        run.wall(300),
        "every storm build to run",
    )
    doomed += _start_all(run, idle)
    _start_all(run, survivors)  # where the retries run
    # Padded last: the background agents never heartbeat, and are declared lost three AWS
    # minutes after they connect (later than the storm needs them).
    _pad_organization(run, size.background)
    ids = [fleet.instances[n] for n in storm]
    traffic = OrgTraffic(fleet.coord.rest_rate, org_traffic, run.wall(60))
    with traffic:
        notice_times, reclaim_at = _storm(run, ids)
        run.outcomes(400)
        fleet.runtime.wait_stopped(doomed, run.wall(SPOT_NOTICE_SECONDS + 30))
        with contextlib.suppress(TimeoutError):
            fleet.wait(lambda: all(_done(run, i) for i in ids), run.wall(60), "the drains to end")
    _judge_builds(run, jobs, reclaim_at)
    _judge_agents(run, doomed)
    with fleet.lock:
        records = {iid: fleet.controller.store.get(iid) for iid in ids}
    drains = [drain_figures(iid, records[iid]) for iid in ids]
    stats = fleet.coord.rest_rate.stats()
    figures = storm_figures(size, stats, drains, notice_times, traffic)
    for d in drains:
        if not d.done:
            rec = records[d.instance_id]
            phase = "never started" if rec is None else f"phase {rec.phase}"
            run.note(f"the drain of {d.instance_id} did not end ({phase}; {stats.limited} 429s)")
    run.timeline("note", "coordinator", "storm figures", **figures.fields())
    run.note(figures.note())


def spot_storm_graphql(run: Run) -> None:
    """:func:`spot_storm` with the stack's ``CoordinatorGraphqlUrl`` set: every drain finds
    its agents with GraphQL lookups (one request a look, on GraphQL's own points), so the
    REST budget carries only the pauses and the forced stops."""
    spot_storm(run)
    lookups = run.fleet.coord.graphql_rate.stats()
    if not lookups.requests:
        run.note("no drain found its agents with GraphQL: CoordinatorGraphqlUrl was not used")
        return
    run.timeline(
        "note",
        "coordinator",
        "graphql figures",
        lookups=lookups.requests,
        rate_limited=lookups.limited,
    )
    run.note(
        f"{FIGURES}GraphQL: {lookups.requests} lookups "
        f"({lookups.requests / STORM.storm:.1f} an instance), 429s {lookups.limited}"
    )


def _start_all(run: Run, instances: Sequence[int]) -> list[RunningTask]:
    """An agent on each of these instances (``storm-<n>``), started together, connected."""
    fleet = run.fleet
    names = [f"storm-{n + 1:02d}" for n in instances]
    tasks = [
        fleet.runtime.run_task(fleet.instances[n], FAMILY, name=name)
        for n, name in zip(instances, names, strict=True)
    ]
    run.tasks.extend(tasks)

    def connected() -> bool:
        agents = [fleet.coord.agent_named(name) for name in names]
        return all(a is not None and a.connection_state == "connected" for a in agents)

    fleet.wait(connected, run.wall(300), f"{len(names)} agent(s) to connect")
    return tasks


def _pad_organization(run: Run, count: int) -> None:
    """``count`` background agents in the organization (as ``bench/controller.py``'s
    ``other_agents``: tagged with a task of another cluster), connected."""
    coord = run.fleet.coord
    for n in range(count):
        reg = coord.register(
            coord.registration_token,
            RegisterRequest(
                name=f"elsewhere-{n:04d}",
                meta_data=[
                    f"ecs:task-arn=arn:aws:ecs:{REGION}:1:task/other/{n:06d}",
                    BACKGROUND_TAG,
                ],
            ),
        )
        coord.connect(reg.access_token, {})
    run.timeline("note", "coordinator", f"organization padded with {count} background agents")


def _storm(run: Run, ids: Sequence[str]) -> tuple[list[float], float]:
    """Every one of these instances' spot notice in one AWS second; the notices' times (AWS
    epoch seconds, as the events give them) and when the instances go (monotonic)."""
    fleet = run.fleet
    # From the start of an AWS second, so that the notices do not straddle two.
    time.sleep(run.wall(1.0 - fleet.clock() % 1.0))
    with fleet.lock:  # nothing else runs in the world meanwhile: the handlers wait
        sent = time.monotonic()
        for iid in ids:
            fleet.runtime.spot_interruption(iid)
    reclaim_at = sent + run.wall(SPOT_NOTICE_SECONDS)
    wanted = set(ids)
    times = [
        datetime.fromisoformat(e["time"]).timestamp()
        for e in fleet.gaps.events
        if e["detail-type"] == "EC2 Spot Instance Interruption Warning"
        and e["detail"]["instance-id"] in wanted
    ]
    spread = max(times) - min(times) if times else 0.0
    run.timeline("note", "ec2", f"spot storm: {len(times)} notices within {spread:.0f} s")
    if spread >= SAME_SECOND:
        run.note(f"the notices took {spread:.0f} AWS seconds to send, not one (a stalled machine)")
    return times, reclaim_at


def _done(run: Run, instance_id: str) -> bool:
    with run.fleet.lock:
        rec = run.fleet.controller.store.get(instance_id)
    return rec is not None and rec.phase == "done"


def _judge_builds(run: Run, jobs: Sequence[str], reclaim_at: float) -> None:
    """Each interrupted build's first attempt ended (``agent_stop``, or it finished) before
    its instance went (a ``lost`` one is counted by the report)."""
    for job_id in jobs:
        first = run.fleet.coord.job(job_id)
        if first.finished_at is None or first.finished_at > reclaim_at:
            run.note(f"build {first.key}'s first attempt did not end before its instance went")
        elif first.signal_reason != "agent_stop" and first.exit_status != "0":
            run.note(
                f"build {first.key}'s first attempt was reported signal_reason="
                f"{first.signal_reason} exit_status={first.exit_status}, not agent_stop"
            )


def _judge_agents(run: Run, doomed: Sequence[RunningTask]) -> None:
    """No interrupted agent died with its instance, or outlived it."""
    killed = [t.name for t in doomed if t.exit_code == 137]
    if killed:
        run.note(f"SIGKILLed with their instance: {', '.join(killed)}")
    left = [t.name for t in doomed if not t.stopped.is_set()]
    if left:
        run.note(f"still running after their instance went: {', '.join(left)}")


SPECS: dict[str, Spec] = {
    NAME: Spec(
        "after",
        "spot storm: up to 20 instances (4 a core, half busy) interrupted in the same second in "
        "a 1,000-agent org, REST limit enforced: every build cancelled, reported, retried; "
        "every drain ends",
        STORM.instances,
        spot_storm,
    ),
    NAME_GRAPHQL: Spec(
        "after",
        "the spot storm with agents found by GraphQL lookups (CoordinatorGraphqlUrl): the same "
        "outcome, no REST listing",
        STORM.instances,
        spot_storm_graphql,
        graphql=True,
    ),
}
