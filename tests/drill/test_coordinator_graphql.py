"""The embedded coordinator's GraphQL API: an organization's agents by meta-data, as Buildkite's
``Organization.agents(metaData:)`` answers, limited in complexity points apart from REST."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fleetdrain.agent.buildkite.models import RegisterRequest
from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer
from fleetdrain.drill.coordinator.faults import Fault

QUERY = """
query($slug: ID!, $tags: [String!]) {
  organization(slug: $slug) {
    agents(first: 10, metaData: $tags) {
      count
      edges { node { uuid connectionState isRunningJob metaData
                     job { ... on JobTypeCommand { uuid state } } } }
    }
  }
}
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served() -> Iterator[tuple[Coordinator, str, Clock]]:
    clock = Clock()
    coord = Coordinator(org="acme", api_token="api-token", clock=clock, lost_agent_timeout=1e9)
    with CoordinatorServer(coord) as server:
        yield coord, f"{server.url}/graphql/v1", clock


def _agent(coord: Coordinator, *tags: str) -> tuple[str, str]:
    reg = coord.register(coord.registration_token, RegisterRequest(name="a", meta_data=[*tags]))
    coord.connect(reg.access_token, {})
    return reg.id, reg.access_token


def _ask(url: str, tags: list[str], token: str = "api-token", slug: str = "acme") -> httpx.Response:
    return httpx.post(
        url,
        json={"query": QUERY, "variables": {"slug": slug, "tags": tags}},
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )


def test_agents_are_found_by_every_meta_data_entry_given(
    served: tuple[Coordinator, str, Clock],
) -> None:
    coord, url, _ = served
    mine, token = _agent(coord, "ecs:task-arn=t-1", "queue=ci")
    job = coord.add_job("make test", agent_query_rules=["queue=ci"])
    ping = coord.ping(token, {})
    assert ping.job is not None and ping.job.id == job.id
    coord.accept(token, job.id, {})
    coord.start(token, job.id, {}, "2026-02-02T03:00:00Z")
    _agent(coord, "ecs:task-arn=t-2", "queue=ci")
    for n in range(150):
        _agent(coord, f"ecs:task-arn=other-{n}")

    answer = _ask(url, ["ecs:task-arn=t-1"]).json()
    found = answer["data"]["organization"]["agents"]
    assert found["count"] == 1
    node = found["edges"][0]["node"]
    assert (node["uuid"], node["connectionState"], node["isRunningJob"]) == (
        mine,
        "connected",
        True,
    )
    assert node["job"] == {"uuid": job.id, "state": "RUNNING"}
    both = _ask(url, ["queue=ci"]).json()["data"]["organization"]["agents"]
    assert both["count"] == 2
    none = _ask(url, ["queue=ci", "ecs:task-arn=other-1"]).json()
    assert none["data"]["organization"]["agents"] == {"count": 0, "edges": []}


def test_another_organization_is_null_and_a_bad_token_or_query_is_refused(
    served: tuple[Coordinator, str, Clock],
) -> None:
    coord, url, _ = served
    _agent(coord, "ecs:task-arn=t-1")
    assert _ask(url, ["ecs:task-arn=t-1"], slug="elsewhere").json()["data"] == {
        "organization": None
    }
    assert _ask(url, ["ecs:task-arn=t-1"], token="wrong").status_code == 401
    bad = httpx.post(
        url,
        json={"query": '{ organization(slug: "acme") { nope } }'},
        headers={"Authorization": "Bearer api-token"},
    ).json()
    assert "Cannot query field 'nope'" in bad["errors"][0]["message"]
    coord.faults.add(Fault("graphql", "status", status=502, count=1))
    assert _ask(url, ["ecs:task-arn=t-1"]).status_code == 502
    assert _ask(url, ["ecs:task-arn=t-1"]).status_code == 200


def test_points_are_charged_as_the_answer_holds_objects_and_refused_beyond_the_limit(
    served: tuple[Coordinator, str, Clock],
) -> None:
    coord, url, clock = served
    _agent(coord, "ecs:task-arn=t-1")
    coord.graphql_rate.limit = 10
    first = _ask(url, ["ecs:task-arn=t-1"])
    # organization, agents, one edge, its node: 4 points (a job would be one more).
    headers: Any = first.headers
    assert (headers["RateLimit-Limit"], headers["RateLimit-Remaining"]) == ("10", "6")
    assert int(headers["RateLimit-Reset"]) == 200  # 5-minute windows on the clock: 1000 -> 1200
    _ask(url, ["ecs:task-arn=t-1"])
    spent = _ask(url, ["ecs:task-arn=t-1"])
    assert spent.status_code == 429 and spent.headers["RateLimit-Remaining"] == "2"
    assert coord.rest_rate.stats().requests == 0, "REST's own limit is not touched"
    clock.now = 1200.0
    assert _ask(url, ["ecs:task-arn=t-1"]).status_code == 200
