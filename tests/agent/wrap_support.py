"""Support for the ``wrap`` tests: a bash worker that traps signals, and a handle on a wrapper.

The worker logs every signal it gets as ``worker: got SIG at <epoch seconds>`` and takes
commands on a FIFO (``job 1.5`` runs ``sleep 1.5`` as a child, ``orphans 5`` leaves five
processes re-parented to PID 1, ``exit 7``, ``die TERM``...). What it does on SIGTERM and
SIGQUIT comes from its environment (``ON_TERM``: finish / exit / ignore; ``ON_QUIT``: exit /
ignore), so one script stands in for the Go agent and for workers that misbehave.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fleetdrain.drill.world.processes import AgentProcess, pid_namespaces_available, spawn_agent

WORKER = r"""#!/bin/bash
say() { printf 'worker: %s at %s\n' "$1" "$EPOCHREALTIME"; }
job=""
draining=""
on_term() {
  say "got TERM"
  case "${ON_TERM:-finish}" in
    exit) say "exiting"; exit "${TERM_STATUS:-0}" ;;
    finish) draining=1 ;;
  esac
}
on_quit() {
  say "got QUIT"
  if [ "${ON_QUIT:-exit}" = exit ]; then
    [ -n "$job" ] && kill -TERM "$job" 2>/dev/null
    say "exiting"; exit "${QUIT_STATUS:-3}"
  fi
}
trap on_term TERM
trap on_quit QUIT
for sig in INT HUP USR1 USR2 WINCH; do trap "say 'got $sig'" "$sig"; done
exec 3<>"$CONTROL"
# fd 4: a FIFO nobody writes, so `read -t` on it is a sleep without a child process (a child
# would make the worker look busy to wrap).
mkfifo "$CONTROL.idle" && exec 4<>"$CONTROL.idle"
say "started"
echo "worker stderr line" >&2
while :; do
  if [ -n "$draining" ] && [ -z "$job" ]; then
    say "drained"; say "exiting"; exit "${TERM_STATUS:-0}"
  fi
  # Bash reads a FIFO a byte at a time: a `read -t` that times out mid-line would drop the
  # line's start. So wait with a zero-timeout poll, then read the whole line (written at once).
  if ! read -t 0 -u 3; then
    read -t 0.05 -u 4 _ || true
  elif read -r -u 3 cmd arg; then
    case "$cmd" in
      job) sleep "$arg" & job=$!; say "job started" ;;
      endjob) if [ -n "$job" ]; then kill "$job"; fi; say "job ended" ;;
      orphans) for _ in $(seq "$arg"); do (sleep 0.2 &); done; say "orphans left" ;;
      stubborn) (trap '' TERM; exec sleep "$arg") & setsid sleep "$arg" & say "stubborn child" ;;
      leave) (trap '' TERM; sleep "$arg" &) ; (sleep "$arg" &); say "left orphans" ;;
      exit) say "exiting"; exit "$arg" ;;
      die) say "exiting"; trap - "$arg"; kill -"$arg" $$ ;;
    esac
  fi
  if [ -n "$job" ] && ! kill -0 "$job" 2>/dev/null; then wait "$job"; job=""; say "job done"; fi
done
"""

_EVENT = re.compile(r"^worker: (.+) at (\d+\.\d+)$", re.M)


def require_pid1() -> None:
    """Skip (with the reason) where this machine cannot make PID namespaces."""
    ok, why = pid_namespaces_available()
    if not ok:
        pytest.skip(f"PID-1 test needs a PID namespace: {why}")


def wrap_command(*args: str) -> list[str]:
    """``python -m fleetdrain.agent.cli wrap ARGS...`` with this interpreter."""
    return [sys.executable, "-m", "fleetdrain.agent.cli", "wrap", *args]


@dataclass
class Wrapped:
    """A running ``wrap`` and its worker."""

    proc: AgentProcess
    control: Path | None
    addr: str | None
    _pidfd: int | None = None
    exited_at: float | None = None
    code: int | None = None
    _events: list[tuple[str, float]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The wrapper's pid (host side)."""
        return self.proc.pid

    def worker_pid(self) -> int:
        """The worker's pid (host side): the wrapper's only child."""
        until = time.monotonic() + 5
        while time.monotonic() < until:
            kids = _children(self.pid)
            if kids:
                return kids[0]
            time.sleep(0.01)
        raise AssertionError(f"no worker under {self.pid}:\n{self.output()}")

    def send(self, sig: int) -> float:
        """Signal the wrapper from outside, as ECS does; the wall time it was sent."""
        at = time.time()
        os.kill(self.pid, sig)
        return at

    def tell(self, line: str) -> None:
        """A command for the worker."""
        assert self.control is not None
        fd = os.open(self.control, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    def wait(self, timeout: float) -> int:
        """Wait for the wrapper to exit; its status. Records the exact wall time of the exit."""
        if self.code is not None:
            return self.code
        if self._pidfd is None:
            self._pidfd = os.pidfd_open(self.proc.popen.pid)
        ready, _, _ = select.select([self._pidfd], [], [], timeout)
        if not ready:
            raise AssertionError(f"wrap still running after {timeout}s:\n{self.output()}")
        self.exited_at = time.time()
        os.close(self._pidfd)
        self.code = self.proc.wait(5)
        return self.code

    def output(self) -> str:
        """Everything the wrapper and the worker wrote."""
        return self.proc.output()

    def events(self) -> list[tuple[str, float]]:
        """The worker's ``(event, wall time)`` lines so far."""
        return [(m[1], float(m[2])) for m in _EVENT.finditer(self.output())]

    def event_time(self, name: str) -> float:
        """Wall time of the worker's first ``name`` event (AssertionError if none)."""
        for event, at in self.events():
            if event == name:
                return at
        raise AssertionError(f"worker never logged {name!r}:\n{self.output()}")

    def wait_event(self, name: str, timeout: float = 5.0) -> float:
        """Wait until the worker logs ``name``; its wall time."""
        wait_until(lambda: any(e == name for e, _ in self.events()), timeout, self.output)
        return self.event_time(name)

    def has_event(self, name: str) -> bool:
        """Whether the worker logged ``name``."""
        return any(e == name for e, _ in self.events())

    def get(self, path: str) -> tuple[int, Any]:
        """GET our health server: (status, parsed JSON)."""
        assert self.addr is not None
        try:
            with urllib.request.urlopen(f"http://{self.addr}{path}", timeout=2) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def status(self) -> dict[str, Any]:
        """Our /status."""
        code, body = self.get("/status")
        assert code == 200, body
        return dict(body)


def wait_until(
    condition: Callable[[], object], timeout: float, why: Callable[[], str] = lambda: ""
) -> None:
    """Poll ``condition`` every 20 ms until true; AssertionError with ``why()`` on timeout."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s\n{why()}")


def free_addr() -> str:
    """A loopback ``host:port`` that was free a moment ago."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class WrapFactory:
    """Starts wrappers for one test and cleans them up."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[Wrapped] = []
        self.worker_script = tmp / "worker.sh"
        self.worker_script.write_text(WORKER)
        self.worker_script.chmod(0o755)

    def __call__(
        self,
        *options: str,
        command: list[str] | None = None,
        env: dict[str, str] | None = None,
        pid1: bool = True,
        health: bool = True,
        name: str | None = None,
        worker_args: tuple[str, ...] = (),
    ) -> Wrapped:
        """Start ``wrap OPTIONS -- COMMAND`` (default: the bash worker, given ``worker_args``,
        which it ignores: a command line as the Go agent's would be)."""
        if pid1:
            require_pid1()
        name = name or f"wrap-{len(self.started) + 1}"
        control = None
        full_env = {"PYTHONUNBUFFERED": "1", **(env or {})}
        if command is None:
            control = self.tmp / f"{name}.ctl"
            os.mkfifo(control)
            full_env["CONTROL"] = str(control)
            command = ["/bin/bash", str(self.worker_script), *worker_args]
        addr = free_addr() if health else None
        args = [*options, *(["--health-check-addr", addr] if addr else []), "--", *command]
        proc = spawn_agent(
            [],
            command=wrap_command(*args),
            log_path=self.tmp / f"{name}.log",
            env=full_env,
            pid1=pid1,
        )
        wrapped = Wrapped(proc, control, addr)
        self.started.append(wrapped)
        if control is not None:
            wrapped.wait_event("started", 10)
        if addr is not None:
            wait_until(lambda: _answers(wrapped), 10, wrapped.output)
        return wrapped

    def close(self) -> None:
        for wrapped in self.started:
            if wrapped.code is None:
                with contextlib.suppress(Exception):
                    for pid in [*_descendants(wrapped.proc.popen.pid)]:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                wrapped.proc.kill()
                with contextlib.suppress(Exception):
                    wrapped.proc.wait(5)


def _answers(wrapped: Wrapped) -> bool:
    try:
        return wrapped.get("/health")[0] in (200, 503)
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tids:
        with contextlib.suppress(FileNotFoundError, ValueError):
            out.extend(int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split())
    return out


def _descendants(pid: int) -> Iterator[int]:
    for child in _children(pid):
        yield from _descendants(child)
        yield child


def zombies_under(pid: int) -> list[int]:
    """Children of ``pid`` that have exited but were not reaped."""
    return [c for c in _children(pid) if process_state(c) == "Z"]


def process_state(pid: int) -> str | None:
    """``R``, ``S``, ``Z``... from /proc, or None when the process is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def wraps(tmp_path: Path) -> Iterator[WrapFactory]:
    """For a ``wrap`` fixture: ``wrap(*options, env=..., pid1=...)`` -> :class:`Wrapped`."""
    factory = WrapFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.close()
