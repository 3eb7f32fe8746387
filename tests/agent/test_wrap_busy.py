"""Busy sources of ``wrap``: the probe's small HTTP client over real loopback sockets, and the
process tree read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator

import pytest

from fleetdrain.agent.busy import ChildrenBusy, ProbeBusy, check_probe_url, descendants, http_get

pytestmark = pytest.mark.slow


@contextlib.asynccontextmanager
async def raw_server(response: bytes, *, delay: float = 0.0) -> AsyncIterator[str]:
    """A server that answers any request with ``response`` bytes; yields its base URL."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        await asyncio.sleep(delay)
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        await server.wait_closed()


async def test_content_length_and_chunked_bodies():
    body = b'{"aggregate_status": "busy"}'
    plain = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    async with raw_server(plain) as url:
        assert await http_get(f"{url}/status.json", timeout=2) == (200, body)
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b'5\r\n{"agg\r\n17\r\nregate_status": "idle"}\r\n0\r\n\r\n'
    )
    async with raw_server(chunked) as url:
        assert await http_get(url, timeout=2) == (200, b'{"aggregate_status": "idle"}')
    no_length = b"HTTP/1.0 404 Not Found\r\n\r\nnot here"
    async with raw_server(no_length) as url:
        assert await http_get(url, timeout=2) == (404, b"not here")


@pytest.mark.parametrize(
    ("response", "busy", "last"),
    [
        (
            b'HTTP/1.1 200 OK\r\nContent-Length: 28\r\n\r\n{"aggregate_status": "busy"}',
            True,
            "busy",
        ),
        (
            b'HTTP/1.1 200 OK\r\nContent-Length: 28\r\n\r\n{"aggregate_status": "idle"}',
            False,
            "idle",
        ),
        (
            b'HTTP/1.1 200 OK\r\nContent-Length: 29\r\n\r\n{"aggregate_status": "dying"}',
            True,
            "dying",
        ),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nOK", True, "HTTP 200"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", False, "HTTP 204"),
        (b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n", True, "down"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", True, "down"),
    ],
    ids=["json-busy", "json-idle", "json-unknown", "200", "204", "503", "not-http"],
)
async def test_probe_answers(response, busy, last):
    async with raw_server(response) as url:
        probe = ProbeBusy(f"{url}/status.json")
        assert await probe.poll() is busy
        assert probe.status()["last"] == last


async def test_probe_that_does_not_answer_in_time_is_down():
    async with raw_server(b"HTTP/1.1 200 OK\r\n\r\n", delay=2.0) as url:
        probe = ProbeBusy(url, timeout=0.2)
        started = time.monotonic()
        assert await probe.poll() is True
        assert time.monotonic() - started < 1.0
        assert "no answer within" in (probe.error or "")


class Fixed:
    """A busy source that says what it is told."""

    description = "the stand-in source"

    def __init__(self, busy: bool) -> None:
        self.busy = busy
        self.polls = 0

    async def poll(self) -> bool:
        self.polls += 1
        return self.busy

    def status(self) -> dict[str, object]:
        return {"source": "fixed", "busy": self.busy}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_probe_not_serving_yet_is_not_busy_and_leaves_busy_to_its_fallback(caplog):
    """Refused before its first answer (the Go agent is still registering): the probe says
    nothing, so busy is the fallback's (wrap: the worker's children), or idle without one."""
    caplog.set_level(logging.INFO, logger="fleetdrain.busy")
    url = f"http://127.0.0.1:{closed_port()}/status.json"
    alone = ProbeBusy(url)
    assert await alone.poll() is False
    assert alone.status() == {
        "source": "probe",
        "url": url,
        "last": "not serving",
        "error": alone.error,
        "serving": False,
    }
    assert "ConnectionRefusedError" in (alone.error or "")
    assert "not serving yet" in caplog.text and "counted as busy" not in caplog.text
    fallback = Fixed(True)
    probe = ProbeBusy(url, before_serving=fallback)
    assert await probe.poll() is True
    fallback.busy = False
    assert await probe.poll() is False
    assert fallback.polls == 2
    assert probe.status()["before_serving"] == {"source": "fixed", "busy": False}
    assert probe.description.endswith("not serving yet: the stand-in source")


async def test_a_probe_not_serving_for_long_is_warned_about_once(caplog):
    caplog.set_level(logging.INFO, logger="fleetdrain.busy")
    ticks = [100.0]
    probe = ProbeBusy(
        f"http://127.0.0.1:{closed_port()}/", not_serving_warning_after=30, clock=lambda: ticks[0]
    )
    for step in (0, 29, 2, 100):
        ticks[0] += step
        assert await probe.poll() is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, caplog.text
    assert "has not answered for 31s" in warnings[0].getMessage()
    assert "BUILDKITE_AGENT_HEALTH_CHECK_ADDR" in warnings[0].getMessage()


async def test_a_probe_that_has_answered_and_then_refuses_is_down_and_busy(caplog):
    """Once it has served, a probe that stops answering may hide a running job: busy."""
    caplog.set_level(logging.INFO, logger="fleetdrain.busy")
    idle = b'HTTP/1.1 200 OK\r\nContent-Length: 28\r\n\r\n{"aggregate_status": "idle"}'
    fallback = Fixed(False)
    async with raw_server(idle) as url:
        probe = ProbeBusy(f"{url}/status.json", before_serving=fallback)
        assert await probe.poll() is False
        assert probe.status()["serving"] is True and "before_serving" not in probe.status()
    assert await probe.poll() is True  # the server is gone: refused
    assert probe.status()["last"] == "down" and "ConnectionRefusedError" in (probe.error or "")
    assert "counted as busy" in caplog.text
    assert fallback.polls == 0, "the fallback is for before the first answer only"


async def test_a_probe_that_accepts_but_never_answers_is_down_even_before_serving():
    """Something accepted the connection: a server is there and failing, not starting up."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        probe = ProbeBusy(
            f"http://127.0.0.1:{listener.getsockname()[1]}/",
            timeout=0.2,
            before_serving=Fixed(False),
        )
        assert await probe.poll() is True
        assert probe.status()["last"] == "down"


def test_probe_urls_are_shown_without_passwords_or_secret_query_values(caplog):
    probe = ProbeBusy("http://agent:hunter22@127.0.0.1:3901/status.json?token=abcdef&x=1")
    shown = probe.status()["url"]
    assert "hunter22" not in shown and "abcdef" not in shown
    assert shown == "http://agent:[REDACTED]@127.0.0.1:3901/status.json?token=[REDACTED]&x=1"
    assert probe.description == shown


@pytest.mark.parametrize(
    "url", ["ftp://host/x", "http:///path", "localhost:3901", "http://h:99999/"]
)
def test_unusable_probe_urls(url):
    with pytest.raises(ValueError):
        check_probe_url(url)


def test_children_busy_reads_the_process_tree():
    script = "import subprocess, time; p = subprocess.Popen(['sleep', '5']); time.sleep(5)"
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        source = ChildrenBusy(lambda: proc.pid)
        for _ in range(250):
            if asyncio.run(source.poll()):
                break
            time.sleep(0.02)
        assert source.busy_now() and source.processes == 1
        assert len(descendants(proc.pid)) == 1
        assert ChildrenBusy(lambda: None).busy_now() is False
    finally:
        for pid in descendants(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        proc.kill()
        proc.wait()
