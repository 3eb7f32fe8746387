"""``fleetdrain-agent wrap -- CMD...``: the PID-1 layer in front of any worker.

Assembled the way ``start`` is, with :class:`fleetdrain.agent.external.ExternalWorker` in place of
the built-in Buildkite worker: the same :class:`fleetdrain.agent.pid1.Supervisor` (signals,
deadline, reaping), task protection, health server and IMDS watch. What differs:

- SIGHUP, SIGUSR1, SIGUSR2 and SIGWINCH are forwarded to the worker unchanged;
- the exit status is the worker's own (128 + n when signal n ended it), within half a second
  of its exit: what the worker leaves behind gets :data:`EXIT_GRACE` after a SIGTERM;
- after a *soft* drain (an IMDS notice: spot, or lifecycle ``Terminated``) the wrapper stays
  up, idle and healthy, once the worker has exited, until ECS stops the task.

Order matters at start-up: signal handlers, then the worker's exec, then everything else. As
PID 1 a signal without a handler is dropped, and the worker should not wait for our HTTP
client to load: ECS and IMDS support is imported only once the worker runs, and only if asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

from fleetdrain.agent.busy import ProbeBusy
from fleetdrain.agent.external import ExternalWorker
from fleetdrain.agent.health import HealthServer
from fleetdrain.agent.pid1 import Supervisor, freeze_startup_objects
from fleetdrain.agent.reaper import Reaper
from fleetdrain.agent.wrap_settings import (
    OneLineParser,
    WrapSettings,
    WrapUsageError,
    add_wrap_arguments,
    settings_from_args,
)

if TYPE_CHECKING:
    import argparse

    from fleetdrain.agent.ecs import ProtectionKeeper
    from fleetdrain.agent.imds import ImdsWatcher, Notice
    from fleetdrain.agent.minihttp import HttpClient

log = logging.getLogger("fleetdrain.wrap")

#: Forwarded to the worker unchanged (DESIGN, "Signals"; issue 6).
FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
#: What the worker leaves running gets this long after SIGTERM before SIGKILL, so that we exit
#: within half a second of the worker's own exit.
EXIT_GRACE = 0.3
#: Turning protection off on the way out is a courtesy (the task is stopping, which ends it):
#: it must not hold up the exit.
RELEASE_BUDGET = 0.15

USAGE = "%(prog)s [options] -- CMD [ARGS...]"
DESCRIPTION = (
    "Run CMD as a child with every drain guarantee that needs no protocol: signals forwarded, "
    "orphans reaped, the exit status passed through, the force signal (the Go agent then "
    "cancels and reports its job as agent_stop) before the --stop-timeout deadline, ECS task "
    "scale-in protection while busy, /health and /status, and IMDS notices."
)


class _Aws:
    """Task protection and the IMDS watch: loaded after the worker has started, if asked for."""

    def __init__(self, settings: WrapSettings, worker: ExternalWorker, supervisor: Supervisor):
        self.settings = settings
        self.worker = worker
        self.supervisor = supervisor
        self.keeper: ProtectionKeeper | None = None
        self.watcher: ImdsWatcher | None = None
        self._http: HttpClient | None = None

    def busy_changed(self, _busy: bool) -> None:
        """Protection follows the worker at once, not at the keeper's next check."""
        if self.keeper is not None:
            self.keeper.notify()

    async def run(self) -> None:
        """Keep protection in line with busy and watch IMDS, until cancelled."""
        # The worker has been started by now: the collection this does no longer delays it.
        freeze_startup_objects()
        settings = self.settings
        agent_uri = _environ("ECS_AGENT_URI")
        if settings.task_protection and not agent_uri:
            log.warning("--task-protection: $ECS_AGENT_URI is not set; protection disabled")
        protect = settings.task_protection and bool(agent_uri)
        if not (protect or settings.watch_imds):
            return
        from fleetdrain.agent.minihttp import HttpClient

        self._http = HttpClient(timeout=10.0)
        jobs = []
        if protect and agent_uri:
            from fleetdrain.agent.ecs import ProtectionKeeper, TaskProtection

            self.keeper = ProtectionKeeper(
                TaskProtection(self._http, agent_uri), busy=self.worker.busy, check_interval=30.0
            )
            jobs.append(self.keeper.run())
        if settings.watch_imds:
            from fleetdrain.agent.imds import ImdsClient, ImdsWatcher

            client = ImdsClient(self._http, base_url=_environ("FLEETDRAIN_IMDS_ENDPOINT"))
            self.watcher = ImdsWatcher(client, interval=settings.imds_poll_interval)
            jobs.append(self.watcher.run(self.on_notice))
            log.info("watching IMDS every %gs", settings.imds_poll_interval)
        freeze_startup_objects()  # what the ECS and IMDS imports just added
        await asyncio.gather(*jobs)

    def on_notice(self, notice: Notice) -> None:
        """Start a soft drain: a spot notice brings its deadline, lifecycle none."""
        if notice.kind == "spot" and notice.deadline is not None:
            left = (notice.deadline - datetime.now(UTC)).total_seconds()
            log.warning(
                "spot interruption (%s at %s): draining, %.1fs left",
                notice.detail,
                notice.deadline.isoformat(),
                left,
            )
            self.supervisor.begin_drain(time.monotonic() + left, reason="spot", soft=True)
        else:
            log.warning(
                "Auto Scaling lifecycle state %s: draining softly (no deadline); staying up "
                "after the worker exits",
                notice.detail,
            )
            self.supervisor.begin_drain(None, reason=notice.kind, soft=True)

    async def close(self) -> None:
        """Turn protection off (briefly: we are exiting)."""
        if self.keeper is not None:
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self.keeper.release(), RELEASE_BUDGET)

    def status(self) -> dict[str, Any]:
        """Protection and IMDS, for /status."""
        out: dict[str, Any] = {}
        if self.keeper is not None:
            out["task_protection"] = {
                "enabled": self.keeper.enabled,
                "expires_at": self.keeper.expires_at,
                "error": self.keeper.last_error,
            }
        if self.watcher is not None:
            out["imds_notices"] = sorted(f"{n.kind}:{n.detail}" for n in self.watcher.notices)
        return out


async def run_wrap(settings: WrapSettings) -> int:
    """Run the worker under the PID-1 layer; the exit status for this process."""
    reaper = Reaper()
    aws: _Aws
    worker = ExternalWorker(
        settings.command,
        reaper,
        graceful_signal=settings.graceful_signal,
        force_signal=settings.force_signal,
        busy_source=ProbeBusy(settings.busy_probe) if settings.busy_probe else None,
        busy_interval=settings.busy_interval,
        on_busy_change=lambda busy: aws.busy_changed(busy),
    )
    supervisor = Supervisor(
        worker,
        reaper,
        stop_timeout=settings.stop_timeout,
        cancel_grace_period=settings.cancel_grace_period,
        margin=settings.drain_margin,
        exit_grace=EXIT_GRACE,
        forwarded=FORWARDED,
        forward=worker.forward,
        hold_after_soft_drain=True,
        # At the deadline a worker that still runs gets the force signal, busy or not: the
        # busy source may be down, and an idle worker loses nothing by it.
        force_if=worker.running,
    )
    aws = _Aws(settings, worker, supervisor)

    def healthy() -> bool:
        return worker.state == "starting" or worker.running() or supervisor.holding

    def status() -> dict[str, Any]:
        out: dict[str, Any] = {**worker.status(), **supervisor.status(), **aws.status()}
        if supervisor.holding:
            out["state"] = "idle"
        out["holding"] = supervisor.holding
        out["soft_drain"] = supervisor.soft_drain
        out["healthy"] = healthy()
        return out

    server = None
    if settings.health_check_addr:
        server = HealthServer(settings.health_check_addr, health=healthy, status=status)
        try:
            await server.start()
        except OSError as exc:
            raise WrapUsageError(
                f"--health-check-addr {settings.health_check_addr}: {exc.strerror or exc}"
            ) from None
    # Runs once the supervisor has installed its handlers and started the worker.
    side = asyncio.get_running_loop().create_task(aws.run(), name="protection-and-imds")
    started = time.monotonic()
    try:
        code = await supervisor.run()
    finally:
        side.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await side
        if not side.cancelled() and side.exception() is not None:
            log.error("task protection / IMDS failed: %s", side.exception())
        await aws.close()
        if server is not None:
            await server.close()
    log.info("exiting with status %d after %.1fs", code, time.monotonic() - started)
    return code


def _environ(name: str) -> str | None:
    return os.environ.get(name) or None


def build_parser(prog: str = "fleetdrain-agent wrap") -> argparse.ArgumentParser:
    """The ``wrap`` parser on its own (the CLI's fast path uses it)."""
    parser = OneLineParser(prog=prog, usage=USAGE, description=DESCRIPTION)
    add_wrap_arguments(parser)
    return parser


def main_from_namespace(ns: argparse.Namespace) -> int:
    """Validate, configure logging and run; bad input is one line on stderr and exit 2/127."""
    try:
        settings = settings_from_args(ns)
    except WrapUsageError as exc:
        print(f"fleetdrain-agent wrap: {exc}", file=sys.stderr)
        return exc.status
    from fleetdrain.agent.cli import configure_logging

    configure_logging(settings.log_level)
    try:
        code = asyncio.run(run_wrap(settings))
    except WrapUsageError as exc:
        print(f"fleetdrain-agent wrap: {exc}", file=sys.stderr)
        return exc.status
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown: everything is closed and reaped by now, and
    tearing down the modules would add ~40 ms between the worker's exit and ours."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str]) -> int:
    """``fleetdrain-agent wrap ARGV...``."""
    return main_from_namespace(build_parser().parse_args(argv))
