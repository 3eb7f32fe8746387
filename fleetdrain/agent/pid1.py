"""The PID-1 layer: signal policy, deadline clock and reaping. It knows nothing of Buildkite.

Signals (docs/design.md, "Signals"):

=====================================  ==================================================
1st SIGTERM / SIGINT                    graceful stop; the ``stop-timeout`` clock starts
2nd SIGTERM / SIGINT, or SIGQUIT        forced stop: the worker cancels and reports its work
3rd                                     SIGKILL the worker's processes and exit at once
SIGHUP                                  ignored (logged), unless forwarded
forwarded signals (``wrap``)            passed to the worker unchanged
=====================================  ==================================================

The deadline clock: once a deadline is known (SIGTERM + stop-timeout, or a spot notice), a
worker that is still busy at ``deadline - cancel_grace_period - margin`` is stopped by force so
that its job is cancelled *and reported* before SIGKILL can come.

A *soft* drain (:meth:`Supervisor.begin_drain` with ``soft=True``: an IMDS notice, not a signal
from ECS) may come with no deadline at all. With ``hold_after_soft_drain``, once the worker has
exited after a soft drain the supervisor stays up, idle, until a stop signal arrives, so that
the service does not place a replacement task on an instance that is going away.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from fleetdrain.agent.reaper import Reaper
from fleetdrain.agent.worker import Worker

log = logging.getLogger("fleetdrain.pid1")

#: What we do at the very end of the deadline: this close to SIGKILL, exit on our own terms.
FINAL_MARGIN = 0.5


class Supervisor:
    """Runs a worker under the signal policy and the deadline clock, reaping as it goes."""

    def __init__(
        self,
        worker: Worker,
        reaper: Reaper,
        *,
        stop_timeout: float = 120.0,
        cancel_grace_period: float = 10.0,
        margin: float = 5.0,
        exit_grace: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        is_pid1: bool | None = None,
        exit_now: Callable[[int], None] | None = None,
        forwarded: Iterable[int] = (),
        forward: Callable[[int], None] | None = None,
        hold_after_soft_drain: bool = False,
        force_if: Callable[[], bool] | None = None,
    ) -> None:
        """``forwarded`` signals are handed to ``forward`` unchanged (SIGHUP among them is then
        forwarded, not ignored). ``force_if`` says whether the worker still needs the forced
        stop at ``deadline - cancel_grace_period - margin`` (default: ``worker.busy``).
        ``hold_after_soft_drain``: see the module docstring."""
        self.worker = worker
        self.reaper = reaper
        self.stop_timeout = stop_timeout
        self.cancel_grace_period = cancel_grace_period
        self.margin = margin
        self.exit_grace = exit_grace
        self.clock = clock
        self.is_pid1 = os.getpid() == 1 if is_pid1 is None else is_pid1
        self._exit_now = exit_now or _hard_exit
        self.level = 0
        self.deadline: float | None = None
        self.drain_reason: str | None = None
        self.signals: list[str] = []
        self._deadline_task: asyncio.Task[None] | None = None
        self._forwarded = frozenset(int(sig) for sig in forwarded)
        if self._forwarded and forward is None:
            raise ValueError("forwarded signals need a forward callback")
        self._forward = forward
        self._force_if = force_if
        self.hold_after_soft_drain = hold_after_soft_drain
        #: A drain began that did not come from a stop signal (IMDS, a controller).
        self.soft_drain = False
        #: A stop signal (TERM, INT, QUIT) arrived: nothing holds the process up any more.
        self.stop_signalled = False
        #: Up and idle after the worker exited from a soft drain (see the module docstring).
        self.holding = False
        self._release = asyncio.Event()
        stops = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
        self._handled = tuple(dict.fromkeys([*stops, *sorted(self._forwarded)]))

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> int:
        """Run the worker to completion; the exit status for this process."""
        loop = asyncio.get_running_loop()
        self.reaper.install(loop)
        for sig in self._handled:
            loop.add_signal_handler(sig, self.on_signal, sig)
        try:
            code = await self.worker.run()
            await self._stop_deadline_clock()
            if self.hold_after_soft_drain and self.soft_drain and not self.stop_signalled:
                await self._reap_everything()
                await self._hold(code)
        finally:
            for sig in self._handled:
                loop.remove_signal_handler(sig)
            await self._stop_deadline_clock()
        await self._reap_everything()
        self.reaper.uninstall()
        return code

    async def _stop_deadline_clock(self) -> None:
        if self._deadline_task is not None:
            self._deadline_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._deadline_task

    async def _hold(self, code: int) -> None:
        """Stay up, idle, until a stop signal: the worker is done but the task must not go."""
        if self.stop_signalled:  # it came while we were reaping what the worker left
            return
        await self._stop_deadline_clock()  # a notice may have started one while we reaped
        log.info(
            "the worker exited (status %d) after a soft drain (%s): staying up, idle, "
            "until the task is stopped",
            code,
            self.drain_reason,
        )
        self.holding = True
        try:
            await self._release.wait()
        finally:
            self.holding = False

    async def _reap_everything(self) -> None:
        """As PID 1, leave nothing behind: the kernel would SIGKILL it when we exit anyway,
        but a TERM first lets it shut down cleanly."""
        if not self.is_pid1:
            return
        self.reaper.reap()
        if not self.reaper.has_children():
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(-1, signal.SIGTERM)
        until = self.clock() + self.exit_grace
        while self.clock() < until and self.reaper.has_children():
            await asyncio.sleep(0.02)
            self.reaper.reap()
        if self.reaper.has_children():
            log.warning("processes still running %.1fs after SIGTERM: SIGKILL", self.exit_grace)
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
            while self.reaper.has_children():
                await asyncio.sleep(0.01)
                self.reaper.reap()

    # -- signals -----------------------------------------------------------------------------

    def on_signal(self, sig: int) -> None:
        """Apply the signal policy to one delivered signal."""
        name = signal.Signals(sig).name
        self.signals.append(name)
        if sig in self._forwarded:
            if self.holding:
                log.info("received %s: the worker has exited, nothing to forward it to", name)
            else:
                assert self._forward is not None
                log.info("received %s: forwarded to the worker", name)
                self._forward(sig)
            return
        if sig == signal.SIGHUP:
            log.info("received SIGHUP: ignored")
            return
        self.stop_signalled = True
        if self.holding:
            log.info("received %s while holding after a soft drain: exiting", name)
            self._release.set()
            return
        if sig == signal.SIGQUIT:
            self.level = max(self.level + 1, 2)
        else:
            self.level += 1
        if self.level == 1:
            log.info("received %s: graceful stop, %.0fs until SIGKILL", name, self.stop_timeout)
            self.begin_drain(self.clock() + self.stop_timeout, reason=name)
        elif self.level == 2:
            log.info("received %s: forced stop, cancelling running work", name)
            self.force("agent_stop")
        else:
            log.warning("received %s again: exiting now", name)
            self.worker.kill()
            self._exit_now(1)

    # -- draining ----------------------------------------------------------------------------

    def begin_drain(self, deadline: float | None, reason: str, *, soft: bool = False) -> None:
        """Stop gracefully; with a deadline, start (or move earlier) the deadline clock.

        ``soft``: the drain did not come from a stop signal (see the module docstring)."""
        if self.holding:
            # The worker is gone; a deadline now would only end the hold with a kill.
            log.info("%s: the worker has already exited, nothing to drain", reason)
            return
        self.drain_reason = self.drain_reason or reason
        self.soft_drain = self.soft_drain or soft
        if deadline is not None and (self.deadline is None or deadline < self.deadline):
            self.deadline = deadline
            if self._deadline_task is not None:
                self._deadline_task.cancel()
            self._deadline_task = asyncio.get_running_loop().create_task(self._watch_deadline())
        self.worker.stop_gracefully(self.deadline)

    def force(self, reason: str) -> None:
        """Forced stop: the worker cancels its work and reports it with ``reason``."""
        self.level = max(self.level, 2)
        self.worker.stop_forcefully(reason)

    def time_left(self) -> float | None:
        """Seconds until the deadline, or None without one."""
        return None if self.deadline is None else self.deadline - self.clock()

    async def _watch_deadline(self) -> None:
        assert self.deadline is not None
        force_at = self.deadline - self.cancel_grace_period - self.margin
        await asyncio.sleep(max(0.0, force_at - self.clock()))
        still_working = self._force_if or self.worker.busy
        if still_working() and self.level < 2:
            log.warning(
                "work still running with %.1fs left before SIGKILL: cancelling it (agent_stop)",
                self.deadline - self.clock(),
            )
            self.force("agent_stop")
        await asyncio.sleep(max(0.0, self._kill_at(self.clock()) - self.clock()))
        log.error(
            "worker still running %.1fs before SIGKILL: killing it and exiting",
            max(0.0, self.deadline - self.clock()),
        )
        self.worker.kill()
        self._exit_now(1)

    def _kill_at(self, forced_at: float) -> float:
        """When the last resort comes: :data:`FINAL_MARGIN` before the deadline, but never
        less than that after the forced stop. A starved process's timer can fire the force
        late; the worker then still has until the deadline itself to report (SIGKILL comes
        then anyway), not a kill in the same instant."""
        assert self.deadline is not None
        return max(self.deadline - FINAL_MARGIN, min(self.deadline, forced_at + FINAL_MARGIN))

    def status(self) -> dict[str, Any]:
        """The PID-1 layer's part of /status."""
        left = self.time_left()
        return {
            "pid1": self.is_pid1,
            "signals": list(self.signals),
            "drain_reason": self.drain_reason,
            "deadline_in_seconds": None if left is None else round(left, 3),
            "orphans_reaped": self.reaper.orphans_reaped,
        }


def freeze_startup_objects() -> None:
    """Exempt everything allocated so far (modules, classes, settings) from garbage collection.

    A full collection walks every tracked object: ~6 ms for wrap's ~17,000 at rest, tens of ms
    for the agent with pydantic and httpx loaded, and many times that on a busy machine. It
    comes at a random allocation, so it lands on a signal being forwarded or a heartbeat being
    sent; none of these objects will ever be garbage, so they need not be looked at again.
    """
    gc.collect()
    gc.freeze()


def _hard_exit(code: int) -> None:
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    sys.stderr.flush()
    os._exit(code)
