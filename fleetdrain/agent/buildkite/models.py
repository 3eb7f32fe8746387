"""Wire payloads of the Buildkite agent API v3 (the subset in docs/protocol.md).

Shared by the agent (client side) and the embedded coordinator (server side). Every model keeps
unknown fields (``extra="allow"``): servers add fields over time and an extra one is never fatal.

The field names and JSON types are those of the Go agent's ``api`` package (``api/agents.go``,
``api/jobs.go``, ``api/heartbeats.go``, ``api/meta_data.go`` in buildkite/agent), because the
hosted service and the Go agent are the two peers either side must satisfy:

* what the Go agent decodes as an ``int`` must go out as a JSON integer (``1``, never ``1.0``:
  ``json: cannot unmarshal number 1.0 into Go struct field ... of type int`` ends the Go agent);
  the interval fields are therefore ``int | float``, which keeps an int an int on the way out,
  and lets our own agent read a fraction of a second from a drill's coordinator;
* what it sends as a ``string`` (``priority``, ``exit_status``) stays a string;
* fields that are ``omitempty`` in Go are ``None`` here and left out by :func:`dump`.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Seconds: an int on the wire whenever the value is whole (see the module docstring).
Seconds = int | float


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class RegisterRequest(_Wire):
    """``POST register`` body (Go: ``AgentRegisterRequest``)."""

    name: str
    hostname: str = ""
    os: str = ""
    arch: str = ""
    #: Go sends both bools always (no omitempty); ours runs commands, so eval is enabled.
    script_eval_enabled: bool = True
    ignore_in_dispatches: bool = False
    #: A string in Go (``priority,omitempty``); a number from older clients is taken too.
    priority: str | None = None
    version: str = ""
    build: str = ""
    meta_data: list[str] = Field(default_factory=list)
    pid: int | None = None
    machine_id: str | None = None
    features: list[str] = Field(default_factory=list)

    @field_validator("meta_data", "features", mode="before")
    @classmethod
    def _nil_slice(cls, value: Any) -> Any:
        # Go encodes a nil slice as null (no omitempty on these): the Go agent without tags
        # sends "meta_data": null.
        return [] if value is None else value

    @field_validator("priority", mode="before")
    @classmethod
    def _number_priority(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        return value


class RegisterResponse(_Wire):
    """``POST register`` answer (Go: ``AgentRegisterResponse``; its intervals are ``int``)."""

    id: str
    name: str = ""
    access_token: str
    endpoint: str | None = None
    request_headers: dict[str, str] = Field(default_factory=dict)
    ping_interval: Seconds = 10
    job_status_interval: Seconds = 5
    heartbeat_interval: Seconds = 60
    meta_data: list[str] = Field(default_factory=list)


class Job(_Wire):
    """A job, from ``accept`` (and in a ping without its token) (Go: ``Job``)."""

    id: str
    endpoint: str | None = None
    state: str = ""
    env: dict[str, str] = Field(default_factory=dict)
    chunks_max_size_bytes: int = 100 * 1024
    chunks_interval_seconds: Seconds = 1
    log_max_size_bytes: int = 1024 * 1024 * 1024
    token: str | None = None

    @property
    def command(self) -> str:
        """The command the job runs (``env.BUILDKITE_COMMAND``)."""
        return self.env.get("BUILDKITE_COMMAND", "")


class PingResponse(_Wire):
    """``GET ping`` answer (Go: ``Ping``)."""

    action: str | None = None
    message: str | None = None
    job: Job | None = None
    endpoint: str | None = None
    request_headers: dict[str, str] | None = None


class HeartbeatRequest(_Wire):
    """``POST heartbeat`` body (Go: ``Heartbeat``)."""

    sent_at: str


class HeartbeatResponse(_Wire):
    """``POST heartbeat`` answer (Go: ``Heartbeat``)."""

    sent_at: str | None = None
    received_at: str | None = None


class JobStartRequest(_Wire):
    """``PUT jobs/{id}/start`` body (Go: ``jobStartRequest``)."""

    started_at: str


class JobStateResponse(_Wire):
    """``GET jobs/{id}`` answer (Go: ``JobState``)."""

    state: str


class JobFinishRequest(_Wire):
    """``PUT jobs/{id}/finish`` body (Go: ``JobFinishRequest``; ``chunks_failed_count`` is
    the one field it always sends)."""

    exit_status: str
    signal: str | None = None
    signal_reason: str | None = None
    finished_at: str
    chunks_failed_count: int = 0


class StopRequest(_Wire):
    """``POST stop`` body (Go: ``AgentStopRequest``, ``force,omitempty``)."""

    force: bool = False


class MetaData(_Wire):
    """A build's meta-data entry (Go: ``MetaData``, both fields ``omitempty``): the body of
    ``jobs/{id}/data/set``, ``data/get`` and ``data/exists`` (``key`` only for the last two),
    and the answer of ``data/get``."""

    key: str
    value: str | None = None


class MetaDataExists(_Wire):
    """``data/exists`` answer (Go: ``MetaDataExists``)."""

    exists: bool


class MetaDataBatch(_Wire):
    """``jobs/{id}/data/set-batch`` body (Go: ``MetaDataBatch``): all items or none."""

    items: list[MetaData]


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict of a model, without unset optional noise."""
    return model.model_dump(mode="json", exclude_none=True)
