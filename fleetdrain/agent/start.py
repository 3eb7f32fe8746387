"""``fleetdrain-agent start``: the built-in Buildkite worker in the PID-1 host.

The :class:`fleetdrain.agent.host.Host` that ``wrap`` uses too (supervisor, task protection,
health server, IMDS watch with ``--watch-imds``, teardown), around
:class:`fleetdrain.agent.buildkite.worker.BuildkiteWorker`. What is ``start``'s own:

- start-up: tags from ECS task metadata and EC2 metadata, with SIGTERM heard while they are
  looked up (as PID 1 a signal without a handler is dropped);
- health is the heartbeat's (:class:`fleetdrain.agent.health.HeartbeatHealth`), or the host's
  hold after a soft drain, when no heartbeats are sent any more;
- the agent API goes through httpx (pooling, TLS to the internet, proxies); the local ECS and
  IMDS endpoints through the small client ``wrap`` uses.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import random
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fleetdrain.agent.buildkite.api import AgentApi, new_http_client
from fleetdrain.agent.buildkite.job_runner import JobSettings
from fleetdrain.agent.buildkite.worker import BuildkiteConfig, BuildkiteWorker
from fleetdrain.agent.health import HeartbeatHealth
from fleetdrain.agent.host import Host, HostError, HostSettings
from fleetdrain.agent.logs import configure_logging
from fleetdrain.agent.minihttp import HttpClient
from fleetdrain.agent.reaper import Reaper, parse_signal
from fleetdrain.agent.settings import StartSettings, settings_from_args

log = logging.getLogger("fleetdrain.agent")

T = TypeVar("T")


#: Tries per metadata source, as the Go agent (agent/tags.go): 5, a constant wait of
#: ``--wait-for-*-meta-data-timeout`` / 5 between them.
METADATA_ATTEMPTS = 5
#: What one attempt may take (the single look-up's old timeout). Bounded by what is left of the
#: wait, but never below :data:`METADATA_MIN_ATTEMPT`, so that every attempt is a real one.
METADATA_ATTEMPT_TIMEOUT = 2.0
METADATA_MIN_ATTEMPT = 0.5
#: Up to this fraction of the wait is added at random, so that a fleet started together does
#: not retry in lock-step.
METADATA_JITTER = 0.1


async def _metadata_with_retries(
    what: str,
    fetch: Callable[[float], Awaitable[dict[str, str]]],
    errors: tuple[type[Exception], ...],
    wait_timeout: float,
    without: str,
) -> list[str]:
    """Up to :data:`METADATA_ATTEMPTS` calls of ``fetch(attempt_timeout)``, ``wait_timeout`` /
    attempts apart (plus jitter); the tags as ``key=value``, or none.

    Each failed attempt is a warning that counts it; a success after retries is logged once;
    giving up is an error that ends with ``without`` (what registering without them means).
    The waits are ``asyncio.sleep``: cancelling (SIGTERM during start-up) ends this at once.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_timeout
    interval = wait_timeout / METADATA_ATTEMPTS
    error = ""
    for attempt in range(1, METADATA_ATTEMPTS + 1):
        limit = min(METADATA_ATTEMPT_TIMEOUT, max(deadline - loop.time(), METADATA_MIN_ATTEMPT))
        try:
            # The fetch bounds its own requests by ``limit``; this bounds the whole attempt
            # (IMDS is several requests), a little later so the request's own error wins.
            async with asyncio.timeout(limit + 0.25):
                tags = await fetch(limit)
        except TimeoutError:
            error = f"{what}: no answer within {limit:.2f}s"
        except errors as exc:
            error = str(exc) if str(exc).startswith(what) else f"{what}: {exc}"
        else:
            if attempt > 1:
                log.info("%s: read at attempt %d/%d", what, attempt, METADATA_ATTEMPTS)
            return [f"{k}={v}" for k, v in tags.items()]
        if attempt == METADATA_ATTEMPTS:
            break
        pause = interval + random.uniform(0, interval * METADATA_JITTER)
        log.warning(
            "%s (attempt %d/%d; retrying in %.2fs)", error, attempt, METADATA_ATTEMPTS, pause
        )
        await asyncio.sleep(pause)
    log.error("%s (attempt %d/%d): %s", error, METADATA_ATTEMPTS, METADATA_ATTEMPTS, without)
    return []


async def gather_tags(settings: StartSettings, http: HttpClient) -> list[str]:
    """The configured tags plus those from ECS task metadata and EC2 metadata, if asked for.

    Each source is tried as the Go agent does (:func:`_metadata_with_retries`, for
    ``--wait-for-ecs-meta-data-timeout`` / ``--wait-for-ec2-meta-data-timeout``). A source that
    still cannot be read is logged as an error and skipped: an agent without ``ecs:*`` tags can
    still run jobs (the controller then falls back to StopTask for it). There is no
    ``--fail-on-missing-tags``.
    """
    tags = list(settings.tags)
    if settings.tags_from_ecs_meta_data:
        from fleetdrain.agent.ecs import MetadataError, ecs_task_tags

        uri = os.environ.get("ECS_CONTAINER_METADATA_URI_V4")
        if not uri:
            log.warning("--tags-from-ecs-meta-data: $ECS_CONTAINER_METADATA_URI_V4 is not set")
        else:
            ecs_uri = uri

            async def ecs_fetch(timeout: float) -> dict[str, str]:
                return await ecs_task_tags(http, ecs_uri, http_timeout=timeout)

            tags += await _metadata_with_retries(
                "ECS task metadata",
                ecs_fetch,
                (MetadataError,),
                settings.wait_for_ecs_meta_data_timeout,
                "registering without ecs:* tags: the drain controller cannot find this "
                "agent's task",
            )
    if settings.tags_from_ec2_meta_data:
        from fleetdrain.agent.imds import ImdsClient, ImdsError

        base_url = os.environ.get("FLEETDRAIN_IMDS_ENDPOINT")

        async def ec2_fetch(timeout: float) -> dict[str, str]:
            # A fresh client per attempt: its timeout is this attempt's (halved: a token, then
            # the reads), and a token that a failed attempt got may be what went wrong.
            imds = ImdsClient(http, base_url=base_url, timeout=timeout / 2)
            return await imds.ec2_tags()

        tags += await _metadata_with_retries(
            "EC2 instance metadata",
            ec2_fetch,
            (ImdsError,),
            settings.wait_for_ec2_meta_data_timeout,
            "registering without aws:* tags",
        )
    return tags


async def run_start(settings: StartSettings) -> int:
    """Run the agent until it has drained (and, after a soft drain, been stopped); the exit
    status. Raises :class:`fleetdrain.agent.host.HostError` if the health address is taken."""
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
        host: Host

        def heartbeat_ok(at: float) -> None:
            if worker.registration is not None:
                health.heartbeat_interval = worker.registration.heartbeat_interval
            health.record_success(at)

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
            on_busy_change=lambda busy: host.busy_changed(busy),
        )
        host = Host(worker, reaper, HostSettings.of(settings), health=health)
        return await host.run()


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


def main_from_namespace(ns: argparse.Namespace) -> int:
    """Validate, configure logging and run; bad input is one line on stderr and exit 2."""
    from pydantic import ValidationError

    try:
        settings = settings_from_args(ns)
    except (ValueError, ValidationError) as exc:
        print(f"fleetdrain-agent start: {_one_line(exc)}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        return asyncio.run(run_start(settings))
    except HostError as exc:
        print(f"fleetdrain-agent start: {exc}", file=sys.stderr)
        return 2


def _one_line(exc: Exception) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        return f"{where}: {err['msg']}" if where else str(err["msg"])
    return str(exc)
