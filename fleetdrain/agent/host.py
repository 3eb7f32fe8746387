"""The PID-1 host: everything ``start`` and ``wrap`` put around their worker, built once.

Given a :class:`fleetdrain.agent.worker.Worker` and :class:`HostSettings`, :class:`Host` runs:

- the :class:`fleetdrain.agent.pid1.Supervisor`: signals, the deadline clock, reaping, and the
  hold after a soft drain (up, idle and healthy once the worker is done, until ECS stops the
  task, so that the service places no replacement on an instance that is going away);
- task scale-in protection (:class:`fleetdrain.agent.ecs.ProtectionKeeper`), on exactly while
  the worker is busy, and turned off on the way out;
- the IMDS watch (:class:`fleetdrain.agent.imds.ImdsWatcher`): a spot interruption notice or
  Auto Scaling lifecycle ``Terminated`` starts a *soft* drain, a spot notice with its time as
  the deadline;
- ``/health`` and ``/status`` (:class:`fleetdrain.agent.health.HealthServer`);
- the teardown: protection off, the server closed, the exit logged.

The commands differ only in the worker they pass and in the worker's own view of health (the
host adds "healthy while holding"); ``/status`` is the worker's, the supervisor's and the host's.

Invariants:

- Buildkite-free and small: nothing here, or imported from here, loads httpx, pydantic or
  :mod:`fleetdrain.agent.buildkite` (``wrap``'s memory budget; ``tests/agent/test_wrap_imds.py``
  checks it).
- Start-up order: the health server, then the supervisor (signal handlers, then the worker's
  start), then protection and the IMDS watch. ECS and IMDS support is imported only then, and
  only if asked for, so that a wrapped worker does not wait for our HTTP client to load.
- One warning when protection is asked for without ``$ECS_AGENT_URI``; protection is then off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from fleetdrain.agent.health import HealthServer
from fleetdrain.agent.pid1 import Supervisor, freeze_startup_objects
from fleetdrain.agent.reaper import Reaper
from fleetdrain.agent.worker import Worker

if TYPE_CHECKING:
    from fleetdrain.agent.ecs import ProtectionKeeper
    from fleetdrain.agent.imds import ImdsWatcher, Notice
    from fleetdrain.agent.minihttp import HttpClient

log = logging.getLogger("fleetdrain.host")

#: Seconds between protection checks when nothing changed (a busy change checks at once).
PROTECTION_CHECK_INTERVAL = 30.0
#: Timeout of each call to the ECS agent and IMDS (both local endpoints).
LOCAL_HTTP_TIMEOUT = 10.0


@dataclass(frozen=True)
class HostSettings:
    """What the PID-1 host needs, whichever command runs it."""

    #: Seconds ECS allows between SIGTERM and SIGKILL: the task definition's stopTimeout.
    stop_timeout: float = 120.0
    #: Seconds the worker needs after the forced stop to cancel and report its work.
    cancel_grace_period: float = 10.0
    #: Seconds kept spare: the forced stop comes at deadline - cancel grace - margin.
    drain_margin: float = 5.0
    #: ``host:port`` for /health and /status, or None for no server.
    health_check_addr: str | None = None
    task_protection: bool = False
    watch_imds: bool = False
    imds_poll_interval: float = 5.0
    #: What the worker leaves running gets this long after SIGTERM before SIGKILL.
    exit_grace: float = 2.0
    #: Seconds turning protection off may take on the way out; None: as long as the call takes.
    release_budget: float | None = None

    @classmethod
    def of(
        cls,
        settings: CommandSettings,
        *,
        exit_grace: float = 2.0,
        release_budget: float | None = None,
    ) -> HostSettings:
        """The host's part of a command's settings (``start``'s or ``wrap``'s: same names)."""
        return cls(
            stop_timeout=settings.stop_timeout,
            cancel_grace_period=settings.cancel_grace_period,
            drain_margin=settings.drain_margin,
            health_check_addr=settings.health_check_addr,
            task_protection=settings.task_protection,
            watch_imds=settings.watch_imds,
            imds_poll_interval=settings.imds_poll_interval,
            exit_grace=exit_grace,
            release_budget=release_budget,
        )


class CommandSettings(Protocol):
    """What :meth:`HostSettings.of` reads of a command's settings."""

    # Read-only (properties), so that frozen dataclasses satisfy it.
    @property
    def stop_timeout(self) -> float: ...
    @property
    def cancel_grace_period(self) -> float: ...
    @property
    def drain_margin(self) -> float: ...
    @property
    def health_check_addr(self) -> str | None: ...
    @property
    def task_protection(self) -> bool: ...
    @property
    def watch_imds(self) -> bool: ...
    @property
    def imds_poll_interval(self) -> float: ...


class HostError(Exception):
    """The host could not start (its health address cannot be bound): one line for stderr."""


class Host:
    """The PID-1 layer assembled around one worker: see the module docstring."""

    def __init__(
        self,
        worker: Worker,
        reaper: Reaper,
        settings: HostSettings,
        *,
        health: Callable[[], bool],
        forwarded: Iterable[int] = (),
        forward: Callable[[int], None] | None = None,
        force_if: Callable[[], bool] | None = None,
    ) -> None:
        """``health`` is the worker's view (heartbeats, a running command); ``forwarded``,
        ``forward`` and ``force_if`` go to the :class:`fleetdrain.agent.pid1.Supervisor`.

        The worker should call :meth:`busy_changed` whenever it becomes busy or idle."""
        self.worker = worker
        self.settings = settings
        self.supervisor = Supervisor(
            worker,
            reaper,
            stop_timeout=settings.stop_timeout,
            cancel_grace_period=settings.cancel_grace_period,
            margin=settings.drain_margin,
            exit_grace=settings.exit_grace,
            forwarded=forwarded,
            forward=forward,
            hold_after_soft_drain=True,
            force_if=force_if,
        )
        self.keeper: ProtectionKeeper | None = None
        self.watcher: ImdsWatcher | None = None
        self._worker_health = health
        self._http: HttpClient | None = None

    # -- what the worker and the server call --------------------------------------------------

    def busy_changed(self, _busy: bool) -> None:
        """Protection follows the worker within milliseconds, not at the keeper's next check."""
        if self.keeper is not None:
            self.keeper.notify()

    def healthy(self) -> bool:
        """The worker's health, or holding after a soft drain (the worker is gone on purpose)."""
        return self.supervisor.holding or self._worker_health()

    def status(self) -> dict[str, Any]:
        """/status: the worker's, the supervisor's, protection and IMDS, the hold."""
        supervisor = self.supervisor
        out: dict[str, Any] = {**self.worker.status(), **supervisor.status()}
        if self.keeper is not None:
            out["task_protection"] = {
                "enabled": self.keeper.enabled,
                "expires_at": self.keeper.expires_at,
                "error": self.keeper.last_error,
            }
        if self.watcher is not None:
            out["imds_notices"] = sorted(f"{n.kind}:{n.detail}" for n in self.watcher.notices)
        if supervisor.holding:
            out["state"] = "idle"
        out["holding"] = supervisor.holding
        out["soft_drain"] = supervisor.soft_drain
        out["healthy"] = self.healthy()
        return out

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

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> int:
        """Serve health, run the worker under the supervisor, tear down; the exit status.

        Raises :class:`HostError` if the health address cannot be bound (nothing has started
        then)."""
        server = await self._serve_health()
        # Runs once the supervisor has installed its handlers and started the worker.
        side = asyncio.get_running_loop().create_task(
            self._protect_and_watch(), name="protection-and-imds"
        )
        started = time.monotonic()
        try:
            code = await self.supervisor.run()
        finally:
            side.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await side
            if not side.cancelled() and side.exception() is not None:
                log.error("task protection / IMDS failed: %s", side.exception())
            await self._release_protection()
            if server is not None:
                await server.close()
        log.info("exiting with status %d after %.1fs", code, time.monotonic() - started)
        return code

    async def _serve_health(self) -> HealthServer | None:
        addr = self.settings.health_check_addr
        if not addr:
            return None
        server = HealthServer(addr, health=self.healthy, status=self.status)
        try:
            await server.start()
        except OSError as exc:
            raise HostError(f"--health-check-addr {addr}: {exc.strerror or exc}") from None
        return server

    async def _protect_and_watch(self) -> None:
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

        self._http = HttpClient(timeout=LOCAL_HTTP_TIMEOUT)
        jobs = []
        if protect and agent_uri:
            from fleetdrain.agent.ecs import ProtectionKeeper, TaskProtection

            self.keeper = ProtectionKeeper(
                TaskProtection(self._http, agent_uri),
                busy=self.worker.busy,
                check_interval=PROTECTION_CHECK_INTERVAL,
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

    async def _release_protection(self) -> None:
        """Turn protection off: a courtesy (a stopping task loses it anyway), within the budget."""
        if self.keeper is None:
            return
        budget = self.settings.release_budget
        if budget is None:
            await self.keeper.release()
            return
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(self.keeper.release(), budget)


def _environ(name: str) -> str | None:
    return os.environ.get(name) or None
