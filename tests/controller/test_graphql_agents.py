"""Finding agents with GraphQL (``graphql_agents``): the client over loopback against the
embedded coordinator's GraphQL API, and whole drains that find their agents with it."""

from __future__ import annotations

from collections.abc import Iterator

import boto3
import pytest

from fleetdrain.agent.buildkite.models import RegisterRequest
from fleetdrain.controller import runtime
from fleetdrain.controller.drain.config import Settings
from fleetdrain.controller.drain.errors import CoordinatorUnavailable, RateLimited
from fleetdrain.controller.drain.graphql_agents import (
    GraphqlAgentLookup,
    GraphqlCoordinator,
    lookup_query,
)
from fleetdrain.controller.drain.shared_listing import SharedAgentListing
from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer
from fleetdrain.drill.coordinator.faults import Fault
from tests.controller.test_drains import World, make_world

TASK = "arn:aws:ecs:us-east-1:1:task/ci/{:06d}"


@pytest.fixture
def world(aws_env: None) -> Iterator[World]:
    with make_world() as w:
        yield w


@pytest.fixture
def served() -> Iterator[tuple[Coordinator, str]]:
    coord = Coordinator(org="acme", api_token="api-token", lost_agent_timeout=1e9)
    with CoordinatorServer(coord) as server:
        yield coord, f"{server.url}/graphql/v1"


def _agents(coord: Coordinator, count: int) -> dict[str, str]:
    ids = {}
    for n in range(count):
        reg = coord.register(
            coord.registration_token,
            RegisterRequest(name=f"a{n}", meta_data=[f"ecs:task-arn={TASK.format(n)}"]),
        )
        coord.connect(reg.access_token, {})
        ids[TASK.format(n)] = reg.id
    return ids


def test_a_lookup_is_one_request_whatever_the_organizations_size(
    served: tuple[Coordinator, str],
) -> None:
    coord, url = served
    ids = _agents(coord, 1050)  # REST: 11 pages of 100
    lookup = GraphqlAgentLookup(url, "acme", lambda: "api-token")
    wanted = [TASK.format(3), TASK.format(1049), TASK.format(99999)]
    found = lookup.agents_for(wanted)
    assert sorted((a.task_arn, a.id) for a in found) == sorted(
        (arn, ids[arn]) for arn in wanted[:2]
    )
    assert all(a.live and not a.busy for a in found)
    assert lookup.requests == 1 and coord.rest_rate.stats().requests == 0
    assert lookup.budget is not None and lookup.budget.remaining < lookup.budget.limit
    assert lookup.agents_for([]) == [] and lookup.requests == 1, "no task: no request"


def test_an_arn_is_a_variable_never_query_text() -> None:
    query = lookup_query(['arn:aws:ecs:x:1:task/ci/"} evil { x'])
    assert "evil" not in query and "$m0" in query


def test_a_busy_agent_shows_its_job(served: tuple[Coordinator, str]) -> None:
    coord, url = served
    reg = coord.register(
        coord.registration_token,
        RegisterRequest(name="busy", meta_data=[f"ecs:task-arn={TASK.format(1)}"]),
    )
    coord.connect(reg.access_token, {})
    job = coord.add_job("make test")
    ping = coord.ping(reg.access_token, {})
    assert ping.job is not None
    coord.accept(reg.access_token, job.id, {})
    coord.start(reg.access_token, job.id, {}, "2026-02-02T03:00:00Z")
    (agent,) = GraphqlAgentLookup(url, "acme", lambda: "api-token").agents_for([TASK.format(1)])
    assert (agent.job_id, agent.job_state, agent.busy) == (job.id, "running", True)


def test_refusals_are_answers_a_drain_can_take(served: tuple[Coordinator, str]) -> None:
    coord, url = served
    _agents(coord, 2)
    # A rejected token: refreshed once, then it goes through.
    tokens = iter(["stale", "api-token"])
    refreshed: list[bool] = []
    lookup = GraphqlAgentLookup(
        url, "acme", lambda: next(tokens), lambda: refreshed.append(True), backoff=0.0
    )
    assert len(lookup.agents_for([TASK.format(0)])) == 1 and refreshed == [True]
    # 5xx: tried again, then unavailable.
    coord.faults.add(Fault("graphql", "status", status=502, count=1))
    again = GraphqlAgentLookup(url, "acme", lambda: "api-token", attempts=2, backoff=0.0)
    assert len(again.agents_for([TASK.format(0)])) == 1 and again.requests == 2
    coord.faults.add(Fault("graphql", "status", status=503, count=2))
    with pytest.raises(CoordinatorUnavailable, match="HTTP 503"):
        again.agents_for([TASK.format(0)])
    # An organization the token does not see: unavailable, with why.
    other = GraphqlAgentLookup(url, "elsewhere", lambda: "api-token")
    with pytest.raises(CoordinatorUnavailable, match="no organization 'elsewhere'"):
        other.agents_for([TASK.format(0)])
    # The points spent: 429 is RateLimited until the reset, and then nothing more is sent.
    coord.graphql_rate.reset()
    coord.graphql_rate.limit = 4
    spent = GraphqlAgentLookup(url, "acme", lambda: "api-token")
    assert len(spent.agents_for([TASK.format(0)])) == 1  # 4 points: the window's all
    with pytest.raises(RateLimited) as limited:
        spent.agents_for([TASK.format(0)])
    assert 0 < limited.value.retry_in <= 300 and spent.requests == 1, "not sent"
    assert spent.rate_refused == 1


def test_a_busy_drain_finds_its_agents_with_graphql_and_lists_nothing(world: World) -> None:
    """A whole drain with GraphQL lookups: its looks cost one GraphQL request each, REST
    carries only the pause; the job finishes, the hook completes."""
    (a,) = world.build(instances=1)
    world.controller(graphql=True)
    agent = world.add_agent(a, job_seconds=90)
    for n in range(250):  # an organization bigger than one REST page
        world.coord.register(
            world.coord.registration_token,
            RegisterRequest(name=f"x{n}", meta_data=[f"ecs:task-arn=elsewhere-{n}"]),
        )
    world.emit(world.gaps.begin_termination(a))
    assert world.record(a).phase == "soft"
    assert world.coord.agent(agent.agent_id).paused
    world.run_until(lambda: world.record(a).phase == "done", limit=300)
    assert world.record(a).outcome == "drained"
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.coord.job(agent.job_id or "").passed
    assert world.graphql.requests >= 2, "its looks asked GraphQL"
    assert world.rest.requests == 1, "REST: the pause only, no listing"


def test_the_deployed_setting_chooses_graphql_and_its_absence_the_shared_listing(
    aws_env: None,
) -> None:
    """template.yaml's CoordinatorGraphqlUrl reaches the functions as
    FLEETDRAIN_COORDINATOR_GRAPHQL_URL, and the handlers' wiring builds on it."""
    env = {
        "FLEETDRAIN_CLUSTER": "ci",
        "FLEETDRAIN_TABLE": "drains",
        "FLEETDRAIN_COORDINATOR_URL": "https://api.buildkite.com",
        "FLEETDRAIN_COORDINATOR_ORG": "acme",
        "FLEETDRAIN_COORDINATOR_TOKEN_SECRET_ARN": "arn:aws:secretsmanager:us-east-1:1:secret:t",
    }
    session = boto3.session.Session(region_name="us-east-1")
    plain = runtime.build_controller(Settings.from_env(env), session)
    assert isinstance(plain.coordinator, SharedAgentListing)
    url = "https://graphql.buildkite.com/v1"
    with_graphql = Settings.from_env({**env, "FLEETDRAIN_COORDINATOR_GRAPHQL_URL": url})
    ctl = runtime.build_controller(with_graphql, session)
    assert isinstance(ctl.coordinator, GraphqlCoordinator)
    assert (ctl.coordinator.lookup.url, ctl.coordinator.lookup.org) == (url, "acme")


def test_the_template_passes_the_graphql_url_to_every_function() -> None:
    from fleetdrain.drill.aws.template import load_template

    template = load_template()
    env = template["Globals"]["Function"]["Environment"]["Variables"]
    assert env["FLEETDRAIN_COORDINATOR_GRAPHQL_URL"] == {"Ref": "CoordinatorGraphqlUrl"}
    assert template["Parameters"]["CoordinatorGraphqlUrl"]["Default"] == ""
