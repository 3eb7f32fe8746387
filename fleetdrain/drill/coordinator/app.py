"""HTTP face of the embedded coordinator: the agent API v3 subset and the REST subset.

Each route parses and validates the wire input strictly, then calls one :class:`Coordinator`
operation; every refusal is a JSON ``{"message": ...}`` with a 4xx status. Faults are decided
before anything else, because they stand for the network and the load balancer in front of the
real service. Then a REST request of the organization is counted against its rate limit
(:mod:`~fleetdrain.drill.coordinator.rate_limit`): 429 beyond it, and the ``RateLimit-*``
headers on every REST answer; the agent API is not limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from fleetdrain.agent.buildkite.models import (
    HeartbeatRequest,
    HeartbeatResponse,
    JobFinishRequest,
    JobStartRequest,
    JobStateResponse,
    MetaData,
    MetaDataBatch,
    MetaDataExists,
    PingResponse,
    RegisterRequest,
    StopRequest,
    dump,
)
from fleetdrain.drill.coordinator import graphql_api
from fleetdrain.drill.coordinator.errors import (
    BadRequest,
    CoordinatorError,
    Unprocessable,
    UnsupportedMediaType,
)
from fleetdrain.drill.coordinator.faults import Fault
from fleetdrain.drill.coordinator.rate_limit import RateDecision
from fleetdrain.drill.coordinator.rest_models import (
    AgentPauseRequest,
    AgentStopRequest,
    CreateBuildRequest,
)
from fleetdrain.drill.coordinator.state import Coordinator, rfc3339_nano

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)

_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$")
_INT_STRING = re.compile(r"^-?\d+$")
_DEFAULT_PER_PAGE = 30
_MAX_PER_PAGE = 100


class _ConnectionDropped(Exception):
    """Raised after a response has started, so that uvicorn closes the connection mid-response."""


class _QuietDrops(logging.Filter):
    """Keeps uvicorn from logging our deliberate connection drops as application errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, _ConnectionDropped)


_QUIET_DROPS = _QuietDrops()


class _DropResponse(Response):
    """Promises a body (Content-Length) and never sends it: the client sees a protocol error."""

    def __init__(self) -> None:
        super().__init__(status_code=200)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", b"4096"),
                ],
            }
        )
        raise _ConnectionDropped("fault: connection dropped")


@dataclass
class _Call:
    """One request as a route handler sees it."""

    request: Request
    coord: Coordinator
    token: str | None
    ignore: bool

    @property
    def headers(self) -> Any:
        return self.request.headers

    def path(self, name: str) -> str:
        return str(self.request.path_params[name])


_Handler = Callable[[_Call], Awaitable[Response]]


def _message(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"message": message, **extra}, status_code=status)


def _ok(payload: BaseModel | dict[str, Any] | None = None) -> JSONResponse:
    if isinstance(payload, BaseModel):
        return JSONResponse(dump(payload))
    return JSONResponse(payload if payload is not None else {})


def _bearer(request: Request, scheme: str) -> str | None:
    value = request.headers.get("authorization")
    if not value:
        return None
    got, _, token = value.partition(" ")
    token = token.strip()
    if got.lower() != scheme.lower() or not token:
        return None
    return token


async def _json_body(request: Request, model: type[M], *, optional: bool = False) -> M:
    raw = await request.body()
    if not raw.strip():
        if optional:
            return model.model_validate({})
        raise BadRequest("a JSON request body is required")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType("JSON bodies need Content-Type: application/json")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"malformed JSON: {exc}") from exc
    try:
        # Strict: the wire types must be right ("exit_status": 0 is a bug, not a "0").
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        raise Unprocessable(f"invalid request body: {problems}") from exc


def _check_rfc3339(value: str, name: str) -> None:
    if not _RFC3339.match(value):
        raise Unprocessable(f"{name} is not an RFC 3339 time: {value!r}")
    try:
        datetime.fromisoformat(value.upper())
    except ValueError as exc:
        raise Unprocessable(f"{name} is not a valid time: {value!r}") from exc


def _query_int(request: Request, name: str, *, default: int | None = None, minimum: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        if default is None:
            raise BadRequest(f"query parameter {name} is required")
        return default
    if not re.fullmatch(r"-?\d+", raw):
        raise BadRequest(f"query parameter {name} must be an integer")
    value = int(raw)
    if value < minimum:
        raise BadRequest(f"query parameter {name} must be >= {minimum}")
    return value


def _gunzip(raw: bytes, limit: int) -> bytes:
    """Decompress a (possibly multi-member) gzip body, refusing more than ``limit`` bytes."""
    out = bytearray()
    data = raw
    try:
        while True:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += inflater.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                raise BadRequest(f"chunk inflates to more than its size ({limit} bytes)")
            if not inflater.eof:
                raise BadRequest("truncated gzip body")
            data = inflater.unused_data
            if not data:
                return bytes(out)
    except zlib.error as exc:
        raise BadRequest(f"body is not valid gzip: {exc}") from exc


# ---------------------------------------------------------------------------- agent API


async def _register(call: _Call) -> Response:
    call.coord.check_registration_token(call.token)
    body = await _json_body(call.request, RegisterRequest)
    if call.ignore:
        return _ok(
            call.coord.register_response(
                str(uuid.uuid4()), body.name, secrets.token_urlsafe(24), body.meta_data
            )
        )
    return _ok(call.coord.register(call.token, body))


async def _connect(call: _Call) -> Response:
    if call.ignore:
        call.coord.authorize(call.token, call.headers)
    else:
        call.coord.connect(call.token, call.headers)
    return _ok()


async def _disconnect(call: _Call) -> Response:
    if call.ignore:
        call.coord.authorize(call.token, call.headers)
    else:
        call.coord.disconnect(call.token, call.headers)
    return _ok()


async def _ping(call: _Call) -> Response:
    if call.ignore:
        call.coord.authorize(call.token, call.headers)
        return _ok(PingResponse(action="idle"))
    return _ok(call.coord.ping(call.token, call.headers))


async def _heartbeat(call: _Call) -> Response:
    call.coord.check_token(call.token)
    body = await _json_body(call.request, HeartbeatRequest)
    _check_rfc3339(body.sent_at, "sent_at")
    if call.ignore:
        # The 3.116-style loss seen from the server: the agent is told all is well, yet the
        # heartbeat counts for nothing towards keeping it alive.
        call.coord.authorize(call.token, call.headers)
        received_at = rfc3339_nano()
    else:
        received_at = call.coord.heartbeat(call.token, call.headers, body.sent_at)
    return _ok(HeartbeatResponse(sent_at=body.sent_at, received_at=received_at))


async def _accept(call: _Call) -> Response:
    job_id = call.path("job_id")
    if call.ignore:
        call.coord.authorize(call.token, call.headers)
        return _ok(call.coord.job_view(job_id))
    return _ok(call.coord.accept(call.token, job_id, call.headers))


async def _start(call: _Call) -> Response:
    job_id = call.path("job_id")
    call.coord.check_token(call.token)
    body = await _json_body(call.request, JobStartRequest)
    _check_rfc3339(body.started_at, "started_at")
    if call.ignore:
        call.coord.authorize_job(call.token, job_id, call.headers)
    else:
        call.coord.start(call.token, job_id, call.headers, body.started_at)
    return _ok()


async def _chunks(call: _Call) -> Response:
    job_id = call.path("job_id")
    call.coord.check_token(call.token)
    request = call.request
    sequence = _query_int(request, "sequence", minimum=1)
    offset = _query_int(request, "offset", minimum=0)
    size = _query_int(request, "size", minimum=0)
    if size > call.coord.chunks_max_size_bytes:
        raise BadRequest(f"size {size} exceeds chunks_max_size_bytes")
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding != "gzip":
        raise UnsupportedMediaType("log chunks must be sent with Content-Encoding: gzip")
    data = _gunzip(await request.body(), size)
    if len(data) != size:
        raise BadRequest(f"chunk is {len(data)} bytes uncompressed, size says {size}")
    if call.ignore:
        call.coord.authorize_job(call.token, job_id, call.headers)
    else:
        call.coord.upload_chunk(call.token, job_id, call.headers, sequence, offset, data)
    return _ok()


async def _job_state(call: _Call) -> Response:
    job_id = call.path("job_id")
    if call.ignore:
        call.coord.authorize_job(call.token, job_id, call.headers)
        return _ok(JobStateResponse(state=call.coord.job(job_id).state))
    return _ok(JobStateResponse(state=call.coord.job_state(call.token, job_id, call.headers)))


async def _finish(call: _Call) -> Response:
    job_id = call.path("job_id")
    call.coord.check_token(call.token)
    body = await _json_body(call.request, JobFinishRequest)
    if not _INT_STRING.match(body.exit_status):
        raise Unprocessable(f"exit_status must be an integer string, got {body.exit_status!r}")
    if "chunks_failed_count" not in body.model_fields_set:
        raise Unprocessable("chunks_failed_count is required (send 0 when none failed)")
    if body.chunks_failed_count < 0:
        raise Unprocessable("chunks_failed_count must be >= 0")
    _check_rfc3339(body.finished_at, "finished_at")
    if call.ignore:
        call.coord.authorize_job(call.token, job_id, call.headers)
    else:
        call.coord.finish(
            call.token,
            job_id,
            call.headers,
            exit_status=body.exit_status,
            signal=body.signal,
            signal_reason=body.signal_reason,
            chunks_failed_count=body.chunks_failed_count,
            finished_at=body.finished_at,
        )
    return _ok()


def _meta_data_item(item: MetaData) -> tuple[str, str]:
    if item.value is None:
        # The Go agent leaves an empty value out (omitempty): there is nothing to set.
        raise Unprocessable(f"meta-data value of {item.key!r} is required")
    return item.key, item.value


async def _meta_data_set(call: _Call) -> Response:
    job_id = call.path("job_id")
    call.coord.check_token(call.token)
    body = await _json_body(call.request, MetaData)
    items = [_meta_data_item(body)]
    if call.ignore:
        call.coord.authorize_job(call.token, job_id, call.headers)
    else:
        call.coord.meta_data_set(call.token, job_id, call.headers, items)
    return _ok()


async def _meta_data_set_batch(call: _Call) -> Response:
    job_id = call.path("job_id")
    call.coord.check_token(call.token)
    body = await _json_body(call.request, MetaDataBatch)
    items = [_meta_data_item(item) for item in body.items]
    if call.ignore:
        call.coord.authorize_job(call.token, job_id, call.headers)
    else:
        call.coord.meta_data_set(call.token, job_id, call.headers, items)
    return _ok()


def _meta_data_scope(call: _Call) -> tuple[str, str]:
    if "job_id" in call.request.path_params:
        return "job", call.path("job_id")
    return "build", call.path("build_id")


async def _meta_data_get(call: _Call) -> Response:
    scope, ident = _meta_data_scope(call)
    call.coord.check_token(call.token)
    body = await _json_body(call.request, MetaData)
    value = call.coord.meta_data_get(call.token, scope, ident, call.headers, body.key)
    return _ok(MetaData(key=body.key, value=value))


async def _meta_data_exists(call: _Call) -> Response:
    scope, ident = _meta_data_scope(call)
    call.coord.check_token(call.token)
    body = await _json_body(call.request, MetaData)
    exists = call.coord.meta_data_exists(call.token, scope, ident, call.headers, body.key)
    return _ok(MetaDataExists(exists=exists))


async def _meta_data_keys(call: _Call) -> Response:
    scope, ident = _meta_data_scope(call)
    call.coord.check_token(call.token)
    # The Go agent sends no body; the answer is a bare JSON array of the keys.
    return JSONResponse(call.coord.meta_data_keys(call.token, scope, ident, call.headers))


async def _agent_pause(call: _Call) -> Response:
    call.coord.check_token(call.token)
    body = await _json_body(call.request, AgentPauseRequest, optional=True)
    if call.ignore:
        call.coord.authorize(call.token, call.headers)
    else:
        call.coord.agent_pause(call.token, call.headers, body.timeout_in_minutes, body.note)
    return _ok()


async def _agent_resume(call: _Call) -> Response:
    if call.ignore:
        call.coord.authorize(call.token, call.headers)
    else:
        call.coord.agent_resume(call.token, call.headers)
    return _ok()


async def _agent_stop(call: _Call) -> Response:
    call.coord.check_token(call.token)
    body = await _json_body(call.request, StopRequest, optional=True)
    if call.ignore:
        call.coord.authorize(call.token, call.headers)
    else:
        call.coord.agent_stop(call.token, call.headers, body.force)
    return _ok()


# ---------------------------------------------------------------------------- REST API


async def _rest_agents(call: _Call) -> Response:
    call.coord.rest_authorize(call.token, call.path("org"))
    page = _query_int(call.request, "page", default=1, minimum=1)
    per_page = min(
        _query_int(call.request, "per_page", default=_DEFAULT_PER_PAGE, minimum=1), _MAX_PER_PAGE
    )
    agents, more = call.coord.rest_agents(page, per_page)
    links = []
    base = call.request.url.remove_query_params(["page", "per_page"])
    if more:
        links.append(f'<{base.include_query_params(page=page + 1, per_page=per_page)}>; rel="next"')
    if page > 1:
        links.append(f'<{base.include_query_params(page=page - 1, per_page=per_page)}>; rel="prev"')
    headers = {"Link": ", ".join(links)} if links else None
    # Not dump(): a REST agent's "job" is an explicit null when it is idle.
    return JSONResponse([a.model_dump(mode="json") for a in agents], headers=headers)


async def _rest_agent(call: _Call) -> Response:
    call.coord.rest_authorize(call.token, call.path("org"))
    return JSONResponse(call.coord.rest_agent(call.path("agent_id")).model_dump(mode="json"))


async def _rest_stop(call: _Call) -> Response:
    call.coord.rest_authorize(call.token, call.path("org"))
    agent_id = call.path("agent_id")
    call.coord.rest_agent(agent_id)
    body = await _json_body(call.request, AgentStopRequest, optional=True)
    if not call.ignore:
        call.coord.stop_agent(agent_id, body.force)
    return Response(status_code=204)


async def _rest_pause(call: _Call) -> Response:
    call.coord.rest_authorize(call.token, call.path("org"))
    agent_id = call.path("agent_id")
    call.coord.rest_agent(agent_id)
    body = await _json_body(call.request, AgentPauseRequest, optional=True)
    if not call.ignore:
        call.coord.pause_agent(agent_id, body.timeout_in_minutes, body.note)
    return Response(status_code=204)


async def _rest_resume(call: _Call) -> Response:
    call.coord.rest_authorize(call.token, call.path("org"))
    agent_id = call.path("agent_id")
    call.coord.rest_agent(agent_id)
    if not call.ignore:
        call.coord.resume_agent(agent_id)
    return Response(status_code=204)


async def _rest_create_build(call: _Call) -> Response:
    call.coord.rest_authorize(call.token, call.path("org"))
    body = await _json_body(call.request, CreateBuildRequest)
    record = call.coord.pipelines.create(call.path("pipeline"), body)
    base = str(call.request.base_url).rstrip("/")
    view = call.coord.pipelines.view(record, base)
    return JSONResponse(view.model_dump(mode="json"), status_code=201)


async def _rest_build(call: _Call) -> Response:
    call.coord.rest_authorize(call.token, call.path("org"))
    record = call.coord.pipelines.get(call.path("pipeline"), int(call.path("number")))
    base = str(call.request.base_url).rstrip("/")
    return JSONResponse(call.coord.pipelines.view(record, base).model_dump(mode="json"))


# ---------------------------------------------------------------------------- assembly


def _fault_response(fault: Fault) -> Response:
    assert fault.status is not None
    headers = {}
    retry_after = fault.retry_after_header()
    if retry_after is not None:
        headers["Retry-After"] = retry_after
    return JSONResponse(
        {"message": f"injected fault: HTTP {fault.status}"},
        status_code=fault.status,
        headers=headers,
    )


def _take_rate(coord: Coordinator, token: str | None, request: Request) -> RateDecision | None:
    """Count a REST request against the organization's limit. Only the organization's own
    requests count (a wrong token or another organization is refused by the route itself, and
    names no organization of ours); None when nothing is enforced."""
    try:
        coord.rest_authorize(token, str(request.path_params.get("org", "")))
    except CoordinatorError:
        return None
    return coord.rest_rate.take()


def _rate_limited(rate: RateDecision) -> Response:
    """Buildkite's answer beyond the limit: 429, ``RateLimit-Remaining: 0``."""
    return JSONResponse(
        {
            "message": f"API rate limit exceeded ({rate.limit} requests a window for this "
            f"organization); it resets in {rate.reset} seconds"
        },
        status_code=429,
        headers=rate.headers(),
    )


def _route(
    coord: Coordinator, name: str, handler: _Handler, scheme: str
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        token = _bearer(request, scheme)
        if scheme == "Token":
            agent_id = coord.token_agent(token)
        else:
            agent_id = request.path_params.get("agent_id")
        fault = coord.take_fault(name, agent_id)
        if fault is not None:
            if fault.kind == "latency":
                await asyncio.sleep(fault.seconds)
            elif fault.kind == "status":
                return _fault_response(fault)
            elif fault.kind == "drop" and not fault.process:
                # Read the body first: closing with unread input makes the kernel send a reset,
                # and the client should see a response cut short, not a refused send.
                await request.body()
                return _DropResponse()
        rate = None
        if scheme == "Bearer":
            rate = _take_rate(coord, token, request)
            if rate is not None and not rate.allowed:
                return _rate_limited(rate)
        call = _Call(request, coord, token, ignore=fault is not None and fault.kind == "ignore")
        try:
            response = await handler(call)
        except CoordinatorError as exc:
            # A refused accept has its own event; a meta-data key that is not set is an
            # answer (the Go agent's `meta-data get --default` relies on the 404), not a refusal.
            answer = (name, exc.status) in (("accept", 422), ("meta_data_get", 404))
            if not answer:
                coord.record_rejection(name, agent_id, exc)
            response = _message(exc.status, exc.message)
        if fault is not None and fault.kind == "drop":
            return _DropResponse()
        if rate is not None:
            response.headers.update(rate.headers())
        return response

    endpoint.__name__ = f"coordinator_{name}"
    return endpoint


class GraphqlRequest(BaseModel):
    """A GraphQL request body."""

    query: str
    variables: dict[str, Any] | None = None


def _graphql_endpoint(coord: Coordinator) -> Callable[[Request], Awaitable[Response]]:
    """``POST /graphql/v1`` (Buildkite: ``https://graphql.buildkite.com/v1``): the API token,
    the query answered by :mod:`~fleetdrain.drill.coordinator.graphql_api`, charged in points
    against the organization's GraphQL limit (``RateLimit-*`` in points, 429 beyond)."""

    async def endpoint(request: Request) -> Response:
        token = _bearer(request, "Bearer")
        try:
            coord.rest_authorize(token, coord.org)
        except CoordinatorError as exc:
            return _message(exc.status, exc.message)
        fault = coord.take_fault("graphql", None)
        if fault is not None and fault.kind == "latency":
            await asyncio.sleep(fault.seconds)
        elif fault is not None and fault.kind == "status":
            return _fault_response(fault)
        try:
            body = await _json_body(request, GraphqlRequest)
        except CoordinatorError as exc:
            return _message(exc.status, exc.message)
        answer = graphql_api.execute(
            coord.org, coord.agents_with_meta_data, body.query, body.variables
        )
        rate = coord.graphql_rate.take(graphql_api.points(answer))
        if rate is not None and not rate.allowed:
            return JSONResponse(
                {"errors": [{"message": "API rate limit exceeded (complexity points)"}]},
                status_code=429,
                headers=rate.headers(),
            )
        return JSONResponse(answer, headers=rate.headers() if rate is not None else None)

    endpoint.__name__ = "coordinator_graphql"
    return endpoint


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    response = _message(exc.status_code, exc.detail)
    response.headers.update(exc.headers or {})
    return response


def _watch_interval(coord: Coordinator) -> float:
    return min(0.2, max(0.02, coord.lost_agent_timeout / 4))


async def _watch_lost(coord: Coordinator) -> None:
    interval = _watch_interval(coord)
    while True:
        try:
            coord.check_lost()
        except Exception:
            log.exception("lost-agent check failed")
        await asyncio.sleep(interval)


def build_app(coord: Coordinator) -> Starlette:
    """The Starlette app serving ``coord``: agent API under ``/v3``, REST under ``/v2``,
    GraphQL (agents by meta-data) at ``/graphql/v1``.

    Its lifespan runs the lost-agent rule every 0.02-0.2 s (a quarter of the timeout).
    """
    logging.getLogger("uvicorn.error").addFilter(_QUIET_DROPS)

    def agent(
        path: str, name: str, handler: _Handler, method: str, route: str | None = None
    ) -> Route:
        endpoint = _route(coord, name, handler, "Token")
        return Route(path, endpoint, methods=[method], name=route or name)

    def rest(path: str, name: str, handler: _Handler, method: str) -> Route:
        full = "/v2/organizations/{org}/agents" + path
        return Route(full, _route(coord, name, handler, "Bearer"), methods=[method], name=name)

    def builds(path: str, name: str, handler: _Handler, method: str) -> Route:
        full = "/v2/organizations/{org}/pipelines/{pipeline}/builds" + path
        return Route(full, _route(coord, name, handler, "Bearer"), methods=[method], name=name)

    routes = [
        agent("/v3/register", "register", _register, "POST"),
        agent("/v3/connect", "connect", _connect, "POST"),
        agent("/v3/disconnect", "disconnect", _disconnect, "POST"),
        agent("/v3/ping", "ping", _ping, "GET"),
        agent("/v3/heartbeat", "heartbeat", _heartbeat, "POST"),
        agent("/v3/pause", "pause", _agent_pause, "POST"),
        agent("/v3/resume", "resume", _agent_resume, "POST"),
        agent("/v3/stop", "stop", _agent_stop, "POST"),
        agent("/v3/jobs/{job_id}/accept", "accept", _accept, "PUT"),
        agent("/v3/jobs/{job_id}/start", "start", _start, "PUT"),
        agent("/v3/jobs/{job_id}/chunks", "chunks", _chunks, "POST"),
        agent("/v3/jobs/{job_id}/finish", "finish", _finish, "PUT"),
        agent("/v3/jobs/{job_id}", "job_state", _job_state, "GET"),
        agent("/v3/jobs/{job_id}/data/set", "meta_data_set", _meta_data_set, "POST"),
        agent(
            "/v3/jobs/{job_id}/data/set-batch", "meta_data_set_batch", _meta_data_set_batch, "POST"
        ),
        agent("/v3/jobs/{job_id}/data/get", "meta_data_get", _meta_data_get, "POST"),
        agent("/v3/jobs/{job_id}/data/exists", "meta_data_exists", _meta_data_exists, "POST"),
        agent("/v3/jobs/{job_id}/data/keys", "meta_data_keys", _meta_data_keys, "POST"),
        # `buildkite-agent meta-data get/exists/keys --build ID`: the same, by build.
        agent(
            "/v3/builds/{build_id}/data/get",
            "meta_data_get",
            _meta_data_get,
            "POST",
            route="meta_data_get_build",
        ),
        agent(
            "/v3/builds/{build_id}/data/exists",
            "meta_data_exists",
            _meta_data_exists,
            "POST",
            route="meta_data_exists_build",
        ),
        agent(
            "/v3/builds/{build_id}/data/keys",
            "meta_data_keys",
            _meta_data_keys,
            "POST",
            route="meta_data_keys_build",
        ),
        rest("", "rest_agents", _rest_agents, "GET"),
        rest("/{agent_id}", "rest_agent", _rest_agent, "GET"),
        rest("/{agent_id}/stop", "rest_stop", _rest_stop, "PUT"),
        rest("/{agent_id}/pause", "rest_pause", _rest_pause, "PUT"),
        rest("/{agent_id}/resume", "rest_resume", _rest_resume, "PUT"),
        builds("", "rest_create_build", _rest_create_build, "POST"),
        builds("/{number:int}", "rest_build", _rest_build, "GET"),
        Route("/graphql/v1", _graphql_endpoint(coord), methods=["POST"], name="graphql"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        watcher = asyncio.create_task(_watch_lost(coord))
        try:
            yield
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    return Starlette(
        routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error}
    )
