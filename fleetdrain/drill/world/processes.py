"""Real agent processes, optionally as PID 1 of their own PID namespace (as in a container).

Used by the tests and by the drill's local task runtime. ``unshare --pid --fork --mount-proc``
makes the agent PID 1 inside a new namespace, so everything PID 1 must do (handle signals it
would otherwise never see, reap orphans, not leave its job behind) is exercised for real.
Signals are sent to the agent's *host* pid, from outside the namespace, as the container
runtime does on ``docker stop``.

Containment: nothing started here outlives whoever started it, however that ends (a normal
end, an exception, a timeout, SIGINT or SIGTERM, or SIGKILL). Three layers:

1. **The PID namespace** (as root): ``unshare --kill-child`` gives the namespace's init (the
   agent) SIGKILL when ``unshare`` dies, and when its init dies the kernel kills everything
   else in the namespace (the job, its children, anything that double-forked).
2. **PR_SET_PDEATHSIG=SIGKILL** on every process :func:`spawn_agent` starts (``unshare``, or
   the agent itself without a namespace): it dies the moment its parent does, even if the
   parent was SIGKILLed. The kernel sends it when the parent *thread* exits, so processes are
   started from the main thread, or from a long-lived spawner thread when asked from another
   (:func:`_popen`); a parent that died before the prctl is caught by the ``getppid`` check
   after it. The drill's scenario processes get the same (:func:`die_with_parent`).
3. **A marker and a sweep**: :func:`contained` puts a fresh run id in the environment
   (:data:`RUN_MARKER`), which every process started inside inherits (the agents pass their
   environment on to jobs), sweeps (SIGKILLs) whatever still carries it on the way out, and
   starts a *guard*: a small process in a session of its own, outside every group and
   namespace the drill kills, that waits for the end of its stdin (the drill closed it, or
   died) and then does the same sweep. That catches what the first two cannot: a job's
   grandchild without a namespace, re-parented to init when its agent was SIGKILLed.

A process that clears its environment and escapes its parent without a PID namespace would
get past all three; with a namespace (root) nothing does.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: Carried in the environment of every process started inside :func:`contained` (its value:
#: that run's id): what the sweep and the guard look for.
RUN_MARKER = "FLEETDRAIN_DRILL_RUN"

_PR_SET_PDEATHSIG = 1


def _load_prctl() -> Any:
    # Resolved once, here: a forked child (``preexec_fn``) must not load libraries.
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent (thread) exits; exit at
    once if ``parent_pid`` is no longer the parent (it died before the prctl took effect).

    Safe in a forked child before ``exec`` (``prctl`` is resolved at import: nothing is
    loaded or imported here); a no-op off Linux.
    """
    if _PRCTL is None:
        return
    _PRCTL(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


class _Spawner:
    """One long-lived thread that starts the processes other threads ask for.

    PR_SET_PDEATHSIG fires when the parent *thread* exits: a process started from a
    short-lived thread would be killed with that thread, so such requests are run here.
    """

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="fleetdrain-spawner", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            call, future = self._requests.get()
            try:
                future.set_result(call())
            except BaseException as exc:
                future.set_exception(exc)

    def call(self, fn: Callable[[], Any]) -> Any:
        future: Future[Any] = Future()
        self._requests.put((fn, future))
        return future.result()


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _forget_spawner() -> None:
    global _spawner, _spawner_lock
    _spawner = None  # its thread does not exist in a forked child
    _spawner_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_spawner)


def _popen(argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` of a child that is SIGKILLed when this process dies (see the
    module docstring), started from the main thread or the spawner thread."""
    global _spawner

    def start() -> subprocess.Popen[bytes]:
        parent = os.getpid()
        return subprocess.Popen(argv, preexec_fn=lambda: die_with_parent(parent), **kwargs)

    if threading.current_thread() is threading.main_thread():
        return start()
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
        spawner = _spawner
    return spawner.call(start)


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
        """SIGKILL, as ECS does at stopTimeout: the agent and everything under it.

        In a PID namespace that is its init (the kernel kills the rest of the namespace);
        without one, its descendants and the process group it leads go with it.
        """
        if self.pid1:
            if self.alive():
                init = self._pid or next(iter(_children(self.popen.pid)), None)
                if init is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(init, signal.SIGKILL)
                self.popen.kill()
            return
        if self.alive():
            for pid in [*_descendants(self.popen.pid), self.popen.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)  # it leads a session of its own

    def output(self) -> str:
        """Everything the agent logged so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def _import_root() -> str | None:
    """The directory this ``fleetdrain`` is imported from, when a child started elsewhere
    needs it on PYTHONPATH (a checkout); None when installed (site-packages is on the path
    already, and putting it first would shadow the standard library)."""
    root = Path(__file__).resolve().parents[3]
    if root.name in ("site-packages", "dist-packages"):
        return None
    return str(root)


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
    The process dies with this process (PR_SET_PDEATHSIG, see the module docstring).
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
    root = _import_root()
    if root is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(p for p in (root, full_env.get("PYTHONPATH")) if p)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as out:
        popen = _popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=True,
        )
    return AgentProcess(popen=popen, log_path=log_path, pid1=pid1)


# ------------------------------------------------------------------ the marker and the sweep


def marked_processes(value: str, key: str = RUN_MARKER) -> list[int]:
    """Every live process (but this one) whose environment holds ``KEY=VALUE``."""
    needle = f"{key}={value}".encode()
    me = os.getpid()
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except FileNotFoundError:
        return found
    for entry in entries:
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                environ = fh.read()
        except OSError:  # gone, or not ours to read
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


def describe(pid: int) -> str:
    """``PID: command line`` (shortened), for reports of what was killed."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = "?"
    return f"{pid}: {cmdline[:120]}"


def sweep(value: str, key: str = RUN_MARKER, timeout: float = 5.0) -> list[str]:
    """SIGKILL every process marked ``KEY=VALUE`` until none is left (or ``timeout``);
    what was killed (:func:`describe`)."""
    killed: list[str] = []
    seen: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        found = marked_processes(value, key)
        if not found:
            return killed
        for pid in found:
            if pid not in seen:
                seen.add(pid)
                killed.append(describe(pid))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            return killed
        time.sleep(0.02)


@dataclass
class Containment:
    """What :func:`contained` set up: the run id, and what its sweep found on the way out."""

    run_id: str
    guard: subprocess.Popen[bytes] | None = None
    #: Processes still marked when the block ended, killed by the sweep (none, normally).
    swept: list[str] = field(default_factory=list)

    def marked(self) -> list[int]:
        """The processes started inside that still run."""
        return marked_processes(self.run_id)


def _start_guard(run_id: str) -> subprocess.Popen[bytes] | None:
    env = {k: v for k, v in os.environ.items() if k != RUN_MARKER}
    root = _import_root()
    if root is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        # No PDEATHSIG, a session of its own: it must outlive this process.
        return subprocess.Popen(
            [sys.executable, "-m", "fleetdrain.drill.world.processes", "guard", run_id],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            cwd="/",
        )
    except OSError:
        return None


@contextlib.contextmanager
def contained(guard: bool = True) -> Iterator[Containment]:
    """Mark every process started inside (``os.environ[RUN_MARKER]``, a fresh run id), and
    kill whatever still carries the mark on the way out, however the block ends; with
    ``guard``, also if this process is SIGKILLed (the guard process does the sweep then).
    The previous value of the marker is restored afterwards (blocks nest)."""
    run_id = uuid.uuid4().hex
    before = os.environ.get(RUN_MARKER)
    containment = Containment(run_id, _start_guard(run_id) if guard else None)
    os.environ[RUN_MARKER] = run_id
    try:
        yield containment
    finally:
        if before is None:
            os.environ.pop(RUN_MARKER, None)
        else:
            os.environ[RUN_MARKER] = before
        containment.swept = sweep(run_id)
        if containment.guard is not None:
            with contextlib.suppress(Exception):
                assert containment.guard.stdin is not None
                containment.guard.stdin.close()  # "done": it sweeps (nothing left) and exits
                containment.guard.wait(5)


def _guard(run_id: str) -> int:
    """The guard: wait until the process that started it closes our stdin or dies; sweep."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the drill, not for us
    with contextlib.suppress(OSError):
        while os.read(0, 4096):
            pass
    sweep(run_id, timeout=30.0)
    return 0


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


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for child in _children(pid):
        out.extend(_descendants(child))
        out.append(child)
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "guard":
        sys.exit(_guard(sys.argv[2]))
    print("usage: python -m fleetdrain.drill.world.processes guard RUN_ID", file=sys.stderr)
    sys.exit(2)
