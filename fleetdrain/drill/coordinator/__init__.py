"""The embedded coordinator: Buildkite agent API v3 subset + REST subset, in memory, over HTTP.

It is the agent's test peer and the drill's server::

    coord = Coordinator(lost_agent_timeout=5.0)
    with CoordinatorServer(coord) as server:
        coord.add_job("echo hi", key="build-1", retry=[RetryRule(exit_status="-1", limit=2)])
        ...  # point an agent at server.agent_endpoint
        coord.wait_for(lambda c: c.step("build-1").outcome == "passed", timeout=30)

Its parts: ``records`` (agents, jobs, steps, retry rules), ``errors`` (refusals by HTTP status),
``state`` (the :class:`Coordinator`: every operation, behind one lock), ``builds`` (pipelines
and builds on top of its jobs), ``repository`` (the git repository the jobs name, for a Buildkite
bootstrap to check out), ``faults`` (injected failures), ``rate_limit`` (Buildkite's REST
limit), ``rest_models`` (the REST wire shapes; the agent API's are
:mod:`fleetdrain.agent.buildkite.models`), ``app`` (the HTTP routes) and ``server`` (uvicorn in
a thread).
"""

from fleetdrain.drill.coordinator.app import build_app
from fleetdrain.drill.coordinator.errors import (
    BadRequest,
    CoordinatorError,
    Forbidden,
    NotFound,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)
from fleetdrain.drill.coordinator.faults import FAULT_ENDPOINTS, FAULT_KINDS, Fault, FaultSet
from fleetdrain.drill.coordinator.rate_limit import RateDecision, RateStats, RestRateLimit
from fleetdrain.drill.coordinator.records import (
    AgentRecord,
    Event,
    JobRecord,
    RetryRule,
    StepRecord,
)
from fleetdrain.drill.coordinator.repository import Repository
from fleetdrain.drill.coordinator.server import CoordinatorServer
from fleetdrain.drill.coordinator.state import Coordinator

__all__ = [
    "FAULT_ENDPOINTS",
    "FAULT_KINDS",
    "AgentRecord",
    "BadRequest",
    "Coordinator",
    "CoordinatorError",
    "CoordinatorServer",
    "Event",
    "Fault",
    "FaultSet",
    "Forbidden",
    "JobRecord",
    "NotFound",
    "RateDecision",
    "RateStats",
    "Repository",
    "RestRateLimit",
    "RetryRule",
    "StepRecord",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
    "build_app",
]
