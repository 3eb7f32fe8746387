"""Pipelines and builds for the embedded coordinator: the REST subset a game day drives.

``POST /v2/organizations/{org}/pipelines/{pipeline}/builds`` creates a build of a pipeline
defined here (:meth:`Pipelines.add`), one job per step, through the coordinator's own
:meth:`~fleetdrain.drill.coordinator.state.Coordinator.add_job` (so retry rules and the lost-agent
rule apply as for any job); ``GET .../builds/{number}`` shows it with every attempt, the way
Buildkite's Builds API does (field names and states as documented there; only a subset).

Kept beside the coordinator, not inside it: the agent API never needs builds, and the
coordinator's model stays the one thing agents talk to. ``coord.pipelines`` is the registry.
The pipelines reach the coordinator only through :class:`CoordinatorJobs` (the few operations
they use), so this module imports its records (:mod:`~fleetdrain.drill.coordinator.records`),
never the coordinator itself; the REST shapes are :mod:`~fleetdrain.drill.coordinator.rest_models`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from fleetdrain.drill.coordinator.errors import NotFound
from fleetdrain.drill.coordinator.records import AgentRecord, JobRecord, RetryRule, StepRecord
from fleetdrain.drill.coordinator.rest_models import (
    CreateBuildRequest,
    RestBuild,
    RestBuildAgent,
    RestBuildJob,
)


class CoordinatorJobs(Protocol):
    """What the pipelines need of the coordinator they build on (a
    :class:`~fleetdrain.drill.coordinator.state.Coordinator`): its organization and clock,
    scheduling a job, and reading steps and agents back."""

    org: str
    clock: Callable[[], float]

    def add_job(
        self,
        command: str,
        env: Mapping[str, str] | None = None,
        retry: list[RetryRule] | None = None,
        agent_query_rules: list[str] | None = None,
        key: str | None = None,
    ) -> JobRecord: ...

    def step(self, key: str) -> StepRecord: ...

    def agent(self, agent_id: str) -> AgentRecord: ...


@dataclass(frozen=True)
class PipelineStep:
    """One command step of a pipeline (``key`` names it within a build)."""

    command: str
    key: str = "build"
    label: str = ""
    retry: tuple[RetryRule, ...] = ()
    agent_query_rules: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class BuildRecord:
    """One build of a pipeline; its jobs are the coordinator's steps ``step_keys``."""

    id: str
    pipeline: str
    number: int
    commit: str
    branch: str
    message: str
    env: dict[str, str]
    created_at: float  # wall clock (epoch seconds)
    step_keys: dict[str, str]  # step key -> the coordinator's job key
    step_labels: dict[str, str]


def _rest_job_state(job: JobRecord) -> str:
    if job.state == "finished":
        return "passed" if job.exit_status == "0" else "failed"
    return job.state  # scheduled, assigned, accepted, running, canceling, canceled


def build_state(steps: list[StepRecord]) -> str:
    """The build's state from its steps' outcomes (Buildkite's build states)."""
    outcomes = [s.outcome for s in steps]
    started = any(a.started_at is not None for s in steps for a in s.attempts)
    if any(o in ("running", "scheduled") for o in outcomes):
        return "running" if started or "running" in outcomes else "scheduled"
    if all(o == "passed" for o in outcomes):
        return "passed"
    if any(o in ("failed", "lost") for o in outcomes):
        return "failed"
    return "canceled"


class Pipelines:
    """The pipelines of ``coord``'s organization and their builds."""

    def __init__(self, coord: CoordinatorJobs, wall: Any = time.time) -> None:
        self._coord = coord
        self._wall = wall
        self._lock = threading.Lock()
        self._pipelines: dict[str, list[PipelineStep]] = {}
        self._builds: dict[tuple[str, int], BuildRecord] = {}

    def add(self, slug: str, steps: list[PipelineStep]) -> None:
        """Define (or redefine) pipeline ``slug``: its steps, in order."""
        if not steps:
            raise ValueError("a pipeline needs at least one step")
        keys = [s.key for s in steps]
        if len(set(keys)) != len(keys):
            raise ValueError(f"step keys must be unique: {keys}")
        with self._lock:
            self._pipelines[slug] = list(steps)

    def create(self, slug: str, request: CreateBuildRequest) -> BuildRecord:
        """A new build of ``slug``: one job per step (NotFound for an unknown pipeline)."""
        with self._lock:
            steps = self._pipelines.get(slug)
            if steps is None:
                raise NotFound("No pipeline found")
            number = 1 + max((n for (p, n) in self._builds if p == slug), default=0)
            record = BuildRecord(
                id=str(uuid.uuid4()),
                pipeline=slug,
                number=number,
                commit=request.commit,
                branch=request.branch,
                message=request.message,
                env=dict(request.env),
                created_at=self._wall(),
                step_keys={},
                step_labels={},
            )
            self._builds[(slug, number)] = record
        for step in steps:
            env = {
                **request.env,
                **step.env,
                "BUILDKITE_PIPELINE_SLUG": slug,
                "BUILDKITE_BUILD_NUMBER": str(number),
                "BUILDKITE_BUILD_ID": record.id,
                "BUILDKITE_BRANCH": request.branch,
                "BUILDKITE_COMMIT": request.commit,
                "BUILDKITE_MESSAGE": request.message,
            }
            key = f"{slug}/{number}/{step.key}"
            self._coord.add_job(
                step.command,
                env=env,
                retry=list(step.retry),
                agent_query_rules=list(step.agent_query_rules),
                key=key,
            )
            record.step_keys[step.key] = key
            record.step_labels[step.key] = step.label or step.command
        return record

    def get(self, slug: str, number: int) -> BuildRecord:
        """The build (NotFound if there is none)."""
        with self._lock:
            if slug not in self._pipelines:
                raise NotFound("No pipeline found")
            record = self._builds.get((slug, number))
        if record is None:
            raise NotFound("No build found")
        return record

    def view(self, record: BuildRecord, base_url: str) -> RestBuild:
        """The build as the REST API shows it (``base_url``: the server's URL)."""
        coord = self._coord
        # Job times are on the coordinator's clock; shown as wall-clock times, as REST does.
        offset = self._wall() - coord.clock()

        def stamp(t: float | None, wall: bool = False) -> str | None:
            if t is None:
                return None
            value = t if wall else t + offset
            return (
                datetime.fromtimestamp(value, UTC)
                .isoformat(timespec="milliseconds")
                .replace("+00:00", "Z")
            )

        steps = [coord.step(key) for key in record.step_keys.values()]
        jobs: list[RestBuildJob] = []
        for step_key, step in zip(record.step_keys, steps, strict=True):
            for attempt in step.attempts:
                agent = None
                if attempt.agent_id is not None:
                    a = coord.agent(attempt.agent_id)
                    agent = RestBuildAgent(
                        id=a.id,
                        name=a.name,
                        connection_state=a.connection_state,
                        meta_data=list(a.meta_data),
                    )
                exit_status = None
                if attempt.exit_status is not None and attempt.state in ("finished", "canceled"):
                    exit_status = int(attempt.exit_status)
                jobs.append(
                    RestBuildJob(
                        id=attempt.id,
                        name=record.step_labels[step_key],
                        step_key=step_key,
                        state=_rest_job_state(attempt),
                        command=attempt.command,
                        agent_query_rules=list(attempt.agent_query_rules) or ["queue=default"],
                        agent=agent,
                        exit_status=exit_status,
                        signal=attempt.signal,
                        signal_reason=attempt.signal_reason,
                        created_at=stamp(attempt.created_at),
                        scheduled_at=stamp(attempt.created_at),
                        started_at=stamp(attempt.started_at),
                        finished_at=stamp(attempt.finished_at),
                        retried=attempt.retried,
                        retried_in_job_id=attempt.retried_by,
                        retries_count=attempt.attempt - 1,
                        retry_type="automatic" if attempt.retry_of else None,
                    )
                )
        state = build_state(steps)
        started = [a.started_at for s in steps for a in s.attempts if a.started_at is not None]
        finished = [a.finished_at for s in steps for a in s.attempts if a.finished_at is not None]
        done = state in ("passed", "failed", "canceled")
        path = f"/v2/organizations/{coord.org}/pipelines/{record.pipeline}/builds/{record.number}"
        return RestBuild(
            id=record.id,
            url=base_url + path,
            web_url=f"{base_url}/{coord.org}/{record.pipeline}/builds/{record.number}",
            number=record.number,
            state=state,
            message=record.message,
            commit=record.commit,
            branch=record.branch,
            env=dict(record.env),
            created_at=stamp(record.created_at, wall=True) or "",
            scheduled_at=stamp(record.created_at, wall=True) or "",
            started_at=stamp(min(started)) if started else None,
            finished_at=stamp(max(finished)) if done and finished else None,
            pipeline={"slug": record.pipeline, "name": record.pipeline},
            jobs=jobs,
        )
