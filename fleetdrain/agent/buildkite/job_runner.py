"""Runs one accepted job: its process group, its log, its state poll, cancelling and finishing.

A job is either finished or reported, never lost: every path out of :meth:`JobRunner.run`
(normal exit, cancel, forced stop, deadline) ends in a ``finish`` call with the job's exit status,
and the job's whole process group is gone before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fleetdrain.agent.buildkite.api import LONG_RETRY, AgentApi, ApiError, Unauthorized, now_rfc3339
from fleetdrain.agent.buildkite.log_streamer import Chunk, LogStreamer, pump
from fleetdrain.agent.buildkite.models import Job, JobFinishRequest
from fleetdrain.agent.buildkite.redact import Redactor
from fleetdrain.agent.reaper import ExitStatus, Reaper, group_alive, signal_group
from fleetdrain.agent.retry import RetryableError, RetryPolicy

log = logging.getLogger("fleetdrain.job")

#: Variables of the agent's own environment that a job must never see.
PRIVATE_ENV = ("BUILDKITE_AGENT_TOKEN",)
#: Variables the agent sets for a job whatever the job's env says (the Go agent's
#: ``protectedEnv`` has them too): values a server sends for them are ignored, with a warning.
AGENT_SET_ENV = ("BUILDKITE_AGENT_ACCESS_TOKEN", "BUILDKITE_AGENT_ENDPOINT")
#: Seconds to wait for the output pipe to drain after the job's process group is gone.
PIPE_DRAIN_SECONDS = 1.0
#: The job's output pipe, widened from Linux's 64 KiB: a job that writes fast wakes the agent
#: once per 256 KiB instead of once per 64 KiB, and blocks less often while the agent gzips.
PIPE_SIZE = 1 << 20
#: Read this much at a time; the StreamReader pauses the pipe at twice this, so the agent holds
#: at most ~512 KiB of output that the log streamer has not taken yet (its own bound is separate).
READ_SIZE = 256 * 1024
#: Seconds kept after the finish call, before the deadline, to disconnect and exit: the PID-1
#: layer's last resort (kill everything and exit 1) comes 0.5 s before the deadline.
EXIT_RESERVE = 1.0
#: Seconds kept after the log upload for the finish call: chunk uploads give up at
#: ``deadline - EXIT_RESERVE - FINISH_RESERVE``, the finish at ``deadline - EXIT_RESERVE``.
FINISH_RESERVE = 1.0
#: Retries once a deadline is known: short back-off, so that a coordinator that comes back
#: seconds before the deadline is noticed within a second.
DRAIN_RETRY = RetryPolicy(max_attempts=None, max_elapsed=None, base=0.25, max_delay=1.0)


@dataclass(frozen=True)
class JobSettings:
    """What the runner needs from the agent's settings."""

    agent_name: str
    build_path: Path
    job_status_interval: float = 5.0
    cancel_signal: signal.Signals = signal.SIGTERM
    signal_grace_period: float = 9.0
    shell: tuple[str, ...] = ()


@dataclass(frozen=True)
class JobResult:
    """What was reported for the job."""

    exit_status: str
    signal: str | None
    signal_reason: str | None
    chunks_failed_count: int
    finished: bool


class JobRunner:
    """One job, from ``start`` to ``finish``."""

    def __init__(
        self,
        api: AgentApi,
        job: Job,
        reaper: Reaper,
        settings: JobSettings,
        *,
        deadline: Callable[[], float | None] = lambda: None,
        stopping: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.api = api
        self.stopping = stopping
        self.job = job
        self.reaper = reaper
        self.settings = settings
        self.deadline = deadline
        self.clock = clock
        self.rng = rng or random.Random()
        self.cancel_reason: str | None = None
        self.pgid: int | None = None
        self._exited: asyncio.Future[ExitStatus] | None = None
        self._streamer: LogStreamer | None = None
        self._cancel_task: asyncio.Task[None] | None = None

    # -- control -----------------------------------------------------------------------------

    def cancel(self, reason: str) -> None:
        """Cancel the job: cancel signal to its group, the signal grace, then SIGKILL.

        Idempotent; the first reason is the one reported.
        """
        if self.cancel_reason is not None:
            return
        if self._exited is not None and self._exited.done():
            # The job has already ended by itself (its log and finish may still be going out):
            # there is nothing to cancel, and its result must not be reported as cancelled,
            # or a retry rule would run a job that passed once more.
            log.info("job %s has already ended: not cancelling it (%s)", self.job.id, reason)
            return
        self.cancel_reason = reason
        log.info("cancelling job %s (%s)", self.job.id, reason)
        self._cancel_task = asyncio.get_running_loop().create_task(self._cancel())

    def kill_now(self) -> None:
        """SIGKILL the job's process group at once (synchronous; the third signal)."""
        if self.pgid is not None:
            signal_group(self.pgid, signal.SIGKILL)

    async def _cancel(self) -> None:
        if self.pgid is None or self._exited is None:
            return
        sig = self.settings.cancel_signal
        # Signal first: a note stuck behind a full log buffer must never delay the cancel.
        signal_group(self.pgid, sig)
        if self._streamer is not None and not self._streamer.closed:
            left = self._time_left()
            note = "" if left is None else f", {left:.0f}s before the deadline"
            self._streamer.write_nowait(
                f"\n[fleetdrain-agent] cancelling job ({self.cancel_reason}{note})\n".encode()
            )
        grace = self._signal_grace()
        try:
            await asyncio.wait_for(asyncio.shield(self._exited), grace)
        except TimeoutError:
            log.warning(
                "job %s still running %.1fs after %s: SIGKILL", self.job.id, grace, sig.name
            )
            signal_group(self.pgid, signal.SIGKILL)

    def _signal_grace(self) -> float:
        """The signal grace period, cut short when the deadline leaves less: the rest of the
        log and the finish must still go out before it (a spot notice, or a stop timeout
        shorter than the cancel grace period, can leave less than the grace)."""
        grace = self.settings.signal_grace_period
        left = self._time_left()
        if left is None:
            return grace
        room = left - (FINISH_RESERVE + EXIT_RESERVE)
        if room < grace:
            log.warning(
                "job %s: %.1fs before the deadline: signal grace cut from %.1fs to %.1fs",
                self.job.id,
                left,
                grace,
                max(room, 0.0),
            )
        return max(0.0, min(grace, room))

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> JobResult:
        """Run the job and report it; returns what was reported."""
        job = self.job
        if job.chunks_max_size_bytes <= 0:
            log.error("job %s has chunks_max_size_bytes=0: refusing it", job.id)
            return await self._finish("-1", None, "agent_refused", 0)
        try:
            await self.api.start(job)
        except Unauthorized:
            log.error("job %s: the server no longer accepts its token; not running it", job.id)
            return JobResult("-1", None, None, 0, finished=False)
        except (ApiError, RetryableError) as exc:
            log.error("job %s could not be started: %s", job.id, exc)
            return await self._finish("-1", None, "process_run_error", 0)

        streamer = LogStreamer(
            self._upload,
            max_chunk_size=job.chunks_max_size_bytes,
            interval=job.chunks_interval_seconds or 1.0,
            # Everything the job can print from its environment: the job's variables and
            # those it inherits from the agent (a task's secrets injected as env vars).
            redactor=Redactor.from_env(self._job_environment()),
        )
        self._streamer = streamer
        await streamer.start()
        try:
            status = await self._run_process(streamer)
        except OSError as exc:
            await streamer.write(f"[fleetdrain-agent] could not run the job: {exc}\n".encode())
            failed = await streamer.close(timeout=self._upload_budget())
            return await self._finish("-1", None, "process_run_error", failed)
        failed = await streamer.close(timeout=self._upload_budget())
        if failed:
            log.warning("job %s: %d log chunk(s) could not be uploaded", job.id, failed)
        return await self._finish(
            str(status.shell_code), status.signal_name, self.cancel_reason, failed
        )

    async def _run_process(self, streamer: LogStreamer) -> ExitStatus:
        loop = asyncio.get_running_loop()
        cwd = self._prepare_checkout()
        proc, exited = self.reaper.spawn(
            [*self._shell(), self.job.command],
            cwd=cwd,
            env=self._environment(cwd),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: cancel signals reach all of it
            close_fds=True,
        )
        self.pgid = proc.pid
        self._exited = exited
        if self.cancel_reason is not None:  # cancelled before the process existed
            self._cancel_task = loop.create_task(self._cancel())
        assert proc.stdout is not None
        _widen_pipe(proc.stdout.fileno())
        reader = asyncio.StreamReader(limit=READ_SIZE)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), proc.stdout
        )
        pumping = loop.create_task(pump(reader, streamer, read_size=READ_SIZE))
        polling = loop.create_task(self._poll_state())
        try:
            status = await asyncio.shield(exited)
        finally:
            polling.cancel()
            # Whatever the job left in its group dies with it: nothing outlives a job.
            signal_group(proc.pid, signal.SIGKILL)
            if not exited.done():
                await asyncio.wait({exited}, timeout=self.settings.signal_grace_period)
            try:
                await asyncio.wait_for(asyncio.shield(pumping), PIPE_DRAIN_SECONDS)
            except TimeoutError:
                # Something outside the group (a daemon that called setsid) holds the pipe.
                log.warning("job %s: output pipe still open after exit; closing it", self.job.id)
                transport.close()
                pumping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await polling
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pumping
            if self._cancel_task is not None:
                self._cancel_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._cancel_task
            transport.close()
        if group_alive(proc.pid):
            log.warning("job %s: process group %d still alive after SIGKILL", self.job.id, proc.pid)
        return status

    async def _poll_state(self) -> None:
        interval = max(self.settings.job_status_interval, 0.05)
        while True:
            await asyncio.sleep(interval + self.rng.uniform(0, interval / 2))
            try:
                state = await self.api.job_state(self.job)
            except Unauthorized:
                log.warning("job %s: token no longer valid; the server gave up on it", self.job.id)
                self.cancel("cancel")
                return
            except (ApiError, RetryableError) as exc:
                log.debug("job %s: state poll failed: %s", self.job.id, exc)
                continue
            if state in ("timing_out", "timed_out"):
                self.cancel("cancel")
                return
            if state in ("canceling", "canceled"):
                # A cancel that reaches an agent which is itself stopping is, in a fleet, the
                # drain controller's forced stop (REST stop with force: the server's only way to
                # reach a busy agent). It is reported agent_stop, as the agent's own deadline
                # cancel would be, so the pipeline's retry rule re-runs the job elsewhere
                # instead of the build ending canceled. The price: a user's cancel that lands
                # during a drain is retried once.
                reason = "agent_stop" if self.stopping() else "cancel"
                if reason == "agent_stop":
                    log.info("job %s: the server cancelled it while this agent stops", self.job.id)
                self.cancel(reason)
                return

    async def _upload(self, chunk: Chunk) -> None:
        await self.api.upload_chunk(
            self.job,
            chunk.sequence,
            chunk.offset,
            chunk.size,
            chunk.data,
            policy=self._policy(),
            done_by=self._done_by(EXIT_RESERVE + FINISH_RESERVE),
        )

    async def _finish(
        self, exit_status: str, sig: str | None, reason: str | None, failed: int
    ) -> JobResult:
        request = JobFinishRequest(
            exit_status=exit_status,
            signal=sig,
            signal_reason=reason,
            finished_at=now_rfc3339(),
            chunks_failed_count=failed,
        )
        try:
            await self.api.finish(
                self.job, request, policy=self._policy(), done_by=self._done_by(EXIT_RESERVE)
            )
        except (ApiError, RetryableError) as exc:
            log.error("job %s: finish could not be reported: %s", self.job.id, exc)
            return JobResult(exit_status, sig, reason, failed, finished=False)
        log.info(
            "job %s finished: exit_status=%s signal=%s signal_reason=%s chunks_failed=%d",
            self.job.id,
            exit_status,
            sig,
            reason,
            failed,
        )
        return JobResult(exit_status, sig, reason, failed, finished=True)

    # -- helpers -----------------------------------------------------------------------------

    def _time_left(self) -> float | None:
        deadline = self.deadline()
        return None if deadline is None else deadline - self.clock()

    def _upload_budget(self) -> float | None:
        left = self._time_left()
        return None if left is None else max(0.1, left - EXIT_RESERVE - FINISH_RESERVE)

    def _done_by(self, reserve: float) -> Callable[[], float | None]:
        """When a call must be over: ``reserve`` before the deadline, asked anew before every
        attempt, since the deadline can appear (SIGTERM, a spot notice) mid-retry."""

        def at() -> float | None:
            deadline = self.deadline()
            return None if deadline is None else deadline - reserve

        return at

    def _policy(self) -> RetryPolicy:
        """Retry for up to an hour, as the Go agent does; with a deadline, with a short
        back-off (the deadline itself ends the retries: see :meth:`_done_by`)."""
        return LONG_RETRY if self.deadline() is None else DRAIN_RETRY

    def _shell(self) -> tuple[str, ...]:
        if self.settings.shell:
            return self.settings.shell
        bash = shutil.which("bash")
        return (bash, "-e", "-c") if bash else ("/bin/sh", "-e", "-c")

    def _prepare_checkout(self) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "-", self.settings.agent_name) or "agent"
        path = self.settings.build_path / safe / self.job.id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _environment(self, cwd: Path) -> dict[str, str]:
        ignored = sorted(k for k in AGENT_SET_ENV if k in self.job.env)
        if ignored:
            # As the Go agent does (its protectedEnv): only the agent sets these.
            log.warning("job %s: ignoring %s from the job's env", self.job.id, ", ".join(ignored))
        env = self._job_environment()
        env["BUILDKITE_BUILD_CHECKOUT_PATH"] = str(cwd)
        return env

    def _job_environment(self) -> dict[str, str]:
        """The job's environment but its checkout path: the agent's own without its private
        variables, the job's on top, and over both what only the agent sets (its name, and the
        API endpoint and token the job's ``buildkite-agent`` calls use)."""
        env = {k: v for k, v in os.environ.items() if k not in PRIVATE_ENV}
        env.update(self.job.env)
        env.setdefault("BUILDKITE_JOB_ID", self.job.id)
        env["BUILDKITE_AGENT_NAME"] = self.settings.agent_name
        # The job's own API credentials (for `buildkite-agent meta-data ...` and the like) come
        # from the agent, not from the server: the job's token, else the agent's access token.
        env["BUILDKITE_AGENT_ENDPOINT"] = self.api.endpoint
        env["BUILDKITE_AGENT_ACCESS_TOKEN"] = self.job.token or self.api.token
        env["BUILDKITE"] = "true"
        env["CI"] = "true"
        return env


def _widen_pipe(fd: int) -> None:
    """Ask for a :data:`PIPE_SIZE` pipe buffer; keep the default where it is refused."""
    # EPERM above /proc/sys/fs/pipe-max-size for an unprivileged user, or when the user's pipe
    # quota is spent: a smaller pipe only costs throughput, never correctness.
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
