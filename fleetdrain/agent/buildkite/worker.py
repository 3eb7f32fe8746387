"""The built-in worker: register, connect, heartbeat, ping, run jobs, disconnect.

Structured concurrency keeps the guarantees visible: the heartbeat task lives in the same task
group as the work loop and is cancelled only after ``disconnect`` returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fleetdrain.agent.buildkite.api import AgentApi, ApiError, Unauthorized, register_request
from fleetdrain.agent.buildkite.heartbeat import AgentLost, HeartbeatLoop
from fleetdrain.agent.buildkite.job_runner import JobResult, JobRunner, JobSettings
from fleetdrain.agent.buildkite.models import Job, PingResponse, RegisterResponse
from fleetdrain.agent.reaper import Reaper
from fleetdrain.agent.retry import RetryableError, RetryPolicy

log = logging.getLogger("fleetdrain.agent")

T = TypeVar("T")

#: A disconnect on the way out gets a few quick tries: the process is about to exit.
DISCONNECT_RETRY = RetryPolicy(max_attempts=4, base=0.1, max_delay=0.5)
#: The disconnect is over this long before a deadline (see :data:`EXIT_RESERVE`).
DISCONNECT_RESERVE = 0.7


@dataclass
class BuildkiteConfig:
    """The worker's settings (built from the CLI's)."""

    registration_token: str
    name: str
    #: How jobs run (where, which cancel signal, its grace): required, no hidden default path.
    job: JobSettings
    tags: list[str] = field(default_factory=list)
    priority: int | None = None
    disconnect_after_job: bool = False
    disconnect_after_idle_timeout: float = 0.0


class _Stopped(Exception):
    """The awaited call was abandoned because a stop was requested."""


class BuildkiteWorker:
    """The Buildkite agent API v3 worker the PID-1 layer drives."""

    def __init__(
        self,
        config: BuildkiteConfig,
        api: AgentApi,
        reaper: Reaper,
        *,
        on_heartbeat: Callable[[float], None] | None = None,
        on_busy_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.api = api
        self.reaper = reaper
        self.on_heartbeat = on_heartbeat
        self.on_busy_change = on_busy_change
        self.clock = clock
        self.rng = rng or random.Random()
        self.state = "starting"
        self.agent_id: str | None = None
        self.registration: RegisterResponse | None = None
        self.heartbeat: HeartbeatLoop | None = None
        self.runner: JobRunner | None = None
        self.last_result: JobResult | None = None
        self.jobs_run = 0
        self.deadline: float | None = None
        self.force_reason: str | None = None
        self._stop = asyncio.Event()
        self._lost = False

    # -- what the PID-1 layer asks -----------------------------------------------------------

    def busy(self) -> bool:
        """A job is running."""
        return self.runner is not None

    def stop_gracefully(self, deadline: float | None) -> None:
        """Take no new job; finish the running one; disconnect; exit."""
        self.deadline = deadline
        # Uploads and a finish already waiting on a slow server must end by it too.
        self.api.deadline_changed()
        if not self._stop.is_set():
            log.info("graceful stop: %s", "draining the running job" if self.busy() else "idle")
        self._stop.set()
        self._set_state("draining" if self.busy() else "stopping")

    def stop_forcefully(self, reason: str) -> None:
        """Cancel the running job (reported with ``reason``), disconnect, exit."""
        self.force_reason = self.force_reason or reason
        self._stop.set()
        if self.runner is not None:
            self.runner.cancel(reason)
        self._set_state("stopping")

    def kill(self) -> None:
        """SIGKILL the running job's process group."""
        if self.runner is not None:
            self.runner.kill_now()

    def status(self) -> dict[str, Any]:
        """The worker's part of /status."""
        runner = self.runner
        return {
            "state": self.state,
            # The Go agent's /status.json field, so `wrap --busy-probe` reads either agent.
            "aggregate_status": "busy" if self.busy() else "idle",
            "agent_id": self.agent_id,
            "name": self.config.name,
            "job": None
            if runner is None
            else {"id": runner.job.id, "cancel": runner.cancel_reason},
            "jobs_run": self.jobs_run,
            "heartbeats": 0 if self.heartbeat is None else self.heartbeat.sent,
        }

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> int:
        """Register, connect, work until stopped or told to disconnect, disconnect."""
        try:
            reg = await self._until_stopped(
                self.api.register(
                    register_request(self.config.name, self.config.tags, self.config.priority),
                    self.config.registration_token,
                )
            )
            self.registration = reg
            self.agent_id = reg.id
            log.info(
                "registered as %s (%s); ping %.3gs, heartbeat %.3gs, job status %.3gs",
                reg.name or self.config.name,
                reg.id,
                reg.ping_interval,
                reg.heartbeat_interval,
                reg.job_status_interval,
            )
            await self._until_stopped(self.api.connect())
        except _Stopped:
            log.info("stopped before connecting")
            self._set_state("stopped")
            return 0
        except (ApiError, RetryableError) as exc:
            log.error("could not register/connect: %s", exc)
            self._set_state("stopped")
            return 1

        self.heartbeat = HeartbeatLoop(
            self.api, reg.heartbeat_interval, on_success=self.on_heartbeat, clock=self.clock
        )
        code = 0
        try:
            async with asyncio.TaskGroup() as group:
                beating = group.create_task(self.heartbeat.run(), name="heartbeat")
                try:
                    code = await self._work(reg)
                finally:
                    await self._disconnect()
                    beating.cancel()
        except* AgentLost as lost:
            self._lost = True
            log.error("the server marked this agent lost (%s): exiting", lost.exceptions[0])
            code = 1
        self._set_state("stopped")
        return code

    async def _work(self, reg: RegisterResponse) -> int:
        self._set_state("idle")
        idle_since = self.clock()
        first = True
        while not self._stop.is_set():
            idle_limit = self.config.disconnect_after_idle_timeout
            if idle_limit > 0 and self.clock() - idle_since >= idle_limit:
                log.info("idle for %.0fs: disconnecting", idle_limit)
                return 0
            if not first:
                try:
                    wait = reg.ping_interval + self.rng.uniform(0, reg.ping_interval)
                    if idle_limit > 0:
                        wait = min(wait, max(0.0, idle_since + idle_limit - self.clock()))
                    # A timeout scope, not wait_for (see ProtectionKeeper.run): this task is
                    # cancelled when the server marks the agent lost, and must then end.
                    async with asyncio.timeout(wait):
                        await self._stop.wait()
                    break
                except TimeoutError:
                    pass
            first = False
            try:
                action, job = await self._until_stopped(self._ping())
            except _Stopped:
                break
            if action == "disconnect":
                log.info("the server asked us to disconnect")
                return 0
            if action == "pause":
                self._set_state("paused")
                continue
            if self.state == "paused":
                self._set_state("idle")
            if job is None:
                continue
            accepted = await self._accept(job)
            if accepted is None:
                continue
            await self._run_job(accepted)
            idle_since = self.clock()
            if self.config.disconnect_after_job:
                log.info("disconnect-after-job: disconnecting")
                return 0
        return 0

    async def _ping(self) -> tuple[str | None, Job | None]:
        try:
            response = await self.api.ping()
        except Unauthorized as exc:
            raise AgentLost(str(exc)) from exc
        except (ApiError, RetryableError) as exc:
            log.warning("ping failed: %s", exc)
            return None, None
        if response.request_headers is not None:
            self.api.request_headers = dict(response.request_headers)
        if response.endpoint and response.endpoint.rstrip("/") != self.api.endpoint:
            switched = await self._switch_endpoint(response.endpoint.rstrip("/"))
            if switched is not None:
                # As the Go agent does: the new endpoint's answer is the one acted on (it may
                # offer a job or ask us to leave); the old one's is stale.
                response = switched
                if response.request_headers is not None:
                    self.api.request_headers = dict(response.request_headers)
        return response.action, response.job

    async def _switch_endpoint(self, endpoint: str) -> PingResponse | None:
        """Switch only after one successful ping against the new endpoint; its response."""
        try:
            response = await self.api.ping(endpoint=endpoint)
        except (ApiError, RetryableError) as exc:
            log.warning("not switching to endpoint %s: %s", endpoint, exc)
            return None
        log.info("switching to endpoint %s", endpoint)
        self.api.endpoint = endpoint
        return response

    async def _accept(self, job: Job) -> Job | None:
        try:
            return await self.api.accept(job.id)
        except Unauthorized as exc:
            raise AgentLost(str(exc)) from exc
        except (ApiError, RetryableError) as exc:
            # Someone else got it, or it went away: back to pinging.
            log.info("job %s not accepted: %s", job.id, exc)
            return None

    async def _run_job(self, job: Job) -> None:
        assert self.registration is not None
        # The server supplies the job status interval at register.
        settings = dataclasses.replace(
            self.config.job, job_status_interval=self.registration.job_status_interval
        )
        runner = JobRunner(
            self.api,
            job,
            self.reaper,
            settings,
            deadline=lambda: self.deadline,
            stopping=self._stop.is_set,
            clock=self.clock,
            rng=self.rng,
        )
        self.runner = runner
        self._set_state("draining" if self._stop.is_set() else "busy")
        self._notify_busy(True)
        if self.force_reason is not None:
            runner.cancel(self.force_reason)
        log.info("running job %s", job.id)
        try:
            self.last_result = await runner.run()
            self.jobs_run += 1
        finally:
            self.runner = None
            self._notify_busy(False)
            self._set_state("stopping" if self._stop.is_set() else "idle")

    async def _disconnect(self) -> None:
        if self._lost:
            return
        try:
            await self.api.disconnect(policy=DISCONNECT_RETRY, done_by=self._disconnect_by)
            log.info("disconnected")
        except (ApiError, RetryableError) as exc:
            log.warning("disconnect failed: %s", exc)

    def _disconnect_by(self) -> float | None:
        # After the finish (EXIT_RESERVE before the deadline), before the PID-1 layer's last
        # resort (0.5 s before it): a coordinator that does not answer must not keep us up.
        return None if self.deadline is None else self.deadline - DISCONNECT_RESERVE

    # -- helpers -----------------------------------------------------------------------------

    async def _until_stopped(self, call: Awaitable[T]) -> T:
        """Await ``call`` unless a stop comes first (then it is cancelled: raise _Stopped)."""
        task = asyncio.ensure_future(call)
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise _Stopped

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.debug("state %s -> %s", self.state, state)
            self.state = state

    def _notify_busy(self, busy: bool) -> None:
        if self.on_busy_change is not None:
            self.on_busy_change(busy)
