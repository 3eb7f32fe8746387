"""Wire shapes of the coordinator's REST subset: agents (list, stop, pause) and builds.

The embedded coordinator, the REST server, is their only user: the agent speaks the agent API
v3 (:mod:`fleetdrain.agent.buildkite.models`), and the controller's and ops' REST clients read
plain JSON. Request bodies keep unknown fields (``extra="allow"``): a client may send more than
this subset knows and that is never fatal. Field names and defaults are Buildkite's (see
``docs/protocol.md`` and the Builds API).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from fleetdrain.drill.coordinator.records import parse_tags


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


# ---------------------------------------------------------------------------- agents


class AgentStopRequest(_Wire):
    """REST ``PUT /v2/organizations/{org}/agents/{id}/stop`` body."""

    force: bool = False


class AgentPauseRequest(_Wire):
    """REST ``PUT /v2/organizations/{org}/agents/{id}/pause`` body (also the agent API's
    ``POST /v3/pause``, which takes the same fields)."""

    note: str | None = None
    timeout_in_minutes: int = Field(default=5, ge=1, le=10080)


class RestJob(_Wire):
    """The job an agent runs, as the REST agent object carries it."""

    id: str
    state: str = ""


class RestAgent(_Wire):
    """An agent as the REST API lists it."""

    id: str
    name: str
    connection_state: str
    hostname: str = ""
    meta_data: list[str] = Field(default_factory=list)
    job: RestJob | None = None
    last_job_finished_at: str | None = None
    priority: int | None = None
    version: str = ""
    paused: bool = False

    def tags(self) -> dict[str, str]:
        """``meta_data`` as a dict (``key=value`` entries; later keys win)."""
        return parse_tags(self.meta_data)


# ---------------------------------------------------------------------------- builds


class CreateBuildRequest(BaseModel):
    """The create-build body: ``commit`` and ``branch`` are required, as on Buildkite."""

    model_config = ConfigDict(extra="allow")

    commit: str = Field(min_length=1)
    branch: str = Field(min_length=1)
    message: str = ""
    env: dict[str, str] = Field(default_factory=dict)


class RestBuildAgent(BaseModel):
    """The agent of a build's job, as the Builds API shows it."""

    id: str
    name: str
    connection_state: str
    meta_data: list[str] = Field(default_factory=list)


class RestBuildJob(BaseModel):
    """A job as the Builds API lists it (every attempt, retried ones included)."""

    id: str
    type: str = "script"
    name: str
    step_key: str
    state: str
    command: str
    agent_query_rules: list[str]
    agent: RestBuildAgent | None
    exit_status: int | None
    signal: str | None
    signal_reason: str | None
    created_at: str | None
    scheduled_at: str | None
    started_at: str | None
    finished_at: str | None
    retried: bool
    retried_in_job_id: str | None
    retries_count: int
    retry_type: str | None


class RestBuild(BaseModel):
    """A build as the Builds API shows it."""

    id: str
    url: str
    web_url: str
    number: int
    state: str
    blocked: bool = False
    message: str
    commit: str
    branch: str
    env: dict[str, str]
    source: str = "api"
    created_at: str
    scheduled_at: str
    started_at: str | None
    finished_at: str | None
    pipeline: dict[str, str]
    jobs: list[RestBuildJob]
