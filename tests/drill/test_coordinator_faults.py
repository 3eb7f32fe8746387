"""The embedded coordinator's fault injection, input validation and authentication."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer, Fault, RetryRule

pytestmark = pytest.mark.timeout(30)

HEADERS = {"X-Fleetdrain-Test": "1"}
STAMP = "2026-01-02T03:04:05.123456789Z"


@pytest.fixture
def server() -> Iterator[CoordinatorServer]:
    coord = Coordinator(
        ping_interval=0.05,
        heartbeat_interval=0.05,
        job_status_interval=0.05,
        lost_agent_timeout=60.0,
        request_headers=HEADERS,
    )
    with CoordinatorServer(coord) as server:
        yield server


@pytest.fixture
def coord(server: CoordinatorServer) -> Coordinator:
    return server.coord


@pytest.fixture
def http(server: CoordinatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.agent_endpoint, timeout=5.0) as client:
        yield client


def register(http: httpx.Client, name: str = "a", connect: bool = True) -> dict[str, str]:
    """Register (and connect) an agent; its auth headers (with the request headers)."""
    r = http.post("/register", json={"name": name}, headers={"Authorization": "Token reg-token"})
    assert r.status_code == 200, r.text
    headers = {"Authorization": f"Token {r.json()['access_token']}", **HEADERS}
    if connect:
        assert http.post("/connect", headers=headers).status_code == 200
    return headers


def agent_id(coord: Coordinator, headers: dict[str, str]) -> str:
    found = coord.token_agent(headers["Authorization"].split()[1])
    assert found is not None
    return found


def running_job(
    http: httpx.Client,
    coord: Coordinator,
    headers: dict[str, str],
    retry: list[RetryRule] | None = None,
) -> str:
    job = coord.add_job("true", retry=retry, key="k")
    assert http.get("/ping", headers=headers).json()["job"]["id"] == job.id
    assert http.put(f"/jobs/{job.id}/accept", headers=headers).status_code == 200
    started = http.put(f"/jobs/{job.id}/start", headers=headers, json={"started_at": STAMP})
    assert started.status_code == 200
    return job.id


# ---------------------------------------------------------------------------- faults


def test_status_fault_fires_count_times_without_processing(
    coord: Coordinator, http: httpx.Client
) -> None:
    headers = register(http)
    coord.faults.add(Fault("heartbeat", "status", status=503, count=2))
    codes = [
        http.post("/heartbeat", headers=headers, json={"sent_at": STAMP}).status_code
        for _ in range(3)
    ]
    assert codes == [503, 503, 200]
    assert len(coord.agent(agent_id(coord, headers)).heartbeats) == 1
    fired = coord.events_of("fault")
    assert [(e.detail["endpoint"], e.detail["status"]) for e in fired] == [("heartbeat", 503)] * 2
    assert coord.faults.active() == []


def test_429_fault_sends_retry_after(coord: Coordinator, http: httpx.Client) -> None:
    headers = register(http)
    coord.faults.add(Fault("ping", "status", status=429, retry_after=2, count=1))
    r = http.get("/ping", headers=headers)
    assert r.status_code == 429
    assert r.headers["Retry-After"] == "2"
    assert "message" in r.json()
    assert http.get("/ping", headers=headers).status_code == 200
    assert len(coord.events_of("ping")) == 1


def test_latency_fault_delays_then_processes(coord: Coordinator, http: httpx.Client) -> None:
    headers = register(http)
    coord.faults.add(Fault("ping", "latency", seconds=0.3, count=1))
    t0 = time.monotonic()
    assert http.get("/ping", headers=headers).status_code == 200
    slow = time.monotonic() - t0
    t0 = time.monotonic()
    assert http.get("/ping", headers=headers).status_code == 200
    fast = time.monotonic() - t0
    assert slow >= 0.3
    assert fast < 0.2
    assert len(coord.events_of("ping")) == 2


def test_latency_does_not_block_other_requests(coord: Coordinator, http: httpx.Client) -> None:
    import threading

    headers = register(http)
    coord.faults.add(Fault("ping", "latency", seconds=1.0, count=1))
    slow = threading.Thread(target=lambda: http.get("/ping", headers=headers))
    slow.start()
    time.sleep(0.05)
    t0 = time.monotonic()
    with httpx.Client(base_url=http.base_url) as other:
        r = other.post("/heartbeat", headers=headers, json={"sent_at": STAMP})
    assert r.status_code == 200
    assert time.monotonic() - t0 < 0.5
    slow.join()


def test_drop_fault_breaks_the_connection_without_processing(
    coord: Coordinator, http: httpx.Client
) -> None:
    headers = register(http)
    coord.faults.add(Fault("heartbeat", "drop", count=1))
    with pytest.raises(httpx.RemoteProtocolError):
        http.post("/heartbeat", headers=headers, json={"sent_at": STAMP})
    assert coord.agent(agent_id(coord, headers)).heartbeats == []
    # The client recovers on a fresh connection.
    assert http.post("/heartbeat", headers=headers, json={"sent_at": STAMP}).status_code == 200
    assert len(coord.agent(agent_id(coord, headers)).heartbeats) == 1


def test_drop_after_processing_loses_only_the_answer(
    coord: Coordinator, http: httpx.Client
) -> None:
    headers = register(http)
    job_id = running_job(http, coord, headers)
    coord.faults.add(Fault("finish", "drop", count=1, process=True))
    body = {"exit_status": "0", "finished_at": STAMP, "chunks_failed_count": 0}
    with pytest.raises(httpx.RemoteProtocolError):
        http.put(f"/jobs/{job_id}/finish", headers=headers, json=body)
    assert coord.job(job_id).state == "finished"
    # The agent's retry of the same finish is accepted and changes nothing.
    assert http.put(f"/jobs/{job_id}/finish", headers=headers, json=body).status_code == 200
    assert len(coord.events_of("finish", job_id=job_id)) == 1


def test_ignored_heartbeats_look_fine_to_the_agent_yet_it_is_lost(
    server: CoordinatorServer, http: httpx.Client
) -> None:
    coord = server.coord
    coord.lost_agent_timeout = 0.3
    headers = register(http)
    job_id = running_job(http, coord, headers, retry=[RetryRule(exit_status="-1")])
    coord.faults.add(Fault("heartbeat", "ignore"))
    deadline = time.monotonic() + 3.0
    answers = []
    while time.monotonic() < deadline:
        r = http.post("/heartbeat", headers=headers, json={"sent_at": STAMP})
        answers.append(r.status_code)
        if r.status_code == 401:
            break
        assert r.json()["received_at"]
        time.sleep(0.05)
    assert answers[0] == 200 and answers[-1] == 401
    assert coord.agent(agent_id(coord, headers)).heartbeats == []
    assert coord.events_of("heartbeat") == []
    lost = coord.job(job_id)
    assert (lost.lost, lost.exit_status, lost.retried) == (True, "-1", True)


def test_fault_scoped_to_one_agent(coord: Coordinator, http: httpx.Client) -> None:
    a = register(http, "a")
    b = register(http, "b")
    coord.faults.add(Fault("*", "status", status=502, agent_id=agent_id(coord, a)))
    assert http.get("/ping", headers=a).status_code == 502
    assert http.post("/disconnect", headers=a).status_code == 502
    assert http.get("/ping", headers=b).status_code == 200
    coord.faults.clear()
    assert http.get("/ping", headers=a).status_code == 200


def test_fault_until_expires(coord: Coordinator, http: httpx.Client) -> None:
    headers = register(http)
    coord.faults.add(Fault("ping", "status", status=500, until=coord.clock() + 0.2))
    assert http.get("/ping", headers=headers).status_code == 500
    time.sleep(0.25)
    assert http.get("/ping", headers=headers).status_code == 200


def test_rest_faults_and_401_bursts(
    server: CoordinatorServer, coord: Coordinator, http: httpx.Client
) -> None:
    headers = register(http)
    aid = agent_id(coord, headers)
    coord.faults.add(Fault("rest_stop", "status", status=401, count=2))
    coord.faults.add(Fault("rest_pause", "ignore", count=1))
    with httpx.Client(
        base_url=server.rest_endpoint, headers={"Authorization": "Bearer api-token"}
    ) as rest:
        codes = [rest.put(f"/agents/{aid}/stop", json={}).status_code for _ in range(3)]
        assert codes == [401, 401, 204]
        assert rest.put(f"/agents/{aid}/pause", json={}).status_code == 204
        assert coord.agent(aid).paused is False
    assert http.get("/ping", headers=headers).json()["action"] == "disconnect"


def test_fault_validation() -> None:
    with pytest.raises(ValueError):
        Fault("pings", "status", status=500)
    with pytest.raises(ValueError):
        Fault("ping", "explode")
    with pytest.raises(ValueError):
        Fault("ping", "status")
    with pytest.raises(ValueError):
        Fault("ping", "latency")
    with pytest.raises(ValueError):
        Fault("ping", "drop", count=0)


# ---------------------------------------------------------------------------- bad input


def test_bad_input_is_4xx_never_500(coord: Coordinator, http: httpx.Client) -> None:
    headers = register(http)
    job_id = running_job(http, coord, headers)
    json_headers = {**headers, "Content-Type": "application/json"}
    finish = f"/jobs/{job_id}/finish"
    good = {"exit_status": "0", "finished_at": STAMP, "chunks_failed_count": 0}
    cases: list[tuple[str, str, dict[str, object], int]] = [
        ("PUT", finish, {"content": b"{not json"}, 400),
        ("PUT", finish, {"content": b""}, 400),
        ("PUT", finish, {"json": [good]}, 422),
        ("PUT", finish, {"json": {**good, "exit_status": 0}}, 422),
        ("PUT", finish, {"json": {**good, "exit_status": "zero"}}, 422),
        (
            "PUT",
            finish,
            {"json": {k: v for k, v in good.items() if k != "chunks_failed_count"}},
            422,
        ),
        ("PUT", finish, {"json": {**good, "chunks_failed_count": "0"}}, 422),
        ("PUT", finish, {"json": {**good, "finished_at": "yesterday"}}, 422),
        ("PUT", finish, {"json": {**good, "finished_at": "2026-01-02"}}, 422),
        (
            "PUT",
            finish,
            {"content": b"exit_status=0", "headers": {"Content-Type": "text/plain"}},
            415,
        ),
        ("POST", "/heartbeat", {"json": {"sent_at": 12}}, 422),
        ("POST", "/heartbeat", {"json": {}}, 422),
        ("POST", f"/jobs/{job_id}/chunks", {"content": b"x"}, 400),
        ("POST", f"/jobs/{job_id}/chunks?sequence=a&offset=0&size=1", {"content": b"x"}, 400),
        ("POST", f"/jobs/{job_id}/chunks?sequence=0&offset=0&size=1", {"content": b"x"}, 400),
        ("POST", f"/jobs/{job_id}/chunks?sequence=1&offset=-1&size=1", {"content": b"x"}, 400),
        ("PUT", f"/jobs/{job_id}/start", {"json": {"started_at": None}}, 422),
        ("PUT", "/jobs/no-such-job/finish", {"json": good}, 404),
        ("GET", "/jobs/no-such-job", {}, 404),
        ("PUT", "/jobs/no-such-job/accept", {}, 404),
        ("GET", "/no-such-route", {}, 404),
        ("DELETE", "/ping", {}, 405),
        ("POST", "/stop", {"json": {"force": 1}}, 422),
    ]
    for method, path, kwargs, expected in cases:
        extra = dict(kwargs.pop("headers", {}))  # type: ignore[call-overload]
        r = http.request(method, path, headers={**json_headers, **extra}, **kwargs)  # type: ignore[arg-type]
        assert r.status_code == expected, (method, path, kwargs, r.status_code, r.text)
        assert "message" in r.json(), r.text
    assert coord.job(job_id).state == "running"
    r = http.post(
        "/register", json={"hostname": "no name"}, headers={"Authorization": "Token reg-token"}
    )
    assert r.status_code == 422
    r = http.post(
        "/register",
        json={"name": "x", "meta_data": "queue=a"},
        headers={"Authorization": "Token reg-token"},
    )
    assert r.status_code == 422
    assert coord.events_of("rejected")


# ---------------------------------------------------------------------------- auth


def test_agent_api_authentication(
    server: CoordinatorServer, coord: Coordinator, http: httpx.Client
) -> None:
    no_auth = http.post("/register", json={"name": "x"})
    assert no_auth.status_code == 401
    wrong = http.post("/register", json={"name": "x"}, headers={"Authorization": "Token nope"})
    assert wrong.status_code == 401
    a = register(http, "a")
    b = register(http, "b")
    assert http.post("/register", json={"name": "x"}, headers=a).status_code == 401
    assert http.get("/ping").status_code == 401
    assert http.get("/ping", headers={"Authorization": "Token reg-token"}).status_code == 401
    assert http.get("/ping", headers={"Authorization": "Bearer api-token"}).status_code == 401
    bearer = {"Authorization": a["Authorization"].replace("Token", "Bearer")}
    assert http.get("/ping", headers=bearer).status_code == 401

    job_a = running_job(http, coord, a)
    token_a = coord.job(job_a).token
    other = coord.add_job("other")
    # b's access token does not cover a's job
    assert http.get(f"/jobs/{job_a}", headers=b).status_code == 403
    assert http.put(f"/jobs/{job_a}/accept", headers=b).status_code == 422
    # a's job token covers its own job only
    job_tok = {"Authorization": f"Token {token_a}", **HEADERS}
    assert http.get(f"/jobs/{job_a}", headers=job_tok).json() == {"state": "running"}
    assert http.get(f"/jobs/{other.id}", headers=job_tok).status_code == 401
    assert http.get("/ping", headers=job_tok).status_code == 401  # not an agent token
    latin1 = {b"Authorization": "Token caf\xe9".encode("latin-1")}
    assert http.post("/register", json={"name": "x"}, headers=latin1).status_code == 401
    assert http.get("/ping", headers=latin1).status_code == 401
    # an unknown token gets 401 even for an unknown job
    assert http.get("/jobs/none", headers={"Authorization": "Token zzz"}).status_code == 401
    with httpx.Client(base_url=server.rest_endpoint) as rest:
        assert rest.get("/agents", headers=a).status_code == 401
        bearer_latin1 = {b"Authorization": "Bearer caf\xe9".encode("latin-1")}
        assert rest.get("/agents", headers=bearer_latin1).status_code == 401
