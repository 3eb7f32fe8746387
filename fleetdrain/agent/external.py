"""The ``wrap`` worker: an external command run as the PID-1 layer's child.

The PID-1 layer asks a worker three things (:class:`fleetdrain.agent.worker.Worker`); for a command
it cannot look inside, they become signals and observation:

- stop gracefully: the graceful signal (default SIGTERM), sent once;
- stop by force: the force signal (default SIGQUIT: the Go agent then cancels its job and
  finishes it with ``signal_reason: agent_stop``), sent once;
- kill: SIGKILL to the worker's process group and to every process below it (a worker may
  run its jobs in process groups of their own, as the Go agent does);
- busy: from a :class:`fleetdrain.agent.busy.BusySource`, polled, with changes reported at once so
  that task protection follows within a poll interval.

The command's stdin, stdout and stderr are this process's own, untouched: its logs reach
``awslogs`` exactly as it writes them. Ours show its command line without secrets
(:func:`fleetdrain.agent.logs.redact_argv`), and so does /status. It runs in a process group of
its own so that the group can be killed without killing us; on a terminal it is made the
foreground group, as tini does.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

from fleetdrain.agent.busy import BusySource, ChildrenBusy, descendants
from fleetdrain.agent.logs import redact_argv
from fleetdrain.agent.reaper import ExitStatus, Reaper

log = logging.getLogger("fleetdrain.wrap")

#: Exit statuses for a command that never ran, as shells give them.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_RUN = 2


class ExternalWorker:
    """Runs ``argv`` as a child and drives it with signals."""

    def __init__(
        self,
        argv: Sequence[str],
        reaper: Reaper,
        *,
        graceful_signal: int = signal.SIGTERM,
        force_signal: int = signal.SIGQUIT,
        busy_source: BusySource | None = None,
        busy_interval: float = 1.0,
        on_busy_change: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``busy_source`` defaults to the worker's child processes."""
        if not argv:
            raise ValueError("no command to run")
        self.argv = list(argv)
        #: The command line as logs and /status show it: no --token value, no *_TOKEN value.
        self.shown_argv = redact_argv(self.argv)
        self.reaper = reaper
        self.graceful_signal = signal.Signals(graceful_signal)
        self.force_signal = signal.Signals(force_signal)
        self.busy_source: BusySource = busy_source or ChildrenBusy(lambda: self.pid)
        self.busy_interval = busy_interval
        self.on_busy_change = on_busy_change
        self.clock = clock
        self.state = "starting"
        self.pid: int | None = None
        self.exit_status: ExitStatus | None = None
        self.started_at: float | None = None
        self._busy = False
        self._graceful_sent = False
        self._force_sent = False
        self._deadline: float | None = None

    # -- what the PID-1 layer asks -----------------------------------------------------------

    def running(self) -> bool:
        """The command has started and not exited."""
        return self.pid is not None

    def busy(self) -> bool:
        """Busy by the busy source (as of its last poll; children are read now)."""
        if self.pid is None:
            return False
        if isinstance(self.busy_source, ChildrenBusy):
            self._set_busy(self.busy_source.busy_now())
        return self._busy

    def stop_gracefully(self, deadline: float | None) -> None:
        """Send the graceful signal, once: a second SIGTERM means "force" to the Go agent."""
        self._deadline = deadline
        if self._graceful_sent or self.pid is None:
            return
        self._graceful_sent = True
        self._set_state("draining")
        log.info(
            "sending %s to the worker (pid %d): graceful stop, %s",
            self.graceful_signal.name,
            self.pid,
            self._time_left(),
        )
        self._signal(self.graceful_signal)

    def stop_forcefully(self, reason: str) -> None:
        """Send the force signal, once (the worker cancels and reports its job itself)."""
        if self._force_sent or self.pid is None:
            return
        self._force_sent = True
        self._set_state("stopping")
        log.warning(
            "sending %s to the worker (pid %d): forced stop (%s), %s",
            self.force_signal.name,
            self.pid,
            reason,
            self._time_left(),
        )
        self._signal(self.force_signal)

    def kill(self) -> None:
        """SIGKILL the worker's process group and everything below it, now."""
        pid = self.pid
        if pid is None:
            return
        # Collected first: once the worker dies its children are re-parented away from it.
        below = descendants(pid)
        log.error(
            "SIGKILL to the worker's process group %d and %d processes below it", pid, len(below)
        )
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        for victim in [pid, *below]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(victim, signal.SIGKILL)

    def forward(self, sig: int) -> None:
        """Pass a signal on to the worker unchanged (SIGHUP, SIGUSR1...)."""
        if self.pid is not None:
            self._signal(signal.Signals(sig))

    def status(self) -> dict[str, Any]:
        """The worker's part of /status."""
        exit_status = self.exit_status
        busy = self.busy()  # first: it may move the state (idle <-> busy)
        return {
            "state": self.state,
            "busy": busy,
            "worker_pid": self.pid,
            "command": self.shown_argv,
            "busy_from": self.busy_source.status(),
            "worker_exit": None
            if exit_status is None
            else {
                "status": exit_status.shell_code,
                "code": exit_status.code,
                "signal": exit_status.signal_name,
            },
        }

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> int:
        """Run the command to its end; its exit status (128 + n when signal n ended it)."""
        try:
            proc, exited = self.reaper.spawn(self.argv, **_spawn_options())
        except FileNotFoundError as exc:
            log.error("cannot run %s: %s", self.shown_argv[0], exc.strerror or exc)
            self._set_state("stopped")
            return EXIT_NOT_FOUND
        except OSError as exc:
            log.error("cannot run %s: %s", self.shown_argv[0], exc.strerror or exc)
            self._set_state("stopped")
            return EXIT_CANNOT_RUN
        self.pid = proc.pid
        self.started_at = self.clock()
        self._set_state("idle")
        log.info("started the worker (pid %d): %s", proc.pid, " ".join(self.shown_argv))
        watching = asyncio.get_running_loop().create_task(self._watch_busy(), name="busy")
        try:
            status = await exited
        finally:
            watching.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watching
        self.pid = None
        self.exit_status = status
        self._set_busy(False)
        self._set_state("stopped")
        how = f"signal {status.signal_name}" if status.signal is not None else f"code {status.code}"
        log.info("the worker exited (%s): exit status %d", how, status.shell_code)
        return status.shell_code

    async def _watch_busy(self) -> None:
        while True:
            busy = await self.busy_source.poll()
            if self.pid is not None:
                self._set_busy(busy)
            await asyncio.sleep(self.busy_interval)

    # -- helpers -----------------------------------------------------------------------------

    def _set_busy(self, busy: bool) -> None:
        if busy == self._busy:
            return
        self._busy = busy
        log.info("worker %s (%s)", "busy" if busy else "idle", self.busy_source.description)
        if self.state in ("idle", "busy"):
            self._set_state("busy" if busy else "idle")
        if self.on_busy_change is not None:
            self.on_busy_change(busy)

    def _set_state(self, state: str) -> None:
        if state != self.state:
            log.debug("state %s -> %s", self.state, state)
            self.state = state

    def _signal(self, sig: signal.Signals) -> None:
        assert self.pid is not None
        # Gone already: it exited, and the reaper has (or will have) its status.
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def _time_left(self) -> str:
        if self._deadline is None:
            return "no deadline"
        return f"{self._deadline - self.clock():.1f}s until SIGKILL"


def _spawn_options() -> dict[str, Any]:
    """Popen options: the caller's stdio, a process group of its own."""
    if _owns_terminal():
        return {"preexec_fn": _foreground_group}
    return {"process_group": 0}


def _owns_terminal() -> bool:
    try:
        return os.isatty(0) and os.tcgetpgrp(0) == os.getpgrp()
    except OSError:
        return False


def _foreground_group() -> None:  # pragma: no cover - runs in the child, between fork and exec
    # Own group, and the terminal's foreground: otherwise reading the terminal stops the worker
    # (SIGTTIN) and ^C / window changes go to us instead of to it.
    os.setpgid(0, 0)
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.tcsetpgrp(0, os.getpgrp())
    signal.signal(signal.SIGTTOU, previous)
