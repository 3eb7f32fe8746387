"""The embedded coordinator's in-memory state and every operation on it: agents, jobs, retry
rules, pauses and stops, the lost-agent rule, events.

Everything lives behind one lock because it is touched from the uvicorn thread (HTTP requests,
the lost-agent watcher) and from test or drill threads at the same time. Readers get deep
copies (snapshots) of the records (:mod:`~fleetdrain.drill.coordinator.records`), never live
ones, so nothing outside this module mutates state unlocked.

Operations that the HTTP layer maps to a status code raise a
:class:`~fleetdrain.drill.coordinator.errors.CoordinatorError` subclass; the Python API raises
the same ones (e.g. stopping an agent that is not connected).
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from fleetdrain.agent.buildkite.models import (
    Job,
    PingResponse,
    RegisterRequest,
    RegisterResponse,
)
from fleetdrain.drill.coordinator.builds import Pipelines
from fleetdrain.drill.coordinator.errors import (
    BadRequest,
    CoordinatorError,
    Forbidden,
    NotFound,
    Unauthorized,
    Unprocessable,
)
from fleetdrain.drill.coordinator.faults import Fault, FaultSet
from fleetdrain.drill.coordinator.rate_limit import (
    DEFAULT_GRAPHQL_RATE_LIMIT,
    DEFAULT_GRAPHQL_RATE_WINDOW,
    DEFAULT_REST_RATE_LIMIT,
    DEFAULT_REST_RATE_WINDOW,
    RestRateLimit,
)
from fleetdrain.drill.coordinator.records import (
    AgentRecord,
    Event,
    JobRecord,
    RetryRule,
    StepRecord,
)
from fleetdrain.drill.coordinator.repository import Repository, drill_repository
from fleetdrain.drill.coordinator.rest_models import RestAgent, RestJob

log = logging.getLogger(__name__)

#: Job states in which the job holds its agent (the agent accepted it and has not finished it).
ACTIVE_JOB_STATES: frozenset[str] = frozenset({"accepted", "running", "canceling"})
#: Job states that never change again.
TERMINAL_JOB_STATES: frozenset[str] = frozenset({"finished", "canceled"})
#: Agent connection states in which the agent is expected to heartbeat.
LIVE_AGENT_STATES: frozenset[str] = frozenset({"connected", "stopping"})
#: The pipeline of a job added on its own (``add_job``), in its env and its REST views.
DEFAULT_PIPELINE = "drill"
_INTEGER = re.compile(r"^[+-]?\d+$")


def rfc3339_nano(ns: int | None = None) -> str:
    """UTC wall time as RFC 3339 with nanoseconds (the Go agent's ``time.RFC3339Nano``)."""
    ns = time.time_ns() if ns is None else ns
    secs, frac = divmod(ns, 1_000_000_000)
    stamp = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{frac:09d}Z"


def _same_secret(given: str | None, expected: str) -> bool:
    # compare_digest refuses non-ASCII str; a hostile header must be a 401, not a 500.
    return given is not None and secrets.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8")
    )


def _priority(value: str | None) -> int | None:
    """A register request's priority (a string on the wire, as the Go agent sends it)."""
    if value is None:
        return None
    if not _INTEGER.match(value.strip()):
        raise Unprocessable(f"priority must be an integer, got {value!r}")
    return int(value)


def _step_outcome(attempts: list[JobRecord]) -> str:
    if any(a.passed for a in attempts):
        return "passed"
    last = attempts[-1]
    if last.state in ("scheduled", "assigned"):
        return "scheduled"
    if last.state in ACTIVE_JOB_STATES:
        return "running"
    if last.lost:
        return "lost"
    if last.state == "canceled":
        return "canceled"
    return "failed"


class Coordinator:
    """The coordinator's state and every operation on it (agent API, REST, Python API).

    Intervals are in seconds and are handed to agents at register (and the chunk interval with
    each job); ``clock`` stamps events and drives the lost-agent rule and pause timeouts (inject
    a fake one to control time).

    On the wire an interval is what Buildkite sends, an integer, whenever it is a whole number
    of seconds. A drill on a compressed clock wants less than a second: such an interval goes
    out as it is (``0.3``), which fleetdrain's agent takes and the Go agent refuses (its fields
    are ``int``: it exits). ``integer_intervals=True`` sends every interval as whole seconds,
    rounded up and at least 1, for a Go agent whatever the settings say.

    ``repository`` is what the jobs' ``BUILDKITE_REPO`` / ``_COMMIT`` / ``_BRANCH`` name (for a
    Buildkite bootstrap to check out); by default a local bare repository with one commit, made
    once and shared (:func:`~fleetdrain.drill.coordinator.repository.drill_repository`).
    ``pipeline`` is the pipeline slug of jobs added with :meth:`add_job`.

    The REST API (``/v2``, not the agent API) is limited as Buildkite limits it:
    ``rest_rate_limit`` requests (200 by default; None or 0: counted, never refused) in each
    fixed window of ``rest_rate_window`` seconds (60) on ``clock``, with the ``RateLimit-*``
    headers on every REST answer and 429 beyond the limit. :attr:`rest_rate` holds the counts
    (:meth:`~fleetdrain.drill.coordinator.rate_limit.RestRateLimit.stats`: requests, 429s,
    the peak of any window); its ``limit`` can be changed at any time.
    """

    def __init__(
        self,
        registration_token: str = "reg-token",
        api_token: str = "api-token",
        org: str = "fleetdrain",
        ping_interval: float = 1.0,
        heartbeat_interval: float = 1.0,
        job_status_interval: float = 1.0,
        lost_agent_timeout: float = 180.0,
        chunks_interval_seconds: float = 1.0,
        chunks_max_size_bytes: int = 100 * 1024,
        request_headers: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        integer_intervals: bool = False,
        repository: Repository | None = None,
        pipeline: str = DEFAULT_PIPELINE,
        rest_rate_limit: int | None = DEFAULT_REST_RATE_LIMIT,
        rest_rate_window: float = DEFAULT_REST_RATE_WINDOW,
        graphql_rate_limit: int | None = DEFAULT_GRAPHQL_RATE_LIMIT,
        graphql_rate_window: float = DEFAULT_GRAPHQL_RATE_WINDOW,
    ) -> None:
        if chunks_max_size_bytes < 1:
            raise ValueError("chunks_max_size_bytes must be >= 1")
        self.registration_token = registration_token
        self.api_token = api_token
        self.org = org
        self.ping_interval = ping_interval
        self.heartbeat_interval = heartbeat_interval
        self.job_status_interval = job_status_interval
        self.lost_agent_timeout = lost_agent_timeout
        self.chunks_interval_seconds = chunks_interval_seconds
        self.chunks_max_size_bytes = chunks_max_size_bytes
        self.request_headers: dict[str, str] = dict(request_headers or {})
        self.clock = clock
        self.integer_intervals = integer_intervals
        self.pipeline = pipeline
        self._repository = repository
        fractional = [
            f"{name}={value:g}"
            for name, value in (
                ("ping_interval", ping_interval),
                ("heartbeat_interval", heartbeat_interval),
                ("job_status_interval", job_status_interval),
                ("chunks_interval_seconds", chunks_interval_seconds),
            )
            if not float(value).is_integer()
        ]
        if fractional and not integer_intervals:
            log.info(
                "%s go on the wire as fractions of a second: fleetdrain's agent takes them, "
                "the Go agent does not (integer_intervals=True rounds them up)",
                ", ".join(fractional),
            )
        self.faults = FaultSet(clock)
        self.rest_rate = RestRateLimit(rest_rate_limit, rest_rate_window, clock)
        #: The GraphQL API's own limit, in complexity points (``/graphql/v1``).
        self.graphql_rate = RestRateLimit(graphql_rate_limit, graphql_rate_window, clock)
        # Re-entrant so that internal helpers can be called with the lock held or not.
        self._lock = threading.RLock()
        self._agents: dict[str, AgentRecord] = {}
        self._jobs: dict[str, JobRecord] = {}
        # token -> ("agent" | "job", id); job tokens are only valid once the job is accepted.
        self._tokens: dict[str, tuple[str, str]] = {}
        self._events: list[Event] = []
        # (key, rule index) -> retries that rule has caused for that step.
        self._retry_counts: dict[tuple[str, int], int] = {}
        # build id -> its meta-data (key -> value, in the order first set).
        self._meta_data: dict[str, dict[str, str]] = {}
        # step key -> (build id, build number) of a job added without a build of its own.
        self._step_builds: dict[str, tuple[str, int]] = {}
        self._build_numbers = itertools.count(1)
        # Pipelines and builds (the REST Builds subset) sit on top of the jobs above.
        self.pipelines = Pipelines(self)

    # ------------------------------------------------------------------ Python API: jobs

    def add_job(
        self,
        command: str,
        env: Mapping[str, str] | None = None,
        retry: list[RetryRule] | None = None,
        agent_query_rules: list[str] | None = None,
        key: str | None = None,
    ) -> JobRecord:
        """Schedule a new step (attempt 1) and return a snapshot of its job.

        Without ``agent_query_rules`` the job targets ``queue=default``, as on Buildkite.
        ``key`` names the logical step; it defaults to the job id. The job's build is the one
        its env names (``BUILDKITE_BUILD_ID``, ``_NUMBER``, ``BUILDKITE_PIPELINE_SLUG``: a
        pipeline's build), else one build per step key in :attr:`pipeline`.
        """
        with self._lock:
            job_id = str(uuid.uuid4())
            step_key = key if key is not None else job_id
            env = dict(env or {})
            build_id, build_number = self._build_of(step_key, env)
            job = JobRecord(
                id=job_id,
                key=step_key,
                attempt=1,
                retry_of=None,
                command=command,
                env=env,
                agent_query_rules=list(agent_query_rules or []),
                retry_rules=list(retry or []),
                token=secrets.token_urlsafe(24),
                build_id=build_id,
                build_number=build_number,
                pipeline=env.get("BUILDKITE_PIPELINE_SLUG", self.pipeline),
                created_at=self.clock(),
            )
            self._jobs[job_id] = job
            self._event("schedule", job_id=job_id, key=job.key, attempt=1)
            return copy.deepcopy(job)

    def job(self, job_id: str) -> JobRecord:
        """A snapshot of one job (NotFound if unknown)."""
        with self._lock:
            return copy.deepcopy(self._job(job_id))

    def jobs(self) -> list[JobRecord]:
        """Snapshots of every job, in creation order."""
        with self._lock:
            return copy.deepcopy(list(self._jobs.values()))

    def builds(self) -> dict[str, StepRecord]:
        """Every step (job ``key``) with all its attempts and its outcome, in creation order."""
        with self._lock:
            by_key: dict[str, list[JobRecord]] = {}
            for job in self._jobs.values():
                by_key.setdefault(job.key, []).append(copy.deepcopy(job))
        steps: dict[str, StepRecord] = {}
        for key, attempts in by_key.items():
            attempts.sort(key=lambda a: a.attempt)
            steps[key] = StepRecord(key, attempts, _step_outcome(attempts))
        return steps

    def step(self, key: str) -> StepRecord:
        """One step's attempts and outcome (NotFound if no job has this key)."""
        steps = self.builds()
        if key not in steps:
            raise NotFound(f"no step with key {key!r}")
        return steps[key]

    def cancel_job(self, job_id: str) -> str:
        """Cancel like a user would; return the job's new state.

        Not yet accepted: ``canceled`` at once. Accepted or running: ``canceling``, which the
        agent sees on its state poll; its finish then makes it ``canceled``. Already done or
        canceling: unchanged.
        """
        with self._lock:
            job = self._job(job_id)
            self._cancel(job, reason="user")
            return job.state

    def meta_data(self, job_id: str) -> dict[str, str]:
        """A copy of the meta-data of the job's build (NotFound if the job is unknown)."""
        with self._lock:
            return dict(self._meta_data.get(self._job(job_id).build_id, {}))

    @property
    def repository(self) -> Repository | None:
        """What the jobs' env names as their source (made on first use; None without git)."""
        if self._repository is None:
            self._repository = drill_repository()
        return self._repository

    def wire_seconds(self, seconds: float) -> int | float:
        """An interval as it goes on the wire: an int when whole (or always, rounded up and at
        least 1, with ``integer_intervals``), else the fraction as it is."""
        if self.integer_intervals:
            return max(1, math.ceil(seconds))
        return int(seconds) if float(seconds).is_integer() else seconds

    # ------------------------------------------------------------------ Python API: agents

    def agents(self) -> list[AgentRecord]:
        """Snapshots of every agent, in registration order."""
        with self._lock:
            for agent in self._agents.values():
                self._lapse_pause(agent)
            return copy.deepcopy(list(self._agents.values()))

    def agent(self, agent_id: str) -> AgentRecord:
        """A snapshot of one agent (NotFound if unknown)."""
        with self._lock:
            agent = self._agent(agent_id)
            self._lapse_pause(agent)
            return copy.deepcopy(agent)

    def agent_named(self, name: str) -> AgentRecord | None:
        """The most recently registered agent called ``name``, if any."""
        with self._lock:
            for agent in reversed(self._agents.values()):
                if agent.name == name:
                    self._lapse_pause(agent)
                    return copy.deepcopy(agent)
        return None

    def stop_agent(self, agent_id: str, force: bool = False) -> None:
        """Ask an agent to stop (REST ``PUT .../stop``); BadRequest unless it is connected.

        Graceful: it gets ``disconnect`` on the first ping after its job is done. Forced: its
        running job goes to ``canceling`` too. A stopping agent can be stopped again with force.
        """
        with self._lock:
            agent = self._agent(agent_id)
            if agent.connection_state not in LIVE_AGENT_STATES:
                raise BadRequest("Can only stop connected agents")
            agent.stop_requested = True
            agent.stop_force = agent.stop_force or force
            agent.connection_state = "stopping"
            self._event("stop", agent_id=agent.id, force=force)
            job = self._jobs.get(agent.job_id) if agent.job_id else None
            if force and job is not None and job.state in ACTIVE_JOB_STATES:
                self._cancel(job, reason="agent_stop")

    def pause_agent(
        self, agent_id: str, timeout_minutes: float = 5, note: str | None = None
    ) -> None:
        """Pause an agent: no new jobs (ping ``pause``) until resumed or the timeout lapses."""
        if not 0 < timeout_minutes <= 10080:
            raise Unprocessable("timeout_in_minutes must be in 1..10080")
        with self._lock:
            agent = self._agent(agent_id)
            if agent.connection_state not in LIVE_AGENT_STATES:
                raise BadRequest("Can only pause connected agents")
            agent.paused = True
            agent.paused_until = self.clock() + timeout_minutes * 60
            agent.pause_note = note
            self._event("pause", agent_id=agent.id, timeout_minutes=timeout_minutes, note=note)

    def resume_agent(self, agent_id: str) -> None:
        """Resume a paused agent (a no-op if it is not paused)."""
        with self._lock:
            agent = self._agent(agent_id)
            if agent.paused:
                agent.paused = False
                agent.paused_until = None
                self._event("resume", agent_id=agent.id, reason="resumed")

    def heartbeat_gaps(self, agent_id: str) -> float:
        """The longest time in seconds the agent went without a heartbeat while connected.

        Measured from connect to the first heartbeat, between heartbeats, and from the last one
        to the disconnect (or to the moment it was declared lost, or to now while it is still
        connected). 0.0 for an agent that never connected.
        """
        with self._lock:
            agent = self._agent(agent_id)
            if agent.connected_at is None:
                return 0.0
            points = [agent.connected_at, *(t for t in agent.heartbeats if t >= agent.connected_at)]
            if agent.connection_state in LIVE_AGENT_STATES:
                points.append(self.clock())
            elif agent.lost_at is not None:
                points.append(agent.lost_at)
            elif agent.disconnected_at is not None and agent.disconnected_at >= agent.connected_at:
                points.append(agent.disconnected_at)
        return max((b - a for a, b in itertools.pairwise(points)), default=0.0)

    # ------------------------------------------------------------------ Python API: misc

    @property
    def events(self) -> list[Event]:
        """A copy of the event log, oldest first.

        Kinds: ``register connect ping heartbeat accept accept_rejected start chunk state_poll
        finish retry retry_exhausted schedule unassign disconnect lost stop pause resume cancel
        meta_data fault rejected``. ``lost`` is recorded for the agent (no job_id) and for the
        job it held; ``rejected`` is any refused request (detail: endpoint, status, message);
        ``meta_data`` any meta-data call (detail: ``op``, one of ``set get exists keys``, and
        the ``keys`` it names).
        """
        with self._lock:
            return list(self._events)

    def events_of(
        self, kind: str | None = None, agent_id: str | None = None, job_id: str | None = None
    ) -> list[Event]:
        """Events filtered by kind, agent and/or job."""
        return [
            e
            for e in self.events
            if (kind is None or e.kind == kind)
            and (agent_id is None or e.agent_id == agent_id)
            and (job_id is None or e.job_id == job_id)
        ]

    def wait_for(
        self,
        predicate: Callable[[Coordinator], bool],
        timeout: float,
        interval: float = 0.02,
    ) -> bool:
        """Poll ``predicate(self)`` until it is true (True) or ``timeout`` real seconds pass."""
        deadline = time.monotonic() + timeout
        while True:
            if predicate(self):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(interval)

    def check_lost(self) -> list[str]:
        """Apply the lost-agent rule now; return the ids of agents it declared lost.

        A connected (or stopping) agent whose last heartbeat, or its connect if it never sent
        one, is older than ``lost_agent_timeout`` is lost: its tokens stop working and its
        running job is finished by the server with exit status ``-1`` (then retry rules apply).
        """
        with self._lock:
            now = self.clock()
            lost: list[str] = []
            for agent in self._agents.values():
                if agent.connection_state not in LIVE_AGENT_STATES:
                    continue
                ref = agent.last_heartbeat
                if ref is None or (agent.connected_at is not None and ref < agent.connected_at):
                    ref = agent.connected_at
                if ref is not None and now - ref > self.lost_agent_timeout:
                    self._mark_lost(agent, now)
                    lost.append(agent.id)
            return lost

    def take_fault(self, endpoint: str, agent_id: str | None) -> Fault | None:
        """Consume the fault (if any) that a request to ``endpoint`` meets; records an event."""
        draining = False
        if agent_id is not None:
            with self._lock:
                agent = self._agents.get(agent_id)
                draining = agent is not None and (agent.paused or agent.stop_requested)
        fault = self.faults.take(endpoint, agent_id, draining)
        if fault is not None:
            with self._lock:
                self._event(
                    "fault",
                    agent_id=agent_id,
                    endpoint=endpoint,
                    fault_kind=fault.kind,
                    status=fault.status,
                    seconds=fault.seconds,
                )
        return fault

    def record_rejection(
        self, endpoint: str, agent_id: str | None, error: CoordinatorError
    ) -> None:
        """Log a refused request as a ``rejected`` event (refused accepts: ``accept_rejected``)."""
        with self._lock:
            self._event(
                "rejected",
                agent_id=agent_id,
                endpoint=endpoint,
                status=error.status,
                message=error.message,
            )

    def token_agent(self, token: str | None) -> str | None:
        """The agent a token belongs to (agent token, or job token of an assigned job), if any."""
        if token is None:
            return None
        with self._lock:
            owner = self._tokens.get(token)
            if owner is None:
                return None
            kind, ident = owner
            if kind == "agent":
                return ident
            return self._jobs[ident].agent_id

    # ------------------------------------------------------------------ agent API

    def check_registration_token(self, token: str | None) -> None:
        """Unauthorized unless ``token`` is the registration token."""
        if not _same_secret(token, self.registration_token):
            raise Unauthorized("invalid registration token")

    def register(self, token: str | None, request: RegisterRequest) -> RegisterResponse:
        """``POST /v3/register``: create an agent in state ``registered``."""
        self.check_registration_token(token)
        priority = _priority(request.priority)
        with self._lock:
            agent = AgentRecord(
                id=str(uuid.uuid4()),
                name=request.name,
                access_token=secrets.token_urlsafe(24),
                hostname=request.hostname,
                version=request.version,
                priority=priority,
                meta_data=list(request.meta_data),
                registered_at=self.clock(),
            )
            self._agents[agent.id] = agent
            self._tokens[agent.access_token] = ("agent", agent.id)
            self._event("register", agent_id=agent.id, name=agent.name, meta_data=agent.meta_data)
            return self.register_response(agent.id, agent.name, agent.access_token, agent.meta_data)

    def register_response(
        self, agent_id: str, name: str, access_token: str, meta_data: list[str]
    ) -> RegisterResponse:
        """The register answer for these agent details (also used to fake one under a fault)."""
        return RegisterResponse(
            id=agent_id,
            name=name,
            access_token=access_token,
            endpoint=None,
            request_headers=dict(self.request_headers),
            ping_interval=self.wire_seconds(self.ping_interval),
            job_status_interval=self.wire_seconds(self.job_status_interval),
            heartbeat_interval=self.wire_seconds(self.heartbeat_interval),
            meta_data=list(meta_data),
        )

    def check_token(self, token: str | None) -> None:
        """Unauthorized unless ``token`` is a live agent's or an accepted job's token.

        A side-effect-free pre-check, so that a bad token is answered with 401 before the body
        is even validated; the operation itself checks again, atomically.
        """
        with self._lock:
            owner = self._tokens.get(token) if token is not None else None
            if owner is None:
                raise Unauthorized("invalid access token")
            agent_id = self.token_agent(token)
            if agent_id is not None and self._agents[agent_id].connection_state == "lost":
                raise Unauthorized("invalid access token (agent lost)")

    def authorize(self, token: str | None, headers: Mapping[str, str]) -> str:
        """The id of the live agent whose access token this is (Unauthorized otherwise)."""
        with self._lock:
            return self._auth_agent(token, headers).id

    def authorize_job(self, token: str | None, job_id: str, headers: Mapping[str, str]) -> str:
        """The id of the agent a job-scoped call acts for (job token or assigned agent's token)."""
        with self._lock:
            return self._auth_job(token, job_id, headers)[0].id

    def connect(self, token: str | None, headers: Mapping[str, str]) -> None:
        """``POST /v3/connect``."""
        with self._lock:
            agent = self._auth_agent(token, headers)
            if agent.connection_state == "stopped":
                raise Unprocessable("agent was stopped; register again")
            if agent.connection_state in LIVE_AGENT_STATES:
                return
            agent.connection_state = "connected"
            agent.connected_at = self.clock()
            agent.disconnected_at = None
            self._event("connect", agent_id=agent.id)

    def disconnect(self, token: str | None, headers: Mapping[str, str]) -> None:
        """``POST /v3/disconnect``: ``stopped`` if a stop was requested, else ``disconnected``.

        A job the agent still holds is lost with it (exit ``-1``) and offered to retry rules; a
        job merely assigned goes back to the queue.
        """
        with self._lock:
            agent = self._auth_agent(token, headers)
            if agent.connection_state in ("disconnected", "stopped"):
                return
            now = self.clock()
            self._release_job(agent, reason="agent disconnected with a job")
            agent.connection_state = "stopped" if agent.stop_requested else "disconnected"
            agent.disconnected_at = now
            self._event("disconnect", agent_id=agent.id, connection_state=agent.connection_state)

    def ping(self, token: str | None, headers: Mapping[str, str]) -> PingResponse:
        """``GET /v3/ping``: disconnect, pause, a job to accept, or idle."""
        with self._lock:
            agent = self._auth_agent(token, headers)
            if agent.connection_state not in LIVE_AGENT_STATES:
                raise Unprocessable(f"agent is {agent.connection_state}, not connected")
            response = self._ping_decision(agent)
            if self.request_headers:
                response.request_headers = dict(self.request_headers)
            job_id = response.job.id if response.job is not None else None
            self._event("ping", agent_id=agent.id, job_id=job_id, action=response.action)
            return response

    def heartbeat(self, token: str | None, headers: Mapping[str, str], sent_at: str) -> str:
        """``POST /v3/heartbeat``: record it; return ``received_at`` (RFC 3339, nanoseconds)."""
        with self._lock:
            agent = self._auth_agent(token, headers)
            if agent.connection_state not in LIVE_AGENT_STATES:
                raise Unprocessable(f"agent is {agent.connection_state}, not connected")
            agent.heartbeats.append(self.clock())
            self._event("heartbeat", agent_id=agent.id, sent_at=sent_at)
            return rfc3339_nano()

    def accept(self, token: str | None, job_id: str, headers: Mapping[str, str]) -> Job:
        """``PUT /v3/jobs/:id/accept``: only the agent the job was assigned to, only once.

        A repeat by the same agent (a retry after a lost response) gets the job again.
        """
        with self._lock:
            agent = self._auth_agent(token, headers)
            job = self._job(job_id)
            if job.agent_id == agent.id and job.state in ACTIVE_JOB_STATES:
                return self._job_view(job, agent, with_token=True)
            if job.agent_id != agent.id or job.state != "assigned":
                self._event(
                    "accept_rejected",
                    agent_id=agent.id,
                    job_id=job.id,
                    state=job.state,
                    assigned_to=job.agent_id,
                )
                raise Unprocessable(
                    f"job {job.id} is {job.state}"
                    + ("" if job.agent_id == agent.id else " and not assigned to this agent")
                )
            job.state = "accepted"
            job.accepted_at = self.clock()
            self._tokens[job.token] = ("job", job.id)
            self._event("accept", agent_id=agent.id, job_id=job.id)
            return self._job_view(job, agent, with_token=True)

    def start(
        self, token: str | None, job_id: str, headers: Mapping[str, str], started_at: str
    ) -> None:
        """``PUT /v3/jobs/:id/start``: accepted -> running (a repeat is a no-op)."""
        with self._lock:
            agent, job = self._auth_job(token, job_id, headers)
            if job.started_at is not None and job.state in ACTIVE_JOB_STATES:
                return
            if job.state not in ("accepted", "canceling"):
                raise Unprocessable(f"cannot start a job that is {job.state}")
            if job.state == "accepted":
                job.state = "running"
            job.started_at = self.clock()
            self._event("start", agent_id=agent.id, job_id=job.id, started_at=started_at)

    def upload_chunk(
        self,
        token: str | None,
        job_id: str,
        headers: Mapping[str, str],
        sequence: int,
        offset: int,
        data: bytes,
    ) -> None:
        """``POST /v3/jobs/:id/chunks``: store one (already decompressed) chunk.

        A repeat of a sequence with identical content is accepted and changes nothing; the same
        sequence with other content is refused.
        """
        with self._lock:
            agent, job = self._auth_job(token, job_id, headers)
            if job.state in TERMINAL_JOB_STATES:
                raise Unprocessable(f"job is {job.state}; no more chunks")
            if job.state not in ACTIVE_JOB_STATES:
                raise Unprocessable(f"job is {job.state}, not accepted")
            if len(data) > self.chunks_max_size_bytes:
                raise BadRequest(f"chunk larger than {self.chunks_max_size_bytes} bytes")
            chunk = (offset, len(data), data)
            existing = job.chunks.get(sequence)
            if existing is not None:
                if existing != chunk:
                    raise Unprocessable(f"sequence {sequence} already stored with other content")
                self._event(
                    "chunk",
                    agent_id=agent.id,
                    job_id=job.id,
                    sequence=sequence,
                    offset=offset,
                    size=len(data),
                    duplicate=True,
                )
                return
            job.chunks[sequence] = chunk
            self._event(
                "chunk",
                agent_id=agent.id,
                job_id=job.id,
                sequence=sequence,
                offset=offset,
                size=len(data),
                duplicate=False,
            )

    def job_state(self, token: str | None, job_id: str, headers: Mapping[str, str]) -> str:
        """``GET /v3/jobs/:id``: the job's state."""
        with self._lock:
            agent, job = self._auth_job(token, job_id, headers)
            self._event("state_poll", agent_id=agent.id, job_id=job.id, state=job.state)
            return job.state

    def finish(
        self,
        token: str | None,
        job_id: str,
        headers: Mapping[str, str],
        exit_status: str,
        signal: str | None,
        signal_reason: str | None,
        chunks_failed_count: int,
        finished_at: str,
    ) -> None:
        """``PUT /v3/jobs/:id/finish``: ``finished`` (``canceled`` if it was canceling).

        An identical repeat is a no-op; then the job's retry rules are applied.
        """
        body = {
            "exit_status": exit_status,
            "signal": signal,
            "signal_reason": signal_reason,
            "chunks_failed_count": chunks_failed_count,
        }
        with self._lock:
            _agent, job = self._auth_job(token, job_id, headers)
            if job.state in TERMINAL_JOB_STATES:
                if job.finish_body == body:
                    return
                raise Unprocessable(f"job is already {job.state}")
            if job.state not in ACTIVE_JOB_STATES:
                raise Unprocessable(f"cannot finish a job that is {job.state}")
            job.finish_body = body
            self._finish(
                job,
                exit_status,
                signal,
                signal_reason,
                chunks_failed_count,
                finished_at=finished_at,
            )

    def meta_data_set(
        self,
        token: str | None,
        job_id: str,
        headers: Mapping[str, str],
        items: list[tuple[str, str]],
    ) -> None:
        """``POST jobs/:id/data/set`` (one item) and ``data/set-batch``: set keys in the job's
        build, all of them or none. Keys and values must not be blank; the job must be active
        (accepted, running or canceling)."""
        if not items:
            raise Unprocessable("no meta-data items to set")
        for key, value in items:
            if not key.strip():
                raise Unprocessable("meta-data key cannot be blank")
            if not value.strip():
                raise Unprocessable(f"meta-data value of {key!r} cannot be blank")
        with self._lock:
            agent, job = self._auth_job(token, job_id, headers)
            if job.state not in ACTIVE_JOB_STATES:
                raise Unprocessable(f"job is {job.state}; meta-data is set while it runs")
            store = self._meta_data.setdefault(job.build_id, {})
            for key, value in items:
                store[key] = value
            keys = [key for key, _ in items]
            self._event("meta_data", agent_id=agent.id, job_id=job.id, op="set", keys=keys)

    def meta_data_get(
        self, token: str | None, scope: str, ident: str, headers: Mapping[str, str], key: str
    ) -> str:
        """``POST jobs/:id/data/get`` (``scope`` ``job``) or ``builds/:id/data/get``
        (``build``): the value; NotFound when the key was never set (the Go agent's
        ``--default`` needs that 404)."""
        with self._lock:
            agent, job_id, store = self._meta_data_of(token, scope, ident, headers)
            self._event("meta_data", agent_id=agent.id, job_id=job_id, op="get", keys=[key])
            if key not in store:
                raise NotFound(f"No meta-data value exists for key {key!r}")
            return store[key]

    def meta_data_exists(
        self, token: str | None, scope: str, ident: str, headers: Mapping[str, str], key: str
    ) -> bool:
        """``POST jobs/:id/data/exists`` (or ``builds/:id/...``): whether the key is set."""
        with self._lock:
            agent, job_id, store = self._meta_data_of(token, scope, ident, headers)
            self._event("meta_data", agent_id=agent.id, job_id=job_id, op="exists", keys=[key])
            return key in store

    def meta_data_keys(
        self, token: str | None, scope: str, ident: str, headers: Mapping[str, str]
    ) -> list[str]:
        """``POST jobs/:id/data/keys`` (or ``builds/:id/...``): the keys, in the order first
        set."""
        with self._lock:
            agent, job_id, store = self._meta_data_of(token, scope, ident, headers)
            self._event("meta_data", agent_id=agent.id, job_id=job_id, op="keys", keys=[])
            return list(store)

    def agent_pause(
        self,
        token: str | None,
        headers: Mapping[str, str],
        timeout_minutes: float,
        note: str | None,
    ) -> None:
        """``POST /v3/pause`` (the agent pausing itself)."""
        agent_id = self.authorize(token, headers)
        self.pause_agent(agent_id, timeout_minutes, note)

    def agent_resume(self, token: str | None, headers: Mapping[str, str]) -> None:
        """``POST /v3/resume``."""
        self.resume_agent(self.authorize(token, headers))

    def agent_stop(self, token: str | None, headers: Mapping[str, str], force: bool) -> None:
        """``POST /v3/stop`` (the agent stopping itself)."""
        self.stop_agent(self.authorize(token, headers), force)

    def job_view(self, job_id: str) -> Job:
        """The job as a ping offers it (no token)."""
        with self._lock:
            job = self._job(job_id)
            agent = self._agents.get(job.agent_id) if job.agent_id else None
            return self._job_view(job, agent, with_token=False)

    # ------------------------------------------------------------------ REST API

    def rest_authorize(self, token: str | None, org: str) -> None:
        """Unauthorized unless the API token; NotFound for another organization."""
        if not _same_secret(token, self.api_token):
            raise Unauthorized("Authentication required. Please supply a valid API Access Token")
        if org != self.org:
            raise NotFound("No organization found")

    def rest_agents(self, page: int, per_page: int) -> tuple[list[RestAgent], bool]:
        """One page (1-based) of agents in registration order, and whether more follow."""
        with self._lock:
            agents = list(self._agents.values())
            start = (page - 1) * per_page
            chosen = agents[start : start + per_page]
            return [self._rest_view(a) for a in chosen], start + per_page < len(agents)

    def agents_with_meta_data(self, entries: list[str]) -> list[RestAgent]:
        """The agents having every ``key=value`` entry of ``entries`` in their meta-data, in
        registration order (GraphQL's ``Organization.agents(metaData:)``)."""
        wanted = set(entries)
        with self._lock:
            return [self._rest_view(a) for a in self._agents.values() if wanted <= set(a.meta_data)]

    def rest_agent(self, agent_id: str) -> RestAgent:
        """One agent as REST shows it (NotFound if unknown)."""
        with self._lock:
            return self._rest_view(self._agent(agent_id))

    # ------------------------------------------------------------------ internals (lock held)

    def _event(
        self, kind: str, agent_id: str | None = None, job_id: str | None = None, **detail: Any
    ) -> None:
        self._events.append(Event(self.clock(), kind, agent_id, job_id, detail))

    def _agent(self, agent_id: str) -> AgentRecord:
        agent = self._agents.get(agent_id)
        if agent is None:
            raise NotFound(f"no agent {agent_id}")
        return agent

    def _job(self, job_id: str) -> JobRecord:
        job = self._jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def _build_of(self, step_key: str, env: Mapping[str, str]) -> tuple[str, int]:
        build_id = env.get("BUILDKITE_BUILD_ID")
        if build_id:
            number = env.get("BUILDKITE_BUILD_NUMBER", "")
            return build_id, int(number) if number.isdigit() else 0
        if step_key not in self._step_builds:
            self._step_builds[step_key] = (str(uuid.uuid4()), next(self._build_numbers))
        return self._step_builds[step_key]

    def _meta_data_of(
        self, token: str | None, scope: str, ident: str, headers: Mapping[str, str]
    ) -> tuple[AgentRecord, str | None, dict[str, str]]:
        """Who asks (agent), about which job (None for a build), and the build's meta-data."""
        if scope == "job":
            agent, job = self._auth_job(token, ident, headers)
            return agent, job.id, self._meta_data.get(job.build_id, {})
        owner = self._tokens.get(token) if token is not None else None
        if owner is None:
            raise Unauthorized("invalid access token")
        kind, owner_id = owner
        agent_id = owner_id if kind == "agent" else self._jobs[owner_id].agent_id
        assert agent_id is not None  # job tokens are only issued at accept
        agent = self._agents[agent_id]
        if agent.connection_state == "lost":
            raise Unauthorized("invalid access token (agent lost)")
        self._note_request(agent, headers)
        if not any(j.build_id == ident for j in self._jobs.values()):
            raise NotFound("No build found")
        return agent, None, self._meta_data.get(ident, {})

    def _note_request(self, agent: AgentRecord, headers: Mapping[str, str]) -> None:
        agent.requests += 1
        if any(headers.get(k) != v for k, v in self.request_headers.items()):
            agent.request_headers_missing += 1

    def _auth_agent(self, token: str | None, headers: Mapping[str, str]) -> AgentRecord:
        owner = self._tokens.get(token) if token is not None else None
        if owner is None or owner[0] != "agent":
            raise Unauthorized("invalid access token")
        agent = self._agents[owner[1]]
        if agent.connection_state == "lost":
            raise Unauthorized("invalid access token (agent lost)")
        self._note_request(agent, headers)
        return agent

    def _auth_job(
        self, token: str | None, job_id: str, headers: Mapping[str, str]
    ) -> tuple[AgentRecord, JobRecord]:
        owner = self._tokens.get(token) if token is not None else None
        if owner is None:
            raise Unauthorized("invalid access token")
        kind, ident = owner
        if kind == "job":
            if ident != job_id:
                raise Unauthorized("job token of another job")
            job = self._jobs[ident]
            assert job.agent_id is not None  # job tokens are only issued at accept
            agent = self._agents[job.agent_id]
        else:
            agent = self._agents[ident]
            if agent.connection_state == "lost":
                raise Unauthorized("invalid access token (agent lost)")
            job = self._job(job_id)
            if job.agent_id != agent.id:
                self._note_request(agent, headers)
                raise Forbidden(f"job {job_id} is not assigned to this agent")
        if agent.connection_state == "lost":
            raise Unauthorized("invalid access token (agent lost)")
        self._note_request(agent, headers)
        return agent, job

    def _lapse_pause(self, agent: AgentRecord) -> None:
        if agent.paused and agent.paused_until is not None and self.clock() >= agent.paused_until:
            agent.paused = False
            agent.paused_until = None
            self._event("resume", agent_id=agent.id, reason="lapsed")

    def _ping_decision(self, agent: AgentRecord) -> PingResponse:
        job = self._jobs.get(agent.job_id) if agent.job_id else None
        holding = job is not None and job.state in ACTIVE_JOB_STATES
        self._lapse_pause(agent)
        if agent.stop_requested and not holding:
            self._unassign(agent)
            return PingResponse(action="disconnect")
        if agent.paused:
            self._unassign(agent)
            return PingResponse(action="pause")
        if holding or agent.stop_requested:
            return PingResponse(action="idle")
        if job is not None and job.state == "assigned":
            # The agent may have lost our previous answer; offer the same job again.
            return PingResponse(job=self._job_view(job, agent, with_token=False))
        tags = agent.tags
        for candidate in self._jobs.values():
            if candidate.state == "scheduled" and self._matches(candidate, tags):
                candidate.state = "assigned"
                candidate.agent_id = agent.id
                candidate.assigned_at = self.clock()
                agent.job_id = candidate.id
                return PingResponse(job=self._job_view(candidate, agent, with_token=False))
        return PingResponse(action="idle")

    @staticmethod
    def _matches(job: JobRecord, tags: Mapping[str, str]) -> bool:
        for rule in job.agent_query_rules or ["queue=default"]:
            key, sep, value = rule.partition("=")
            key, value = key.strip(), value.strip()
            if not sep:
                if key not in tags:
                    return False
            elif key == "queue" and value == "default" and "queue" not in tags:
                continue
            elif value == "*":
                if key not in tags:
                    return False
            elif tags.get(key) != value:
                return False
        return True

    def _unassign(self, agent: AgentRecord) -> None:
        job = self._jobs.get(agent.job_id) if agent.job_id else None
        if job is not None and job.state == "assigned":
            job.state = "scheduled"
            job.agent_id = None
            job.assigned_at = None
            agent.job_id = None
            self._event("unassign", agent_id=agent.id, job_id=job.id)

    def _release_job(self, agent: AgentRecord, reason: str) -> None:
        self._unassign(agent)
        job = self._jobs.get(agent.job_id) if agent.job_id else None
        if job is not None and job.state in ACTIVE_JOB_STATES:
            job.lost = True
            self._event("lost", agent_id=agent.id, job_id=job.id, reason=reason)
            self._finish(job, "-1", None, None, job.chunks_failed_count, finished_at=None)

    def _mark_lost(self, agent: AgentRecord, now: float) -> None:
        agent.connection_state = "lost"
        agent.lost_at = now
        self._event("lost", agent_id=agent.id, last_heartbeat=agent.last_heartbeat)
        self._release_job(agent, reason="agent lost")

    def _cancel(self, job: JobRecord, reason: str) -> None:
        if job.state in ("scheduled", "assigned"):
            if job.agent_id is not None:
                agent = self._agents[job.agent_id]
                if agent.job_id == job.id:
                    agent.job_id = None
            job.state = "canceled"
            job.canceled_at = job.finished_at = self.clock()
        elif job.state in ("accepted", "running"):
            job.state = "canceling"
            job.canceled_at = self.clock()
        else:
            return
        job.cancel_reason = reason
        self._event("cancel", agent_id=job.agent_id, job_id=job.id, reason=reason, state=job.state)

    def _finish(
        self,
        job: JobRecord,
        exit_status: str,
        signal: str | None,
        signal_reason: str | None,
        chunks_failed_count: int,
        finished_at: str | None,
    ) -> None:
        job.state = "canceled" if job.state == "canceling" else "finished"
        job.exit_status = exit_status
        job.signal = signal
        job.signal_reason = signal_reason
        job.chunks_failed_count = chunks_failed_count
        job.finished_at = self.clock()
        if job.agent_id is not None:
            agent = self._agents[job.agent_id]
            if agent.job_id == job.id:
                agent.job_id = None
            agent.last_job_finished_at = rfc3339_nano()
        self._event(
            "finish",
            agent_id=job.agent_id,
            job_id=job.id,
            state=job.state,
            exit_status=exit_status,
            signal=signal,
            signal_reason=signal_reason,
            chunks_failed_count=chunks_failed_count,
            finished_at=finished_at,
            lost=job.lost,
        )
        self._apply_retry(job)

    def _apply_retry(self, job: JobRecord) -> None:
        # A job that passed is never retried, whatever the rules say.
        if job.exit_status == "0" and job.signal_reason is None:
            return
        for index, rule in enumerate(job.retry_rules):
            if not rule.matches(job.exit_status, job.signal_reason):
                continue
            # As on Buildkite, the first matching rule decides; its limit counts per step.
            used = self._retry_counts.get((job.key, index), 0)
            if used >= rule.limit:
                self._event("retry_exhausted", job_id=job.id, key=job.key, rule=index)
                return
            self._retry_counts[(job.key, index)] = used + 1
            retry = JobRecord(
                id=str(uuid.uuid4()),
                key=job.key,
                attempt=job.attempt + 1,
                retry_of=job.id,
                command=job.command,
                env=dict(job.env),
                agent_query_rules=list(job.agent_query_rules),
                retry_rules=list(job.retry_rules),
                token=secrets.token_urlsafe(24),
                build_id=job.build_id,
                build_number=job.build_number,
                pipeline=job.pipeline,
                created_at=self.clock(),
            )
            self._jobs[retry.id] = retry
            job.retried = True
            job.retried_by = retry.id
            self._event(
                "retry",
                job_id=job.id,
                key=job.key,
                rule=index,
                new_job_id=retry.id,
                attempt=retry.attempt,
            )
            return

    def _job_view(self, job: JobRecord, agent: AgentRecord | None, with_token: bool) -> Job:
        # What a real build's job carries, so that a Buildkite bootstrap accepts it (it needs
        # the repository, commit, branch, pipeline slug and provider, organization, job id and
        # agent name); the job's own env (a pipeline build's commit and branch) over it, and the
        # coordinator's own facts over both. No BUILDKITE_AGENT_ACCESS_TOKEN: the agent sets
        # that for the job itself (the Go agent ignores, with a warning, one sent in the env).
        env = {
            "BUILDKITE_PIPELINE_SLUG": job.pipeline,
            "BUILDKITE_PIPELINE_NAME": job.pipeline,
            "BUILDKITE_BUILD_ID": job.build_id,
            "BUILDKITE_BUILD_NUMBER": str(job.build_number),
            "BUILDKITE_LABEL": job.key,
            "BUILDKITE_SOURCE": "api",
            "BUILDKITE_PULL_REQUEST": "false",
            "BUILDKITE_TIMEOUT": "false",
        }
        repo = self.repository
        if repo is not None:
            env.update(
                {
                    "BUILDKITE_REPO": repo.url,
                    "BUILDKITE_COMMIT": repo.commit,
                    "BUILDKITE_BRANCH": repo.branch,
                    "BUILDKITE_PIPELINE_DEFAULT_BRANCH": repo.branch,
                    "BUILDKITE_PIPELINE_PROVIDER": repo.provider,
                }
            )
        env.update(job.env)
        env.update(
            {
                "BUILDKITE": "true",
                "CI": "true",
                "BUILDKITE_COMMAND": job.command,
                "BUILDKITE_SCRIPT_PATH": job.command,
                "BUILDKITE_JOB_ID": job.id,
                "BUILDKITE_STEP_KEY": job.key,
                "BUILDKITE_RETRY_COUNT": str(job.attempt - 1),
                "BUILDKITE_ORGANIZATION_SLUG": self.org,
            }
        )
        if agent is not None:
            env["BUILDKITE_AGENT_ID"] = agent.id
            env["BUILDKITE_AGENT_NAME"] = agent.name
        return Job(
            id=job.id,
            state=job.state,
            env=env,
            chunks_max_size_bytes=self.chunks_max_size_bytes,
            chunks_interval_seconds=self.wire_seconds(self.chunks_interval_seconds),
            token=job.token if with_token else None,
        )

    def _rest_view(self, agent: AgentRecord) -> RestAgent:
        self._lapse_pause(agent)
        job = self._jobs.get(agent.job_id) if agent.job_id else None
        return RestAgent(
            id=agent.id,
            name=agent.name,
            connection_state=agent.connection_state,
            hostname=agent.hostname,
            meta_data=list(agent.meta_data),
            job=RestJob(id=job.id, state=job.state) if job is not None else None,
            last_job_finished_at=agent.last_job_finished_at,
            priority=agent.priority,
            version=agent.version,
            paused=agent.paused,
        )
