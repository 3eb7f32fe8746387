"""The embedded coordinator over real loopback HTTP: agent API v3, REST subset, retries, loss.

Fault injection, bad input and auth live in ``test_coordinator_faults.py``.
"""

from __future__ import annotations

import gzip
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from fleetdrain.drill.coordinator import (
    BadRequest,
    Coordinator,
    CoordinatorServer,
    NotFound,
    RetryRule,
)

pytestmark = pytest.mark.timeout(30)

RFC3339_NANO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{9}Z$")
HEADERS = {"X-Fleetdrain-Test": "1"}


def now_rfc3339() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Agent:
    """A minimal, hand-driven agent API client (one httpx client per agent)."""

    def __init__(
        self,
        server: CoordinatorServer,
        name: str = "agent",
        meta_data: list[str] | None = None,
        registration_token: str = "reg-token",
    ) -> None:
        self.http = httpx.Client(base_url=server.agent_endpoint, timeout=5.0)
        r = self.http.post(
            "/register",
            json={
                "name": name,
                "hostname": "host-1",
                "version": "0.1.0",
                "meta_data": meta_data or [],
                "priority": 3,
            },
            headers={"Authorization": f"Token {registration_token}"},
        )
        assert r.status_code == 200, r.text
        self.registration: dict[str, Any] = r.json()
        self.id: str = self.registration["id"]
        self.token: str = self.registration["access_token"]
        self.extra_headers: dict[str, str] = dict(self.registration["request_headers"])

    def call(
        self, method: str, path: str, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Token {token or self.token}", **self.extra_headers}
        headers.update(kwargs.pop("headers", {}))
        return self.http.request(method, path, headers=headers, **kwargs)

    def connect(self) -> httpx.Response:
        return self.call("POST", "/connect")

    def disconnect(self) -> httpx.Response:
        return self.call("POST", "/disconnect")

    def ping(self) -> httpx.Response:
        return self.call("GET", "/ping")

    def heartbeat(self) -> httpx.Response:
        return self.call("POST", "/heartbeat", json={"sent_at": now_rfc3339()})

    def accept(self, job_id: str) -> httpx.Response:
        return self.call("PUT", f"/jobs/{job_id}/accept")

    def start(self, job_id: str, token: str | None = None) -> httpx.Response:
        return self.call("PUT", f"/jobs/{job_id}/start", token, json={"started_at": now_rfc3339()})

    def chunk(
        self, job_id: str, seq: int, offset: int, data: bytes, token: str | None = None
    ) -> httpx.Response:
        return self.call(
            "POST",
            f"/jobs/{job_id}/chunks",
            token,
            params={"sequence": seq, "offset": offset, "size": len(data)},
            content=gzip.compress(data),
            headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"},
        )

    def state(self, job_id: str, token: str | None = None) -> httpx.Response:
        return self.call("GET", f"/jobs/{job_id}", token)

    def finish(
        self,
        job_id: str,
        exit_status: str = "0",
        token: str | None = None,
        signal_reason: str | None = None,
        **extra: Any,
    ) -> httpx.Response:
        body = {
            "exit_status": exit_status,
            "signal": None,
            "signal_reason": signal_reason,
            "finished_at": now_rfc3339(),
            "chunks_failed_count": 0,
            **extra,
        }
        return self.call("PUT", f"/jobs/{job_id}/finish", token, json=body)

    def take_job(self) -> dict[str, Any]:
        """Ping, accept and start the offered job; the accepted job JSON."""
        r = self.ping()
        assert r.status_code == 200, r.text
        offered = r.json().get("job")
        assert offered is not None, r.json()
        r = self.accept(offered["id"])
        assert r.status_code == 200, r.text
        job: dict[str, Any] = r.json()
        assert self.start(job["id"], job["token"]).status_code == 200
        return job

    def close(self) -> None:
        self.http.close()


MakeServer = Callable[..., CoordinatorServer]


@pytest.fixture
def make_server() -> Iterator[MakeServer]:
    """Factory: ``make_server(**coordinator_kwargs)`` -> a started server (stopped at the end)."""
    servers: list[CoordinatorServer] = []

    def make(**kwargs: Any) -> CoordinatorServer:
        defaults: dict[str, Any] = {
            "ping_interval": 0.05,
            "heartbeat_interval": 0.05,
            "job_status_interval": 0.05,
            "lost_agent_timeout": 60.0,
            "request_headers": HEADERS,
        }
        defaults.update(kwargs)
        server = CoordinatorServer(Coordinator(**defaults)).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: MakeServer) -> CoordinatorServer:
    return make_server()


@pytest.fixture
def coord(server: CoordinatorServer) -> Coordinator:
    return server.coord


@pytest.fixture
def agents(server: CoordinatorServer) -> Iterator[Callable[..., Agent]]:
    made: list[Agent] = []

    def make(
        name: str = "agent", meta_data: list[str] | None = None, connect: bool = True
    ) -> Agent:
        agent = Agent(server, name, meta_data)
        if connect:
            assert agent.connect().status_code == 200
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.close()


@pytest.fixture
def rest(server: CoordinatorServer) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=server.rest_endpoint, headers={"Authorization": "Bearer api-token"}, timeout=5.0
    ) as client:
        yield client


# ---------------------------------------------------------------------------- server


def test_server_binds_a_random_loopback_port_and_stops(make_server: MakeServer) -> None:
    a, b = make_server(), make_server()
    assert a.port != b.port
    assert a.url == f"http://127.0.0.1:{a.port}"
    assert a.agent_endpoint == a.url + "/v3"
    a.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(b.url.replace(str(b.port), str(a.port)) + "/v3/ping", timeout=2)
    assert httpx.get(b.agent_endpoint + "/ping", timeout=2).status_code == 401


# ---------------------------------------------------------------------------- happy path


def test_full_job_lifecycle_assembles_the_gzip_log(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    job = coord.add_job("echo hi", env={"FOO": "bar"}, key="build-1")
    agent = agents("a1", meta_data=["queue=default", "ecs:cluster=c1"])

    reg = agent.registration
    assert reg["request_headers"] == HEADERS
    assert (reg["ping_interval"], reg["heartbeat_interval"], reg["job_status_interval"]) == (
        0.05,
        0.05,
        0.05,
    )
    assert reg["meta_data"] == ["queue=default", "ecs:cluster=c1"]
    assert coord.agent(agent.id).connection_state == "connected"

    hb = agent.heartbeat()
    assert hb.status_code == 200
    assert RFC3339_NANO.match(hb.json()["received_at"]), hb.json()
    assert coord.agent(agent.id).last_heartbeat is not None

    ping = agent.ping().json()
    assert ping["job"]["id"] == job.id
    assert "token" not in ping["job"]
    assert coord.job(job.id).state == "assigned"

    accepted = agent.accept(job.id).json()
    assert accepted["state"] == "accepted"
    assert accepted["token"]
    env = accepted["env"]
    assert env["BUILDKITE_COMMAND"] == "echo hi"
    assert env["BUILDKITE_JOB_ID"] == job.id
    assert env["BUILDKITE_AGENT_ID"] == agent.id
    assert env["FOO"] == "bar"
    assert "BUILDKITE_AGENT_ACCESS_TOKEN" not in env  # the agent sets it for the job
    assert accepted["chunks_max_size_bytes"] == 100 * 1024
    assert accepted["chunks_interval_seconds"] == 1
    assert type(accepted["chunks_interval_seconds"]) is int  # whole seconds: an int

    tok = accepted["token"]
    assert agent.start(job.id, tok).status_code == 200
    assert agent.state(job.id, tok).json() == {"state": "running"}
    # Out of order on purpose: assembly goes by offset, not arrival.
    assert agent.chunk(job.id, 2, 6, b"world\n", tok).status_code == 200
    assert agent.chunk(job.id, 1, 0, b"hello ", tok).status_code == 200
    assert agent.finish(job.id, "0", tok).status_code == 200
    assert agent.state(job.id, tok).json() == {"state": "finished"}
    assert agent.disconnect().status_code == 200

    done = coord.job(job.id)
    assert done.state == "finished"
    assert done.exit_status == "0"
    assert done.log == b"hello world\n"
    assert done.log_complete
    assert not done.retried
    assert coord.step("build-1").outcome == "passed"
    rec = coord.agent(agent.id)
    assert rec.connection_state == "disconnected"
    assert rec.job_id is None
    assert rec.request_headers_missing == 0
    assert rec.requests >= 9
    kinds = [e.kind for e in coord.events if e.agent_id == agent.id]
    expected = [
        "register",
        "connect",
        "heartbeat",
        "ping",
        "accept",
        "start",
        "state_poll",
        "chunk",
        "chunk",
        "finish",
        "state_poll",
        "disconnect",
    ]
    assert kinds == expected


def test_requests_without_the_request_headers_are_counted(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    agent = agents()
    agent.extra_headers = {}
    agent.ping()
    agent.heartbeat()
    agent.extra_headers = {"X-Fleetdrain-Test": "wrong"}
    agent.ping()
    assert coord.agent(agent.id).request_headers_missing == 3
    agent.extra_headers = dict(HEADERS)
    agent.ping()
    assert coord.agent(agent.id).request_headers_missing == 3


def test_chunks_are_idempotent_validated_and_closed_at_finish(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    job = coord.add_job("true")
    agent = agents()
    tok = agent.take_job()["token"]
    assert agent.chunk(job.id, 1, 0, b"abc", tok).status_code == 200
    assert agent.chunk(job.id, 1, 0, b"abc", tok).status_code == 200  # retried upload
    assert agent.chunk(job.id, 1, 0, b"xyz", tok).status_code == 422  # same seq, other bytes
    assert len(coord.job(job.id).chunks) == 1
    # size says 4 but the body inflates to 3 bytes
    r = agent.call(
        "POST",
        f"/jobs/{job.id}/chunks",
        tok,
        params={"sequence": 2, "offset": 3, "size": 4},
        content=gzip.compress(b"def"),
        headers={"Content-Encoding": "gzip"},
    )
    assert r.status_code == 400
    r = agent.call(
        "POST",
        f"/jobs/{job.id}/chunks",
        tok,
        params={"sequence": 2, "offset": 3, "size": 3},
        content=b"def",
    )
    assert r.status_code == 415  # not gzip-encoded
    r = agent.call(
        "POST",
        f"/jobs/{job.id}/chunks",
        tok,
        params={"sequence": 2, "offset": 3, "size": 3},
        content=b"not gzip",
        headers={"Content-Encoding": "gzip"},
    )
    assert r.status_code == 400
    big = b"x" * (coord.chunks_max_size_bytes + 1)
    assert agent.chunk(job.id, 2, 3, big, tok).status_code == 400
    # A gap: offset 10 leaves bytes 3..9 missing.
    assert agent.chunk(job.id, 3, 10, b"tail", tok).status_code == 200
    assert agent.finish(job.id, "0", tok).status_code == 200
    assert agent.chunk(job.id, 4, 14, b"late", tok).status_code == 422
    done = coord.job(job.id)
    assert done.log == b"abctail"
    assert not done.log_complete
    assert sorted(done.chunks) == [1, 3]


def test_finish_repeat_is_idempotent_and_a_different_one_refused(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    job = coord.add_job("false", retry=[RetryRule(exit_status="*", limit=5)])
    agent = agents()
    tok = agent.take_job()["token"]
    assert agent.finish(job.id, "1", tok).status_code == 200
    assert agent.finish(job.id, "1", tok).status_code == 200
    assert agent.finish(job.id, "2", tok).status_code == 422
    assert len(coord.events_of("finish", job_id=job.id)) == 1
    assert len(coord.events_of("retry", job_id=job.id)) == 1
    assert len(coord.jobs()) == 2
    assert agent.start(job.id, tok).status_code == 422  # finished jobs do not start


def test_start_is_idempotent_and_only_from_accepted(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    job = coord.add_job("true")
    agent = agents()
    assert agent.start(job.id).status_code == 403  # not even assigned to it
    offered = agent.ping().json()["job"]
    assert agent.start(offered["id"]).status_code == 422  # assigned, not accepted
    agent.accept(job.id)
    assert agent.start(job.id).status_code == 200
    assert agent.start(job.id).status_code == 200
    assert coord.job(job.id).state == "running"
    assert len(coord.events_of("start", job_id=job.id)) == 1


# ---------------------------------------------------------------------------- dispatch


def test_accept_race_one_agent_gets_the_job(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    job = coord.add_job("true")
    fleet = [agents(f"a{i}") for i in range(8)]
    offers: list[str | None] = [None] * len(fleet)
    barrier = threading.Barrier(len(fleet))

    def ping(i: int) -> None:
        barrier.wait()
        offers[i] = (fleet[i].ping().json().get("job") or {}).get("id")

    threads = [threading.Thread(target=ping, args=(i,)) for i in range(len(fleet))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, offered in enumerate(offers) if offered == job.id]
    assert len(winners) == 1, offers
    winner, loser = fleet[winners[0]], fleet[(winners[0] + 1) % len(fleet)]

    r = loser.accept(job.id)
    assert r.status_code == 422
    assert "message" in r.json()
    assert coord.events_of("accept_rejected", agent_id=loser.id)
    first = winner.accept(job.id)
    assert first.status_code == 200
    again = winner.accept(job.id)  # a retried accept gets the same job back
    assert again.status_code == 200
    assert again.json()["token"] == first.json()["token"]
    assert loser.accept(job.id).status_code == 422
    assert coord.job(job.id).agent_id == winner.id
    assert len(coord.events_of("accept", job_id=job.id)) == 1


def test_many_jobs_many_agents_each_job_assigned_once(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    jobs = [coord.add_job(f"job {n}") for n in range(10)]
    fleet = [agents(f"a{i}") for i in range(5)]
    got: list[str] = []
    lock = threading.Lock()

    def work(agent: Agent) -> None:
        while True:
            offered = agent.ping().json().get("job")
            if offered is None:
                return
            job = agent.accept(offered["id"]).json()
            assert agent.finish(job["id"], "0", job["token"]).status_code == 200
            with lock:
                got.append(job["id"])

    threads = [threading.Thread(target=work, args=(a,)) for a in fleet]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted(j.id for j in jobs)
    assert all(s.outcome == "passed" for s in coord.builds().values())


def test_agent_query_rules_route_jobs(coord: Coordinator, agents: Callable[..., Agent]) -> None:
    builds = coord.add_job("make", agent_query_rules=["queue=builds", "os=linux"])
    plain = coord.add_job("echo")  # implicit queue=default
    untagged = agents("untagged")
    wrong_os = agents("mac", meta_data=["queue=builds", "os=mac"])
    builder = agents("builder", meta_data=["queue=builds", "os=linux"])

    assert wrong_os.ping().json() == {"action": "idle", "request_headers": HEADERS}
    assert builder.ping().json()["job"]["id"] == builds.id
    assert untagged.ping().json()["job"]["id"] == plain.id


def test_unaccepted_assignment_is_reoffered_then_released_on_disconnect(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    job = coord.add_job("true")
    a, b = agents("a"), agents("b")
    assert a.ping().json()["job"]["id"] == job.id
    assert a.ping().json()["job"]["id"] == job.id  # its answer may have been lost
    assert b.ping().json()["action"] == "idle"
    a.disconnect()
    assert coord.job(job.id).state == "scheduled"
    assert b.ping().json()["job"]["id"] == job.id


def test_ping_before_connect_is_refused(agents: Callable[..., Agent]) -> None:
    agent = agents(connect=False)
    assert agent.ping().status_code == 422
    assert agent.heartbeat().status_code == 422
    assert agent.connect().status_code == 200
    assert agent.ping().status_code == 200


# ---------------------------------------------------------------------------- retries


def test_agent_stop_retry_respects_its_limit(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    rules = [RetryRule(exit_status=-1, limit=2), RetryRule(signal_reason="agent_stop", limit=2)]  # type: ignore[arg-type]
    first = coord.add_job("sleep 300", retry=rules, key="long")
    agent = agents()
    for attempt in (1, 2, 3):
        job = agent.take_job()
        assert job["env"]["BUILDKITE_RETRY_COUNT"] == str(attempt - 1)
        assert agent.finish(job["id"], "143", job["token"], "agent_stop").status_code == 200
    step = coord.step("long")
    assert [a.attempt for a in step.attempts] == [1, 2, 3]
    assert step.attempts[0].id == first.id
    assert [a.retry_of for a in step.attempts] == [None, step.attempts[0].id, step.attempts[1].id]
    assert [a.retried for a in step.attempts] == [True, True, False]
    assert step.outcome == "failed"
    assert step.retries == 2
    assert agent.ping().json()["action"] == "idle"  # nothing left to run
    assert coord.events_of("retry_exhausted", job_id=step.attempts[2].id)


def test_exit_minus_one_retries_then_passes(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    coord.add_job("flaky", retry=[RetryRule(exit_status="-1", limit=2)], key="flaky")
    agent = agents()
    job = agent.take_job()
    agent.finish(job["id"], "-1", job["token"])
    job = agent.take_job()
    agent.finish(job["id"], "0", job["token"])
    step = coord.step("flaky")
    assert step.outcome == "passed"
    assert len(step.attempts) == 2
    assert not step.attempts[1].retried


def test_retry_rule_matching() -> None:
    assert RetryRule(exit_status="*").matches("1", None)
    assert not RetryRule(exit_status="*").matches("0", None)
    assert RetryRule(exit_status="-1").matches("-1", None)
    assert not RetryRule(exit_status="-1").matches("1", None)
    assert RetryRule(signal_reason="agent_stop").matches("143", "agent_stop")
    assert not RetryRule(signal_reason="agent_stop").matches("143", "cancel")
    assert RetryRule(exit_status="-1", signal_reason="none").matches("-1", None)
    assert not RetryRule(exit_status="-1", signal_reason="none").matches("-1", "cancel")
    assert RetryRule(exit_status=-1) == RetryRule(exit_status="-1")  # type: ignore[arg-type]


def test_no_retry_for_other_exit_statuses_or_a_pass(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    rules = [RetryRule(exit_status="-1"), RetryRule(signal_reason="agent_stop")]
    coord.add_job("a", retry=rules, key="fails")
    coord.add_job("b", retry=[RetryRule(limit=3)], key="passes")
    agent = agents()
    job = agent.take_job()
    agent.finish(job["id"], "1", job["token"])
    job = agent.take_job()
    agent.finish(job["id"], "0", job["token"])
    assert len(coord.jobs()) == 2
    assert coord.step("fails").outcome == "failed"
    assert coord.step("passes").outcome == "passed"


# ---------------------------------------------------------------------------- lost agents


def test_silent_agent_is_lost_its_tokens_die_and_its_job_is_retried(
    make_server: MakeServer,
) -> None:
    server = make_server(lost_agent_timeout=0.3)
    coord = server.coord
    coord.add_job("sleep 300", retry=[RetryRule(exit_status="-1", limit=1)], key="build")
    quiet = Agent(server, "quiet")
    chatty = Agent(server, "chatty")
    try:
        quiet.connect()
        chatty.connect()
        job = quiet.take_job()
        tok = job["token"]
        stop = threading.Event()

        def beat() -> None:
            while not stop.is_set():
                chatty.heartbeat()
                time.sleep(0.05)

        beater = threading.Thread(target=beat)
        beater.start()
        try:
            assert coord.wait_for(lambda c: c.agent(quiet.id).connection_state == "lost", 3.0)
            time.sleep(0.4)  # longer than the timeout: the heartbeating agent must survive it
            assert coord.agent(chatty.id).connection_state == "connected"
        finally:
            stop.set()
            beater.join()

        assert quiet.ping().status_code == 401
        assert quiet.heartbeat().status_code == 401
        assert quiet.state(job["id"], tok).status_code == 401
        assert quiet.finish(job["id"], "0", tok).status_code == 401
        lost = coord.job(job["id"])
        assert (lost.state, lost.exit_status, lost.lost, lost.retried) == (
            "finished",
            "-1",
            True,
            True,
        )
        assert coord.heartbeat_gaps(quiet.id) > 0.3
        assert coord.heartbeat_gaps(chatty.id) < 0.3

        retry = chatty.take_job()
        assert retry["env"]["BUILDKITE_RETRY_COUNT"] == "1"
        chatty.finish(retry["id"], "0", retry["token"])
        step = coord.step("build")
        assert step.outcome == "passed"
        assert step.lost_attempts == 1
        kinds = [e.kind for e in coord.events_of(agent_id=quiet.id) if e.kind != "rejected"]
        assert kinds[-3:] == ["lost", "lost", "finish"]  # the agent, its job, the job's end
        rejected = coord.events_of("rejected", agent_id=quiet.id)
        assert [e.detail["status"] for e in rejected] == [401, 401, 401, 401]
    finally:
        quiet.close()
        chatty.close()


def test_disconnecting_with_a_running_job_loses_it(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    coord.add_job("sleep 300", retry=[RetryRule(exit_status="-1")], key="k")
    agent = agents()
    job = agent.take_job()
    agent.disconnect()
    rec = coord.job(job["id"])
    assert (rec.exit_status, rec.lost, rec.retried) == ("-1", True, True)
    assert coord.step("k").outcome == "scheduled"


def test_check_lost_by_hand_with_a_fake_clock(make_server: MakeServer) -> None:
    clock = FakeClock()
    server = make_server(clock=clock, lost_agent_timeout=10.0)
    coord = server.coord
    agent = Agent(server)
    try:
        agent.connect()  # t=1000
        clock.advance(4)
        agent.heartbeat()  # 1004
        clock.advance(1)
        agent.heartbeat()  # 1005
        clock.advance(3)
        agent.heartbeat()  # 1008
        clock.advance(2)
        assert coord.check_lost() == []  # 2 s since the last heartbeat
        assert coord.heartbeat_gaps(agent.id) == 4.0
        clock.advance(8.5)  # 10.5 s since the last heartbeat
        assert coord.check_lost() == [agent.id]
        assert coord.agent(agent.id).lost_at == 1018.5
        assert coord.heartbeat_gaps(agent.id) == 10.5
    finally:
        agent.close()


# ---------------------------------------------------------------------------- REST


def test_rest_lists_agents_with_pagination(
    coord: Coordinator, agents: Callable[..., Agent], rest: httpx.Client
) -> None:
    fleet = [agents(f"a{i}", meta_data=[f"n={i}"]) for i in range(5)]
    job = coord.add_job("true")
    fleet[0].ping()

    r = rest.get("/agents", params={"per_page": 2})
    assert r.status_code == 200
    seen = [a["id"] for a in r.json()]
    pages = 1
    while "next" in r.links:
        r = rest.get(r.links["next"]["url"])
        assert r.status_code == 200
        seen += [a["id"] for a in r.json()]
        pages += 1
    assert pages == 3
    assert seen == [a.id for a in fleet]
    assert "next" not in r.links and "prev" in r.links

    everyone = rest.get("/agents").json()
    assert len(everyone) == 5
    first = everyone[0]
    assert first["job"] == {"id": job.id, "state": "assigned"}
    assert everyone[1]["job"] is None
    assert first["connection_state"] == "connected"
    assert first["meta_data"] == ["n=0"]
    assert (first["hostname"], first["version"], first["priority"]) == ("host-1", "0.1.0", 3)
    assert first["paused"] is False
    assert rest.get("/agents", params={"per_page": 500}).status_code == 200  # clamped to 100
    assert rest.get("/agents", params={"per_page": 0}).status_code == 400
    assert rest.get("/agents", params={"page": "x"}).status_code == 400
    assert rest.get(f"/agents/{fleet[2].id}").json()["name"] == "a2"


def test_rest_auth_org_and_unknown_agent(server: CoordinatorServer, rest: httpx.Client) -> None:
    base = server.url + "/v2/organizations"
    assert httpx.get(f"{base}/fleetdrain/agents").status_code == 401
    bad = httpx.get(f"{base}/fleetdrain/agents", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401
    tok = httpx.get(f"{base}/fleetdrain/agents", headers={"Authorization": "Token api-token"})
    assert tok.status_code == 401
    other = httpx.get(f"{base}/other/agents", headers={"Authorization": "Bearer api-token"})
    assert other.status_code == 404
    assert rest.get("/agents/nope").status_code == 404
    assert rest.put("/agents/nope/stop", json={"force": False}).status_code == 404


def test_rest_graceful_stop_waits_for_the_job(
    coord: Coordinator, agents: Callable[..., Agent], rest: httpx.Client
) -> None:
    coord.add_job("sleep 10")
    agent = agents()
    job = agent.take_job()
    r = rest.put(f"/agents/{agent.id}/stop", json={"force": False})
    assert r.status_code == 204
    assert rest.get(f"/agents/{agent.id}").json()["connection_state"] == "stopping"
    assert agent.ping().json()["action"] == "idle"  # the job still runs
    assert agent.state(job["id"], job["token"]).json()["state"] == "running"
    coord.add_job("more work")  # must not be handed to a stopping agent
    assert agent.ping().json()["action"] == "idle"
    agent.finish(job["id"], "0", job["token"])
    assert agent.ping().json()["action"] == "disconnect"
    agent.disconnect()
    assert coord.agent(agent.id).connection_state == "stopped"
    again = rest.put(f"/agents/{agent.id}/stop", json={"force": False})
    assert again.status_code == 400
    assert again.json() == {"message": "Can only stop connected agents"}


def test_rest_forced_stop_cancels_the_job(
    coord: Coordinator, agents: Callable[..., Agent], rest: httpx.Client
) -> None:
    coord.add_job("sleep 10", retry=[RetryRule(signal_reason="agent_stop")], key="k")
    agent = agents()
    job = agent.take_job()
    assert rest.put(f"/agents/{agent.id}/stop", json={"force": True}).status_code == 204
    assert agent.state(job["id"], job["token"]).json()["state"] == "canceling"
    assert agent.ping().json()["action"] == "idle"  # until it reports the job
    agent.finish(job["id"], "143", job["token"], "agent_stop", signal="SIGTERM")
    rec = coord.job(job["id"])
    assert (rec.state, rec.signal_reason, rec.retried) == ("canceled", "agent_stop", True)
    assert agent.ping().json()["action"] == "disconnect"
    assert coord.step("k").outcome == "scheduled"


def test_stop_of_an_idle_agent_and_of_a_registered_one(
    coord: Coordinator, agents: Callable[..., Agent], rest: httpx.Client
) -> None:
    idle = agents("idle")
    job = coord.add_job("x")
    assert rest.put(f"/agents/{idle.id}/stop", content=b"").status_code == 204  # body optional
    assert idle.ping().json()["action"] == "disconnect"
    assert coord.job(job.id).state == "scheduled"
    fresh = agents("fresh", connect=False)
    assert rest.put(f"/agents/{fresh.id}/stop", json={"force": True}).status_code == 400
    with pytest.raises(BadRequest):
        coord.stop_agent(fresh.id)
    with pytest.raises(NotFound):
        coord.stop_agent("nope")


def test_rest_pause_and_resume_through_ping(
    coord: Coordinator, agents: Callable[..., Agent], rest: httpx.Client
) -> None:
    agent = agents()
    job = coord.add_job("true")
    assert rest.put(f"/agents/{agent.id}/pause", json={"note": "drain"}).status_code == 204
    assert agent.ping().json()["action"] == "pause"
    assert coord.job(job.id).state == "scheduled"
    assert rest.get(f"/agents/{agent.id}").json()["paused"] is True
    bad = rest.put(f"/agents/{agent.id}/pause", json={"timeout_in_minutes": 0})
    assert bad.status_code == 422
    assert (
        rest.put(f"/agents/{agent.id}/pause", json={"timeout_in_minutes": 10081}).status_code == 422
    )
    assert rest.put(f"/agents/{agent.id}/resume").status_code == 204
    assert agent.ping().json()["job"]["id"] == job.id
    rec = coord.agent(agent.id)
    assert rec.paused is False


def test_pause_holds_an_assigned_job_back_and_lets_a_running_one_finish(
    coord: Coordinator, agents: Callable[..., Agent], rest: httpx.Client
) -> None:
    agent = agents()
    coord.add_job("one")
    job = agent.take_job()
    second = coord.add_job("two")
    rest.put(f"/agents/{agent.id}/pause", json={})
    assert agent.state(job["id"], job["token"]).json()["state"] == "running"
    assert agent.finish(job["id"], "0", job["token"]).status_code == 200
    assert agent.ping().json()["action"] == "pause"
    assert coord.job(second.id).state == "scheduled"


def test_pause_lapses_at_its_timeout(make_server: MakeServer) -> None:
    clock = FakeClock()
    server = make_server(clock=clock)
    agent = Agent(server)
    try:
        agent.connect()
        job = server.coord.add_job("true")
        with httpx.Client(
            base_url=server.rest_endpoint, headers={"Authorization": "Bearer api-token"}
        ) as rest:
            r = rest.put(f"/agents/{agent.id}/pause", json={"timeout_in_minutes": 1})
            assert r.status_code == 204
        clock.advance(59)
        assert agent.ping().json()["action"] == "pause"
        clock.advance(2)
        assert agent.ping().json()["job"]["id"] == job.id
        assert server.coord.events_of("resume", agent_id=agent.id)[0].detail["reason"] == "lapsed"
    finally:
        agent.close()


def test_agent_api_pause_resume_stop(coord: Coordinator, agents: Callable[..., Agent]) -> None:
    agent = agents()
    assert agent.call("POST", "/pause").status_code == 200
    assert agent.ping().json()["action"] == "pause"
    assert agent.call("POST", "/resume").status_code == 200
    assert agent.ping().json()["action"] == "idle"
    assert agent.call("POST", "/stop", json={"force": False}).status_code == 200
    assert agent.ping().json()["action"] == "disconnect"
    assert agent.call("POST", "/stop", json={"force": "yes"}).status_code == 422


# ---------------------------------------------------------------------------- cancel


def test_cancel_job_before_and_after_accept(
    coord: Coordinator, agents: Callable[..., Agent]
) -> None:
    waiting = coord.add_job("never runs")
    assert coord.cancel_job(waiting.id) == "canceled"
    agent = agents()
    assert agent.ping().json()["action"] == "idle"

    running = coord.add_job("sleep 10")
    job = agent.take_job()
    assert coord.cancel_job(running.id) == "canceling"
    assert agent.state(job["id"], job["token"]).json()["state"] == "canceling"
    agent.finish(job["id"], "143", job["token"], "cancel")
    assert coord.job(running.id).state == "canceled"
    assert coord.cancel_job(running.id) == "canceled"

    offered = coord.add_job("assigned then canceled")
    assert agent.ping().json()["job"]["id"] == offered.id
    coord.cancel_job(offered.id)
    assert agent.accept(offered.id).status_code == 422
    assert coord.agent(agent.id).job_id is None


# ---------------------------------------------------------------------------- standalone


def test_python_dash_m_runs_standalone() -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fleetdrain.drill.coordinator", "--job", "echo hi"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        m = re.search(r"(http://127\.0\.0\.1:\d+)", first)
        assert m, first
        r = httpx.post(
            m.group(1) + "/v3/register",
            json={"name": "x"},
            headers={"Authorization": "Token reg-token"},
        )
        assert r.status_code == 200
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0, out
        assert "job-1: scheduled" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
