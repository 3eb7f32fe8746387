"""The heartbeat loop: from connect to disconnect, independent of pings, jobs and stops.

This loop is the whole answer to "who stops the heartbeat?": nobody but the worker's
disconnect. Its task is cancelled only after ``disconnect`` returns; a graceful stop, a pause, a
long job or a failing ping never touch it (buildkite-agent 3.116.0 broke exactly this).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from fleetdrain.agent.buildkite.api import AgentApi, ApiError, Unauthorized
from fleetdrain.agent.retry import RetryableError

log = logging.getLogger("fleetdrain.heartbeat")


class AgentLost(Exception):
    """The server no longer accepts our access token: it has marked this agent lost."""


class HeartbeatLoop:
    """Sends a heartbeat every ``interval`` seconds; retries sooner after a failure."""

    def __init__(
        self,
        api: AgentApi,
        interval: float,
        *,
        on_success: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.api = api
        self.interval = max(interval, 0.05)
        self.on_success = on_success
        self.clock = clock
        self.sleep = sleep
        self.sent = 0
        self.failures = 0
        self.last_success: float | None = None

    async def run(self) -> None:
        """Heartbeat until cancelled. Raises :class:`AgentLost` on a 401."""
        while True:
            started = self.clock()
            try:
                # A heartbeat stuck behind a slow server must not delay the next one forever.
                await self.api.heartbeat(timeout=max(self.interval, 5.0))
            except Unauthorized as exc:
                raise AgentLost(str(exc)) from exc
            except (RetryableError, ApiError) as exc:
                self.failures += 1
                log.warning("heartbeat failed: %s", exc)
                # Try again well inside the interval so that one lost heartbeat is not a gap.
                await self.sleep(min(self.interval / 4, 1.0))
                continue
            self.sent += 1
            self.last_success = self.clock()
            # At debug level: when each one went out and how long the server took, so that a
            # gap the server reports can be told apart from a late send.
            log.debug(
                "heartbeat %d sent, answered in %.3fs", self.sent, self.last_success - started
            )
            if self.on_success is not None:
                self.on_success(self.last_success)
            await self.sleep(max(0.0, self.interval - (self.clock() - started)))
