"""Finding an instance's agents with Buildkite's GraphQL API: one request, whatever the size of
the organization.

The REST API cannot filter agents by tag, so a REST lookup pages through the whole organization
(100 agents a page): at 10,000 agents one listing is 100 of the 200 requests the organization
has a minute. GraphQL's ``Organization.agents(metaData: [...])`` returns the agents having the
given meta-data: one alias per task (``t0: agents(first: 10, metaData: ["ecs:task-arn=..."])``)
finds every agent of an instance in one request, counted against GraphQL's own limit (points:
20,000 in 5 minutes for the organization; a lookup costs ~3 points a task), not REST's.
Pauses and stops stay on REST (``pause`` has no GraphQL mutation), through the wrapped client.

Invariants:

- One request per :meth:`GraphqlAgentLookup.agents_for`, none for no task.
- Its budget is GraphQL's, as the last answer's ``RateLimit-*`` headers gave it (points): a
  lookup the budget has nothing left for, or one answered 429, is ``RateLimited`` with the
  time to the reset (a drain takes that as "not before then", never as an outage).
- A 5xx or a transport error is tried ``attempts`` times, then ``CoordinatorUnavailable``;
  a 401 refreshes the token once; errors in a 200's body (a token without GraphQL access, a
  query the schema refuses) and an organization the token cannot see are
  ``CoordinatorUnavailable`` with GraphQL's message.
- An agent without an ``ecs:task-arn`` tag, or with another task's, is left out (as the REST
  listing leaves it out); the agent's ``paused`` is not asked (the drain remembers the pauses
  it made; pausing a paused agent is harmless).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from typing import Any

import httpx

from fleetdrain.controller.drain.coordinator import (
    CoordinatorClient,
    RateBudget,
    controller_http,
)
from fleetdrain.controller.drain.errors import CoordinatorUnavailable, RateLimited
from fleetdrain.controller.drain.ports import AgentView

#: Buildkite's GraphQL endpoint.
BUILDKITE_GRAPHQL_URL = "https://graphql.buildkite.com/v1"
#: Agents asked for a task (one is the rule; a re-registered agent's old record may linger).
PER_TASK = 10

_FIELDS = (
    "edges { node { uuid name connectionState metaData "
    "job { ... on JobTypeCommand { uuid state } } } }"
)


def lookup_query(task_arns: list[str]) -> str:
    """The query for these tasks' agents: one aliased ``agents`` field a task (their tags are
    passed as variables, so no ARN is ever spliced into the query text)."""
    params = ", ".join(f"$m{n}: [String!]" for n in range(len(task_arns)))
    fields = " ".join(
        f"t{n}: agents(first: {PER_TASK}, metaData: $m{n}) {{ {_FIELDS} }}"
        for n in range(len(task_arns))
    )
    head = f"query FleetdrainAgents($slug: ID!, {params})"
    return f"{head} {{ organization(slug: $slug) {{ {fields} }} }}"


def _view(node: Any, task_arn: str) -> AgentView | None:
    if not isinstance(node, dict) or not isinstance(node.get("uuid"), str):
        return None
    tags = [t for t in node.get("metaData") or [] if isinstance(t, str)]
    if f"ecs:task-arn={task_arn}" not in tags:
        return None
    job = node.get("job") if isinstance(node.get("job"), dict) else None
    state = job.get("state") if job else None
    return AgentView(
        id=node["uuid"],
        name=str(node.get("name") or ""),
        task_arn=task_arn,
        connection_state=str(node.get("connectionState") or ""),
        job_id=str(job["uuid"]) if job and job.get("uuid") else None,
        # GraphQL's JobStates are upper case; the drain's (REST's) lower case.
        job_state=str(state).lower() if state else None,
        paused=False,
    )


class GraphqlAgentLookup:
    """The agents of given tasks, by their ``ecs:task-arn`` meta-data, in one GraphQL request.
    ``token`` is called for the API token before each request (it needs GraphQL access)."""

    def __init__(
        self,
        url: str,
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
    ) -> None:
        self.url = url
        self.org = org
        self._token = token
        self._invalidate = invalidate
        self._http = http or controller_http(timeout)
        self._attempts = max(1, attempts)
        self._backoff = backoff
        self._sleep = sleep
        self._clock = clock
        self.requests = 0
        #: 429s received, and lookups refused without a request (the points were spent).
        self.rate_limited = 0
        self.rate_refused = 0
        #: The organization's GraphQL budget in points, as last seen.
        self.budget: RateBudget | None = None

    def close(self) -> None:
        self._http.close()

    def agents_for(self, task_arns: Iterable[str]) -> list[AgentView]:
        """The live and gone agents tagged with these tasks (one request; none for no task)."""
        arns = list(dict.fromkeys(task_arns))
        if not arns:
            return []
        variables: dict[str, Any] = {"slug": self.org}
        variables.update({f"m{n}": [f"ecs:task-arn={arn}"] for n, arn in enumerate(arns)})
        data = self._post({"query": lookup_query(arns), "variables": variables})
        org = data.get("organization")
        if not isinstance(org, dict):
            raise CoordinatorUnavailable(
                f"GraphQL: no organization {self.org!r} for this token (or no access)"
            )
        found: list[AgentView] = []
        for n, arn in enumerate(arns):
            conn = org.get(f"t{n}")
            for edge in (conn.get("edges") if isinstance(conn, dict) else None) or []:
                view = _view(edge.get("node") if isinstance(edge, dict) else None, arn)
                if view is not None:
                    found.append(view)
        return found

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        now = self._clock()
        if self.budget is not None and not self.budget.affords(1, now):
            self.rate_refused += 1
            raise RateLimited(
                "GraphQL: the organization's points are spent", self.budget.reset_in(now)
            )
        refreshed = False
        attempt = 0
        while True:
            attempt += 1
            self.requests += 1
            headers = {"Authorization": f"Bearer {self._token()}"}
            try:
                response = self._http.post(self.url, headers=headers, json=body)
            except httpx.HTTPError as exc:
                if attempt >= self._attempts:
                    raise CoordinatorUnavailable(f"GraphQL: {type(exc).__name__}") from exc
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
                retry_in = budget.reset_in(self._clock()) if budget is not None else 60.0
                raise RateLimited("GraphQL: HTTP 429 (complexity points spent)", retry_in)
            if response.status_code >= 500:
                if attempt >= self._attempts:
                    raise CoordinatorUnavailable(f"GraphQL: HTTP {response.status_code}")
                self._sleep(self._backoff * attempt)
                continue
            if response.status_code != 200:
                raise CoordinatorUnavailable(f"GraphQL: HTTP {response.status_code}")
            try:
                answer = response.json()
            except (ValueError, json.JSONDecodeError) as exc:
                raise CoordinatorUnavailable("GraphQL: not JSON") from exc
            if not isinstance(answer, dict):
                raise CoordinatorUnavailable("GraphQL: not a JSON object")
            errors = answer.get("errors")
            if errors:
                first = errors[0] if isinstance(errors, list) and errors else errors
                message = first.get("message") if isinstance(first, dict) else str(first)
                raise CoordinatorUnavailable(f"GraphQL: {message}")
            data = answer.get("data")
            if not isinstance(data, dict):
                raise CoordinatorUnavailable("GraphQL: no data")
            return data


class GraphqlCoordinator:
    """:class:`~fleetdrain.controller.drain.ports.CoordinatorPort`: agents found with GraphQL
    (:class:`GraphqlAgentLookup`, one request a look whatever the organization's size), one
    agent, pauses and stops through the REST client."""

    def __init__(self, rest: CoordinatorClient, lookup: GraphqlAgentLookup) -> None:
        self.rest = rest
        self.lookup = lookup
        #: A lookup is one request: what a drain records as its listing's size.
        self.last_pages = 1

    def agents_for(self, task_arns: Iterable[str]) -> list[AgentView]:
        return self.lookup.agents_for(task_arns)

    def listing_cost(self, known_pages: int, asker: str = "") -> int:
        """One request, whatever the organization's size (so it is preferred to asking two or
        more agents one by one)."""
        return 1

    def agent(self, agent_id: str) -> AgentView | None:
        return self.rest.agent(agent_id)

    def pause(self, agent_id: str, note: str, timeout_minutes: int) -> bool:
        return self.rest.pause(agent_id, note, timeout_minutes)

    def stop(self, agent_id: str, force: bool) -> bool:
        return self.rest.stop(agent_id, force)
