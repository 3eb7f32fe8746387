"""Buildkite's GraphQL API, the part a drain asks of it: an organization's agents by meta-data.

Buildkite serves GraphQL at ``https://graphql.buildkite.com/v1`` (here ``/graphql/v1``):
``POST {"query", "variables"}`` with an API token as ``Authorization: Bearer``. Its
``Organization.agents(first:, metaData: [String!])`` filters an organization's agents to those
having the matching meta-data, which the REST API cannot (REST filters by name, hostname and
version only): an instance's agents are found in one request, however big the organization.
The schema here is that field's slice of Buildkite's (``Agent``: ``uuid``, ``name``,
``connectionState``, ``isRunningJob``, ``metaData``, ``job``; ``JobTypeCommand``: ``uuid``,
``state``), executed by graphql-core, so a query outside it is answered with GraphQL's own
errors, as Buildkite answers one outside its schema.

The limit is the organization's own, apart from REST's, in complexity points: 20,000 in each
5 minutes by default (an object costs 1, a scalar 0: a request costs the objects its answer
holds), ``RateLimit-*`` headers in points, 429 beyond
(https://buildkite.com/docs/apis/graphql/graphql-resource-limits). :func:`execute` answers;
:mod:`~fleetdrain.drill.coordinator.app` authorizes, charges and replies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetdrain.drill.coordinator.rest_models import RestAgent

if TYPE_CHECKING:
    from graphql import GraphQLSchema

#: Buildkite's cap on a connection's ``first``.
MAX_FIRST = 500

SDL = """
type Query {
  organization(slug: ID!): Organization
}

type Organization {
  slug: String!
  agents(first: Int, metaData: [String!]): AgentConnection
}

type AgentConnection {
  count: Int!
  edges: [AgentEdge]
}

type AgentEdge {
  node: Agent
}

type Agent {
  uuid: String!
  name: String
  connectionState: String
  isRunningJob: Boolean
  metaData: [String]
  job: Job
}

union Job = JobTypeCommand

type JobTypeCommand {
  uuid: String!
  state: String
}
"""

_SCHEMA: GraphQLSchema | None = None


def schema() -> GraphQLSchema:
    """The schema (built once)."""
    global _SCHEMA
    if _SCHEMA is None:
        # graphql-core comes with the drill extra: the rest of the coordinator runs without it.
        from graphql import build_schema

        _SCHEMA = build_schema(SDL)
    return _SCHEMA


def _agent(agent: RestAgent) -> dict[str, Any]:
    job = None
    if agent.job is not None:
        # GraphQL's JobStates are upper case (RUNNING); REST's are lower case (running).
        job = {
            "__typename": "JobTypeCommand",
            "uuid": agent.job.id,
            "state": agent.job.state.upper(),
        }
    return {
        "uuid": agent.id,
        "name": agent.name,
        "connectionState": agent.connection_state,
        "isRunningJob": agent.job is not None and agent.job.state in ("accepted", "running"),
        "metaData": list(agent.meta_data),
        "job": job,
    }


def execute(
    org: str,
    agents_with: Any,
    query: str,
    variables: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The answer to ``query`` for organization ``org`` (``{"data": ..., "errors": ...}`` as
    GraphQL answers); ``agents_with(entries)``: the agents having every meta-data entry."""

    def agents(_info: Any, first: int | None = None, metaData: list[str] | None = None) -> Any:
        if first is not None and not 1 <= first <= MAX_FIRST:
            raise ValueError(f"first must be between 1 and {MAX_FIRST}")
        found = agents_with(list(metaData or []))
        shown = found[: first if first is not None else MAX_FIRST]
        return {"count": len(found), "edges": [{"node": _agent(a)} for a in shown]}

    def organization(_info: Any, slug: str) -> Any:
        return {"slug": org, "agents": agents} if slug == org else None

    from graphql import graphql_sync

    result = graphql_sync(
        schema(), query, root_value={"organization": organization}, variable_values=variables
    )
    out: dict[str, Any] = {"data": result.data}
    if result.errors:
        out["errors"] = [e.formatted for e in result.errors]
    return out


def points(answer: dict[str, Any]) -> int:
    """What an answer costs: the objects it holds (an object 1, a scalar 0), at least 1."""

    def count(value: Any) -> int:
        if isinstance(value, dict):
            return 1 + sum(count(v) for v in value.values())
        if isinstance(value, list):
            return sum(count(v) for v in value)
        return 0

    return max(1, count(answer.get("data")) - 1)  # the data object itself is free
