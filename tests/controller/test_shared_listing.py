"""The drains' request budget: one organization listing shared by every drain
(``shared_listing`` on the drain table in moto), request priorities, the growing tick."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from fleetdrain.controller.drain.config import Settings
from fleetdrain.controller.drain.coordinator import RESERVE, RateBudget
from fleetdrain.controller.drain.core import wait_tick
from fleetdrain.controller.drain.errors import Conflict
from fleetdrain.controller.drain.ports import AgentView, DrainRecord
from fleetdrain.controller.drain.shared_listing import (
    AgentListing,
    SharedAgentListing,
    cluster_name,
    in_cluster,
)
from fleetdrain.controller.drain.state import DynamoListingCache

CLUSTER = "ci"
TASK = "arn:aws:ecs:us-east-1:123456789012:task/ci/"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def view(n: int, task: str = TASK, busy: bool = False) -> AgentView:
    return AgentView(
        id=f"agent-{n}",
        name=f"a{n}",
        task_arn=f"{task}{n}",
        connection_state="connected",
        job_id="job" if busy else None,
        job_state="running" if busy else None,
        paused=False,
    )


class Lister:
    """The REST client's listing side: counts listings; ``pages`` a listing takes."""

    def __init__(self, agents: list[AgentView], pages: int = 10) -> None:
        self.agents = agents
        self.pages = pages
        self.last_pages = 0
        self.listings = 0

    def list_agents(self) -> list[AgentView]:
        self.listings += 1
        self.last_pages = self.pages
        return list(self.agents)

    def agent(self, agent_id: str) -> AgentView | None:
        return next((a for a in self.agents if a.id == agent_id), None)

    def pause(self, agent_id: str, note: str, timeout_minutes: int) -> bool:
        return True

    def stop(self, agent_id: str, force: bool) -> bool:
        return True


def shared(ddb: Any, lister: Lister, clock: Clock, **kwargs: Any) -> SharedAgentListing:
    """One Lambda container's view: its own memory, the table's item in common."""
    cache = DynamoListingCache(ddb, "drains", CLUSTER, clock, 3600)
    return SharedAgentListing(lister, cache, CLUSTER, clock, sleep=clock.advance, **kwargs)


def test_one_listing_serves_every_drain_of_every_container_while_fresh(ddb: Any) -> None:
    clock = Clock()
    lister = Lister([view(n) for n in range(3)])
    first, second = shared(ddb, lister, clock), shared(ddb, lister, clock)
    assert [a.id for a in first.agents_for([f"{TASK}1"])] == ["agent-1"]
    clock.advance(10)
    # Another container (no memory of it) reads the table's item: no listing of its own.
    assert [a.id for a in second.agents_for([f"{TASK}0", f"{TASK}2"])] == ["agent-0", "agent-2"]
    assert lister.listings == 1 and second.shared == 1 and second.last_pages == 10
    clock.advance(6)  # 16 s old: older than max_age (15 s), never used again
    second.agents_for([f"{TASK}0"])
    assert lister.listings == 2 and second.refreshes == 1


def test_busy_state_is_never_older_than_max_age(ddb: Any) -> None:
    clock = Clock()
    lister = Lister([view(1, busy=True)])
    listing = shared(ddb, lister, clock)
    assert listing.agents_for([f"{TASK}1"])[0].busy
    lister.agents = [view(1, busy=False)]
    clock.advance(15)
    assert listing.agents_for([f"{TASK}1"])[0].busy, "15 s old: still the shared one"
    clock.advance(1)
    assert not listing.agents_for([f"{TASK}1"])[0].busy


def test_a_refresh_another_container_claimed_is_waited_for(ddb: Any) -> None:
    clock = Clock()
    lister = Lister([view(1)])
    cache = DynamoListingCache(ddb, "drains", CLUSTER, clock, 3600)
    assert cache.claim(clock(), clock() + 10)  # the other container is listing now
    waiting = shared(ddb, lister, clock)
    published = AgentListing((view(1),), clock(), 10)

    def sleep(seconds: float) -> None:  # the other container finishes while we wait
        clock.advance(seconds)
        if clock() >= 1001.0:
            cache.put(published)

    waiting._sleep = sleep
    assert [a.id for a in waiting.agents_for([f"{TASK}1"])] == ["agent-1"]
    assert lister.listings == 0 and waiting.shared == 1 and clock() == 1001.0


def test_a_claimed_refresh_that_never_comes_is_not_waited_for_long(ddb: Any) -> None:
    clock = Clock()
    lister = Lister([view(1)])
    cache = DynamoListingCache(ddb, "drains", CLUSTER, clock, 3600)
    assert cache.claim(clock(), clock() + 10)
    assert not cache.claim(clock(), clock() + 10), "one claim at a time"
    listing = shared(ddb, lister, clock, refresh_wait=3.0)
    assert listing.agents_for([f"{TASK}1"])
    assert lister.listings == 1 and clock() == 1003.0, "waited 3 s, then listed on its own"
    clock.advance(10)
    assert cache.claim(clock(), clock() + 10), "a claim that outlived its time is taken over"


def test_a_stored_listing_is_only_replaced_by_a_newer_one(ddb: Any) -> None:
    clock = Clock()
    cache = DynamoListingCache(ddb, "drains", CLUSTER, clock, 3600)
    cache.put(AgentListing((view(1),), 1000.0, 3))
    with pytest.raises(Conflict):
        cache.put(AgentListing((view(2),), 999.0, 3))
    stored = cache.get()
    assert stored is not None and stored.agents == (view(1),) and stored.pages == 3
    cache.put(AgentListing((view(2, busy=True),), 1001.0, 4))
    assert cache.get() == AgentListing((view(2, busy=True),), 1001.0, 4)


def test_only_this_clusters_agents_are_kept(ddb: Any) -> None:
    clock = Clock()
    other = "arn:aws:ecs:us-east-1:123456789012:task/web/"
    lister = Lister([view(1), view(2, task=other)])
    shared(ddb, lister, clock).agents_for([])
    stored = DynamoListingCache(ddb, "drains", CLUSTER, clock, 3600).get()
    assert stored is not None and [a.id for a in stored.agents] == ["agent-1"]
    assert cluster_name("arn:aws:ecs:us-east-1:1:cluster/ci") == "ci"
    assert in_cluster(f"{TASK}x", "arn:aws:ecs:us-east-1:1:cluster/ci")
    assert not in_cluster(f"{other}x", CLUSTER)


def test_a_listing_too_big_for_an_item_is_used_but_not_shared(
    ddb: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fleetdrain.controller.drain import state

    monkeypatch.setattr(state, "MAX_LISTING_BYTES", 100)
    clock = Clock()
    lister = Lister([view(n) for n in range(5)])
    assert len(shared(ddb, lister, clock).agents_for([f"{TASK}{n}" for n in range(5)])) == 5
    assert DynamoListingCache(ddb, "drains", CLUSTER, clock, 3600).get() is None
    shared(ddb, lister, clock).agents_for([])
    assert lister.listings == 2, "the next container lists on its own"


def test_what_a_listing_costs_depends_on_how_many_drains_share_it(ddb: Any) -> None:
    clock = Clock()
    lister = Lister([view(1)], pages=10)
    listing = shared(ddb, lister, clock)
    assert listing.listing_cost(10, "i-1") == 10, "a lone drain pays all of it"
    assert listing.listing_cost(10, "i-1") == 10, "asking again is not more demand"
    for n in range(2, 6):
        listing.listing_cost(10, f"i-{n}")
    assert listing.listing_cost(10, "i-6") == 2, "six drains asked in the last minute"
    listing.agents_for([])
    assert listing.listing_cost(10, "i-1") == 0, "a fresh one costs nothing"
    clock.advance(61)
    assert listing.listing_cost(10, "i-1") == 10, "the others have not asked for a minute"


def test_the_reserve_keeps_the_last_requests_for_forced_stops() -> None:
    now = 0.0
    budget = RateBudget(limit=200, remaining=51, reset_at=60.0, seen_at=now)
    assert budget.affords(1, now, RESERVE["pause"]), "51: one pause leaves the 50"
    spent = dataclasses.replace(budget, remaining=50)
    assert not spent.affords(1, now, RESERVE["pause"])
    assert spent.affords(1, now, RESERVE["read"]) and spent.affords(1, now, RESERVE["force"])
    low = dataclasses.replace(budget, remaining=20)
    assert not low.affords(1, now, RESERVE["read"]) and low.affords(1, now, RESERVE["force"])
    last = dataclasses.replace(budget, remaining=1)
    assert last.affords(1, now, RESERVE["force"])
    assert last.affords(1, 60.0, RESERVE["pause"]), "a reset window has all of it again"


def test_the_tick_grows_with_the_wait_up_to_its_cap_unless_turned_off() -> None:
    rec = DrainRecord(instance_id="i-1", drain_id="d", cluster=CLUSTER, started_at=0.0)
    fixed = Settings(cluster=CLUSTER, tick_interval=20.0, max_tick_interval=0.0)
    assert [wait_tick(rec, t, fixed) for t in (0, 100, 1000)] == [20.0, 20.0, 20.0]
    growing = Settings(cluster=CLUSTER, tick_interval=20.0)  # the default: up to 60 s
    assert [wait_tick(rec, t, growing) for t in (0, 40, 60, 90, 500)] == [20, 20, 30, 45, 60]
    rec.phase, rec.draining_at = "hard", 480.0
    assert wait_tick(rec, 500.0, growing) == 20.0, "hard: counted from DRAINING"


def test_a_drain_alone_lists_for_itself_without_table_writes(ddb: Any) -> None:
    clock = Clock()
    lister = Lister([view(1)], pages=1)
    listing = shared(ddb, lister, clock)
    cache = DynamoListingCache(ddb, "drains", CLUSTER, clock, 3600)
    listing.listing_cost(1, "i-1")
    listing.agents_for([f"{TASK}1"])  # nothing stored yet: never alone, stored for others
    first = cache.get()
    assert first is not None and first.fetched_at == 1000.0
    clock.advance(20)
    listing.listing_cost(1, "i-1")
    listing.agents_for([f"{TASK}1"])
    assert lister.listings == 2 and listing.private is not None
    assert cache.get() == first, "alone: no claim, no write"
    # Another drain asks in this container: the next refresh is shared again.
    clock.advance(20)
    listing.listing_cost(1, "i-2")
    listing.agents_for([f"{TASK}1"])
    stored = cache.get()
    assert stored is not None and stored.fetched_at == 1040.0
