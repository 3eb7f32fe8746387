"""The one owner of ``waitpid`` in the agent: spawns children, reaps them and every orphan.

As PID 1 every process whose parent dies is re-parented to us; unless we wait for it, it stays a
zombie for the life of the task. asyncio's child watchers wait for one pid at a time, which would
leave those orphans behind, so the agent spawns through :class:`Reaper` instead and reaps with
``waitpid(-1)`` on SIGCHLD, handing each status to whoever spawned that pid.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("fleetdrain.reaper")


@dataclass(frozen=True)
class ExitStatus:
    """How a child ended: ``code`` for a normal exit, ``signal`` when a signal killed it."""

    code: int | None
    signal: int | None

    @classmethod
    def from_wait_status(cls, status: int) -> ExitStatus:
        """Decode a raw ``waitpid`` status."""
        value = os.waitstatus_to_exitcode(status)
        if value < 0:
            return cls(code=None, signal=-value)
        return cls(code=value, signal=None)

    @property
    def shell_code(self) -> int:
        """The status as a shell reports it: the code, or 128 + the signal number."""
        if self.signal is not None:
            return 128 + self.signal
        return self.code if self.code is not None else 0

    @property
    def signal_name(self) -> str | None:
        """``SIGTERM``-style name of the killing signal, if any."""
        if self.signal is None:
            return None
        try:
            return signal.Signals(self.signal).name
        except ValueError:
            return f"SIG{self.signal}"


class Reaper:
    """Spawns children and reaps every child of this process, known or orphaned."""

    def __init__(self) -> None:
        self._waiters: dict[int, asyncio.Future[ExitStatus]] = {}
        # A child can be reaped before anyone asked for it (spawn and the SIGCHLD race).
        self._unclaimed: dict[int, ExitStatus] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self.orphans_reaped = 0

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Reap on every SIGCHLD from now on (and once now, for anything already dead)."""
        self._loop = loop or asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()

    def uninstall(self) -> None:
        """Stop handling SIGCHLD."""
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
            self._loop = None

    def spawn(
        self, argv: Sequence[str], **popen_kwargs: Any
    ) -> tuple[subprocess.Popen[bytes], asyncio.Future[ExitStatus]]:
        """Start a child with :class:`subprocess.Popen`; its exit status arrives on the future."""
        proc = subprocess.Popen(list(argv), **popen_kwargs)
        return proc, self.watch(proc.pid, proc)

    def watch(
        self, pid: int, proc: subprocess.Popen[bytes] | None = None
    ) -> asyncio.Future[ExitStatus]:
        """A future for the exit status of child ``pid``."""
        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[ExitStatus] = loop.create_future()
        if proc is not None:
            future.add_done_callback(lambda f: _settle_popen(proc, f))
        early = self._unclaimed.pop(pid, None)
        if early is not None:
            future.set_result(early)
        else:
            self._waiters[pid] = future
        return future

    def reap(self) -> None:
        """Collect every exited child without blocking."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            exit_status = ExitStatus.from_wait_status(status)
            waiter = self._waiters.pop(pid, None)
            if waiter is not None:
                if not waiter.done():
                    waiter.set_result(exit_status)
            elif os.getpid() == 1:
                self.orphans_reaped += 1
                log.debug("reaped orphan pid %d (%s)", pid, exit_status)
            else:
                # Not PID 1: only our own children come here; keep it for a late watch().
                self._unclaimed[pid] = exit_status
                if len(self._unclaimed) > 1024:
                    self._unclaimed.pop(next(iter(self._unclaimed)))

    def has_children(self) -> bool:
        """Whether any child (known or orphan) is still unreaped."""
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid != 0:
            # Put the status where reap() would have: we just took it off the kernel.
            exit_status = ExitStatus.from_wait_status(status)
            waiter = self._waiters.pop(pid, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(exit_status)
            return self.has_children()
        return True


def _settle_popen(proc: subprocess.Popen[bytes], future: asyncio.Future[ExitStatus]) -> None:
    # Popen must never waitpid() itself: the pid is gone (and could be reused).
    if not future.cancelled():
        proc.returncode = future.result().shell_code


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("not permitted to signal process group %d", pgid)
        return False
    return True


def group_alive(pgid: int) -> bool:
    """Whether any process (zombies included) is left in group ``pgid``."""
    return signal_group(pgid, 0)


def parse_signal(name: str | int) -> signal.Signals:
    """``SIGTERM``, ``TERM``, ``term`` or ``15`` to a signal; ValueError for anything else."""
    if isinstance(name, int) or str(name).strip().isdigit():
        return signal.Signals(int(name))
    text = str(name).strip().upper()
    if not text.startswith("SIG"):
        text = "SIG" + text
    try:
        return signal.Signals[text]
    except KeyError:
        raise ValueError(f"unknown signal name: {name!r}") from None
