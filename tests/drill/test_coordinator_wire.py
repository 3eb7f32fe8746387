"""The embedded coordinator speaks the wire as Buildkite does, for the Go agent as for ours.

Over real loopback HTTP, every answer is held field by field to the Go agent's types
(``go_agent_types``: ints stay ints, strings stay strings), the requests are sent the way the
Go agent sends them (no body where it sends none, ``priority`` a string, nil slices as
``null``, times in ``time.RFC3339Nano`` with a local offset), and the job's env is one the Go
bootstrap accepts: its required variables are there, its repository can be checked out the way
the bootstrap does it, and the agent's access token is not in it.
"""

from __future__ import annotations

import gzip
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer, Fault, RetryRule
from fleetdrain.drill.coordinator.builds import PipelineStep
from tests.drill import go_agent_types as go

pytestmark = pytest.mark.timeout(30)

#: ``time.Now().Format(time.RFC3339Nano)``: trailing zeros trimmed, the host's offset.
GO_SENT_AT = "2026-03-04T15:16:17.1234567+11:00"
GO_STARTED_AT = "2026-03-04T04:16:18.5Z"
GO_FINISHED_AT = "2026-03-04T04:16:19Z"


class GoAgent:
    """Calls the coordinator the way the Go agent's ``api.Client`` does."""

    def __init__(self, server: CoordinatorServer, name: str = "go-agent", **register: Any) -> None:
        self.http = httpx.Client(base_url=server.agent_endpoint, timeout=5.0)
        body = {
            "name": name,
            "hostname": "ip-10-0-0-1",
            "os": "linux",
            "arch": "amd64",
            "script_eval_enabled": True,
            "ignore_in_dispatches": False,
            "priority": "5",
            "version": "3.120.0",
            "build": "12345",
            "meta_data": None,  # a nil []string: no tags
            "pid": 4242,
            "machine_id": "0123456789abcdef",
            "features": None,
            **register,
        }
        self.register_response = self.http.post(
            "/register", json=body, headers={"Authorization": "Token reg-token"}
        )
        assert self.register_response.status_code == 200, self.register_response.text
        self.registration: dict[str, Any] = self.register_response.json()
        self.token: str = self.registration["access_token"]

    def call(
        self, method: str, path: str, token: str | None = None, json: Any = None, **kw: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Token {token or self.token}", **kw.pop("headers", {})}
        if json is not None:
            return self.http.request(method, path, json=json, headers=headers, **kw)
        return self.http.request(method, path, headers=headers, **kw)  # no body at all

    def take_job(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Connect, ping, accept: (the ping's job, the accepted job)."""
        assert self.call("POST", "/connect").status_code == 200
        ping = self.call("GET", "/ping")
        assert ping.status_code == 200, ping.text
        offered = ping.json()["job"]
        accepted = self.call("PUT", f"/jobs/{offered['id']}/accept")
        assert accepted.status_code == 200, accepted.text
        return offered, accepted.json()

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def servers() -> Iterator[list[CoordinatorServer]]:
    made: list[CoordinatorServer] = []
    yield made
    for server in made:
        server.stop()


def serve(servers: list[CoordinatorServer], **kwargs: Any) -> CoordinatorServer:
    # Buildkite-like settings: whole seconds (the standalone coordinator's defaults).
    settings: dict[str, Any] = {
        "ping_interval": 1.0,
        "heartbeat_interval": 5.0,
        "job_status_interval": 1.0,
        **kwargs,
    }
    server = CoordinatorServer(Coordinator(**settings)).start()
    servers.append(server)
    return server


@pytest.fixture
def server(servers: list[CoordinatorServer]) -> CoordinatorServer:
    return serve(servers)


@pytest.fixture
def coord(server: CoordinatorServer) -> Coordinator:
    return server.coord


@pytest.fixture
def go_agent(server: CoordinatorServer) -> Iterator[GoAgent]:
    agent = GoAgent(server)
    yield agent
    agent.close()


def no_problems(model: type[go.GoStruct], body: Any) -> None:
    assert go.go_problems(model, body) == [], body


# ---------------------------------------------------------------------------- register


def test_register_takes_the_go_request_and_answers_in_go_types(
    coord: Coordinator, go_agent: GoAgent
) -> None:
    reg = go_agent.registration
    no_problems(go.AgentRegisterResponse, reg)
    for field in ("ping_interval", "job_status_interval", "heartbeat_interval"):
        assert type(reg[field]) is int and reg[field] >= 1, (field, reg[field])
    # Integer literals on the wire, not 1.0: that is what Go's int decoding needs.
    raw = go_agent.register_response.text
    assert '"ping_interval":1,' in raw.replace(" ", ""), raw
    assert (reg["ping_interval"], reg["heartbeat_interval"], reg["job_status_interval"]) == (
        1,
        5,
        1,
    )
    for field in ("id", "name", "access_token"):
        assert isinstance(reg[field], str) and reg[field], field
    assert reg["request_headers"] == {}
    assert reg["meta_data"] == []  # null tags registered as none
    agent = coord.agent(reg["id"])
    assert (agent.priority, agent.version, agent.hostname) == (5, "3.120.0", "ip-10-0-0-1")


def test_priority_is_a_string_a_number_from_older_clients_and_nothing_else(
    server: CoordinatorServer,
) -> None:
    older = GoAgent(server, "older", priority=7)
    assert server.coord.agent(older.registration["id"]).priority == 7
    unset = GoAgent(server, "unset", priority=None)
    assert server.coord.agent(unset.registration["id"]).priority is None
    for bad in ("high", "", True, 1.5):
        r = older.http.post(
            "/register",
            json={"name": "bad", "priority": bad},
            headers={"Authorization": "Token reg-token"},
        )
        assert r.status_code == 422, (bad, r.text)
        assert "priority" in r.json()["message"]
    # The REST view (what the controller reads) keeps Buildkite's number.
    rest = httpx.get(
        f"{server.rest_endpoint}/agents/{older.registration['id']}",
        headers={"Authorization": "Bearer api-token"},
    )
    assert rest.json()["priority"] == 7
    older.close()
    unset.close()


def test_sub_second_intervals_are_fractions_unless_integer_intervals(
    servers: list[CoordinatorServer],
) -> None:
    drill_pace = {
        "ping_interval": 0.3,
        "heartbeat_interval": 0.5,
        "job_status_interval": 2.0,
        "chunks_interval_seconds": 0.5,
    }
    ours = GoAgent(serve(servers, **drill_pace))
    reg = ours.registration
    # For fleetdrain's agent only: the Go agent cannot take 0.3.
    assert (reg["ping_interval"], reg["heartbeat_interval"]) == (0.3, 0.5)
    assert type(reg["job_status_interval"]) is int  # a whole value stays an int
    assert go.go_problems(go.AgentRegisterResponse, reg) != []

    server = serve(servers, integer_intervals=True, **drill_pace)
    go_agent = GoAgent(server)
    reg = go_agent.registration
    no_problems(go.AgentRegisterResponse, reg)
    assert (reg["ping_interval"], reg["heartbeat_interval"], reg["job_status_interval"]) == (
        1,
        1,
        2,
    )
    server.coord.add_job("true")
    _offered, job = go_agent.take_job()
    no_problems(go.Job, job)
    assert job["chunks_interval_seconds"] == 1
    ours.close()
    go_agent.close()


# ---------------------------------------------------------------------------- the job's calls


def test_ping_accept_start_chunks_state_finish_answer_in_go_types(
    coord: Coordinator, go_agent: GoAgent
) -> None:
    assert go_agent.call("POST", "/connect").status_code == 200
    idle = go_agent.call("GET", "/ping")
    assert idle.status_code == 200
    no_problems(go.Ping, idle.json())
    assert idle.json() == {"action": "idle"}

    beat = go_agent.call("POST", "/heartbeat", json={"sent_at": GO_SENT_AT})
    assert beat.status_code == 200, beat.text
    no_problems(go.Heartbeat, beat.json())
    assert beat.json()["sent_at"] == GO_SENT_AT

    job = coord.add_job("echo hi")
    ping = go_agent.call("GET", "/ping").json()
    no_problems(go.Ping, ping)
    assert ping["job"]["id"] == job.id and "token" not in ping["job"]

    accepted = go_agent.call("PUT", f"/jobs/{job.id}/accept")
    assert accepted.status_code == 200, accepted.text
    body = accepted.json()
    no_problems(go.Job, body)
    assert body["state"] == "accepted" and body["token"]
    assert type(body["chunks_max_size_bytes"]) is int
    assert type(body["chunks_interval_seconds"]) is int
    assert type(body["log_max_size_bytes"]) is int
    tok = body["token"]

    started = go_agent.call("PUT", f"/jobs/{job.id}/start", tok, json={"started_at": GO_STARTED_AT})
    assert started.status_code == 200, started.text
    assert isinstance(started.json(), dict)  # not read by Go, but JSON
    data = b"hello from go\n"
    chunk = go_agent.call(
        "POST",
        f"/jobs/{job.id}/chunks?sequence=1&offset=0&size={len(data)}",
        tok,
        content=gzip.compress(data),
        headers={"Content-Type": "text/plain", "Content-Encoding": "gzip"},
    )
    assert chunk.status_code == 200, chunk.text
    state = go_agent.call("GET", f"/jobs/{job.id}", tok)
    no_problems(go.JobState, state.json())
    assert state.json() == {"state": "running"}
    # Go's JobFinishRequest: empty signal and signal_reason are left out, the count is not.
    finish = {"exit_status": "0", "finished_at": GO_FINISHED_AT, "chunks_failed_count": 0}
    assert go.go_problems(go.JobFinishRequest, finish, sent_by_go=True) == []
    finished = go_agent.call("PUT", f"/jobs/{job.id}/finish", tok, json=finish)
    assert finished.status_code == 200, finished.text
    assert go_agent.call("POST", "/disconnect").status_code == 200

    done = coord.job(job.id)
    assert (done.state, done.exit_status, done.log) == ("finished", "0", data)
    assert coord.step(job.key).outcome == "passed"


def test_the_agent_side_stop_and_pause_bodies_of_the_go_agent_are_taken(
    coord: Coordinator, go_agent: GoAgent
) -> None:
    assert go_agent.call("POST", "/connect").status_code == 200
    # omitempty: a pause without a timeout is {}, a stop without force is {}.
    assert go_agent.call("POST", "/pause", json={}).status_code == 200
    assert coord.agent(go_agent.registration["id"]).paused
    assert go_agent.call("POST", "/resume").status_code == 200
    assert go_agent.call("POST", "/stop", json={}).status_code == 200
    agent = coord.agent(go_agent.registration["id"])
    assert (agent.connection_state, agent.stop_force) == ("stopping", False)
    assert go_agent.call("GET", "/ping").json() == {"action": "disconnect"}


def test_streaming_pings_are_not_served_so_the_go_agent_polls(
    server: CoordinatorServer, go_agent: GoAgent
) -> None:
    # api/pings_streaming.go: gRPC (ConnectRPC) at the endpoint's root. A 404 ends the Go
    # agent's best-effort streaming loop; its polling ping loop carries on.
    r = httpx.post(
        f"{server.url}/agentedge.v1.AgentEdgeService/StreamPings",
        headers={"Authorization": f"Token {go_agent.token}", "Content-Type": "application/grpc"},
        content=b"\x00\x00\x00\x00\x00",
    )
    assert r.status_code == 404
    assert go_agent.call("POST", "/connect").status_code == 200
    assert go_agent.call("GET", "/ping").json() == {"action": "idle"}


# ---------------------------------------------------------------------------- the job's env


def git(*args: str, cwd: Path) -> str:
    result = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=30
    )
    return result.stdout.strip()


def test_the_job_env_is_one_a_go_bootstrap_accepts_without_the_agent_token(
    coord: Coordinator, go_agent: GoAgent, tmp_path: Path
) -> None:
    job = coord.add_job("make test", env={"FOO": "bar"}, key="unit")
    offered, accepted = go_agent.take_job()
    for view in (offered, accepted):
        env = view["env"]
        missing = sorted(k for k in go.BOOTSTRAP_REQUIRED_ENV if not env.get(k))
        assert missing == [], missing
        protected = sorted(go.AGENT_PROTECTED_ENV & set(env))
        assert protected == [], f"the agent sets these itself: {protected}"
        assert accepted["token"] not in env.values()
        assert go_agent.token not in env.values()
    env = accepted["env"]
    assert env["BUILDKITE_JOB_ID"] == job.id
    assert env["BUILDKITE_COMMAND"] == "make test" and env["FOO"] == "bar"
    assert env["BUILDKITE_AGENT_NAME"] == "go-agent"
    assert env["BUILDKITE_ORGANIZATION_SLUG"] == coord.org
    assert env["BUILDKITE_PIPELINE_SLUG"] == coord.pipeline
    assert env["BUILDKITE_PIPELINE_PROVIDER"] == "git"
    assert env["BUILDKITE_BRANCH"] == "main"
    # Not a pull request: the bootstrap's pull request refspecs stay out of the fetch.
    assert env["BUILDKITE_PULL_REQUEST"] == "false"
    assert env["BUILDKITE_REPO"].startswith("file://")
    assert env["BUILDKITE_BUILD_NUMBER"].isdigit() and env["BUILDKITE_BUILD_ID"]

    # The checkout as the bootstrap does it (internal/job/checkout*.go): clone, clean, fetch
    # the commit from origin, check it out; then the commit meta-data it sends back.
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    git("clone", "-v", "--", env["BUILDKITE_REPO"], ".", cwd=checkout)
    git("clean", "-ffxdq", cwd=checkout)
    git("fetch", "-v", "--prune", "--", "origin", env["BUILDKITE_COMMIT"], cwd=checkout)
    git("checkout", "-f", env["BUILDKITE_COMMIT"], cwd=checkout)
    assert git("rev-parse", "HEAD", cwd=checkout) == env["BUILDKITE_COMMIT"]
    assert (checkout / "README.md").is_file()
    # BUILDKITE_COMMIT=HEAD (a build made with commit HEAD): the branch is fetched instead.
    git("fetch", "-v", "--prune", "--", "origin", env["BUILDKITE_BRANCH"], cwd=checkout)
    assert git("rev-parse", "FETCH_HEAD", cwd=checkout) == env["BUILDKITE_COMMIT"]


def test_a_pipeline_build_names_its_own_build_commit_and_branch(
    coord: Coordinator, server: CoordinatorServer, go_agent: GoAgent
) -> None:
    coord.pipelines.add("game-day", [PipelineStep(command="sleep 1", key="work")])
    r = httpx.post(
        f"{server.rest_endpoint}/pipelines/game-day/builds",
        json={"commit": "HEAD", "branch": "main", "message": "game day"},
        headers={"Authorization": "Bearer api-token"},
    )
    assert r.status_code == 201, r.text
    build = r.json()
    _offered, accepted = go_agent.take_job()
    env = accepted["env"]
    assert (env["BUILDKITE_COMMIT"], env["BUILDKITE_BRANCH"]) == ("HEAD", "main")
    assert env["BUILDKITE_PIPELINE_SLUG"] == "game-day"
    assert env["BUILDKITE_BUILD_ID"] == build["id"]
    assert env["BUILDKITE_BUILD_NUMBER"] == str(build["number"])
    assert env["BUILDKITE_MESSAGE"] == "game day"
    missing = sorted(k for k in go.BOOTSTRAP_REQUIRED_ENV if not env.get(k))
    assert missing == [], missing


# ---------------------------------------------------------------------------- meta-data


def test_meta_data_round_trips_as_the_go_agent_calls_it(
    coord: Coordinator, go_agent: GoAgent
) -> None:
    job = coord.add_job("true", key="step", retry=[RetryRule(exit_status="*", limit=1)])
    _offered, accepted = go_agent.take_job()
    tok = accepted["token"]
    base = f"/jobs/{job.id}/data"
    key = "buildkite:git:commit"  # what every checkout asks, then sets

    exists = go_agent.call("POST", f"{base}/exists", tok, json={"key": key})
    assert exists.status_code == 200, exists.text
    no_problems(go.MetaDataExists, exists.json())
    assert exists.json() == {"exists": False}
    missing = go_agent.call("POST", f"{base}/get", tok, json={"key": key})
    assert missing.status_code == 404  # what `meta-data get --default` relies on
    assert "message" in missing.json()

    value = "commit 0123abc\nabbrev-commit 0123abc\nAuthor: A <a@example.com>\n\n    Subject\n"
    r = go_agent.call("POST", f"{base}/set", tok, json={"key": key, "value": value})
    assert r.status_code == 200, r.text
    assert go_agent.call("POST", f"{base}/exists", tok, json={"key": key}).json() == {
        "exists": True
    }
    got = go_agent.call("POST", f"{base}/get", tok, json={"key": key})
    no_problems(go.MetaData, got.json())
    assert got.json() == {"key": key, "value": value}

    batch = {"items": [{"key": "a", "value": "1"}, {"key": "b", "value": "2"}]}
    assert go.go_problems(go.MetaDataBatch, batch) == []
    assert go_agent.call("POST", f"{base}/set-batch", tok, json=batch).status_code == 200
    # With the agent's access token too (the token the Go agent hands its bootstrap).
    r = go_agent.call("POST", f"{base}/set", json={"key": "a", "value": "one"})
    assert r.status_code == 200, r.text
    keys = go_agent.call("POST", f"{base}/keys", tok)  # no body, as Go sends it
    assert keys.status_code == 200, keys.text
    assert go.META_DATA_KEYS.validate_python(keys.json()) == [key, "a", "b"]
    assert coord.meta_data(job.id) == {key: value, "a": "one", "b": "2"}

    # By build (`--build`): the same store.
    build_id = accepted["env"]["BUILDKITE_BUILD_ID"]
    got = go_agent.call("POST", f"/builds/{build_id}/data/get", tok, json={"key": "b"})
    assert got.status_code == 200 and got.json() == {"key": "b", "value": "2"}
    assert go_agent.call("POST", f"/builds/{build_id}/data/keys").json() == [key, "a", "b"]
    assert go_agent.call("POST", "/builds/no-such-build/data/keys").status_code == 404

    # The build's meta-data outlives the job: its retry (same build) sees it.
    finish = {"exit_status": "1", "finished_at": GO_FINISHED_AT, "chunks_failed_count": 0}
    assert go_agent.call("PUT", f"/jobs/{job.id}/finish", tok, json=finish).status_code == 200
    late = go_agent.call("POST", f"{base}/set", tok, json={"key": "late", "value": "x"})
    assert late.status_code == 422  # set while the job runs
    retry = coord.step("step").attempts[-1]
    assert retry.id != job.id and retry.build_id == job.build_id
    assert coord.meta_data(retry.id) == coord.meta_data(job.id)
    # Another step is another build.
    other = coord.add_job("true", key="other")
    assert coord.meta_data(other.id) == {}
    assert coord.events_of("meta_data", job_id=job.id)


def test_meta_data_refusals(coord: Coordinator, server: CoordinatorServer) -> None:
    owner, stranger = GoAgent(server, "owner"), GoAgent(server, "stranger")
    job = coord.add_job("true")
    _offered, accepted = owner.take_job()
    tok = accepted["token"]
    base = f"/jobs/{job.id}/data"
    cases: list[tuple[str | None, Any, int]] = [
        (tok, {"key": "k"}, 422),  # no value: Go leaves an empty one out
        (tok, {"key": "k", "value": "   "}, 422),
        (tok, {"key": " ", "value": "v"}, 422),
        (tok, {"key": "k", "value": 5}, 422),  # a string, as everywhere
        (stranger.token, {"key": "k", "value": "v"}, 403),  # not its job
        ("nope", {"key": "k", "value": "v"}, 401),
    ]
    for token, body, status in cases:
        r = owner.call("POST", f"{base}/set", token or tok, json=body)
        assert r.status_code == status, (body, r.text)
        assert "message" in r.json()
    bad_batch = {"items": [{"key": "ok", "value": "1"}, {"key": "bad"}]}
    assert owner.call("POST", f"{base}/set-batch", tok, json=bad_batch).status_code == 422
    assert coord.meta_data(job.id) == {}  # all or nothing
    assert owner.call("POST", f"{base}/set-batch", tok, json={"items": []}).status_code == 422
    assert owner.call("POST", "/jobs/no-such-job/data/keys").status_code == 404
    owner.close()
    stranger.close()


def test_meta_data_routes_take_faults(coord: Coordinator, go_agent: GoAgent) -> None:
    job = coord.add_job("true")
    _offered, accepted = go_agent.take_job()
    coord.faults.add(Fault(endpoint="meta_data_set", kind="status", status=503, count=1))
    body = {"key": "k", "value": "v"}
    base = f"/jobs/{job.id}/data"
    assert go_agent.call("POST", f"{base}/set", accepted["token"], json=body).status_code == 503
    assert go_agent.call("POST", f"{base}/set", accepted["token"], json=body).status_code == 200
    assert coord.meta_data(job.id) == {"k": "v"}
