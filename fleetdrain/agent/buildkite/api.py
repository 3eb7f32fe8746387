"""Agent API v3 client: authentication, ``request_headers``, retries and typed payloads."""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import ssl
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from fleetdrain import __version__
from fleetdrain.agent.buildkite.models import (
    HeartbeatRequest,
    HeartbeatResponse,
    Job,
    JobFinishRequest,
    JobStartRequest,
    JobStateResponse,
    PingResponse,
    RegisterRequest,
    RegisterResponse,
    dump,
)
from fleetdrain.agent.retry import (
    NO_RETRY,
    RetryableError,
    RetryPolicy,
    parse_retry_after,
    retrying,
)

log = logging.getLogger("fleetdrain.api")

M = TypeVar("M", bound=BaseModel)

#: The Go agent retries chunk uploads (and finish) "for up to an hour"; so do we.
LONG_RETRY = RetryPolicy(max_attempts=None, max_elapsed=3600.0, base=0.25, max_delay=5.0)
#: Calls whose failure the caller handles by moving on (accept, start) get a few quick tries.
SHORT_RETRY = RetryPolicy(max_attempts=4, base=0.2, max_delay=2.0)
#: register/connect/disconnect: a handful of tries with back-off, then the error is the caller's.
CONNECT_RETRY = RetryPolicy(max_attempts=8, base=0.5, max_delay=10.0)
#: With a ``done_by`` limit, the last attempt starts at least this long before it: less time
#: than that is not enough for one request over loopback or a LAN.
MIN_ATTEMPT_SECONDS = 0.25

#: A time on the API's clock (monotonic seconds), or None for no limit.
Deadline = Callable[[], float | None]


def new_http_client(timeout: float, connect: float) -> httpx.AsyncClient:
    """The HTTP client for the agent API (seconds: ``timeout`` per operation, ``connect``),
    with TLS set up only when it is first needed.

    httpx builds its TLS context when the client is made, loading certifi's whole bundle
    (~3 MB of the agent's idle memory) even for an ``http://`` endpoint. Here ``https://``
    goes through a transport made at the first https request, whose context reads the OS CA
    directory certificate by certificate (see :func:`tls_context`). Where a proxy is configured
    in the environment, httpx's own proxy routing is kept and the context is made at once.
    """
    import urllib.request

    timeouts = httpx.Timeout(timeout, connect=connect)
    if urllib.request.getproxies_environment():
        return httpx.AsyncClient(timeout=timeouts, verify=tls_context())
    return httpx.AsyncClient(
        timeout=timeouts,
        # Plain http only: this context has no CA at all, so TLS through it cannot succeed.
        transport=httpx.AsyncHTTPTransport(verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)),
        mounts={"https://": _LazyTransport(lambda: httpx.AsyncHTTPTransport(verify=tls_context()))},
    )


def tls_context() -> ssl.SSLContext:
    """A verifying TLS client context: ``$SSL_CERT_FILE`` or ``$SSL_CERT_DIR`` when set (as
    httpx honours them), else the OS CA directory where it has hashed certificates (OpenSSL
    then loads only those a server's chain needs), else certifi's bundle."""
    cafile = os.environ.get("SSL_CERT_FILE") or None
    capath = os.environ.get("SSL_CERT_DIR") or None
    if cafile or capath:
        return ssl.create_default_context(cafile=cafile, capath=capath)
    os_dir = ssl.get_default_verify_paths().capath
    if os_dir and _has_hashed_certs(os_dir):
        return ssl.create_default_context(capath=os_dir)
    import certifi

    return ssl.create_default_context(cafile=certifi.where())


def _has_hashed_certs(path: str) -> bool:
    # c_rehash names: 8 hex digits, a dot, a digit (update-ca-certificates makes them).
    try:
        with os.scandir(path) as entries:
            return any(len(e.name) == 10 and e.name[8] == "." for e in entries)
    except OSError:
        return False


class _LazyTransport(httpx.AsyncBaseTransport):
    """Makes the real transport on the first request through it."""

    def __init__(self, make: Callable[[], httpx.AsyncBaseTransport]) -> None:
        self._make = make
        self._transport: httpx.AsyncBaseTransport | None = None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._transport is None:
            self._transport = self._make()
        return await self._transport.handle_async_request(request)

    async def aclose(self) -> None:
        if self._transport is not None:
            await self._transport.aclose()


class ApiError(Exception):
    """A final (non-retryable) error from the agent API."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class Unauthorized(ApiError):
    """401: the token is not (or no longer) valid; the server has given up on us or the job."""


def now_rfc3339() -> str:
    """The current UTC time as RFC 3339 with nanosecond-style fraction, as the Go agent sends."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def user_agent() -> str:
    """``<name>/<version> (<os>; <arch>)``."""
    return f"fleetdrain-agent/{__version__} ({platform.system().lower()}; {platform.machine()})"


class AgentApi:
    """One agent's view of the API: the endpoint, its access token and the server's headers.

    ``http`` is injected so that tests and the agent share timeouts and the connection pool.
    """

    def __init__(
        self,
        endpoint: str,
        http: httpx.AsyncClient,
        *,
        token: str = "",
        on_retry_log: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.endpoint = endpoint.rstrip("/")
        self.http = http
        self.token = token
        self.request_headers: dict[str, str] = {}
        self._log_retries = on_retry_log
        #: Attempts under a ``done_by`` limit now in flight, with their limit.
        self._in_flight: set[tuple[asyncio.Timeout, Deadline]] = set()

    # -- plumbing ----------------------------------------------------------------------------

    def _headers(self, token: str | None, extra: Mapping[str, str] | None) -> dict[str, str]:
        headers = {"User-Agent": user_agent(), **self.request_headers}
        headers["Authorization"] = f"Token {token if token is not None else self.token}"
        if extra:
            headers.update(extra)
        return headers

    async def _send(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        content: bytes | None = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        endpoint: str | None = None,
        timeout: float | None = None,
    ) -> httpx.Response:
        url = f"{(endpoint or self.endpoint).rstrip('/')}/{path.lstrip('/')}"
        try:
            response = await self.http.request(
                method,
                url,
                json=json,
                content=content,
                params=params,
                headers=self._headers(token, headers),
                timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
            )
        except httpx.TransportError as exc:
            raise RetryableError(f"{method} {path}: {type(exc).__name__}: {exc}") from exc
        if response.status_code == 429 or response.status_code >= 500:
            raise RetryableError(
                f"{method} {path}: HTTP {response.status_code}",
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
            )
        if response.status_code == 401:
            raise Unauthorized(f"{method} {path}: HTTP 401 {_message(response)}", 401)
        if response.status_code >= 400:
            raise ApiError(
                f"{method} {path}: HTTP {response.status_code} {_message(response)}",
                response.status_code,
            )
        return response

    async def call(
        self,
        method: str,
        path: str,
        *,
        policy: RetryPolicy = NO_RETRY,
        done_by: Deadline | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        """One API call with the given retry policy. Raises ApiError/RetryableError when done.

        ``done_by`` returns a time on :attr:`clock` by which the call must be over, answered
        or not (None: no limit). It is asked again before every attempt, because a drain
        deadline can appear (SIGTERM) while a long retry loop waits out a coordinator outage:
        no attempt starts later than :data:`MIN_ATTEMPT_SECONDS` before it, and each attempt is
        cut off at it.
        """

        def on_retry(what: str, attempt: int, wait: float) -> None:
            if self._log_retries:
                log.warning("%s; retry %d in %.2fs", what, attempt, wait)

        def end() -> float | None:
            return None if done_by is None else done_by()

        def give_up_at() -> float | None:
            at = end()
            return None if at is None else at - MIN_ATTEMPT_SECONDS

        async def once() -> httpx.Response:
            if done_by is None:
                return await self._send(method, path, **kwargs)
            at = end()
            if at is not None and at - self.clock() <= 0:
                raise RetryableError(f"{method} {path}: no time left before the deadline")
            # One attempt must not outlive the deadline either (a server that answers after
            # 30 s, a connection that hangs): the whole attempt, not each read, is bounded,
            # and an attempt that started before there was a deadline gets it when it comes
            # (see deadline_changed).
            entry = (asyncio.timeout_at(self._loop_time(at)), done_by)
            try:
                async with entry[0]:
                    self._in_flight.add(entry)
                    try:
                        return await self._send(method, path, **kwargs)
                    finally:
                        self._in_flight.discard(entry)
            except TimeoutError:
                raise RetryableError(
                    f"{method} {path}: no answer before the deadline (cut off)"
                ) from None

        return await retrying(
            once,
            policy,
            describe=f"{method} {path}",
            on_retry=on_retry,
            clock=self.clock,
            give_up_at=give_up_at,
        )

    def deadline_changed(self) -> None:
        """Re-read ``done_by`` for every attempt in flight: a deadline has appeared or moved
        (SIGTERM, a spot notice), and an attempt that began without one must end by it too.
        Call it from the event loop's thread."""
        for scope, done_by in list(self._in_flight):
            at = done_by()
            if at is not None:
                scope.reschedule(self._loop_time(at))

    def _loop_time(self, at: float | None) -> float | None:
        """``at`` on :attr:`clock` as event-loop time (None stays None)."""
        if at is None:
            return None
        return asyncio.get_running_loop().time() + (at - self.clock())

    # -- calls -------------------------------------------------------------------------------

    async def register(self, request: RegisterRequest, registration_token: str) -> RegisterResponse:
        """Register with the registration token; adopt the access token, endpoint and headers."""
        response = await self.call(
            "POST", "register", token=registration_token, json=dump(request), policy=CONNECT_RETRY
        )
        reg = _parse(RegisterResponse, response)
        self.token = reg.access_token
        if reg.endpoint:
            self.endpoint = reg.endpoint.rstrip("/")
        self.request_headers = dict(reg.request_headers)
        return reg

    async def connect(self) -> None:
        """Mark the agent connected."""
        await self.call("POST", "connect", policy=CONNECT_RETRY)

    async def disconnect(
        self, policy: RetryPolicy = CONNECT_RETRY, done_by: Deadline | None = None
    ) -> None:
        """Mark the agent disconnected (over by ``done_by``, see :meth:`call`)."""
        await self.call("POST", "disconnect", policy=policy, done_by=done_by)

    async def ping(self, endpoint: str | None = None) -> PingResponse:
        """One ping (no retries: the ping loop is the retry)."""
        response = await self.call("GET", "ping", endpoint=endpoint)
        return _parse(PingResponse, response)

    async def heartbeat(self, timeout: float | None = None) -> HeartbeatResponse:
        """One heartbeat (no retries here: the heartbeat loop decides when to try again)."""
        body = HeartbeatRequest(sent_at=now_rfc3339())
        response = await self.call("POST", "heartbeat", json=dump(body), timeout=timeout)
        return _parse(HeartbeatResponse, response)

    async def accept(self, job_id: str) -> Job:
        """Accept an offered job. A 422 (someone else took it) surfaces as ApiError."""
        response = await self.call("PUT", f"jobs/{job_id}/accept", policy=SHORT_RETRY)
        return _parse(Job, response)

    async def start(self, job: Job) -> None:
        """Tell the server the job started."""
        body = JobStartRequest(started_at=now_rfc3339())
        await self.call(
            "PUT", f"jobs/{job.id}/start", json=dump(body), token=job.token, policy=SHORT_RETRY
        )

    async def upload_chunk(
        self,
        job: Job,
        sequence: int,
        offset: int,
        size: int,
        gzipped: bytes,
        policy: RetryPolicy = LONG_RETRY,
        done_by: Deadline | None = None,
    ) -> None:
        """Upload one gzip-compressed log chunk (over by ``done_by``, see :meth:`call`)."""
        await self.call(
            "POST",
            f"jobs/{job.id}/chunks",
            params={"sequence": sequence, "offset": offset, "size": size},
            content=gzipped,
            headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"},
            token=job.token,
            policy=policy,
            done_by=done_by,
        )

    async def job_state(self, job: Job) -> str:
        """The job's state on the server (one try: the poll loop is the retry)."""
        response = await self.call("GET", f"jobs/{job.id}", token=job.token)
        return _parse(JobStateResponse, response).state

    async def finish(
        self,
        job: Job,
        request: JobFinishRequest,
        policy: RetryPolicy = LONG_RETRY,
        done_by: Deadline | None = None,
    ) -> None:
        """Report the job's result (retried like chunks: a result is never dropped silently;
        over by ``done_by``, see :meth:`call`)."""
        await self.call(
            "PUT",
            f"jobs/{job.id}/finish",
            json=dump(request),
            token=job.token,
            policy=policy,
            done_by=done_by,
        )


def _message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    if isinstance(body, dict) and "message" in body:
        return str(body["message"])
    return str(body)[:200]


def _parse(model: type[M], response: httpx.Response) -> M:
    try:
        return model.model_validate_json(response.content or b"{}")
    except ValidationError as exc:
        raise ApiError(
            f"unexpected {model.__name__} from server: {exc.errors()[0]['msg']}",
            response.status_code,
        ) from exc


def machine_id() -> str:
    """A stable id for this host (systemd machine-id where present)."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path) as fh:
                return fh.read().strip()
        except OSError:
            continue
    return platform.node()


def register_request(name: str, tags: list[str], priority: int | None) -> RegisterRequest:
    """The register body for this process, as the Go agent's ``AgentRegisterRequest`` is sent:
    ``priority`` a string (left out when unset, as is an empty ``machine_id``), the two
    bools and both lists always there."""
    return RegisterRequest(
        name=name,
        hostname=platform.node(),
        os=platform.system().lower(),
        arch=platform.machine(),
        script_eval_enabled=True,
        ignore_in_dispatches=False,
        priority=None if priority is None else str(priority),
        version=__version__,
        build="fleetdrain",
        meta_data=list(tags),
        pid=os.getpid(),
        machine_id=machine_id() or None,
        features=[],
    )
