"""One listing of the organization's agents, shared by every drain: the drains' request budget.

Finding an instance's agents takes a listing of the whole organization (Buildkite's REST API
cannot filter agents by tag): 10 requests at 1,000 agents, of the 200 a minute the organization
has for all its users. A spot storm starts 100 drains in the same second, a scale-in 100 a
minute; each listing on its own would spend the window many times over. So a listing is made
at most once every ``max_age`` seconds for the whole cluster and kept where every Lambda
container reads it (:class:`ListingCachePort`: an item of the drain table), and in this
container's memory for as long as it is fresh.

Invariants:

- A listing older than ``max_age`` is never used: an agent's busy state in it is at most that
  old (the drain's tick is the same order, so a drain learns no later than it would have).
- A drain alone (no other drain asked in this container lately, and no other container's
  listing is recent) lists for itself only: no claim, no write.
- One container refreshes at a time: it claims the refresh with a conditional write; the others
  wait up to ``refresh_wait`` for the new listing and then list on their own (a refresher that
  died does not hold every drain up).
- A stored listing is only ever replaced by a newer one (conditional on ``fetched_at``).
- Only this cluster's agents are kept (the task ARN names the cluster), so the item stays small;
  a listing too big for an item is used but not shared (and says so in the log).
- What the coordinator raises (unavailable, rate-limited) reaches the drain unchanged; a cache
  that fails (DynamoDB throttled) only costs the sharing.

Everything else (one agent, pause, stop) goes straight to the wrapped client.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from fleetdrain.controller.drain.errors import Conflict, Retryable
from fleetdrain.controller.drain.ports import AgentView, Clock, Sleep

log = logging.getLogger("fleetdrain.drain")

#: How long a listing serves every drain (seconds on the drain clock).
MAX_AGE = 15.0
#: How long a container waits for another's refresh before it lists on its own.
REFRESH_WAIT = 3.0
#: A claimed refresh not finished by then is taken as dead.
CLAIM_SECONDS = 10.0
POLL = 0.25
#: The steps of this long (seconds) are the demand a refresh serves: a tick round and more.
DEMAND_WINDOW = 60.0


@dataclass(frozen=True)
class AgentListing:
    """The cluster's agents as one listing of the organization saw them."""

    agents: tuple[AgentView, ...]
    #: When the listing began (drain clock): nothing in it is older.
    fetched_at: float
    #: Pages the listing took (the organization's size in requests).
    pages: int

    def fresh(self, now: float, max_age: float) -> bool:
        return now - self.fetched_at <= max_age


class Lister(Protocol):
    """What is wrapped: ``coordinator.CoordinatorClient``."""

    last_pages: int

    def list_agents(self) -> list[AgentView]: ...

    def agent(self, agent_id: str) -> AgentView | None: ...

    def pause(self, agent_id: str, note: str, timeout_minutes: int) -> bool: ...

    def stop(self, agent_id: str, force: bool) -> bool: ...


class ListingCachePort(Protocol):
    """Where the shared listing lives (``state.DynamoListingCache``). Raises ``Retryable`` on
    trouble that passes."""

    def get(self) -> AgentListing | None:
        """The stored listing (strongly consistent), or None."""
        ...

    def claim(self, now: float, until: float) -> bool:
        """Claim the refresh until ``until``; False if another claim runs at ``now``."""
        ...

    def put(self, listing: AgentListing) -> None:
        """Store ``listing`` and drop the claim; ``Conflict`` if a newer one is stored."""
        ...


def cluster_name(cluster: str) -> str:
    """The cluster's name, from its name or ARN (``arn:aws:ecs:...:cluster/<name>``)."""
    return cluster.rsplit("cluster/", 1)[-1] if cluster.startswith("arn:") else cluster


def in_cluster(task_arn: str, cluster: str) -> bool:
    """Whether a task ARN is one of ``cluster``'s (``...:task/<cluster>/<id>``)."""
    return f":task/{cluster_name(cluster)}/" in task_arn


class SharedAgentListing:
    """:class:`~fleetdrain.controller.drain.ports.CoordinatorPort`: ``client`` with its
    organization listing shared through ``cache`` (see the module docstring)."""

    def __init__(
        self,
        client: Lister,
        cache: ListingCachePort,
        cluster: str,
        clock: Clock,
        *,
        max_age: float = MAX_AGE,
        refresh_wait: float = REFRESH_WAIT,
        sleep: Sleep = time.sleep,
    ) -> None:
        self.client = client
        self._cache = cache
        self._cluster = cluster
        self._clock = clock
        self._sleep = sleep
        self.max_age = max_age
        self.refresh_wait = refresh_wait
        self._memo: AgentListing | None = None
        #: Drain -> when it last asked what a listing costs (the demand a refresh serves).
        self._asked: dict[str, float] = {}
        #: When the listings this container stored began (to tell them from others').
        self._own: set[float] = set()
        #: When the table's listing was last read.
        self._read_at: float | None = None
        #: The last listing made for one drain alone (not stored, not shared).
        self.private: AgentListing | None = None
        self.last_pages = 0
        #: Listings this container made, and those it took from the cache or its memory.
        self.refreshes = 0
        self.shared = 0

    # ------------------------------------------------------------------ the shared listing

    def listing_cost(self, known_pages: int, asker: str = "") -> int:
        """What a listing costs the drain ``asker``: 0 while a fresh one is shared; else a
        refresh's pages divided among the drains that will share it (those that asked in the
        last :data:`DEMAND_WINDOW` seconds in this container, ``asker`` included), at least 1.
        So a lone drain asks for its few agents one by one, and of a hundred that tick
        together the first refreshes for all."""
        now = self._clock()
        self._asked[asker] = now
        for who, when in list(self._asked.items()):
            if when < now - DEMAND_WINDOW:
                del self._asked[who]
        listing = self._stored(now)
        if listing is not None and listing.fresh(now, self.max_age):
            return 0
        pages = max(known_pages, listing.pages if listing else 0)
        return max(1, math.ceil(pages / len(self._asked))) if pages else 0

    def agents_for(self, task_arns: Iterable[str]) -> list[AgentView]:
        """The agents of these tasks, from a listing at most ``max_age`` old."""
        listing = self._current()
        self.last_pages = listing.pages
        wanted = set(task_arns)
        return [a for a in listing.agents if a.task_arn in wanted]

    def _stored(self, now: float) -> AgentListing | None:
        """This container's listing while it is fresh, else the cache's (None if neither)."""
        if self._memo is not None and self._memo.fresh(now, self.max_age):
            return self._memo
        if (
            len(self._asked) <= 1
            and self._memo is not None
            and self._read_at is not None
            and now - self._read_at < DEMAND_WINDOW
            and self._alone(self._memo, now)
        ):
            # Alone: the table is looked at once a minute (for another container's listing),
            # not at every step.
            return self._memo
        self._read_at = now
        try:
            stored = self._cache.get()
        except Retryable as exc:
            log.warning("shared agent listing unreadable", extra={"error": str(exc)})
            return self._memo
        if stored is not None and (self._memo is None or stored.fetched_at > self._memo.fetched_at):
            self._memo = stored
        return self._memo

    def _current(self) -> AgentListing:
        now = self._clock()
        listing = self._stored(now)
        if listing is not None and listing.fresh(now, self.max_age):
            self.shared += 1
            return listing
        if self._alone(listing, now):
            # Nobody to share with: a listing of our own, as a drain without the table would
            # make (the claim and the write would only cost AWS calls).
            return self._refresh(share=False)
        try:
            claimed = self._cache.claim(now, now + CLAIM_SECONDS)
        except Retryable as exc:
            log.warning("cannot claim the agent listing's refresh", extra={"error": str(exc)})
            claimed = True  # list on our own; the put below may still share it
        if not claimed:
            waited = 0.0
            while waited < self.refresh_wait:
                self._sleep(POLL)
                waited += POLL
                listing = self._stored(self._clock())
                if listing is not None and listing.fresh(self._clock(), self.max_age):
                    self.shared += 1
                    return listing
        return self._refresh()

    def _alone(self, stored: AgentListing | None, now: float) -> bool:
        """Whether a refresh now would serve this drain only: at most one drain asked in this
        container in the last :data:`DEMAND_WINDOW`, and the stored listing is this
        container's or older than that (no other container is sharing one). With nothing
        stored (the first drain, or a storm's first second) it is never taken as alone."""
        if len(self._asked) > 1 or stored is None:
            return False
        return stored.fetched_at in self._own or now - stored.fetched_at > DEMAND_WINDOW

    def _refresh(self, share: bool = True) -> AgentListing:
        started = self._clock()
        agents = [a for a in self.client.list_agents() if in_cluster(a.task_arn, self._cluster)]
        listing = AgentListing(tuple(agents), started, self.client.last_pages)
        self.refreshes += 1
        if not share:
            # Kept apart from the memo: the stored listing stays the one others would see.
            self.private = listing
            return listing
        self._memo = listing
        self._own = {*sorted(self._own)[-7:], listing.fetched_at}
        try:
            self._cache.put(listing)
        except Conflict:
            pass  # a newer listing is stored already
        except (Retryable, ValueError) as exc:
            log.warning("agent listing not shared", extra={"error": str(exc)})
        return listing

    # ------------------------------------------------------------------ the rest: as it is

    def agent(self, agent_id: str) -> AgentView | None:
        return self.client.agent(agent_id)

    def pause(self, agent_id: str, note: str, timeout_minutes: int) -> bool:
        return self.client.pause(agent_id, note, timeout_minutes)

    def stop(self, agent_id: str, force: bool) -> bool:
        return self.client.stop(agent_id, force)
