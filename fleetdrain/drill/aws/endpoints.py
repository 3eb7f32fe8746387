"""Stand-ins for the endpoints an ECS task sees on a real host, served over loopback HTTP.

- :class:`EcsAgentStandIn`: what the ECS container agent serves each task: task metadata v4
  (``ECS_CONTAINER_METADATA_URI_V4``) and task scale-in protection (``ECS_AGENT_URI``).
  Several tasks share one server; each task's URIs carry its own endpoint id in the path,
  the way the real agent tells tasks apart.
- :class:`ImdsStandIn`: EC2 instance metadata, IMDSv2 only (tokens required), with settable
  spot interruption notices and Auto Scaling target lifecycle state. Several instances share
  one server under ``/instances/<instance-id>``; the unprefixed paths are the first instance.

Each serves itself with :class:`fleetdrain.drill.serve.ServeInThread` (``serve()``).

Both stand-ins take a ``clock`` (aware datetimes) so tests can move time and the drill can
compress it. The response shapes follow the ECS agent's task protection handler
(``{"protection"|"failure"|"error": ...}``); error *messages* written here are ours.
"""

from __future__ import annotations

import json
import secrets
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from fleetdrain.drill.serve import ServeInThread

Clock = Callable[[], datetime]


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _go_time(value: datetime | None) -> str | None:
    # Go's time.Time marshals as RFC 3339 with a Z for UTC.
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Faults:
    """Pending injected failures: (scope key) -> statuses to answer with, in order."""

    def __init__(self) -> None:
        self._pending: dict[tuple[str | None, str], list[int]] = {}

    def add(self, key: tuple[str | None, str], count: int, status: int) -> None:
        self._pending.setdefault(key, []).extend([status] * count)

    def take(self, specific: tuple[str | None, str], general: tuple[str | None, str]) -> int | None:
        for key in (specific, general):
            queue = self._pending.get(key)
            if queue:
                return queue.pop(0)
        return None


# ------------------------------------------------------------------------------- ECS agent


@dataclass(frozen=True)
class ProtectionPut:
    """One PUT the stand-in received: when (by its clock), what it asked, what it got."""

    at: datetime
    enabled: bool | None
    expires_in_minutes: int | None
    status: int


@dataclass(frozen=True)
class ProtectionSnapshot:
    """A task's protection as the stand-in holds it now (lapses already applied)."""

    enabled: bool
    expires_at: datetime | None


@dataclass
class EcsTask:
    """One task served by :class:`EcsAgentStandIn`."""

    task_id: str
    endpoint_id: str
    task_arn: str
    family: str
    revision: str
    availability_zone: str
    launch_type: str
    service_name: str | None
    container_name: str
    extra_metadata: dict[str, Any] = field(default_factory=dict)
    protection_enabled: bool = False
    protection_expires: datetime | None = None
    puts: list[ProtectionPut] = field(default_factory=list)
    created_at: datetime = field(default_factory=_utc_now)


_PROTECTION_FIELDS = {
    "protectionenabled": "ProtectionEnabled",
    "expiresinminutes": "ExpiresInMinutes",
}
DEFAULT_EXPIRES_IN_MINUTES = 120
MAX_EXPIRES_IN_MINUTES = 2880


class _DecodeError(Exception):
    pass


def _decode_protection_request(raw: bytes) -> tuple[bool | None, int | None]:
    # The ECS agent decodes with Go's encoding/json and DisallowUnknownFields: field names
    # match case-insensitively, unknown fields and wrong types are errors, null is "absent".
    try:
        body = json.loads(raw)
    except ValueError:
        raise _DecodeError from None
    if not isinstance(body, dict):
        raise _DecodeError
    enabled: bool | None = None
    minutes: int | None = None
    for key, value in body.items():
        name = _PROTECTION_FIELDS.get(key.lower())
        if name is None:
            raise _DecodeError
        if name == "ProtectionEnabled":
            if value is not None and not isinstance(value, bool):
                raise _DecodeError
            enabled = value
        else:
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise _DecodeError
            minutes = value
    return enabled, minutes


class EcsAgentStandIn:
    """The ECS container agent's task endpoints for any number of tasks.

    Task protection behaves as ECS documents it: ``ExpiresInMinutes`` defaults to 120, must
    be 1..2880, is reset by every enabling PUT, and protection lapses at its expiration (by
    the injected clock). Tasks without a service get a ``TASK_NOT_VALID`` failure, as ECS
    gives standalone tasks. Every protection PUT is recorded in ``EcsTask.puts``.
    """

    def __init__(
        self,
        *,
        cluster: str = "fleetdrain",
        region: str = "us-east-1",
        account_id: str = "123456789012",
        clock: Clock = _utc_now,
        on_protection: Callable[[str, bool, datetime | None], None] | None = None,
    ):
        """``cluster`` is reported as given (a name, as on EC2, or an ARN, as on Fargate).

        ``on_protection(task_arn, enabled, expires_at)`` is called after every accepted PUT:
        on a real host the ECS agent forwards it to ECS (``UpdateTaskProtection``), which is
        where the drain controller's ``GetTaskProtection`` reads it.
        """
        self.cluster = cluster
        self.on_protection = on_protection
        self.region = region
        self.account_id = account_id
        self.clock = clock
        self.base_url: str | None = None
        self._cluster_name = cluster.rsplit("/", 1)[-1]
        self._lock = threading.Lock()
        self._tasks: dict[str, EcsTask] = {}
        self._by_endpoint: dict[str, EcsTask] = {}
        self._faults = _Faults()
        self.app = Starlette(
            routes=[
                Route("/v4/{endpoint_id}/task", self._task_metadata, methods=["GET"]),
                Route("/v4/{endpoint_id}", self._container_metadata, methods=["GET"]),
                Route(
                    "/api/{endpoint_id}/task-protection/v1/state",
                    self._protection,
                    methods=["GET", "PUT"],
                ),
            ]
        )

    # -- setup and inspection (any thread)

    def add_task(
        self,
        task_id: str | None = None,
        *,
        family: str = "fleetdrain-agent",
        revision: str = "1",
        availability_zone: str = "us-east-1a",
        launch_type: str = "EC2",
        service_name: str | None = "fleetdrain-agents",
        container_name: str = "agent",
        extra_metadata: dict[str, Any] | None = None,
    ) -> EcsTask:
        """Register a task (``service_name=None``: a standalone task). Returns its record."""
        task_id = task_id or uuid.uuid4().hex
        endpoint_id = f"{task_id}-{zlib.crc32(task_id.encode())}"
        task = EcsTask(
            task_id=task_id,
            endpoint_id=endpoint_id,
            task_arn=f"arn:aws:ecs:{self.region}:{self.account_id}:task/{self._cluster_name}/{task_id}",
            family=family,
            revision=revision,
            availability_zone=availability_zone,
            launch_type=launch_type,
            service_name=service_name,
            container_name=container_name,
            extra_metadata=dict(extra_metadata or {}),
            created_at=self.clock(),
        )
        with self._lock:
            if task_id in self._tasks:
                raise ValueError(f"task {task_id} exists")
            self._tasks[task_id] = task
            self._by_endpoint[endpoint_id] = task
        return task

    def task(self, task_id_or_arn: str) -> EcsTask:
        """The task with this id or ARN (KeyError if none)."""
        with self._lock:
            if task_id_or_arn in self._tasks:
                return self._tasks[task_id_or_arn]
            for task in self._tasks.values():
                if task.task_arn == task_id_or_arn:
                    return task
        raise KeyError(task_id_or_arn)

    def protection(self, task_id_or_arn: str) -> ProtectionSnapshot:
        """The task's protection now, as ``GetTaskProtection`` would report it."""
        task = self.task(task_id_or_arn)
        with self._lock:
            self._apply_lapse(task)
            return ProtectionSnapshot(task.protection_enabled, task.protection_expires)

    def puts(self, task_id_or_arn: str) -> list[ProtectionPut]:
        """Every protection PUT the task made, in order."""
        task = self.task(task_id_or_arn)
        with self._lock:
            return list(task.puts)

    def fail_next(
        self,
        count: int,
        status: int = 500,
        *,
        task_id: str | None = None,
        endpoint: Literal["protection", "metadata"] = "protection",
    ) -> None:
        """Answer the next ``count`` calls to ``endpoint`` (of ``task_id``, or of any task) with
        ``status`` and an ECS-shaped ``ServerException`` body."""
        with self._lock:
            self._faults.add((task_id, endpoint), count, status)

    def reset(self) -> None:
        """Forget every task and pending fault (between scenarios or tests)."""
        with self._lock:
            self._tasks.clear()
            self._by_endpoint.clear()
            self._faults = _Faults()

    def env_for(self, task_id: str) -> dict[str, str]:
        """``ECS_CONTAINER_METADATA_URI_V4`` and ``ECS_AGENT_URI`` for the task's container."""
        if self.base_url is None:
            raise RuntimeError("stand-in is not being served: use serve() or set base_url")
        endpoint_id = self.task(task_id).endpoint_id
        return {
            "ECS_CONTAINER_METADATA_URI_V4": f"{self.base_url}/v4/{endpoint_id}",
            "ECS_AGENT_URI": f"{self.base_url}/api/{endpoint_id}",
        }

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Serve on a loopback port for the duration of the block; yields the base URL."""
        with ServeInThread(self.app) as server:
            self.base_url = server.url
            try:
                yield server.url
            finally:
                self.base_url = None

    # -- internals (server thread)

    def _apply_lapse(self, task: EcsTask) -> None:
        expires = task.protection_expires
        if task.protection_enabled and expires is not None and self.clock() >= expires:
            task.protection_enabled = False
            task.protection_expires = None

    def _lookup(self, request: Request, endpoint: str) -> tuple[EcsTask | None, int | None]:
        with self._lock:
            task = self._by_endpoint.get(request.path_params["endpoint_id"])
            if task is None:
                return None, None
            fault = self._faults.take((task.task_id, endpoint), (None, endpoint))
            return task, fault

    def _metadata_json(self, task: EcsTask) -> dict[str, Any]:
        container = self._container_json(task)
        started = _go_time(task.created_at)
        doc: dict[str, Any] = {
            "Cluster": self.cluster,
            "TaskARN": task.task_arn,
            "Family": task.family,
            "Revision": task.revision,
            "DesiredStatus": "RUNNING",
            "KnownStatus": "RUNNING",
            "Limits": {"CPU": 0.5, "Memory": 1024},
            "PullStartedAt": started,
            "PullStoppedAt": started,
            "AvailabilityZone": task.availability_zone,
            "LaunchType": task.launch_type,
            "Containers": [container],
            "ClockDrift": {
                "ClockErrorBound": 0.5,
                "ReferenceTimestamp": started,
                "ClockSynchronizationStatus": "SYNCHRONIZED",
            },
        }
        if task.service_name:
            doc["ServiceName"] = task.service_name
        doc.update(task.extra_metadata)
        return doc

    def _container_json(self, task: EcsTask) -> dict[str, Any]:
        docker_id = task.endpoint_id.split("-", 1)[0]
        return {
            "DockerId": docker_id,
            "Name": task.container_name,
            "DockerName": f"ecs-{task.family}-{task.revision}-{task.container_name}",
            "Image": "fleetdrain-agent:latest",
            "Labels": {
                "com.amazonaws.ecs.cluster": self.cluster,
                "com.amazonaws.ecs.container-name": task.container_name,
                "com.amazonaws.ecs.task-arn": task.task_arn,
                "com.amazonaws.ecs.task-definition-family": task.family,
                "com.amazonaws.ecs.task-definition-version": task.revision,
            },
            "DesiredStatus": "RUNNING",
            "KnownStatus": "RUNNING",
            "CreatedAt": _go_time(task.created_at),
            "StartedAt": _go_time(task.created_at),
            "Type": "NORMAL",
            "ContainerARN": (
                f"arn:aws:ecs:{self.region}:{self.account_id}:container/"
                f"{self._cluster_name}/{task.task_id}/{docker_id}"
            ),
        }

    @staticmethod
    def _not_found(endpoint_id: str) -> JSONResponse:
        return JSONResponse(
            f"V4 metadata handler: unable to find a task for endpoint id {endpoint_id}",
            status_code=404,
        )

    async def _task_metadata(self, request: Request) -> Response:
        task, fault = self._lookup(request, "metadata")
        if task is None:
            return self._not_found(request.path_params["endpoint_id"])
        if fault is not None:
            return JSONResponse("injected fault", status_code=fault)
        return JSONResponse(self._metadata_json(task))

    async def _container_metadata(self, request: Request) -> Response:
        task, fault = self._lookup(request, "metadata")
        if task is None:
            return self._not_found(request.path_params["endpoint_id"])
        if fault is not None:
            return JSONResponse("injected fault", status_code=fault)
        return JSONResponse(self._container_json(task))

    async def _protection(self, request: Request) -> Response:
        raw = await request.body() if request.method == "PUT" else b""
        task, fault = self._lookup(request, "protection")
        if task is None:
            return _protection_error(
                404, None, "ResourceNotFoundException", "Failed to find a task for the request"
            )
        if request.method == "GET":
            if fault is not None:
                return _protection_error(fault, task.task_arn, "ServerException", "injected fault")
            return self._protection_answer(task)
        return self._protection_put(task, raw, fault)

    def _protection_put(self, task: EcsTask, raw: bytes, fault: int | None) -> Response:
        now = self.clock()
        try:
            enabled, minutes = _decode_protection_request(raw)
        except _DecodeError:
            self._record(task, ProtectionPut(now, None, None, 400))
            return _protection_error(
                400,
                None,
                "InvalidParameterException",
                "UpdateTaskProtection: failed to decode request",
            )

        def record(status: int) -> None:
            self._record(task, ProtectionPut(now, enabled, minutes, status))

        if fault is not None:
            record(fault)
            return _protection_error(fault, task.task_arn, "ServerException", "injected fault")
        if enabled is None:
            record(400)
            return _protection_error(
                400,
                task.task_arn,
                "InvalidParameterException",
                "Invalid request: does not contain 'ProtectionEnabled' field",
            )
        effective = DEFAULT_EXPIRES_IN_MINUTES if minutes is None else minutes
        if enabled and not 1 <= effective <= MAX_EXPIRES_IN_MINUTES:
            record(400)
            # ECS rejects it; the agent passes ECS's error on with the ECS request id.
            return _protection_error(
                400,
                task.task_arn,
                "InvalidParameterException",
                f"expiresInMinutes must be between 1 and {MAX_EXPIRES_IN_MINUTES}",
                request_id=str(uuid.uuid4()),
            )
        if task.service_name is None:
            record(200)
            return _protection_failure(task.task_arn, "TASK_NOT_VALID")
        with self._lock:
            task.protection_enabled = enabled
            task.protection_expires = now + timedelta(minutes=effective) if enabled else None
            task.puts.append(ProtectionPut(now, enabled, minutes, 200))
            expires = task.protection_expires
        if self.on_protection is not None:
            self.on_protection(task.task_arn, enabled, expires)
        return self._protection_answer(task)

    def _record(self, task: EcsTask, put: ProtectionPut) -> None:
        with self._lock:
            task.puts.append(put)

    def _protection_answer(self, task: EcsTask) -> Response:
        if task.service_name is None:
            return _protection_failure(task.task_arn, "TASK_NOT_VALID")
        with self._lock:
            self._apply_lapse(task)
            body = {
                "protection": {
                    "ExpirationDate": _go_time(task.protection_expires),
                    "ProtectionEnabled": task.protection_enabled,
                    "TaskArn": task.task_arn,
                }
            }
        return JSONResponse(body)


def _protection_error(
    status: int, arn: str | None, code: str, message: str, *, request_id: str | None = None
) -> JSONResponse:
    error: dict[str, str] = {"Arn": arn} if arn else {}
    error.update({"Code": code, "Message": message})
    body: dict[str, Any] = {"requestID": request_id} if request_id else {}
    body["error"] = error
    return JSONResponse(body, status_code=status)


def _protection_failure(arn: str, reason: str) -> JSONResponse:
    return JSONResponse({"failure": {"Arn": arn, "Detail": None, "Reason": reason}})


# ------------------------------------------------------------------------------------ IMDS


@dataclass
class ImdsInstance:
    """One EC2 instance's metadata as :class:`ImdsStandIn` serves it."""

    instance_id: str
    instance_type: str = "m7g.large"
    availability_zone: str = "us-east-1a"
    life_cycle: str = "on-demand"
    ami_id: str = "ami-0fleetdrain000000"
    local_ipv4: str = "10.0.1.10"
    spot_action: tuple[str, datetime] | None = None
    #: None: the instance is not in an Auto Scaling group (the path is then 404).
    target_lifecycle_state: str | None = "InService"

    def leaves(self) -> dict[str, str]:
        """Every path under ``/latest/`` this instance answers, with its text."""
        region = self.availability_zone[:-1]
        leaves = {
            "meta-data/ami-id": self.ami_id,
            "meta-data/instance-id": self.instance_id,
            "meta-data/instance-type": self.instance_type,
            "meta-data/instance-life-cycle": self.life_cycle,
            "meta-data/local-ipv4": self.local_ipv4,
            "meta-data/placement/availability-zone": self.availability_zone,
            "meta-data/placement/region": region,
            "dynamic/instance-identity/document": json.dumps(
                {
                    "instanceId": self.instance_id,
                    "instanceType": self.instance_type,
                    "availabilityZone": self.availability_zone,
                    "region": region,
                    "imageId": self.ami_id,
                    "privateIp": self.local_ipv4,
                },
                indent=2,
            ),
        }
        if self.spot_action is not None:
            action, when = self.spot_action
            leaves["meta-data/spot/instance-action"] = json.dumps(
                {"action": action, "time": when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}
            )
        if self.target_lifecycle_state is not None:
            leaves["meta-data/autoscaling/target-lifecycle-state"] = self.target_lifecycle_state
        return leaves


@dataclass(frozen=True)
class ImdsRequest:
    """One request the IMDS stand-in answered."""

    method: str
    path: str
    instance_id: str | None
    status: int


class ImdsStandIn:
    """IMDSv2 (``HttpTokens: required``) for one or more instances.

    ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds`` (1..21600) gives a
    token bound to the instance; every GET needs a live one in ``X-aws-ec2-metadata-token``
    (401 otherwise). Tokens expire by the injected clock. Token PUTs carrying
    ``X-Forwarded-For`` get 403, as on EC2.
    """

    def __init__(
        self,
        instance_id: str = "i-0fleetdrain00000001",
        *,
        clock: Clock = _utc_now,
        **instance_fields: Any,
    ):
        """Creates the first (unprefixed) instance; more with :meth:`add_instance`."""
        self.clock = clock
        self.base_url: str | None = None
        self._lock = threading.Lock()
        self._instances: dict[str, ImdsInstance] = {}
        self._first = instance_id
        self._tokens: dict[str, tuple[str, datetime]] = {}
        self._faults = _Faults()
        self.requests: list[ImdsRequest] = []
        self._first_fields = dict(instance_fields)
        self.add_instance(instance_id, **instance_fields)
        self.app = Starlette(
            routes=[
                Route("/latest/api/token", self._token, methods=["PUT"]),
                Route("/latest/{path:path}", self._get, methods=["GET"]),
                Route("/instances/{iid}/latest/api/token", self._token, methods=["PUT"]),
                Route("/instances/{iid}/latest/{path:path}", self._get, methods=["GET"]),
            ]
        )

    def add_instance(self, instance_id: str, **fields: Any) -> ImdsInstance:
        """Add an instance, served under ``/instances/<instance_id>``."""
        instance = ImdsInstance(instance_id=instance_id, **fields)
        with self._lock:
            if instance_id in self._instances:
                raise ValueError(f"instance {instance_id} exists")
            self._instances[instance_id] = instance
        return instance

    def instance(self, instance_id: str | None = None) -> ImdsInstance:
        """The instance's record (the first instance by default)."""
        with self._lock:
            return self._instances[instance_id or self._first]

    def set_spot_action(
        self, time: datetime | None, action: str = "terminate", *, instance_id: str | None = None
    ) -> None:
        """Publish a spot interruption notice for ``time`` (None withdraws it)."""
        instance = self.instance(instance_id)
        with self._lock:
            instance.spot_action = None if time is None else (action, time)

    def set_target_lifecycle_state(
        self, state: str | None, *, instance_id: str | None = None
    ) -> None:
        """Set ``autoscaling/target-lifecycle-state`` (None: not in an Auto Scaling group)."""
        instance = self.instance(instance_id)
        with self._lock:
            instance.target_lifecycle_state = state

    def reset(self) -> None:
        """Back to the state at construction: the first instance only, as it was created;
        no tokens, faults or recorded requests."""
        with self._lock:
            self._instances = {
                self._first: ImdsInstance(instance_id=self._first, **self._first_fields)
            }
            self._tokens.clear()
            self._faults = _Faults()
            self.requests.clear()

    def fail_next(self, count: int, status: int = 500, *, instance_id: str | None = None) -> None:
        """Answer the next ``count`` requests (of ``instance_id``, or any) with ``status``."""
        with self._lock:
            self._faults.add((instance_id, "any"), count, status)

    def token_puts(self, instance_id: str | None = None) -> int:
        """How many token PUTs succeeded (for ``instance_id``, or in all)."""
        with self._lock:
            return sum(
                1
                for r in self.requests
                if r.method == "PUT"
                and r.status == 200
                and (instance_id is None or r.instance_id == instance_id)
            )

    def base_url_for(self, instance_id: str) -> str:
        """The IMDS base URL an agent on ``instance_id`` should use."""
        if self.base_url is None:
            raise RuntimeError("stand-in is not being served: use serve() or set base_url")
        return f"{self.base_url}/instances/{instance_id}"

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Serve on a loopback port for the duration of the block; yields the base URL."""
        with ServeInThread(self.app) as server:
            self.base_url = server.url
            try:
                yield server.url
            finally:
                self.base_url = None

    # -- internals (server thread)

    def _answer(
        self, request: Request, instance_id: str | None, status: int, text: str = ""
    ) -> Response:
        with self._lock:
            self.requests.append(ImdsRequest(request.method, request.url.path, instance_id, status))
        if status == 200:
            return PlainTextResponse(text)
        # IMDS error bodies are small HTML pages; the status is what clients act on.
        return Response(
            f"<html><body><h1>{status}</h1></body></html>",
            status_code=status,
            media_type="text/html",
        )

    def _resolve(self, request: Request) -> tuple[ImdsInstance | None, int | None]:
        iid = request.path_params.get("iid") or self._first
        with self._lock:
            instance = self._instances.get(iid)
            fault = self._faults.take((iid, "any"), (None, "any"))
        return instance, fault

    async def _token(self, request: Request) -> Response:
        instance, fault = self._resolve(request)
        if instance is None:
            return self._answer(request, None, 404)
        iid = instance.instance_id
        if fault is not None:
            return self._answer(request, iid, fault)
        if "x-forwarded-for" in request.headers:
            return self._answer(request, iid, 403)
        ttl_text = request.headers.get("x-aws-ec2-metadata-token-ttl-seconds", "")
        if not ttl_text.isdigit() or not 1 <= int(ttl_text) <= 21600:
            return self._answer(request, iid, 400)
        token = secrets.token_urlsafe(42)
        with self._lock:
            self._tokens[token] = (iid, self.clock() + timedelta(seconds=int(ttl_text)))
        response = self._answer(request, iid, 200, token)
        response.headers["X-aws-ec2-metadata-token-ttl-seconds"] = ttl_text
        return response

    async def _get(self, request: Request) -> Response:
        instance, fault = self._resolve(request)
        if instance is None:
            return self._answer(request, None, 404)
        iid = instance.instance_id
        if fault is not None:
            return self._answer(request, iid, fault)
        token = request.headers.get("x-aws-ec2-metadata-token", "")
        with self._lock:
            bound = self._tokens.get(token)
            if bound is not None and bound[1] <= self.clock():
                del self._tokens[token]
                bound = None
            leaves = instance.leaves()
        if bound is None or bound[0] != iid:
            return self._answer(request, iid, 401)
        path = request.path_params["path"]
        if path in leaves:
            return self._answer(request, iid, 200, leaves[path])
        prefix = path.rstrip("/") + "/"
        children = sorted(
            {
                rest.split("/", 1)[0] + ("/" if "/" in rest else "")
                for leaf in leaves
                if leaf.startswith(prefix) and (rest := leaf[len(prefix) :])
            }
        )
        if children:
            return self._answer(request, iid, 200, "\n".join(children))
        return self._answer(request, iid, 404)
