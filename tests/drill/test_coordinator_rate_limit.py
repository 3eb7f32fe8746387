"""The embedded coordinator's REST rate limit over real loopback HTTP: Buildkite's headers on
every REST answer, 429 beyond the limit until the window resets, the agent API untouched, and the
counts a bench reads. The coordinator's clock is a fake one, so a window passes at once."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetdrain.agent.buildkite.models import RegisterRequest
from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer, RestRateLimit
from fleetdrain.drill.coordinator.__main__ import parse_args

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]
API = {"Authorization": "Bearer api-token"}


class FakeClock:
    def __init__(self, now: float = 6000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def serve(clock: FakeClock, **kwargs: Any) -> Iterator[tuple[Coordinator, httpx.Client]]:
    coord = Coordinator(org="acme", clock=clock, lost_agent_timeout=1e9, **kwargs)
    with CoordinatorServer(coord) as server, httpx.Client(base_url=server.url) as http:
        yield coord, http


@pytest.fixture
def limited(clock: FakeClock) -> Iterator[tuple[Coordinator, httpx.Client]]:
    yield from serve(clock, rest_rate_limit=5)


def agent(coord: Coordinator, name: str = "a") -> tuple[str, str]:
    reg = coord.register(coord.registration_token, RegisterRequest(name=name))
    coord.connect(reg.access_token, {})
    return reg.id, reg.access_token


def rate(response: httpx.Response) -> tuple[int, int, int]:
    h = response.headers
    return int(h["RateLimit-Remaining"]), int(h["RateLimit-Limit"]), int(h["RateLimit-Reset"])


def test_every_rest_answer_carries_buildkites_headers(
    limited: tuple[Coordinator, httpx.Client], clock: FakeClock
) -> None:
    coord, http = limited
    agent_id, _ = agent(coord)
    clock.now = 6018.5  # windows are multiples of 60 s on the clock: this one ends at 6060
    answers = [
        http.get("/v2/organizations/acme/agents", headers=API),
        http.get(f"/v2/organizations/acme/agents/{agent_id}", headers=API),
        http.put(f"/v2/organizations/acme/agents/{agent_id}/pause", headers=API, json={}),
        http.get("/v2/organizations/acme/agents/no-such-agent", headers=API),  # 404 counts too
    ]
    assert [r.status_code for r in answers] == [200, 200, 204, 404]
    assert [rate(r) for r in answers] == [(4, 5, 42), (3, 5, 42), (2, 5, 42), (1, 5, 42)]


def test_beyond_the_limit_429_until_the_window_resets(
    limited: tuple[Coordinator, httpx.Client], clock: FakeClock
) -> None:
    coord, http = limited
    agent_id, _ = agent(coord)
    url = f"/v2/organizations/acme/agents/{agent_id}"
    assert [http.get(url, headers=API).status_code for _ in range(5)] == [200] * 5
    clock.now = 6059.2
    refused = http.put(url + "/stop", headers=API, json={"force": True})
    assert refused.status_code == 429
    assert rate(refused) == (0, 5, 1)
    assert "rate limit" in refused.json()["message"]
    assert not coord.agent(agent_id).stop_requested, "a refused request does nothing"
    assert http.get(url, headers=API).status_code == 429
    clock.now = 6060.0  # a new window
    again = http.put(url + "/stop", headers=API, json={"force": True})
    assert again.status_code == 204 and rate(again) == (4, 5, 60)
    assert coord.agent(agent_id).stop_requested
    stats = coord.rest_rate.stats()
    assert (stats.requests, stats.limited, stats.peak, stats.peak_allowed) == (8, 2, 7, 5)
    assert stats.window_peak == 7
    assert coord.rest_rate.per_window() == [(6000.0, 7, 2), (6060.0, 1, 0)]


def test_the_agent_api_is_not_limited(limited: tuple[Coordinator, httpx.Client]) -> None:
    coord, http = limited
    _, token = agent(coord)
    auth = {"Authorization": f"Token {token}"}
    for _ in range(12):
        ping = http.get("/v3/ping", headers=auth)
        assert ping.status_code == 200 and "RateLimit-Remaining" not in ping.headers
        beat = http.post("/v3/heartbeat", headers=auth, json={"sent_at": "2026-01-01T00:00:00Z"})
        assert beat.status_code == 200
    assert coord.rest_rate.stats().requests == 0
    assert rate(http.get("/v2/organizations/acme/agents", headers=API))[0] == 4


def test_builds_count_against_the_same_limit(limited: tuple[Coordinator, httpx.Client]) -> None:
    _coord, http = limited
    body = {"commit": "HEAD", "branch": "main", "message": "m", "env": {}}
    created = http.post("/v2/organizations/acme/pipelines/p/builds", headers=API, json=body)
    assert created.status_code == 404 and rate(created)[0] == 4  # no such pipeline: counted
    read = http.get("/v2/organizations/acme/pipelines/p/builds/1", headers=API)
    assert read.status_code == 404 and rate(read)[0] == 3


def test_requests_that_are_not_the_organizations_are_not_counted(
    limited: tuple[Coordinator, httpx.Client],
) -> None:
    coord, http = limited
    wrong = http.get("/v2/organizations/acme/agents", headers={"Authorization": "Bearer nope"})
    other = http.get("/v2/organizations/someone-else/agents", headers=API)
    assert (wrong.status_code, other.status_code) == (401, 404)
    assert "RateLimit-Remaining" not in wrong.headers
    assert "RateLimit-Remaining" not in other.headers
    assert coord.rest_rate.stats().requests == 0


def test_the_default_is_buildkites_200_and_none_counts_without_refusing(
    clock: FakeClock,
) -> None:
    for _coord, http in serve(clock):
        answer = http.get("/v2/organizations/acme/agents", headers=API)
        assert rate(answer) == (199, 200, 60)
    for coord, http in serve(clock, rest_rate_limit=None):
        for _ in range(3):
            answer = http.get("/v2/organizations/acme/agents", headers=API)
            assert answer.status_code == 200 and "RateLimit-Limit" not in answer.headers
        assert coord.rest_rate.stats().requests == 3
        coord.rest_rate.limit = 1  # changed on a running coordinator: enforced from now on
        assert http.get("/v2/organizations/acme/agents", headers=API).status_code == 200
        assert http.get("/v2/organizations/acme/agents", headers=API).status_code == 429


def test_the_window_is_configurable_for_a_compressed_clock(clock: FakeClock) -> None:
    for _coord, http in serve(clock, rest_rate_limit=2, rest_rate_window=6.0):
        codes = [http.get("/v2/organizations/acme/agents", headers=API).status_code]
        codes.append(http.get("/v2/organizations/acme/agents", headers=API).status_code)
        last = http.get("/v2/organizations/acme/agents", headers=API)
        assert codes == [200, 200] and last.status_code == 429 and rate(last) == (0, 2, 6)
        clock.now += 6
        assert http.get("/v2/organizations/acme/agents", headers=API).status_code == 200


def test_peaks_are_over_any_window_not_only_the_fixed_ones() -> None:
    now = [0.0]
    limit = RestRateLimit(limit=None, window=60.0, clock=lambda: now[0])
    for t in (10, 50, 55, 59, 61, 62, 65, 130):
        now[0] = float(t)
        assert limit.take() is None
    stats = limit.stats()
    # [10, 70) holds seven of them; no fixed window holds more than four.
    assert stats.peak == 7 and stats.requests == 8 and stats.limited == 0
    assert stats.window_peak == 4
    assert [n for _, n, _ in limit.per_window()] == [4, 3, 1]
    with pytest.raises(ValueError):
        RestRateLimit(window=0)


def test_command_line_sets_the_limit() -> None:
    assert parse_args([]).rest_rate_limit == 200
    assert parse_args(["--rest-rate-limit", "0"]).rest_rate_limit == 0
    assert parse_args(["--rest-rate-window", "6"]).rest_rate_window == 6.0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetdrain.drill.coordinator", "--rest-rate-limit", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        m = re.search(r"(http://127\.0\.0\.1:\d+)", proc.stdout.readline())
        assert m
        url = m.group(1) + "/v2/organizations/fleetdrain/agents"
        codes = [httpx.get(url, headers=API).status_code for _ in range(2)]
        assert codes == [200, 429]
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, out
        assert "REST requests: 2, 429s: 1" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
