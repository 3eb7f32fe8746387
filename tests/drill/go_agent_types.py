"""The Go agent's wire types, as pydantic models the tests hold both sides of the wire to.

Facts carried over from the Go agent's source (github.com/buildkite/agent), no code: each model
below is one Go struct, its fields the struct's JSON names with the Go type:

* ``api/agents.go``: ``AgentRegisterRequest``, ``AgentRegisterResponse``, ``AgentStopRequest``,
  ``AgentPauseRequest``;
* ``api/pings.go``: ``Ping``;
* ``api/jobs.go``: ``Job``, ``JobState``, ``jobStartRequest``, ``JobFinishRequest``;
* ``api/heartbeats.go``: ``Heartbeat``;
* ``api/meta_data.go``: ``MetaData``, ``MetaDataExists``, ``MetaDataBatch`` and the routes
  (all ``POST``): ``jobs/{id}/data/set`` (body ``MetaData``, answer not read),
  ``jobs/{id}/data/set-batch`` (``MetaDataBatch``), ``{jobs|builds}/{id}/data/get`` (body
  ``{"key"}``, answer ``MetaData``), ``.../data/exists`` (``{"key"}`` -> ``MetaDataExists``),
  ``.../data/keys`` (no body -> a JSON array of strings);
* ``api/chunks.go``: ``POST jobs/{id}/chunks?sequence=%d&offset=%d&size=%d`` (``uint64`` each),
  ``Content-Type: text/plain``, ``Content-Encoding: gzip``, the gzip of the bytes as the body;
* ``api/client.go``: a JSON body is sent with ``Content-Type: application/json``, a call without
  one (connect, disconnect, ping, accept, job state, keys) with no body and no content type;
  only ``Buildkite-*`` names of a server's ``request_headers`` are kept.

What Go's ``encoding/json`` makes of them: a JSON number into an ``int`` / ``uint64`` field must
be an integer literal (``1.0`` is ``cannot unmarshal number 1.0 into Go struct field ... of
type int``, and the Go agent exits); a ``string`` field takes only a JSON string (``5`` into
``priority`` fails); unknown fields are ignored and missing ones keep the zero value. On the way
out an ``omitempty`` field is left out when it is the zero value (``""``, ``0``, ``false``,
empty), every other field is always there (a nil slice as ``null``).

The models are stricter than Go in one way: a ``null`` is refused (Go would take it as
"absent"); a server that means absent leaves the field out. :func:`go_problems` checks a JSON
object against a model, types and (for what a Go agent would send) ``omitempty``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

GoString = StrictStr
GoInt = StrictInt
GoUint64 = Annotated[StrictInt, Field(ge=0)]
GoBool = StrictBool
GoStringSlice = list[StrictStr]
GoStringMap = dict[StrictStr, StrictStr]


def omitempty() -> Any:
    """A field tagged ``json:",omitempty"`` in Go."""
    return Field(default=None, json_schema_extra={"omitempty": True})


class GoStruct(BaseModel):
    """A Go struct as ``encoding/json`` sees it: strict types, unknown fields ignored, any
    field may be absent; ``null`` refused (see the module docstring)."""

    model_config = ConfigDict(extra="allow", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = sorted(k for k in cls.model_fields if k in data and data[k] is None)
            if nulls:
                raise ValueError(f"null in {', '.join(nulls)}: leave an absent field out")
        return data


# ------------------------------------------------------------------------ api/agents.go


class AgentRegisterRequest(GoStruct):
    name: GoString | None = None
    hostname: GoString | None = None
    os: GoString | None = None
    arch: GoString | None = None
    script_eval_enabled: GoBool | None = None
    ignore_in_dispatches: GoBool | None = None
    priority: GoString | None = omitempty()
    version: GoString | None = None
    build: GoString | None = None
    meta_data: GoStringSlice | None = None  # Go field Tags
    pid: GoInt | None = omitempty()
    machine_id: GoString | None = omitempty()
    features: GoStringSlice | None = None


class AgentRegisterResponse(GoStruct):
    id: GoString | None = None  # Go field UUID
    name: GoString | None = None
    access_token: GoString | None = None
    endpoint: GoString | None = None
    request_headers: GoStringMap | None = None
    ping_interval: GoInt | None = None
    job_status_interval: GoInt | None = None
    heartbeat_interval: GoInt | None = None
    meta_data: GoStringSlice | None = None
    # tracing: *AgentTracing, omitempty (not modelled: the coordinator sends none)


class AgentStopRequest(GoStruct):
    force: GoBool | None = omitempty()


class AgentPauseRequest(GoStruct):
    note: GoString | None = omitempty()
    timeout_in_minutes: GoInt | None = omitempty()


# ------------------------------------------------------------------------ api/jobs.go


class Job(GoStruct):
    id: GoString | None = omitempty()
    endpoint: GoString | None = None
    state: GoString | None = omitempty()
    env: GoStringMap | None = omitempty()
    # step (pipeline.CommandStep), matrix_permutation: structs, not modelled (none sent)
    chunks_max_size_bytes: GoUint64 | None = omitempty()
    chunks_interval_seconds: GoInt | None = omitempty()
    log_max_size_bytes: GoUint64 | None = omitempty()
    token: GoString | None = omitempty()
    exit_status: GoString | None = omitempty()
    signal: GoString | None = omitempty()
    signal_reason: GoString | None = omitempty()
    started_at: GoString | None = omitempty()
    finished_at: GoString | None = omitempty()
    runnable_at: GoString | None = omitempty()
    chunks_failed_count: GoInt | None = omitempty()
    traceparent: GoString | None = None


class JobState(GoStruct):
    state: GoString | None = omitempty()


class JobStartRequest(GoStruct):  # Go: jobStartRequest
    started_at: GoString | None = omitempty()


class JobFinishRequest(GoStruct):
    exit_status: GoString | None = omitempty()
    signal: GoString | None = omitempty()
    signal_reason: GoString | None = omitempty()
    finished_at: GoString | None = omitempty()
    chunks_failed_count: GoInt | None = None
    ignore_agent_in_dispatches: GoBool | None = omitempty()  # *bool


# ------------------------------------------------------------------------ api/pings.go


class Ping(GoStruct):
    action: GoString | None = omitempty()
    message: GoString | None = omitempty()
    job: Job | None = omitempty()  # *Job
    endpoint: GoString | None = omitempty()


# ------------------------------------------------------------------------ api/heartbeats.go


class Heartbeat(GoStruct):
    sent_at: GoString | None = None
    received_at: GoString | None = omitempty()


# ------------------------------------------------------------------------ api/meta_data.go


class MetaData(GoStruct):
    key: GoString | None = omitempty()
    value: GoString | None = omitempty()


class MetaDataExists(GoStruct):
    exists: GoBool | None = None


class MetaDataBatch(GoStruct):
    items: list[MetaData] | None = None


#: The answer of ``data/keys``: ``[]string``.
META_DATA_KEYS = TypeAdapter(list[StrictStr])

# ------------------------------------------------------------------------ the job's env

#: ``clicommand/bootstrap.go``: the bootstrap's flags marked ``validate:"required"``, by the
#: variable each is read from. Without any of them the bootstrap refuses the job (an empty
#: ``BUILDKITE_REPO``: "Missing repository").
BOOTSTRAP_REQUIRED_ENV: frozenset[str] = frozenset(
    {
        "BUILDKITE_JOB_ID",  # --job
        "BUILDKITE_REPO",  # --repository
        "BUILDKITE_COMMIT",  # --commit
        "BUILDKITE_BRANCH",  # --branch
        "BUILDKITE_AGENT_NAME",  # --agent
        "BUILDKITE_ORGANIZATION_SLUG",  # --organization
        "BUILDKITE_PIPELINE_SLUG",  # --pipeline
        "BUILDKITE_PIPELINE_PROVIDER",  # --pipeline-provider
    }
)

#: ``agent/job_runner.go`` (``createEnvironment``): variables the Go agent sets for the job
#: itself; one that arrives in the job's env is ignored and named in ``BUILDKITE_IGNORED_ENV``,
#: which the bootstrap warns about. (A subset: the agent-configuration ones the coordinator
#: could plausibly send.)
AGENT_PROTECTED_ENV: frozenset[str] = frozenset(
    {
        "BUILDKITE_AGENT_ENDPOINT",
        "BUILDKITE_AGENT_ACCESS_TOKEN",
        "BUILDKITE_AGENT_DEBUG",
        "BUILDKITE_AGENT_PID",
        "BUILDKITE_BIN_PATH",
        "BUILDKITE_CONFIG_PATH",
        "BUILDKITE_BUILD_PATH",
        "BUILDKITE_HOOKS_PATH",
        "BUILDKITE_PLUGINS_PATH",
        "BUILDKITE_SHELL",
    }
)


# ------------------------------------------------------------------------ checks


def _is_zero(value: Any) -> bool:
    return value is False or value == 0 or value == "" or value == [] or value == {}


def go_problems(model: type[GoStruct], body: Any, *, sent_by_go: bool = False) -> list[str]:
    """What in ``body`` (parsed JSON) the Go struct ``model`` would not take, as messages.

    ``sent_by_go``: also hold it to how the Go agent *encodes* the struct: an ``omitempty``
    field is absent rather than empty, every other field is present.
    """
    if not isinstance(body, dict):
        return [f"{model.__name__}: not a JSON object: {body!r}"]
    try:
        model.model_validate(body)
    except ValidationError as exc:
        return [
            f"{model.__name__}.{'.'.join(str(p) for p in e['loc']) or '(body)'}: {e['msg']}"
            f" (got {e['input']!r})"
            for e in exc.errors()
        ]
    problems: list[str] = []
    if sent_by_go:
        for name, field in model.model_fields.items():
            extra = field.json_schema_extra
            tagged = isinstance(extra, dict) and bool(extra.get("omitempty"))
            if tagged and name in body and _is_zero(body[name]):
                problems.append(f"{model.__name__}.{name}: sent empty; Go leaves it out")
            if not tagged and name not in body:
                problems.append(f"{model.__name__}.{name}: missing; Go always sends it")
    return problems
