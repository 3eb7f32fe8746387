"""The embedded coordinator: Buildkite agent API v3 subset + REST subset, in memory, over HTTP.

It is the agent's test peer and the drill's server::

    coord = Coordinator(lost_agent_timeout=5.0)
    with CoordinatorServer(coord) as server:
        coord.add_job("echo hi", key="build-1", retry=[RetryRule(exit_status="-1", limit=2)])
        ...  # point an agent at server.agent_endpoint
        coord.wait_for(lambda c: c.step("build-1").outcome == "passed", timeout=30)
"""

from fleetdrain.drill.coordinator.app import build_app
from fleetdrain.drill.coordinator.faults import FAULT_ENDPOINTS, FAULT_KINDS, Fault, FaultSet
from fleetdrain.drill.coordinator.server import CoordinatorServer
from fleetdrain.drill.coordinator.state import (
    AgentRecord,
    BadRequest,
    Coordinator,
    CoordinatorError,
    Event,
    Forbidden,
    JobRecord,
    NotFound,
    RetryRule,
    StepRecord,
    Unauthorized,
    Unprocessable,
    UnsupportedMediaType,
)

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
    "RetryRule",
    "StepRecord",
    "Unauthorized",
    "Unprocessable",
    "UnsupportedMediaType",
    "build_app",
]
