"""The local health/status endpoint and the ``fleetdrain-agent health`` check.

The server is a few lines over ``asyncio.start_server`` rather than starlette/uvicorn: it
lives in the PID-1 agent, whose whole idle RSS budget is 40 MB, and two fixed GET routes do
not need a framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fleetdrain.health")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}
_MAX_LINE = 8192
_MAX_HEADERS = 100


def split_addr(addr: str) -> tuple[str, int]:
    """Split ``host:port`` (``[v6]:port``; an empty host means every interface)."""
    host, sep, port_text = addr.rpartition(":")
    if not sep:
        raise ValueError(f"address {addr!r} is not host:port")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"address {addr!r} has no numeric port") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"address {addr!r}: port out of range")
    return host.removeprefix("[").removesuffix("]"), port


class _BadRequest(Exception):
    def __init__(self, status: int):
        super().__init__(status)
        self.status = status


class HealthServer:
    """``GET /health`` (200/503 by ``health()``) and ``GET /status`` (JSON of ``status()``).

    HEAD is served too; every response closes the connection. Garbage, oversized and slow
    requests get an error or a closed connection; nothing a client sends can stop the server.
    """

    def __init__(
        self,
        addr: str,
        health: Callable[[], bool],
        status: Callable[[], dict[str, Any]],
        *,
        read_timeout: float = 5.0,
    ):
        """``addr`` is ``host:port``; port 0 picks a free one (see :attr:`port`)."""
        self._host, self._port = split_addr(addr)
        self._health = health
        self._status = status
        self._read_timeout = read_timeout
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        """The bound port (the real one after :meth:`start` when 0 was asked for)."""
        return self._port

    async def start(self) -> None:
        """Bind and start serving."""
        self._server = await asyncio.start_server(
            self._handle, self._host or None, self._port, limit=_MAX_LINE
        )
        self._port = self._server.sockets[0].getsockname()[1]
        log.info("health server on %s:%d", self._host or "*", self._port)

    async def close(self) -> None:
        """Stop listening and drop connections still open."""
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()
        self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            try:
                async with asyncio.timeout(self._read_timeout):
                    method, path = await self._read_request(reader)
            except _BadRequest as exc:
                await self._send(writer, exc.status, {"error": _REASONS[exc.status]}, False)
                return
            except TimeoutError:
                await self._send(writer, 408, {"error": _REASONS[408]}, False)
                return
            status, body, extra = self._route(method, path)
            await self._send(writer, status, body, method == "HEAD", extra)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:  # a request must never take the agent down
            log.exception("health server: request failed")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, reader: asyncio.StreamReader) -> tuple[str, str]:
        try:
            request_line = await reader.readline()
            if not request_line.endswith(b"\n"):
                raise _BadRequest(400)
            parts = request_line.split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
                raise _BadRequest(400)
            for _ in range(_MAX_HEADERS):
                line = await reader.readline()
                if not line.endswith(b"\n"):
                    raise _BadRequest(400)
                if line in (b"\r\n", b"\n"):
                    break
            else:
                raise _BadRequest(431)
        except (ValueError, asyncio.LimitOverrunError):
            # readline's way of saying a line exceeded the stream limit
            raise _BadRequest(431) from None
        try:
            method = parts[0].decode("ascii")
            target = parts[1].decode("ascii")
        except UnicodeDecodeError:
            raise _BadRequest(400) from None
        return method, target.split("?", 1)[0]

    def _route(self, method: str, path: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        if path not in ("/health", "/status"):
            return 404, {"error": _REASONS[404]}, {}
        if method not in ("GET", "HEAD"):
            return 405, {"error": _REASONS[405]}, {"Allow": "GET, HEAD"}
        if path == "/health":
            try:
                ok = bool(self._health())
            except Exception:
                log.exception("health check raised")
                ok = False
            return (200 if ok else 503), {"ok": ok}, {}
        try:
            return 200, self._status(), {}
        except Exception as exc:
            log.exception("status raised")
            return 500, {"error": f"{type(exc).__name__}: {exc}"}, {}

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        body: dict[str, Any],
        head_only: bool,
        extra: dict[str, str] | None = None,
    ) -> None:
        payload = json.dumps(body, default=str).encode() + b"\n"
        headers = {
            "Content-Type": "application/json",
            "Content-Length": str(len(payload)),
            "Cache-Control": "no-store",
            "Connection": "close",
            **(extra or {}),
        }
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        writer.write(head.encode("ascii") + b"\r\n" + (b"" if head_only else payload))
        # A client that does not read must not hold the handler forever.
        async with asyncio.timeout(self._read_timeout):
            await writer.drain()


class HeartbeatHealth:
    """Healthy while the last successful heartbeat is younger than 2 x the heartbeat interval.

    Before the first heartbeat: healthy for ``startup_grace`` seconds from construction.
    After :meth:`disconnected` (a deliberate disconnect, e.g. a soft drain that keeps the
    task up idle): healthy, since no heartbeats are expected any more.
    """

    def __init__(
        self,
        heartbeat_interval: float | None = None,
        *,
        startup_grace: float = 120.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``heartbeat_interval`` (seconds) may be set later, once register has told it."""
        self.heartbeat_interval = heartbeat_interval
        self.startup_grace = startup_grace
        self._clock = clock
        self._started = clock()
        self._last: float | None = None
        self._disconnected = False

    @property
    def interval(self) -> float | None:
        """Alias of ``heartbeat_interval``."""
        return self.heartbeat_interval

    @interval.setter
    def interval(self, seconds: float | None) -> None:
        self.heartbeat_interval = seconds

    @property
    def last_success(self) -> float | None:
        """Clock time of the last successful heartbeat, or None."""
        return self._last

    def record_success(self, at: float | None = None) -> None:
        """Record a successful heartbeat at ``at`` (clock seconds; default now)."""
        when = self._clock() if at is None else at
        if self._last is None or when > self._last:
            self._last = when
        self._disconnected = False

    def disconnected(self) -> None:
        """The worker disconnected on purpose: stop expecting heartbeats."""
        self._disconnected = True

    def __call__(self) -> bool:
        """True while healthy by the rule above."""
        if self._disconnected:
            return True
        now = self._clock()
        if self._last is None:
            return now - self._started < self.startup_grace
        if self.heartbeat_interval is None:
            return True
        return now - self._last < 2 * self.heartbeat_interval


#: The Go agent's health check server (``buildkite-agent start --health-check-addr``,
#: agent/agent_pool.go): ``/`` answers 200 "OK: Buildkite agent is running", ``/status.json``
#: 200 with ``{"health": "ok", "aggregate_status": ...}`` (v3.72+); every other path, ``/health``
#: among them, 404. Asked in this order when ``/health`` is not found.
GO_AGENT_HEALTH_PATHS = ("/", "/status.json")


def check(addr: str, timeout: float = 2.0) -> int:
    """Whether the agent at ``addr`` is healthy: 0, else 1 with one line on stderr.

    For the container ``healthCheck`` (no curl in the image). ``addr`` is the server's own
    listen address: an empty or wildcard host is checked on loopback. What answers decides
    whose server it is:

    - ours (``start``, ``wrap``): ``GET /health`` answers 200 or 503, and that is the verdict;
    - the Go agent's (its ``--health-check-addr``, e.g. ``$BUILDKITE_AGENT_HEALTH_CHECK_ADDR``
      with no wrap in front): ``/health`` is 404 there, so ``GET /`` is asked (200 while the
      agent runs), then ``/status.json`` if ``/`` is not found either.

    ``timeout`` bounds the whole check, however many requests it takes. A server that is not
    listening is unhealthy (the Go agent opens its port only once it has registered: give the
    health check a ``startPeriod``).
    """
    # Imported here: only the short-lived health subcommand needs it, the agent does not.
    import http.client

    try:
        host, port = split_addr(addr)
    except ValueError as exc:
        print(f"health: {exc}", file=sys.stderr)
        return 1
    host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    deadline = time.monotonic() + timeout

    def get(path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(
            host, port, timeout=max(0.05, deadline - time.monotonic())
        )
        try:
            conn.request("GET", path, headers={"Connection": "close"})
            response = conn.getresponse()
            return response.status, response.read(4096)
        finally:
            conn.close()

    path = "/health"
    try:
        status, body = get(path)
        if status == 404:
            for path in GO_AGENT_HEALTH_PATHS:
                status, body = get(path)
                if status != 404:
                    break
    except (OSError, http.client.HTTPException) as exc:
        print(f"health: {addr}{path}: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
        return 1
    if status == 200 and (path != "/status.json" or _go_health_ok(body)):
        return 0
    text = _one_line(body[:512].decode("utf-8", "replace"))
    print(f"health: {addr}{path}: HTTP {status} {text}", file=sys.stderr)
    return 1


def _go_health_ok(body: bytes) -> bool:
    """The Go agent's ``/status.json`` says ``"health": "ok"`` (a body without it is fine)."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return True
    return not isinstance(parsed, dict) or parsed.get("health", "ok") == "ok"


def _one_line(text: object) -> str:
    return " ".join(str(text).split())
