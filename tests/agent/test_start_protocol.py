"""The real agent process speaks agent API v3 exactly (docs/protocol.md).

Each test starts ``fleetdrain-agent start`` as a real process (not PID 1: nothing here depends
on it) against the embedded coordinator on loopback and asserts on what the *server* saw: the
coordinator's records and events, and every HTTP request as it arrived. The latter comes from
:class:`Recorder`, an ASGI wrapper that this module puts around the coordinator's app. The
wrapper can also rewrite a JSON response on its way out, which is how the tests make the server
say things the coordinator has no knob for: a ping that names a new ``endpoint``, a job with
``chunks_max_size_bytes: 0``, a job offered to the wrong agent.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import fleetdrain.drill.coordinator.server as server_module
from fleetdrain import __version__
from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer, Fault, build_app
from fleetdrain.drill.world.processes import AgentProcess, agent_command
from tests.drill import go_agent_types as go

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parents[2]
#: Routes called with the job's own token (from accept) rather than the agent's access token.
JOB_SCOPED = frozenset({"start", "chunks", "job_state", "finish"})
#: ``<name>/<version> (<os>; <arch>)``.
USER_AGENT = re.compile(
    r"^(?P<name>[\w.-]+)/(?P<version>[\w.+-]+) \((?P<os>[^;()]+); (?P<arch>[^;()]+)\)$"
)
#: A job that reports it is running, keeps the default TERM action, and runs long enough
#: to be cancelled.
SLEEPING_JOB = "echo started; sleep 30"


# ------------------------------------------------------------------------------ the recorder


@dataclass
class Seen:
    """One request as the server received it (and what it answered)."""

    server: str
    start: float
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    body: bytes = b""
    status: int | None = None
    end: float | None = None

    @property
    def parts(self) -> list[str]:
        return self.path.strip("/").split("/")

    @property
    def route(self) -> str:
        """The coordinator's route name: ``register``, ``ping``, ``chunks``, ``job_state``..."""
        parts = self.parts
        if parts[:2] == ["v3", "jobs"]:
            return parts[3] if len(parts) > 3 else "job_state"
        return parts[-1]

    @property
    def job_id(self) -> str | None:
        parts = self.parts
        return parts[2] if parts[:2] == ["v3", "jobs"] else None

    @property
    def token(self) -> str | None:
        scheme, _, token = self.headers.get("authorization", "").partition(" ")
        return token if scheme == "Token" else None

    def json(self) -> Any:
        return json.loads(self.body)


Rewrite = Callable[[Seen, dict[str, Any]], "dict[str, Any] | None"]


class Recorder:
    """ASGI middleware: records every request; optionally rewrites 200 JSON responses.

    ``rewrite(route, fn)`` makes ``fn(seen, payload)`` see (and return a replacement for, or
    None to keep) every successful JSON response of that route. Responses of rewritten routes
    are buffered, so do not combine a rewrite with a ``drop`` fault on the same route.
    """

    def __init__(self, app: ASGIApp, name: str) -> None:
        self.app = app
        self.name = name
        self._seen: list[Seen] = []
        self._rewrites: list[tuple[str, Rewrite]] = []
        self._lock = threading.Lock()

    def rewrite(self, route: str, fn: Rewrite) -> Callable[[], None]:
        """Install a rewrite; returns a function that removes it."""
        entry = (route, fn)
        with self._lock:
            self._rewrites.append(entry)

        def remove() -> None:
            with self._lock:
                self._rewrites.remove(entry)

        return remove

    def seen(self, route: str | None = None, token: str | None = None) -> list[Seen]:
        """Requests so far, in arrival order, optionally of one route and/or token."""
        with self._lock:
            out = list(self._seen)
        return [
            s
            for s in out
            if (route is None or s.route == route) and (token is None or s.token == token)
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = Seen(
            server=self.name,
            start=time.monotonic(),
            method=scope["method"],
            path=scope["path"],
            query=dict(parse_qsl(scope["query_string"].decode("latin-1"))),
            headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]},
        )
        with self._lock:
            self._seen.append(seen)
            rewrites = [fn for route, fn in self._rewrites if route == seen.route]
        body = bytearray()

        async def receiving() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                body.extend(message.get("body", b""))
                seen.body = bytes(body)
            return message

        if not rewrites:

            async def sending(message: Message) -> None:
                if message["type"] == "http.response.start":
                    seen.status = message["status"]
                elif not message.get("more_body", False):
                    seen.end = time.monotonic()
                await send(message)

            await self.app(scope, receiving, sending)
            return

        started: Message | None = None
        parts: list[bytes] = []

        async def buffering(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = message
            else:
                parts.append(message.get("body", b""))

        await self.app(scope, receiving, buffering)
        assert started is not None
        raw = b"".join(parts)
        if started["status"] == 200:
            payload = json.loads(raw or b"{}")
            for fn in rewrites:
                replaced = fn(seen, payload)
                if replaced is not None:
                    payload = replaced
            raw = json.dumps(payload).encode()
        headers = [(k, v) for k, v in started["headers"] if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(raw)).encode()))
        seen.status = started["status"]
        await send({**started, "headers": headers})
        await send({"type": "http.response.body", "body": raw})
        seen.end = time.monotonic()


@dataclass
class Harness:
    """Makes fleets (the conftest's ``make_fleet``) whose servers are wrapped in recorders."""

    make_fleet: Callable[..., Any]
    recorders: list[Recorder] = field(default_factory=list)
    servers: list[CoordinatorServer] = field(default_factory=list)

    def make(self, **coordinator: Any) -> tuple[Any, Recorder]:
        """A running fleet (``make_fleet(**coordinator)``) and the recorder of its server."""
        fleet = self.make_fleet(**coordinator)
        return fleet, self.recorders[-1]

    def serve(self, coord: Coordinator) -> tuple[CoordinatorServer, Recorder]:
        """Another server for the same coordinator (stopped at teardown)."""
        server = CoordinatorServer(coord).start()
        self.servers.append(server)
        return server, self.recorders[-1]


@pytest.fixture
def harness(make_fleet: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> Iterator[Harness]:
    made = Harness(make_fleet)

    def recorded_app(coord: Coordinator) -> Recorder:
        recorder = Recorder(build_app(coord), name=f"server-{len(made.recorders)}")
        made.recorders.append(recorder)
        return recorder

    # CoordinatorServer builds its app with this module-level name: every server the test
    # starts (make_fleet's, and any more) serves through a recorder.
    monkeypatch.setattr(server_module, "build_app", recorded_app)
    yield made
    for server in made.servers:
        server.stop()


# ------------------------------------------------------------------------------ helpers


def start_agent(fleet: Any, *extra: str, **kwargs: Any) -> tuple[AgentProcess, str, str]:
    """Start an agent (not PID 1) and wait until it is connected: (process, name, agent id)."""
    proc, name, _ = fleet.agent(*extra, pid1=False, **kwargs)
    return proc, name, fleet.agent_id(name)


def wait_until(fleet: Any, predicate: Callable[[], bool], timeout: float, what: str) -> None:
    assert fleet.coord.wait_for(lambda _c: predicate(), timeout), f"{what}\n{fleet._logs()}"


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def event_time(fleet: Any, kind: str, **match: Any) -> float:
    events = fleet.coord.events_of(kind, **match)
    assert events, f"no {kind} event for {match}"
    return float(events[-1].time)


def stop_and_wait(proc: AgentProcess, timeout: float = 10.0) -> int:
    proc.send(signal.SIGTERM)
    return proc.wait(timeout=timeout)


def dead(pid: int) -> bool:
    """Gone, or a zombie nobody has reaped yet (it runs nothing either way)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


# ------------------------------------------------------------------------------ 1. auth, headers


def test_tokens_request_headers_and_user_agent_on_every_request(harness: Harness) -> None:
    fleet, rec = harness.make()
    proc, _name, agent_id = start_agent(fleet)
    job = fleet.coord.add_job("echo hello; sleep 0.5; echo bye")
    fleet.wait_job_state(job.id, ("finished",))
    assert stop_and_wait(proc) == 0, proc.output()

    agent = fleet.coord.agent(agent_id)
    job = fleet.coord.job(job.id)
    seen = rec.seen()
    register, rest = seen[0], seen[1:]
    assert register.route == "register"
    assert register.token == fleet.coord.registration_token
    assert rest[0].route == "connect", [s.route for s in seen[:3]]
    routes = {s.route for s in rest}
    assert {"connect", "ping", "heartbeat", "accept", "disconnect"} <= routes
    assert routes >= JOB_SCOPED
    for s in rest:
        expected = job.token if s.route in JOB_SCOPED else agent.access_token
        assert s.token == expected, f"{s.method} {s.path} sent the wrong token"
        # From register on (connect comes before any ping could have supplied them).
        assert s.headers.get("x-fleetdrain-test") == "1", f"{s.path} without request_headers"
    assert agent.request_headers_missing == 0
    assert agent.requests == len(rest)

    for s in seen:
        match = USER_AGENT.match(s.headers.get("user-agent", ""))
        assert match, s.headers.get("user-agent")
        assert match["name"] == "fleetdrain-agent"
        assert match["version"] == __version__
        assert match["os"] == platform.system().lower()
        assert match["arch"] == platform.machine()
    body = register.json()
    assert body["name"] == agent.name and body["version"] == __version__
    assert (body["os"], body["arch"]) == (platform.system().lower(), platform.machine())
    # JSON bodies say so; chunks are gzip text.
    for s in seen:
        if s.body and s.route != "chunks":
            assert s.headers["content-type"] == "application/json", s.path
    for s in rec.seen("chunks"):
        assert s.headers["content-encoding"] == "gzip"
        assert s.headers["content-type"].startswith("text/plain")


def test_request_headers_from_a_ping_replace_those_from_register(harness: Harness) -> None:
    fleet, rec = harness.make()
    proc, _name, agent_id = start_agent(fleet)
    token = fleet.coord.agent(agent_id).access_token
    fleet.coord.request_headers = {"X-Fleetdrain-Test": "2"}
    changed = time.monotonic()

    def pings_after_change() -> list[Seen]:
        return [s for s in rec.seen("ping", token) if s.start > changed]

    # The first ping answered after the change hands out the new headers; by the ping after
    # it the agent has adopted them, and everything that arrives from then on carries them.
    wait_until(fleet, lambda: len(pings_after_change()) >= 4, 10, "the agent stopped pinging")
    adopted = pings_after_change()[1].start
    later = [s for s in rec.seen(token=token) if s.start >= adopted]
    assert {"ping", "heartbeat"} <= {s.route for s in later}
    for s in later:
        assert s.headers.get("x-fleetdrain-test") == "2", f"{s.path} kept the old headers"
    assert stop_and_wait(proc) == 0


# ------------------------------------------------------------------------------ 2. intervals


def test_server_supplied_intervals_and_ping_jitter(harness: Harness) -> None:
    fast_fleet, fast_rec = harness.make(
        ping_interval=0.2, heartbeat_interval=0.25, job_status_interval=0.15
    )
    slow_fleet, slow_rec = harness.make(
        ping_interval=0.5, heartbeat_interval=0.6, job_status_interval=0.4
    )
    fast, _, _ = start_agent(fast_fleet)
    slow, _, _ = start_agent(slow_fleet)
    wait_until(slow_fleet, lambda: len(slow_rec.seen("ping")) >= 4, 15, "slow agent: too few pings")
    fast_job = fast_fleet.coord.add_job("sleep 1.3")
    slow_job = slow_fleet.coord.add_job("sleep 1.3")
    fast_fleet.wait_job_state(fast_job.id, ("finished",))
    slow_fleet.wait_job_state(slow_job.id, ("finished",))

    jitter: list[float] = []
    for rec, ping, heartbeat, job_status in (
        (fast_rec, 0.2, 0.25, 0.15),
        (slow_rec, 0.5, 0.6, 0.4),
    ):
        accept = rec.seen("accept")[0].start
        ping_gaps = gaps([s.start for s in rec.seen("ping") if s.start < accept])
        assert len(ping_gaps) >= 3, ping_gaps
        # Each wait is the interval plus jitter in [0, interval): gaps in [p, 2p) + the RTT.
        assert min(ping_gaps) >= ping - 0.03, (ping, ping_gaps)
        assert max(ping_gaps) < 2 * ping + 0.15, (ping, ping_gaps)
        beat_gaps = sorted(gaps([s.start for s in rec.seen("heartbeat")]))
        median = beat_gaps[len(beat_gaps) // 2]
        assert heartbeat * 0.85 < median < heartbeat * 1.2, (heartbeat, beat_gaps)
        poll_gaps = gaps([s.start for s in rec.seen("job_state")])
        assert poll_gaps, "no job state polls"
        assert min(poll_gaps) >= job_status - 0.03, (job_status, poll_gaps)
        assert max(poll_gaps) < 1.5 * job_status + 0.15, (job_status, poll_gaps)
        jitter += [(gap - ping) / ping for gap in ping_gaps]
    # The jitter is random, not a constant offset: >= 9 draws from [0, 1) (in intervals) all
    # fall within 0.2 of each other with a probability of about 2e-5.
    assert len(jitter) >= 9 and max(jitter) - min(jitter) > 0.2, jitter
    assert stop_and_wait(fast) == 0
    assert stop_and_wait(slow) == 0


# ------------------------------------------------------------------------------ 3. pause


def test_pause_takes_no_job_keeps_heartbeating_and_resume_runs_it(harness: Harness) -> None:
    fleet, rec = harness.make()
    proc, name, addr = fleet.agent(pid1=False, health=True)
    agent_id = fleet.agent_id(name)
    job = fleet.coord.add_job("echo ran")
    # The server pauses the agent; this test's server also (wrongly) offers the job with the
    # pause, so an agent that ignored the action would try to accept it.
    fleet.coord.pause_agent(agent_id)
    offer = fleet.coord.job_view(job.id).model_dump(mode="json", exclude_none=True)

    def offer_with_pause(_seen: Seen, payload: dict[str, Any]) -> dict[str, Any] | None:
        return {**payload, "job": offer} if payload.get("action") == "pause" else None

    remove = rec.rewrite("ping", offer_with_pause)
    paused_at = time.monotonic()
    wait_until(
        fleet,
        lambda: len([s for s in rec.seen("ping") if s.start > paused_at]) >= 4,
        10,
        "the paused agent stopped pinging",
    )
    with urllib.request.urlopen(f"http://{addr}/status", timeout=2) as response:
        status = json.load(response)
    assert status["state"] == "paused", status
    assert rec.seen("accept") == [], "a paused agent accepted a job"
    assert fleet.coord.job(job.id).state == "scheduled"
    remove()
    fleet.coord.resume_agent(agent_id)
    fleet.wait_job_state(job.id, ("finished",))
    assert fleet.coord.job(job.id).exit_status == "0"
    assert fleet.coord.agent(agent_id).connection_state == "connected"
    assert fleet.coord.heartbeat_gaps(agent_id) < 0.5 * 1.5
    assert stop_and_wait(proc) == 0


# ------------------------------------------------------------------------------ 4. remote stop


def test_stop_while_idle_disconnects_and_exits_0(harness: Harness) -> None:
    fleet, _rec = harness.make()
    proc, _name, agent_id = start_agent(fleet)
    stopped = time.monotonic()
    fleet.coord.stop_agent(agent_id, force=False)
    assert proc.wait(timeout=5) == 0, proc.output()
    took = time.monotonic() - stopped
    assert took < 2 * 0.2 + 1.0, f"idle agent took {took:.2f}s to leave after a stop"
    assert [e.detail["action"] for e in fleet.coord.events_of("ping", agent_id=agent_id)][
        -1
    ] == "disconnect"
    assert fleet.coord.agent(agent_id).connection_state == "stopped"


def test_stop_during_a_job_finishes_it_then_disconnects(harness: Harness) -> None:
    fleet, _rec = harness.make()
    proc, _name, agent_id = start_agent(fleet)
    job = fleet.coord.add_job("echo begin; sleep 1.2; echo end")
    fleet.wait_job_state(job.id, ("running",))
    fleet.coord.stop_agent(agent_id, force=False)
    assert proc.wait(timeout=15) == 0, proc.output()
    done = fleet.coord.job(job.id)
    assert (done.state, done.exit_status, done.signal_reason) == ("finished", "0", None)
    assert b"end" in done.log
    finished = event_time(fleet, "finish", job_id=job.id)
    disconnected = event_time(fleet, "disconnect", agent_id=agent_id)
    assert finished < disconnected < finished + 1.5
    assert fleet.coord.agent(agent_id).connection_state == "stopped"
    assert fleet.coord.heartbeat_gaps(agent_id) < 0.5 * 1.5


def test_forced_stop_cancels_the_job_through_the_state_poll(harness: Harness) -> None:
    fleet, _rec = harness.make()
    proc, _name, agent_id = start_agent(fleet, "--cancel-grace-period", "3")
    job = fleet.coord.add_job("trap 'echo got TERM; exit 143' TERM; echo started; sleep 30 & wait")
    fleet.wait_job_state(job.id, ("running",))
    wait_until(fleet, lambda: b"started" in fleet.coord.job(job.id).log, 5, "job never started")
    stopped = time.monotonic()
    fleet.coord.stop_agent(agent_id, force=True)
    assert proc.wait(timeout=15) == 0, proc.output()
    done = fleet.coord.job(job.id)
    assert done.state == "canceled"
    assert (done.exit_status, done.signal_reason) == ("143", "cancel")
    assert b"got TERM" in done.log
    polls = [e.detail["state"] for e in fleet.coord.events_of("state_poll", job_id=job.id)]
    assert polls[-1] == "canceling", polls
    # Seen on the next poll (interval 0.2 s + jitter) and answered by the job's trap at once.
    assert event_time(fleet, "finish", job_id=job.id) - stopped < 1.5
    assert fleet.coord.agent(agent_id).connection_state == "stopped"


# ------------------------------------------------------------------------------ 5. accept


def test_a_job_someone_else_accepted_sends_the_agent_back_to_pinging(harness: Harness) -> None:
    fleet, rec = harness.make()
    first, _, agent_a = start_agent(fleet)
    taken = fleet.coord.add_job("echo first; sleep 1.5")
    fleet.wait_job_state(taken.id, ("running",))
    assert fleet.coord.job(taken.id).agent_id == agent_a
    # Agent B's first ping offers it the job A already holds: its accept must fail (422).
    offer = fleet.coord.job_view(taken.id).model_dump(mode="json", exclude_none=True)
    offered: list[str] = []

    def stale_offer(seen: Seen, payload: dict[str, Any]) -> dict[str, Any] | None:
        owner = fleet.coord.token_agent(seen.token)
        if owner in (None, agent_a) or offered or "job" in payload:
            return None
        offered.append(owner)
        return {**payload, "action": None, "job": offer}

    rec.rewrite("ping", stale_offer)
    second, _, agent_b = start_agent(fleet, "--tags", "queue=default,who=b")
    wait_until(
        fleet,
        lambda: bool(fleet.coord.events_of("accept_rejected", agent_id=agent_b)),
        5,
        "B never tried the stale offer",
    )
    rejected_at = event_time(fleet, "accept_rejected", agent_id=agent_b)
    # For B only: A may be idle again by now (a loaded machine), and must not take it.
    nxt = fleet.coord.add_job("echo second", agent_query_rules=["who=b"])
    fleet.wait_job_state(nxt.id, ("finished",))
    assert fleet.coord.job(nxt.id).agent_id == agent_b
    assert fleet.coord.job(nxt.id).exit_status == "0"
    token_b = fleet.coord.agent(agent_b).access_token
    assert [s for s in rec.seen("ping", token_b) if s.start > rejected_at], "B stopped pinging"
    assert len(rec.seen("accept", token_b)) == 2  # the stale offer once, then its own job
    fleet.wait_job_state(taken.id, ("finished",))
    assert fleet.coord.job(taken.id).agent_id == agent_a
    assert fleet.coord.job(taken.id).exit_status == "0"
    assert stop_and_wait(first) == 0 and stop_and_wait(second) == 0


def test_accept_5xx_is_retried_and_the_job_still_runs(harness: Harness) -> None:
    fleet, rec = harness.make()
    proc, _name, agent_id = start_agent(fleet)
    fault = fleet.coord.faults.add(Fault(endpoint="accept", kind="status", status=503, count=5))
    job = fleet.coord.add_job("echo ran")
    fleet.wait_job_state(job.id, ("finished",), timeout=15)
    done = fleet.coord.job(job.id)
    assert (done.exit_status, done.agent_id) == ("0", agent_id)
    assert b"ran" in done.log
    assert fault.fired == 5
    assert len(rec.seen("accept")) == 6
    assert len(fleet.coord.events_of("start", job_id=job.id)) == 1
    assert proc.alive()
    assert stop_and_wait(proc) == 0


# ------------------------------------------------------------------------------ 6. cancel


def test_cancel_signals_the_whole_process_group(harness: Harness) -> None:
    fleet, _rec = harness.make()
    proc, _name, _agent_id = start_agent(fleet, "--cancel-grace-period", "3")
    job = fleet.coord.add_job(
        'sh -c \'trap "echo child got TERM; exit 0" TERM; echo child ready; '
        "while :; do sleep 0.05; done' & "
        "trap 'echo parent got TERM; wait; exit 143' TERM; echo parent ready; wait"
    )
    fleet.wait_job_state(job.id, ("running",))
    wait_until(
        fleet,
        lambda: {b"child ready", b"parent ready"} <= set(fleet.coord.job(job.id).log.split(b"\n")),
        5,
        "the job did not start both processes",
    )
    cancelled = time.monotonic()
    assert fleet.coord.cancel_job(job.id) == "canceling"
    fleet.wait_job_state(job.id, ("canceled",))
    done = fleet.coord.job(job.id)
    log = done.log.decode()
    assert "parent got TERM" in log and "child got TERM" in log, log
    assert "cancelling job (cancel" in log
    assert (done.exit_status, done.signal_reason) == ("143", "cancel")
    # Not the SIGKILL after the signal grace (2 s): the TERM reached both at once.
    assert event_time(fleet, "finish", job_id=job.id) - cancelled < 1.5
    assert stop_and_wait(proc) == 0


def test_a_job_token_that_turns_401_cancels_the_job(harness: Harness) -> None:
    fleet, rec = harness.make()
    proc, _name, agent_id = start_agent(fleet, "--cancel-grace-period", "3")
    fault = fleet.coord.faults.add(
        Fault(endpoint="job_state", kind="status", status=401, count=1, agent_id=agent_id)
    )
    job = fleet.coord.add_job(SLEEPING_JOB)
    fleet.wait_job_state(job.id, ("finished",), timeout=10)
    done = fleet.coord.job(job.id)
    assert fault.fired == 1
    assert done.signal_reason == "cancel"
    assert (done.exit_status, done.signal) == ("143", "SIGTERM")
    assert len(rec.seen("job_state")) == 1, "the agent kept polling a job it gave up on"
    # The job's token is not the agent's: the agent itself is fine and carries on.
    finished = event_time(fleet, "finish", job_id=job.id)
    token = fleet.coord.agent(agent_id).access_token
    wait_until(
        fleet,
        lambda: any(s.start > finished for s in rec.seen("ping", token)),
        5,
        "the agent stopped pinging",
    )
    assert proc.alive()
    assert stop_and_wait(proc) == 0


# ------------------------------------------------------------------------------ 7, 8. chunks


def test_a_large_binary_log_arrives_byte_exact_in_contiguous_gzip_chunks(
    harness: Harness, tmp_path: Path
) -> None:
    fleet, rec = harness.make(chunks_max_size_bytes=64 * 1024)
    payload = os.urandom(2 * 1024 * 1024)
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    proc, _name, _agent_id = start_agent(fleet)
    job = fleet.coord.add_job(f"cat {source}")
    fleet.wait_job_state(job.id, ("finished",), timeout=20)
    done = fleet.coord.job(job.id)
    assert done.exit_status == "0" and done.chunks_failed_count == 0
    assert done.log == payload
    assert done.log_complete
    assert not fleet.coord.events_of("rejected"), fleet.coord.events_of("rejected")

    requests = rec.seen("chunks")
    sequences = sorted(int(s.query["sequence"]) for s in requests)
    assert sequences == list(range(1, len(requests) + 1))
    assert len(requests) >= 2 * 1024 * 1024 // (64 * 1024)
    expected_offset = 0
    for s in sorted(requests, key=lambda s: int(s.query["sequence"])):
        offset, size = int(s.query["offset"]), int(s.query["size"])
        assert offset == expected_offset, "offsets are not cumulative in sequence order"
        assert 0 < size <= 64 * 1024
        assert s.body[:2] == b"\x1f\x8b", "chunk body is not gzip"
        data = gzip.decompress(s.body)
        assert len(data) == size and data == payload[offset : offset + size]
        expected_offset += size
    assert expected_offset == len(payload)
    assert stop_and_wait(proc) == 0


def test_chunks_max_size_0_refuses_the_job_with_minus_1(harness: Harness, tmp_path: Path) -> None:
    # The coordinator (rightly) cannot be configured to hand out 0: the recorder rewrites the
    # accept response instead, as a misbehaving server would send it.
    fleet, rec = harness.make()
    remove = rec.rewrite("accept", lambda _s, p: {**p, "chunks_max_size_bytes": 0})
    proc, _name, _agent_id = start_agent(fleet)
    marker = tmp_path / "ran"
    job = fleet.coord.add_job(f"touch {marker}; echo ran")
    fleet.wait_job_state(job.id, ("finished",))
    done = fleet.coord.job(job.id)
    assert done.exit_status == "-1"
    assert done.finish_body is not None and done.finish_body["chunks_failed_count"] == 0
    assert not marker.exists(), "the refused job ran"
    assert rec.seen("start") == [] and rec.seen("chunks") == []
    # The agent is not broken by it: the next (sane) job runs.
    remove()
    nxt = fleet.coord.add_job("echo fine")
    fleet.wait_job_state(nxt.id, ("finished",))
    assert fleet.coord.job(nxt.id).exit_status == "0"
    assert stop_and_wait(proc) == 0


# ------------------------------------------------------------------------------ 9. finish


def test_finish_reports_exit_statuses_and_signals_as_the_wire_wants_them(harness: Harness) -> None:
    fleet, rec = harness.make()
    proc, _name, _agent_id = start_agent(fleet)
    usr1 = signal.SIGUSR1
    cases = [
        ("exit 0", "0", None),
        ("echo failing; exit 1", "1", None),
        ("exit 3", "3", None),
        (f"kill -{usr1.name.removeprefix('SIG')} $$", str(128 + usr1.value), usr1.name),
    ]
    jobs = [fleet.coord.add_job(command) for command, _, _ in cases]
    for job in jobs:
        fleet.wait_job_state(job.id, ("finished",))
    for job, (command, exit_status, sig) in zip(jobs, cases, strict=True):
        done = fleet.coord.job(job.id)
        assert (done.exit_status, done.signal, done.signal_reason) == (exit_status, sig, None), (
            command
        )
        [request] = [s for s in rec.seen("finish") if s.job_id == job.id]
        body = request.json()
        assert isinstance(body["exit_status"], str) and body["exit_status"] == exit_status
        assert body["chunks_failed_count"] == 0  # always sent, even when 0
        assert body.get("signal") == sig
        assert body.get("signal_reason") is None
        assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$", body["finished_at"]), body
    assert stop_and_wait(proc) == 0


# ------------------------------------------------------------------------------ 10. retries


def test_retry_after_is_honoured_on_chunks_and_finish(harness: Harness) -> None:
    fleet, rec = harness.make()
    proc, _name, _agent_id = start_agent(fleet)
    fleet.coord.faults.add(
        Fault(endpoint="chunks", kind="status", status=429, retry_after=0.7, count=1)
    )
    fleet.coord.faults.add(
        Fault(endpoint="finish", kind="status", status=503, retry_after=0.7, count=1)
    )
    job = fleet.coord.add_job("echo hello")
    fleet.wait_job_state(job.id, ("finished",), timeout=10)
    done = fleet.coord.job(job.id)
    assert done.exit_status == "0" and done.chunks_failed_count == 0
    assert done.log == b"hello\n"
    for route in ("chunks", "finish"):
        tries = rec.seen(route)
        assert [s.status for s in tries] == [429 if route == "chunks" else 503, 200], route
        assert tries[0].end is not None
        waited = tries[1].start - tries[0].end
        # Without Retry-After the first back-off is at most 0.25 s.
        assert waited >= 0.7 - 0.02, f"{route}: retried after {waited:.2f}s, Retry-After 0.7"
    assert stop_and_wait(proc) == 0


def test_network_drops_and_5xx_are_retried(harness: Harness) -> None:
    fleet, rec = harness.make()
    proc, _name, agent_id = start_agent(fleet)
    faults = [
        Fault(endpoint="start", kind="drop", count=1),
        Fault(endpoint="chunks", kind="drop", count=1),
        Fault(endpoint="chunks", kind="status", status=502, count=2),
        # Processed, then the answer is lost: the retried finish must be harmless.
        Fault(endpoint="finish", kind="drop", process=True, count=1),
        Fault(endpoint="finish", kind="status", status=500, count=1),
        Fault(endpoint="heartbeat", kind="drop", count=1),
    ]
    for fault in faults:
        fleet.coord.faults.add(fault)
    job = fleet.coord.add_job("for i in 1 2 3 4 5; do echo line $i; sleep 0.1; done")
    wait_until(fleet, lambda: all(f.fired == f.count for f in faults), 15, "faults did not fire")
    # The server processed the first finish (its answer was lost): the agent retries until it
    # hears success, which the repeat gets.
    wait_until(
        fleet,
        lambda: [s.status for s in rec.seen("finish")] == [200, 500, 200],
        10,
        "finish was not retried to success",
    )
    done = fleet.coord.job(job.id)
    assert done.exit_status == "0" and done.chunks_failed_count == 0
    assert done.log == b"".join(f"line {i}\n".encode() for i in range(1, 6))
    assert done.log_complete
    assert not fleet.coord.events_of("rejected"), fleet.coord.events_of("rejected")
    # A dropped heartbeat is retried within a quarter interval: the gap stays under 1.5 x
    # (plus the 0.1 s the PID-1 tests allow a loaded machine).
    assert fleet.coord.heartbeat_gaps(agent_id) < 0.5 * 1.5 + 0.1
    assert stop_and_wait(proc) == 0


def test_a_final_4xx_is_not_retried(harness: Harness, tmp_path: Path) -> None:
    fleet, rec = harness.make()
    proc, _name, _agent_id = start_agent(fleet)
    # A chunk the server refuses (400) is counted as failed, never sent again.
    fleet.coord.faults.add(Fault(endpoint="chunks", kind="status", status=400, count=1))
    first = fleet.coord.add_job("echo one")
    fleet.wait_job_state(first.id, ("finished",))
    done = fleet.coord.job(first.id)
    assert done.exit_status == "0"
    assert done.chunks_failed_count == 1
    assert [s.status for s in rec.seen("chunks") if s.job_id == first.id] == [400]
    # A start the server refuses (422): the job does not run and is finished -1, once.
    fleet.coord.faults.add(Fault(endpoint="start", kind="status", status=422, count=1))
    marker = tmp_path / "ran"
    second = fleet.coord.add_job(f"touch {marker}")
    fleet.wait_job_state(second.id, ("finished",))
    assert fleet.coord.job(second.id).exit_status == "-1"
    assert [s.status for s in rec.seen("start") if s.job_id == second.id] == [422]
    assert not marker.exists()
    assert stop_and_wait(proc) == 0


# ------------------------------------------------------------------------------ 11. endpoint


def test_a_new_endpoint_from_ping_is_used_after_one_successful_ping(harness: Harness) -> None:
    fleet, rec_a = harness.make()
    proc, _name, agent_id = start_agent(fleet)
    token = fleet.coord.agent(agent_id).access_token
    advertised: dict[str, str] = {}

    def advertise(_seen: Seen, payload: dict[str, Any]) -> dict[str, Any] | None:
        # Only the new endpoint offers jobs: the old one's answer is stale once it names another.
        if not advertised:
            return None
        return {k: v for k, v in payload.items() if k != "job"} | {"endpoint": advertised["to"]}

    rec_a.rewrite("ping", advertise)

    # An endpoint that does not answer is not switched to: the agent stays where it is.
    with socket_closed_port() as port:
        advertised["to"] = f"http://127.0.0.1:{port}/v3"
        since = time.monotonic()
        wait_until(
            fleet,
            lambda: len([s for s in rec_a.seen("ping", token) if s.start > since]) >= 3,
            10,
            "the agent left a working endpoint for a dead one",
        )
    assert "not switching to endpoint" in proc.output()

    # A working one is: after one ping there, everything goes there.
    server_b, rec_b = harness.serve(fleet.coord)
    advertised["to"] = server_b.agent_endpoint
    job = fleet.coord.add_job("echo on b")
    fleet.wait_job_state(job.id, ("finished",))
    b_pings = rec_b.seen("ping", token)
    assert b_pings, "no ping at the new endpoint"
    switched = b_pings[0].end
    assert switched is not None
    job_calls = [s for s in rec_b.seen() if s.job_id == job.id]
    assert {"accept", "start", "chunks", "finish"} <= {s.route for s in job_calls}
    # The answer to that first ping is the one acted on: the job it offered is accepted at
    # once, not a ping later.
    accept = rec_b.seen("accept", token)[0]
    assert [s for s in b_pings if s.start < accept.start] == [b_pings[0]]
    # The heartbeat loop, which does not ping, has moved too.
    wait_until(
        fleet,
        lambda: any(s.start > switched for s in rec_b.seen("heartbeat", token)),
        5,
        "no heartbeat at the new endpoint",
    )
    assert stop_and_wait(proc) == 0
    stragglers = [s for s in rec_a.seen() if s.start > switched + 0.25]
    assert stragglers == [], [(s.route, s.start - switched) for s in stragglers]
    assert {"heartbeat", "disconnect"} <= {s.route for s in rec_b.seen(token=token)}


class socket_closed_port:
    """A loopback port that refuses connections (bound, never listening) for the block."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return int(self._sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self._sock.close()


# ------------------------------------------------------------------------- 12. disconnect-after


def test_disconnect_after_job_runs_one_job_then_exits_0(harness: Harness) -> None:
    fleet, _rec = harness.make()
    jobs = [fleet.coord.add_job("echo one"), fleet.coord.add_job("echo two")]
    proc, _name, agent_id = start_agent(fleet, "--disconnect-after-job")
    assert proc.wait(timeout=10) == 0, proc.output()
    states = sorted(fleet.coord.job(j.id).state for j in jobs)
    assert states == ["finished", "scheduled"], states
    [ran] = [j for j in jobs if fleet.coord.job(j.id).state == "finished"]
    finished = event_time(fleet, "finish", job_id=ran.id)
    assert finished < event_time(fleet, "disconnect", agent_id=agent_id) < finished + 1.0
    assert fleet.coord.agent(agent_id).connection_state == "disconnected"


def test_disconnect_after_idle_timeout_counts_idle_time_only(harness: Harness) -> None:
    idle_fleet, _ = harness.make()
    busy_fleet, _ = harness.make()
    idle, _, idle_id = start_agent(idle_fleet, "--disconnect-after-idle-timeout", "1")
    busy, _, busy_id = start_agent(busy_fleet, "--disconnect-after-idle-timeout", "1.5")
    job = busy_fleet.coord.add_job("sleep 0.8")
    assert idle.wait(timeout=10) == 0, idle.output()
    assert busy.wait(timeout=10) == 0, busy.output()
    idle_for = event_time(idle_fleet, "disconnect", agent_id=idle_id) - event_time(
        idle_fleet, "connect", agent_id=idle_id
    )
    assert 1.0 <= idle_for < 1.0 + 0.6, idle_for
    assert busy_fleet.coord.job(job.id).exit_status == "0"
    after_job = event_time(busy_fleet, "disconnect", agent_id=busy_id) - event_time(
        busy_fleet, "finish", job_id=job.id
    )
    # The idle clock restarts when the job ends.
    assert 1.5 - 0.05 <= after_job < 1.5 + 0.6, after_job


# ------------------------------------------------------------------------------ 13. secrets


def test_secrets_are_redacted_and_the_registration_token_is_not_in_the_job_env(
    harness: Harness,
) -> None:
    fleet, _rec = harness.make()
    agent_secret = "agent-side-npm-token-0123456789"
    proc, _name, agent_id = start_agent(
        fleet,
        env={
            "BUILDKITE_AGENT_TOKEN": fleet.coord.registration_token,
            "FLEET_NPM_TOKEN": agent_secret,
        },
    )
    secrets = {
        "MY_SECRET_TOKEN": "s3cr3t-t0ken-value-42",
        "DB_PASSWORD": "correct-horse-battery",
    }
    job = fleet.coord.add_job(
        'echo "token=$MY_SECRET_TOKEN"; echo "password=$DB_PASSWORD"; env',
        env=secrets,
    )
    fleet.wait_job_state(job.id, ("finished",))
    done = fleet.coord.job(job.id)
    log = done.log.decode()
    assert done.exit_status == "0", log
    assert "token=[REDACTED]" in log and "password=[REDACTED]" in log
    for value in (*secrets.values(), done.token, agent_secret):
        assert value not in log, f"{value!r} leaked into the log"
    assert "MY_SECRET_TOKEN=[REDACTED]" in log  # env printed it: redacted, not dropped
    assert "FLEET_NPM_TOKEN=[REDACTED]" in log
    # The agent's own credentials are not the job's business.
    assert "BUILDKITE_AGENT_TOKEN=" not in log
    assert fleet.coord.registration_token not in log
    assert fleet.coord.agent(agent_id).access_token not in log
    assert stop_and_wait(proc) == 0


# ------------------------------------------------------------------------------ 14. agent lost


def test_an_agent_the_server_marked_lost_kills_its_job_and_exits_non_zero(
    harness: Harness, tmp_path: Path
) -> None:
    fleet, _rec = harness.make(heartbeat_interval=0.3, lost_agent_timeout=1.0)
    proc, _name, agent_id = start_agent(fleet)
    pids = tmp_path / "pids"
    # It ignores the cancel signal: only a SIGKILL of its group ends it in time.
    job = fleet.coord.add_job(
        f"trap '' TERM; sleep 60 & echo $! >> {pids}; echo $$ >> {pids}; echo started; wait"
    )
    wait_until(fleet, lambda: b"started" in fleet.coord.job(job.id).log, 5, "job never started")
    # From now on the server answers heartbeats but counts none of them (the 3.116 symptom).
    lost_from = time.monotonic()
    fleet.coord.faults.add(Fault(endpoint="heartbeat", kind="ignore", agent_id=agent_id))
    code = proc.wait(timeout=15)
    took = time.monotonic() - lost_from
    assert code != 0, proc.output()
    # Lost after 1 s, noticed at the next call (0.3 s), the job killed without a signal grace.
    assert took < 1.0 + 3.0, f"took {took:.1f}s to give up"
    agent = fleet.coord.agent(agent_id)
    assert agent.connection_state == "lost"
    done = fleet.coord.job(job.id)
    assert done.lost and done.exit_status == "-1"
    job_pids = [int(p) for p in pids.read_text().split()]
    assert len(job_pids) == 2
    assert fleet.coord.wait_for(lambda _c: all(dead(p) for p in job_pids), 2), job_pids


# ------------------------------------------------------------------------------ 15. bad flags


@pytest.mark.parametrize(
    ("args", "mentions"),
    [
        (["start"], "token"),
        (["start", "--token", "x", "--cancel-signal", "SIGNOPE"], "SIGNOPE"),
    ],
    ids=["no-token", "unknown-cancel-signal"],
)
def test_bad_flags_exit_2_with_one_line(args: list[str], mentions: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDKITE_")}
    result = subprocess.run(
        [*agent_command(), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("fleetdrain-agent start: ")
    assert mentions in lines[0]
    assert result.stdout == ""


def test_a_job_the_server_reports_canceled_is_cancelled(harness: Harness) -> None:
    # The coordinator itself says "canceling" until the finish; a server may skip straight to
    # "canceled" (the Go agent treats both the same), so the agent must too.
    fleet, rec = harness.make()
    proc, _name, _agent_id = start_agent(fleet, "--cancel-grace-period", "3")
    job = fleet.coord.add_job("trap 'echo got TERM; exit 143' TERM; echo started; sleep 30 & wait")
    fleet.wait_job_state(job.id, ("running",))
    wait_until(fleet, lambda: b"started" in fleet.coord.job(job.id).log, 5, "job never started")
    rec.rewrite("job_state", lambda _s, p: {**p, "state": "canceled"})
    fleet.wait_job_state(job.id, ("finished",))
    done = fleet.coord.job(job.id)
    assert (done.exit_status, done.signal_reason) == ("143", "cancel")
    assert b"got TERM" in done.log
    assert stop_and_wait(proc) == 0


# ------------------------------------------------------------------------------ 16. Go's types


#: Routes the agent calls without a body, as the Go agent does (no body, no content type).
NO_BODY = frozenset({"connect", "ping", "accept", "job_state", "disconnect"})
#: Each JSON body the agent sends, and the Go agent's struct for it (api/agents.go, jobs.go,
#: heartbeats.go).
GO_REQUEST_TYPES = {
    "register": go.AgentRegisterRequest,
    "heartbeat": go.Heartbeat,
    "start": go.JobStartRequest,
    "finish": go.JobFinishRequest,
}
#: What a job runs to use the API credentials its agent gave it: one meta-data set, as
#: ``buildkite-agent meta-data set from-job hello`` would.
META_DATA_SET = """\
import json, os, urllib.request
env = os.environ
request = urllib.request.Request(
    f"{env['BUILDKITE_AGENT_ENDPOINT']}/jobs/{env['BUILDKITE_JOB_ID']}/data/set",
    data=json.dumps({"key": "from-job", "value": "hello"}).encode(),
    method="POST",
    headers={
        "Authorization": f"Token {env['BUILDKITE_AGENT_ACCESS_TOKEN']}",
        "Content-Type": "application/json",
    },
)
print("meta-data set:", urllib.request.urlopen(request, timeout=5).status)
"""


def test_every_request_is_what_the_go_agent_sends_and_the_job_gets_its_credentials(
    harness: Harness, tmp_path: Path
) -> None:
    fleet, rec = harness.make()
    proc, _name, agent_id = start_agent(fleet, "--priority", "5")
    script = tmp_path / "meta_data_set.py"
    script.write_text(META_DATA_SET)
    job = fleet.coord.add_job(
        'printf %s "$BUILDKITE_AGENT_ACCESS_TOKEN" | sha256sum; '
        'echo "endpoint=$BUILDKITE_AGENT_ENDPOINT"; '
        f"{sys.executable} {script}; "
        "sleep 0.7"  # long enough for a job state poll (0.2 s + jitter)
    )
    fleet.wait_job_state(job.id, ("finished",))
    wait_until(fleet, lambda: len(rec.seen("heartbeat")) >= 2, 5, "too few heartbeats")
    assert stop_and_wait(proc) == 0, proc.output()
    done = fleet.coord.job(job.id)
    log = done.log.decode()
    assert done.exit_status == "0", log

    # The job's API credentials come from the agent (not the server's env): its own token
    # (redacted from the log: here only its hash), the endpoint, and they work.
    assert hashlib.sha256(done.token.encode()).hexdigest() in log, log
    assert f"endpoint={fleet.server.agent_endpoint}" in log
    assert "meta-data set: 200" in log
    assert fleet.coord.meta_data(job.id) == {"from-job": "hello"}

    agent_calls = [s for s in rec.seen() if s.route != "data"]  # the job's own call aside
    assert {s.route for s in agent_calls} >= {*NO_BODY, *GO_REQUEST_TYPES, "chunks"}
    for s in agent_calls:
        if s.route in NO_BODY:
            assert s.body == b"" and "content-type" not in s.headers, (s.method, s.path)
        elif s.route == "chunks":
            assert s.headers["content-type"] == "text/plain"
            assert s.headers["content-encoding"] == "gzip"
            assert set(s.query) == {"sequence", "offset", "size"}
            assert all(v.isdigit() for v in s.query.values()), s.query  # uint64 %d
            assert len(gzip.decompress(s.body)) == int(s.query["size"])
        else:
            model = GO_REQUEST_TYPES[s.route]
            assert s.headers["content-type"] == "application/json", s.path
            assert go.go_problems(model, s.json(), sent_by_go=True) == [], (s.route, s.body)
    register = rec.seen("register")[0].json()
    assert register["priority"] == "5"  # a string, as Go's AgentRegisterRequest has it
    assert register["script_eval_enabled"] is True
    assert register["ignore_in_dispatches"] is False
    assert fleet.coord.agent(agent_id).priority == 5
    finish = rec.seen("finish")[0].json()
    assert finish["exit_status"] == "0" and finish["chunks_failed_count"] == 0
    assert "signal" not in finish and "signal_reason" not in finish  # omitempty
