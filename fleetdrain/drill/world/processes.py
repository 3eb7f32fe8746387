"""Real agent processes, optionally as PID 1 of their own PID namespace (as in a container).

Used by the tests and by the drill's local task runtime. ``unshare --pid --fork --mount-proc``
makes the agent PID 1 inside a new namespace, so everything PID 1 must do (handle signals it
would otherwise never see, reap orphans, not leave its job behind) is exercised for real.
Signals are sent to the agent's *host* pid, from outside the namespace, as the container
runtime does on ``docker stop``.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@functools.cache
def pid_namespaces_available() -> tuple[bool, str]:
    """Whether ``unshare --pid --fork --mount-proc`` works here, and why not if it does not."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return False, "unshare (util-linux) is not installed"
    if os.geteuid() != 0:
        return False, "new PID namespaces need root here (not running as root)"
    try:
        result = subprocess.run(
            [unshare, "--pid", "--fork", "--mount-proc", "sh", "-c", 'test "$$" = 1'],
            capture_output=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, f"unshare failed: {exc}"
    if result.returncode != 0:
        return False, f"unshare refused: {result.stderr.decode(errors='replace').strip()}"
    return True, ""


def agent_command() -> list[str]:
    """How to run ``fleetdrain-agent`` with this interpreter (no PATH lookup)."""
    return [sys.executable, "-m", "fleetdrain.agent.cli"]


@dataclass
class AgentProcess:
    """One running agent process and how to reach it."""

    popen: subprocess.Popen[bytes]
    log_path: Path
    pid1: bool
    started_at: float = field(default_factory=time.monotonic)
    _pid: int | None = None

    @property
    def pid(self) -> int:
        """The agent's pid as seen from here (the host side of its namespace)."""
        if not self.pid1:
            return self.popen.pid
        if self._pid is None:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                children = _children(self.popen.pid)
                if children:
                    self._pid = children[0]
                    break
                time.sleep(0.005)
            else:
                raise RuntimeError("the agent did not start inside its PID namespace")
        return self._pid

    def send(self, sig: int) -> None:
        """Deliver a signal to the agent, as the container runtime would."""
        os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        """Wait for exit; the exit status (128 + n if a signal ended it)."""
        code = self.popen.wait(timeout=timeout)
        return 128 - code if code < 0 else code

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL, as ECS does at stopTimeout (the whole namespace dies with its PID 1)."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError, RuntimeError):
                os.kill(self.pid, signal.SIGKILL)
            self.popen.kill()

    def output(self) -> str:
        """Everything the agent logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def spawn_agent(
    args: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    pid1: bool = True,
    command: Sequence[str] | None = None,
) -> AgentProcess:
    """Start ``fleetdrain-agent ARGS`` (or ``command``), as PID 1 when ``pid1`` and possible.

    With ``pid1=True`` on a machine without PID namespaces this raises RuntimeError with the
    reason: a test that needs PID 1 must skip with that reason, not silently run without it.
    """
    argv = list(command) if command is not None else [*agent_command(), *args]
    if pid1:
        ok, why = pid_namespaces_available()
        if not ok:
            raise RuntimeError(f"cannot run as PID 1: {why}")
        unshare = shutil.which("unshare")
        assert unshare is not None
        argv = [unshare, "--pid", "--fork", "--mount-proc", "--kill-child", *argv]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    # The agent must import this checkout's packages even from a temporary working directory.
    root = str(Path(__file__).resolve().parents[3])
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, full_env.get("PYTHONPATH")) if p)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    return AgentProcess(popen=popen, log_path=log_path, pid1=pid1)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                out.extend(int(p) for p in fh.read().split())
        except (FileNotFoundError, ValueError):
            continue
    return out
