"""Busy sources of ``wrap``: the probe's small HTTP client over real loopback sockets, and the
process tree read from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
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


async def test_refused_probe_is_down_and_logged(caplog):
    caplog.set_level(logging.INFO, logger="fleetdrain.busy")
    probe = ProbeBusy("http://127.0.0.1:9/status.json")
    assert await probe.poll() is True
    assert probe.status()["last"] == "down" and probe.error
    assert "counted as busy" in caplog.text


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
