"""``fleetdrain-agent start``: the PID-1 layer around the built-in Buildkite worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fleetdrain.agent.buildkite.api import AgentApi, new_http_client
from fleetdrain.agent.buildkite.job_runner import JobSettings
from fleetdrain.agent.buildkite.worker import BuildkiteConfig, BuildkiteWorker
from fleetdrain.agent.ecs import ProtectionKeeper, TaskProtection
from fleetdrain.agent.health import HealthServer, HeartbeatHealth
from fleetdrain.agent.minihttp import HttpClient
from fleetdrain.agent.pid1 import Supervisor, freeze_startup_objects
from fleetdrain.agent.reaper import Reaper, parse_signal
from fleetdrain.agent.settings import StartSettings

log = logging.getLogger("fleetdrain.agent")

T = TypeVar("T")


async def gather_tags(settings: StartSettings, http: HttpClient) -> list[str]:
    """The configured tags plus those from ECS task metadata and EC2 metadata, if asked for.

    Metadata that cannot be read is logged and skipped: an agent without ``ecs:*`` tags can
    still run jobs (the controller then falls back to StopTask for it).
    """
    tags = list(settings.tags)
    if settings.tags_from_ecs_meta_data:
        from fleetdrain.agent.ecs import MetadataError, ecs_task_tags

        uri = os.environ.get("ECS_CONTAINER_METADATA_URI_V4")
        if not uri:
            log.warning("--tags-from-ecs-meta-data: $ECS_CONTAINER_METADATA_URI_V4 is not set")
        else:
            try:
                tags += [f"{k}={v}" for k, v in (await ecs_task_tags(http, uri)).items()]
            except MetadataError as exc:
                log.warning("ECS task metadata: %s", exc)
    if settings.tags_from_ec2_meta_data:
        from fleetdrain.agent.imds import ImdsClient, ImdsError

        try:
            imds = ImdsClient(http, base_url=os.environ.get("FLEETDRAIN_IMDS_ENDPOINT"))
            tags += [f"{k}={v}" for k, v in (await imds.ec2_tags()).items()]
        except ImdsError as exc:
            log.warning("EC2 instance metadata: %s", exc)
    return tags


async def run_start(settings: StartSettings) -> int:
    """Run the agent until it has drained; the process exit status."""
    reaper = Reaper()
    health = HeartbeatHealth()
    # ECS and IMDS are local endpoints: the small client that wrap uses too. httpx is for the
    # agent API (connection pooling, TLS to the internet, proxies).
    local = HttpClient(timeout=10.0)
    async with new_http_client(timeout=30.0, connect=10.0) as http:
        tags = await _unless_stopped_early(gather_tags(settings, local))
        if tags is None:
            log.info("stopped while starting up: exiting")
            return 0
        api = AgentApi(settings.endpoint, http)
        worker: BuildkiteWorker
        keeper = (
            _protection_keeper(local, busy=lambda: worker.busy())
            if settings.task_protection
            else None
        )

        def heartbeat_ok(at: float) -> None:
            if worker.registration is not None:
                health.heartbeat_interval = worker.registration.heartbeat_interval
            health.record_success(at)

        def busy_changed(_busy: bool) -> None:
            # Protection follows the job within milliseconds, not at the next periodic check.
            if keeper is not None:
                keeper.notify()

        worker = BuildkiteWorker(
            BuildkiteConfig(
                registration_token=settings.token.get_secret_value(),
                name=settings.name,
                tags=tags,
                priority=settings.priority,
                job=JobSettings(
                    agent_name=settings.name,
                    build_path=settings.build_path,
                    cancel_signal=parse_signal(settings.cancel_signal),
                    signal_grace_period=settings.effective_signal_grace,
                ),
                disconnect_after_job=settings.disconnect_after_job,
                disconnect_after_idle_timeout=settings.disconnect_after_idle_timeout,
            ),
            api,
            reaper,
            on_heartbeat=heartbeat_ok,
            on_busy_change=busy_changed,
        )
        supervisor = Supervisor(
            worker,
            reaper,
            stop_timeout=settings.stop_timeout,
            cancel_grace_period=settings.cancel_grace_period,
            margin=settings.drain_margin,
        )

        def status() -> dict[str, Any]:
            out: dict[str, Any] = {**worker.status(), **supervisor.status()}
            out["healthy"] = health()
            if keeper is not None:
                out["task_protection"] = {
                    "enabled": keeper.enabled,
                    "expires_at": keeper.expires_at,
                    "error": keeper.last_error,
                }
            return out

        server = None
        if settings.health_check_addr:
            server = HealthServer(settings.health_check_addr, health=health, status=status)
            await server.start()
            log.info("health and status on http://%s", settings.health_check_addr)
        keeping = None
        if keeper is not None:
            keeping = asyncio.get_running_loop().create_task(keeper.run(), name="task-protection")
        started = time.monotonic()
        freeze_startup_objects()
        try:
            code = await supervisor.run()
        finally:
            if keeping is not None and keeper is not None:
                keeping.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeping
                await keeper.release()
            if server is not None:
                await server.close()
        log.info("exiting with status %d after %.1fs", code, time.monotonic() - started)
        return code


async def _unless_stopped_early(setup: Coroutine[Any, Any, T]) -> T | None:
    """Run start-up work that comes before the supervisor (metadata look-ups can take seconds).

    As PID 1 a signal without a handler is dropped, so SIGTERM during start-up would be lost;
    here it ends start-up instead (None): nothing is registered yet, so there is nothing to drain.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    early = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
    for sig in early:
        loop.add_signal_handler(sig, stop.set)
    task = asyncio.ensure_future(setup)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        for sig in early:
            loop.remove_signal_handler(sig)
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def _protection_keeper(http: HttpClient, busy: Callable[[], bool]) -> ProtectionKeeper | None:
    agent_uri = os.environ.get("ECS_AGENT_URI")
    if not agent_uri:
        log.warning("--task-protection: $ECS_AGENT_URI is not set; protection disabled")
        return None
    return ProtectionKeeper(TaskProtection(http, agent_uri), busy=busy, check_interval=30.0)
