"""fleetdrain.agent.health: the health/status server over real loopback sockets, the heartbeat rule,
and the synchronous check used by the container healthCheck."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from fleetdrain.agent.health import HealthServer, HeartbeatHealth, check, split_addr


class Flags:
    def __init__(self) -> None:
        self.healthy = True
        self.status: dict[str, Any] = {"state": "idle", "job": None}

    def health(self) -> bool:
        return self.healthy

    def get_status(self) -> dict[str, Any]:
        return self.status


@pytest.fixture
def flags() -> Flags:
    return Flags()


@pytest.fixture
async def server(flags: Flags) -> AsyncIterator[HealthServer]:
    srv = HealthServer("127.0.0.1:0", flags.health, flags.get_status, read_timeout=0.3)
    await srv.start()
    yield srv
    await srv.close()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


def url(server: HealthServer, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


async def raw_exchange(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 2.0)
    except ConnectionResetError:
        return b""  # the server hung up on an oversized request before reading it all
    finally:
        writer.close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------- server


async def test_health_200_then_503(server: HealthServer, flags: Flags, client):
    assert server.port != 0
    ok = await client.get(url(server, "/health"))
    assert ok.status_code == 200 and ok.json() == {"ok": True}
    assert ok.headers["connection"] == "close"
    flags.healthy = False
    bad = await client.get(url(server, "/health"))
    assert bad.status_code == 503 and bad.json() == {"ok": False}


async def test_status_json(server: HealthServer, flags: Flags, client):
    deadline = datetime(2026, 3, 1, 12, 2, tzinfo=UTC)
    flags.status = {"state": "draining", "job": "j-1", "deadline": deadline}
    response = await client.get(url(server, "/status?verbose=1"))
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"state": "draining", "job": "j-1", "deadline": str(deadline)}


async def test_unknown_path_404_and_wrong_method_405(server: HealthServer, client):
    assert (await client.get(url(server, "/"))).status_code == 404
    assert (await client.get(url(server, "/healthz"))).status_code == 404
    post = await client.post(url(server, "/health"), content=b"x")
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"


async def test_head_has_headers_but_no_body(server: HealthServer, flags: Flags):
    reply = await raw_exchange(server.port, b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"Content-Length: " in head
    assert body == b""
    flags.healthy = False
    reply = await raw_exchange(server.port, b"HEAD /health HTTP/1.0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503 ")


async def test_health_callback_that_raises_is_unhealthy(flags: Flags, client):
    def broken() -> bool:
        raise RuntimeError("boom")

    def broken_status() -> dict[str, Any]:
        raise RuntimeError("boom")

    srv = HealthServer("127.0.0.1:0", broken, broken_status)
    await srv.start()
    try:
        assert (await client.get(url(srv, "/health"))).status_code == 503
        assert (await client.get(url(srv, "/status"))).status_code == 500
    finally:
        await srv.close()


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00\xff\xfe garbage\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET /health SPDY/9\r\n\r\n",
        b"GET /h\xc3\xa9alth HTTP/1.1\r\n\r\n",
        b"GET /health HTTP/1.1\r\n" + b"X-Long: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
        b"GET /health HTTP/1.1",  # then EOF
    ],
)
async def test_garbage_requests_do_not_kill_it(server: HealthServer, client, garbage: bytes):
    reply = await raw_exchange(server.port, garbage)
    assert reply == b"" or reply.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 431 "))
    assert (await client.get(url(server, "/health"))).status_code == 200


async def test_garbage_request_gets_400(server: HealthServer):
    reply = await raw_exchange(server.port, b"\x00\xff\xfe garbage\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 ")


async def test_slow_client_is_cut_off_and_others_still_served(server: HealthServer, client):
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /hea")  # and then nothing
    await writer.drain()
    # served while the slow one still holds its connection
    assert (await client.get(url(server, "/health"))).status_code == 200
    reply = await asyncio.wait_for(reader.read(), 2.0)  # cut off at the 0.3 s read timeout
    assert reply.startswith(b"HTTP/1.1 408 ")
    writer.close()


async def test_close_stops_listening(flags: Flags):
    srv = HealthServer("127.0.0.1:0", flags.health, flags.get_status)
    await srv.start()
    port = srv.port
    _, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(srv.close(), 2.0)  # does not wait for the idle connection
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    idle_writer.close()


def test_split_addr():
    assert split_addr("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert split_addr(":8080") == ("", 8080)
    assert split_addr("[::1]:0") == ("::1", 0)
    for bad in ("8080", "host:http", "host:70000"):
        with pytest.raises(ValueError):
            split_addr(bad)


# ------------------------------------------------------------------------------ heartbeat


class Ticks:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_heartbeat_health_grace_then_two_intervals():
    ticks = Ticks()
    health = HeartbeatHealth(10.0, startup_grace=30.0, clock=ticks)
    assert health()  # starting up
    ticks.t += 29.9
    assert health()
    ticks.t += 0.2
    assert not health()  # grace over and still no heartbeat
    health.record_success()
    assert health()
    ticks.t += 19.9
    assert health()
    ticks.t += 0.2
    assert not health()  # last success 20.1 s ago > 2 x 10 s
    health.record_success(at=ticks.t - 5)
    assert health()
    assert health.last_success == ticks.t - 5


def test_heartbeat_health_interval_learned_later_and_deliberate_disconnect():
    ticks = Ticks()
    health = HeartbeatHealth(startup_grace=5.0, clock=ticks)
    health.record_success()
    health.interval = 2.0  # from register
    assert health.heartbeat_interval == 2.0
    ticks.t += 3.9
    assert health()
    ticks.t += 0.2
    assert not health()
    health.disconnected()  # soft drain: stays up idle, no heartbeats expected
    ticks.t += 1000
    assert health()
    health.record_success()  # connected again: the rule applies again
    ticks.t += 5
    assert not health()


def test_heartbeat_health_ignores_out_of_order_success():
    ticks = Ticks()
    health = HeartbeatHealth(10.0, clock=ticks)
    health.record_success(at=ticks.t)
    health.record_success(at=ticks.t - 100)
    assert health.last_success == ticks.t


# ---------------------------------------------------------------------------------- check


async def test_check_exit_codes(server: HealthServer, flags: Flags, capsys):
    addr = f"127.0.0.1:{server.port}"
    # check() blocks, and the server runs on this loop: call it from a thread
    assert await asyncio.to_thread(check, addr) == 0
    assert capsys.readouterr().err == ""
    flags.healthy = False
    assert await asyncio.to_thread(check, addr) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "503" in err
    # a listen address with an empty host is checked on loopback
    flags.healthy = True
    assert await asyncio.to_thread(check, f":{server.port}") == 0


def test_check_closed_port_and_bad_addr(capsys):
    assert check(f"127.0.0.1:{closed_port()}", timeout=1.0) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ConnectionRefused" in err
    assert check("no-port-here") == 1
    assert capsys.readouterr().err.count("\n") == 1


def test_check_silent_server_times_out(capsys):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        assert check(f"127.0.0.1:{listener.getsockname()[1]}", timeout=0.3) == 1
    assert "timed out" in capsys.readouterr().err


async def _health_cli(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """``fleetdrain-agent health`` as the container healthCheck runs it: a process of its own."""
    import os
    import sys

    base = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FLEETDRAIN_HEALTH_CHECK_ADDR", "BUILDKITE_AGENT_HEALTH_CHECK_ADDR")
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fleetdrain.agent.cli",
        "health",
        *args,
        env={**base, **env},
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def test_health_command_reads_wraps_address_before_the_agents():
    good, bad = Flags(), Flags()
    bad.healthy = False
    servers = [HealthServer("127.0.0.1:0", f.health, f.get_status) for f in (good, bad)]
    for srv in servers:
        await srv.start()
    try:
        ok_addr, bad_addr = (f"127.0.0.1:{srv.port}" for srv in servers)
        # start's variable alone (a `start` container)
        assert (await _health_cli(env={"BUILDKITE_AGENT_HEALTH_CHECK_ADDR": ok_addr}))[0] == 0
        code, err = await _health_cli(env={"BUILDKITE_AGENT_HEALTH_CHECK_ADDR": bad_addr})
        assert code == 1 and "503" in err
        # wrap's variable alone
        assert (await _health_cli(env={"FLEETDRAIN_HEALTH_CHECK_ADDR": ok_addr}))[0] == 0
        assert (await _health_cli(env={"FLEETDRAIN_HEALTH_CHECK_ADDR": bad_addr}))[0] == 1
        # Both (a wrapped Go agent): wrap's own server is the one asked, whichever is healthy.
        both = {
            "FLEETDRAIN_HEALTH_CHECK_ADDR": bad_addr,
            "BUILDKITE_AGENT_HEALTH_CHECK_ADDR": ok_addr,
        }
        assert (await _health_cli(env=both))[0] == 1
        both = {
            "FLEETDRAIN_HEALTH_CHECK_ADDR": ok_addr,
            "BUILDKITE_AGENT_HEALTH_CHECK_ADDR": bad_addr,
        }
        assert (await _health_cli(env=both))[0] == 0
        # --addr beats both; an empty variable counts as unset
        assert (
            await _health_cli("--addr", ok_addr, env={"FLEETDRAIN_HEALTH_CHECK_ADDR": bad_addr})
        )[0] == 0
        empty = {"FLEETDRAIN_HEALTH_CHECK_ADDR": "", "BUILDKITE_AGENT_HEALTH_CHECK_ADDR": ok_addr}
        assert (await _health_cli(env=empty))[0] == 0
    finally:
        for srv in servers:
            await srv.close()
