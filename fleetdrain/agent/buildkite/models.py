"""Wire payloads of the Buildkite agent API v3 (the subset in docs/protocol.md).

Shared by the agent (client side) and the embedded coordinator (server side). Every model keeps
unknown fields (``extra="allow"``): servers add fields over time and an extra one is never fatal.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)


class RegisterRequest(_Wire):
    name: str
    hostname: str = ""
    os: str = ""
    arch: str = ""
    priority: int | None = None
    version: str = ""
    build: str = ""
    meta_data: list[str] = Field(default_factory=list)
    pid: int = 0
    machine_id: str = ""
    features: list[str] = Field(default_factory=list)


class RegisterResponse(_Wire):
    id: str
    name: str = ""
    access_token: str
    endpoint: str | None = None
    request_headers: dict[str, str] = Field(default_factory=dict)
    ping_interval: float = 10
    job_status_interval: float = 5
    heartbeat_interval: float = 60
    meta_data: list[str] = Field(default_factory=list)


class Job(_Wire):
    id: str
    endpoint: str | None = None
    state: str = ""
    env: dict[str, str] = Field(default_factory=dict)
    chunks_max_size_bytes: int = 100 * 1024
    chunks_interval_seconds: float = 1
    log_max_size_bytes: int = 1024 * 1024 * 1024
    token: str | None = None

    @property
    def command(self) -> str:
        """The command the job runs (``env.BUILDKITE_COMMAND``)."""
        return self.env.get("BUILDKITE_COMMAND", "")


class PingResponse(_Wire):
    action: str | None = None
    message: str | None = None
    job: Job | None = None
    endpoint: str | None = None
    request_headers: dict[str, str] | None = None


class HeartbeatRequest(_Wire):
    sent_at: str


class HeartbeatResponse(_Wire):
    sent_at: str | None = None
    received_at: str | None = None


class JobStartRequest(_Wire):
    started_at: str


class JobStateResponse(_Wire):
    state: str


class JobFinishRequest(_Wire):
    exit_status: str
    signal: str | None = None
    signal_reason: str | None = None
    finished_at: str
    chunks_failed_count: int = 0


class StopRequest(_Wire):
    force: bool = False


def dump(model: BaseModel) -> dict[str, Any]:
    """JSON-ready dict of a model, without unset optional noise."""
    return model.model_dump(mode="json", exclude_none=True)
