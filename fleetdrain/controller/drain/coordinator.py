"""The coordinator's REST API as the drain uses it: list agents, pause, stop.

``GET /v2/organizations/{org}/agents`` (paginated by ``Link: rel="next"``) finds an instance's
agents by their ``ecs:task-arn`` tag; ``PUT .../agents/{id}/pause`` and ``.../stop`` signal
them. The API token comes from Secrets Manager through :class:`SecretToken` (cached; refreshed
once on a 401) and is never logged: it only ever lives in the Authorization header.

Transport errors, timeouts and 5xx are retried a few times with a short back-off; what is
still failing then is :class:`CoordinatorUnavailable`, and the drain falls back to ECS.

Rate limits: Buildkite allows an organization 200 REST requests a minute (all its users
together) and puts ``RateLimit-Remaining``, ``RateLimit-Limit`` and ``RateLimit-Reset`` (seconds
until the window resets) on every answer; beyond the limit it answers 429 until the reset
(https://buildkite.com/docs/apis/rest-api/limits). The client keeps what the last answer said as
a :class:`RateBudget` (:attr:`CoordinatorClient.budget`) so that a caller can decide whether to
spend a request.

Every request has a priority, and the lower ones leave a reserve of the window for the higher
(:data:`RESERVE`, a share of the limit): a forced stop (it cancels a job before its instance
dies) may spend the last request of the window, a read (a listing, one agent) leaves a tenth of
it, a pause (it only keeps new jobs away) leaves a quarter. The organization's other users spend
from the same window, so the reserve is what keeps a spot storm's forced stops possible after
its pauses. A request that its priority cannot afford now, or that is answered 429, waits for
the reset when that fits ``max_rate_wait`` (the time budget of one call), and otherwise is
:class:`~fleetdrain.controller.drain.errors.RateLimited` at once (with the seconds to the
reset), without spending more of the organization's requests: the core waits for the window
where it can, and falls back to ECS only where a deadline cannot wait. A 429 without the
headers is retried like a 5xx.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import httpx
from botocore.exceptions import BotoCoreError, ClientError

from fleetdrain.controller.drain.aws_errors import reraise_retryable
from fleetdrain.controller.drain.errors import CoordinatorUnavailable, RateLimited
from fleetdrain.controller.drain.ports import AgentView

#: A listing reads at most this many pages of 100 (10,000 agents: half a minute window of the
#: organization's 200 requests); an organization bigger than that is listed in part, and says so.
MAX_PAGES = 100

log = logging.getLogger("fleetdrain.drain")
#: The longest one call waits for the rate-limit window to reset, by default (seconds).
MAX_RATE_WAIT = 10.0
#: 429s with rate-limit headers one call waits out before it gives up.
MAX_RATE_RETRIES = 3
#: What each priority leaves of the window for the higher ones (a share of the limit, rounded
#: down: 20 and 50 of Buildkite's 200).
RESERVE = {"force": 0.0, "read": 0.10, "pause": 0.25}
Priority = Literal["force", "read", "pause"]


@dataclass(frozen=True)
class RateBudget:
    """The organization's REST budget as the coordinator's last answer gave it.

    Times are on the client's clock (``seen_at`` the answer, ``reset_at`` the window's end).
    """

    limit: int
    remaining: int
    reset_at: float
    seen_at: float

    def remaining_at(self, now: float) -> int:
        """Requests the organization can still make at ``now`` (the whole limit once the window
        has reset). Other users of the organization spend from the same budget: this is an upper
        bound, not a reservation."""
        return self.limit if now >= self.reset_at else self.remaining

    def reset_in(self, now: float) -> float:
        """Seconds from ``now`` until the window resets (0 once it has)."""
        return max(0.0, self.reset_at - now)

    def affords(self, requests: int, now: float, reserve: float = 0.0) -> bool:
        """Whether ``requests`` more fit in the budget at ``now``, leaving ``reserve`` (a share
        of the limit) unspent."""
        return self.remaining_at(now) - requests >= int(self.limit * reserve)

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], now: float) -> RateBudget | None:
        """The budget Buildkite's ``RateLimit-*`` headers give, or None if they are absent or
        not numbers."""
        try:
            limit = int(headers["RateLimit-Limit"])
            remaining = int(headers["RateLimit-Remaining"])
            reset = float(headers["RateLimit-Reset"])
        except (KeyError, ValueError):
            return None
        if not math.isfinite(reset):
            return None
        return cls(max(0, limit), max(0, remaining), now + max(0.0, reset), now)


class SecretToken:
    """The coordinator API token from Secrets Manager, cached for ``ttl`` seconds.

    The secret is either the token itself or JSON with a ``token`` key.
    """

    def __init__(
        self,
        client: Any,
        secret_id: str,
        clock: Callable[[], float] = time.monotonic,
        ttl: float = 300.0,
    ) -> None:
        self._sm = client
        self._secret_id = secret_id
        self._clock = clock
        self._ttl = ttl
        self._value: str | None = None
        self._fetched_at = 0.0
        self.fetches = 0

    def __repr__(self) -> str:
        return f"SecretToken({self._secret_id!r}, cached={self._value is not None})"

    def get(self) -> str:
        if self._value is None or self._clock() - self._fetched_at >= self._ttl:
            try:
                out = self._sm.get_secret_value(SecretId=self._secret_id)
            except (ClientError, BotoCoreError) as exc:
                reraise_retryable(exc, "Secrets Manager GetSecretValue")
                raise CoordinatorUnavailable(
                    f"cannot read the coordinator token secret: {type(exc).__name__}"
                ) from exc
            raw = str(out.get("SecretString") or "").strip()
            if raw.startswith("{"):
                try:
                    raw = str(json.loads(raw).get("token", "")).strip()
                except ValueError:
                    raw = ""
            if not raw:
                raise CoordinatorUnavailable("the coordinator token secret is empty")
            self._value = raw
            self._fetched_at = self._clock()
            self.fetches += 1
        return self._value

    def invalidate(self) -> None:
        self._value = None


def controller_http(timeout: float) -> httpx.Client:
    """The HTTP client the controller talks to Buildkite with (REST and GraphQL): ``timeout``
    seconds a request, at most 2 to connect."""
    return httpx.Client(
        timeout=httpx.Timeout(timeout, connect=min(timeout, 2.0)),
        headers={"User-Agent": "fleetdrain-controller"},
    )


class CoordinatorClient:
    """:class:`~fleetdrain.controller.drain.ports.CoordinatorPort`: REST client for one
    organization. ``token`` is called for the token before each call."""

    def __init__(
        self,
        base_url: str,
        org: str,
        token: Callable[[], str],
        invalidate: Callable[[], None] = lambda: None,
        *,
        http: httpx.Client | None = None,
        timeout: float = 5.0,
        attempts: int = 3,
        backoff: float = 0.2,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        max_rate_wait: float = MAX_RATE_WAIT,
        honour_rate_limit: bool = True,
        max_pages: int = MAX_PAGES,
    ) -> None:
        self._base = f"{base_url.rstrip('/')}/v2/organizations/{org}/agents"
        self._token = token
        self._invalidate = invalidate
        self._http = http or controller_http(timeout)
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._sleep = sleep
        self._clock = clock
        #: The longest one call may wait for the rate-limit window to reset (seconds); a
        #: caller with a deadline (a Lambda's remaining time) may lower it.
        self.max_rate_wait = max_rate_wait
        #: False: the headers are read (``budget``) but a 429 is retried like a 5xx and a spent
        #: budget does not hold a request back (the client before rate limits were honoured;
        #: ``bench/controller.py --before``).
        self.honour_rate_limit = honour_rate_limit
        self.requests = 0
        self.max_pages = max(1, max_pages)
        #: How many pages the last :meth:`agents_for` read (the size of the organization).
        self.last_pages = 0
        #: The last listing stopped at :attr:`max_pages` with more to read.
        self.truncated = False
        #: The organization's REST budget as last seen (None until an answer carried it).
        self.budget: RateBudget | None = None
        #: 429s received; calls refused without a request (the budget was spent); waits for a
        #: window to reset, and the seconds spent waiting.
        self.rate_limited = 0
        self.rate_refused = 0
        self.rate_waits = 0
        self.rate_waited = 0.0

    def close(self) -> None:
        self._http.close()

    def _request(
        self,
        method: str,
        url: str,
        *,
        json_body: dict[str, Any] | None = None,
        priority: Priority = "read",
    ) -> httpx.Response:
        refreshed = False
        attempt = 0
        waited = 0.0
        limited = 0
        while True:
            waited += self._await_budget(method, url, waited, priority)
            attempt += 1
            headers = {"Authorization": f"Bearer {self._token()}"}
            self.requests += 1
            try:
                response = self._http.request(method, url, headers=headers, json=json_body)
            except httpx.HTTPError as exc:
                if attempt >= self._attempts:
                    raise CoordinatorUnavailable(
                        f"{method} {_path(url)}: {type(exc).__name__}"
                    ) from exc
                self._sleep(self._backoff * attempt)
                continue
            budget = RateBudget.from_headers(response.headers, self._clock())
            if budget is not None:
                self.budget = budget
            if response.status_code == 401 and not refreshed:
                refreshed = True
                self._invalidate()
                continue
            if response.status_code == 429:
                self.rate_limited += 1
                limited += 1
                if budget is not None and self.honour_rate_limit:
                    # Buildkite's answer: nothing left until the reset (the organization's
                    # budget, or this token's own: either way, wait for the window). The next
                    # turn waits for it if this call can afford to, else gives up at once.
                    self.budget = dataclasses.replace(budget, remaining=0)
                    if limited > MAX_RATE_RETRIES:
                        raise RateLimited(
                            f"{method} {_path(url)}: HTTP 429 after {limited - 1} waits",
                            budget.reset_in(self._clock()),
                        )
                    attempt -= 1
                    continue
            if response.status_code == 429 or response.status_code >= 500:
                if attempt >= self._attempts:
                    raise CoordinatorUnavailable(
                        f"{method} {_path(url)}: HTTP {response.status_code}"
                    )
                self._sleep(self._backoff * attempt)
                continue
            if response.status_code in (401, 403):
                raise CoordinatorUnavailable(f"{method} {_path(url)}: HTTP {response.status_code}")
            return response

    def _await_budget(self, method: str, url: str, waited: float, priority: Priority) -> float:
        """Before a request: if the last answer said the organization's budget cannot afford
        it at its priority (what is left is the higher priorities' reserve) and the window has
        not reset, wait for the reset (when the wait fits what is left of ``max_rate_wait`` for
        this call) or raise RateLimited without sending. Returns the seconds waited."""
        budget = self.budget
        if budget is None or not self.honour_rate_limit:
            return 0.0
        now = self._clock()
        if budget.affords(1, now, RESERVE[priority]):
            return 0.0
        wait = budget.reset_in(now)
        if waited + wait > self.max_rate_wait:
            self.rate_refused += 1
            raise RateLimited(
                f"{method} {_path(url)} ({priority}): rate limit spent "
                f"({budget.remaining_at(now)} of {budget.limit} left), resets in {wait:.0f} s, "
                f"more than the {self.max_rate_wait - waited:.0f} s this call may wait",
                wait,
            )
        self._sleep(wait)
        self.rate_waits += 1
        self.rate_waited += wait
        # The window has reset: the whole limit is there again (as far as we know).
        self.budget = RateBudget(budget.limit, budget.limit, budget.reset_at, budget.reset_at)
        return wait

    def agents_for(self, task_arns: Iterable[str]) -> list[AgentView]:
        """Agents whose ``ecs:task-arn`` tag is one of ``task_arns`` (every page)."""
        wanted = set(task_arns)
        return [view for view in self.list_agents() if view.task_arn in wanted]

    def list_agents(self) -> list[AgentView]:
        """Every agent of the organization that has an ``ecs:task-arn`` tag (every page; read
        priority). :attr:`last_pages` says how many pages that took."""
        found: list[AgentView] = []
        url: str | None = f"{self._base}?per_page=100"
        pages = 0
        while url and pages < self.max_pages:
            pages += 1
            response = self._request("GET", url)
            if response.status_code != 200:
                raise CoordinatorUnavailable(f"GET agents: HTTP {response.status_code}")
            try:
                rows = response.json()
            except ValueError as exc:
                raise CoordinatorUnavailable("GET agents: not JSON") from exc
            if not isinstance(rows, list):
                raise CoordinatorUnavailable("GET agents: not a list")
            found.extend(view for row in rows if (view := _agent_view(row)) is not None)
            url = response.links.get("next", {}).get("url")
        self.last_pages = pages
        self.truncated = bool(url)
        if url:
            # Not an outage (what was read is right): the tasks of agents beyond it are drained
            # as agentless (task protection for busy, StopTask, their own deadline).
            log.warning(
                "agent listing stopped at its page limit: the organization has more agents, "
                "and those beyond it are not found",
                extra={"pages": pages, "agents_read": len(found)},
            )
        return found

    def listing_cost(self, known_pages: int, asker: str = "") -> int:
        """Requests a listing of the organization would take now: ``known_pages`` (what the
        drain's last listing took; this client shares no listing)."""
        return known_pages

    def agent(self, agent_id: str) -> AgentView | None:
        """One agent by id (``GET .../agents/{id}``); None if the coordinator no longer knows
        it. One request, where :meth:`agents_for` pages through the whole organization."""
        response = self._request("GET", f"{self._base}/{agent_id}")
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise CoordinatorUnavailable(f"GET agent: HTTP {response.status_code}")
        try:
            row = response.json()
        except ValueError as exc:
            raise CoordinatorUnavailable("GET agent: not JSON") from exc
        return _agent_view(row)

    def pause(self, agent_id: str, note: str, timeout_minutes: int) -> bool:
        """Pause an agent; False when the coordinator says it cannot (not connected, unknown)."""
        body = {"note": note, "timeout_in_minutes": max(1, min(10080, timeout_minutes))}
        response = self._request(
            "PUT", f"{self._base}/{agent_id}/pause", json_body=body, priority="pause"
        )
        return self._done(response, "pause")

    def stop(self, agent_id: str, force: bool) -> bool:
        """Stop an agent (``force``: cancel its job, reported ``agent_stop``); False if it can't."""
        response = self._request(
            "PUT",
            f"{self._base}/{agent_id}/stop",
            json_body={"force": force},
            priority="force" if force else "pause",
        )
        return self._done(response, "stop")

    @staticmethod
    def _done(response: httpx.Response, what: str) -> bool:
        if response.status_code in (200, 204):
            return True
        if response.status_code in (400, 404, 422):
            return False  # the agent is gone or not connected: nothing left to signal
        raise CoordinatorUnavailable(f"{what}: HTTP {response.status_code}")


def _path(url: str) -> str:
    return httpx.URL(url).path


def _agent_view(row: Any) -> AgentView | None:
    if not isinstance(row, dict) or not isinstance(row.get("id"), str):
        return None
    task_arn = ""
    for tag in row.get("meta_data") or []:
        if isinstance(tag, str) and tag.startswith("ecs:task-arn="):
            task_arn = tag.split("=", 1)[1]
    if not task_arn:
        return None
    job = row.get("job") if isinstance(row.get("job"), dict) else None
    return AgentView(
        id=row["id"],
        name=str(row.get("name", "")),
        task_arn=task_arn,
        connection_state=str(row.get("connection_state", "")),
        job_id=str(job["id"]) if job and job.get("id") else None,
        job_state=str(job.get("state")) if job and job.get("state") else None,
        paused=bool(row.get("paused", False)),
    )
