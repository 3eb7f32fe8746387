"""Benchmark: ``fleetdrain-agent wrap`` against Debian's ``tini`` and ``dumb-init``, side by side.

    python bench/wrap.py                 # ~20 s
    python bench/wrap.py --samples 1000  # tighter percentiles

Not a test: it prints one table and exits 0 whatever the figures are (``--strict`` exits 1
when a goal is missed). Every wrapper runs as PID 1 of its own PID namespace when ``unshare``
works here (``unshare --pid --fork --mount-proc``, as the tests and the drill run the agent),
in front of the same worker, and signals come from outside the namespace, as ECS sends them.
Where ``tini`` or ``dumb-init`` is not installed (``apt-get install tini dumb-init``) the table
says so and leaves their column out.

The worker is ``sh -c 'echo exec; exec python3 worker.py'``: the ``exec`` line marks the moment
the wrapper has started it; the Python worker then blocks the signals it expects and takes them
with ``sigwaitinfo``, printing ``CLOCK_MONOTONIC`` as it receives each (that clock is
system-wide, so it compares with this process's).

Figures, per wrapper:

1. signal-forward latency: SIGUSR1 to the wrapper's host pid -> the worker has it (median, p99
   over ``--samples`` signals, one at a time); and the first SIGTERM (the graceful signal),
   once per run, 0.25 s after the worker's start.
2. exit-status pass-through: the worker exits 0, exits 3, is killed by SIGKILL (expect 137),
   in turn, run after run; the wrapper's status must be the worker's.
3. exit lag: the worker's last act -> the wrapper has exited (pidfd of the namespace's
   ``unshare``, which exits right after its PID 1).
4. wrapper RSS (VmRSS of its host pid) after the latency samples.
5. start-up: spawning ``unshare`` -> the worker's ``exec`` line, and the same minus the
   no-wrapper baseline (``unshare`` running the worker itself).

Two ``wrap`` columns: bare (as the others: no options), and ``wrap+`` with everything on:
``--busy-probe``, task protection and ``--watch-imds`` against the drill's ECS agent and IMDS
stand-ins, served from this process (the wrapper then talks HTTP with fleetdrain/agent/minihttp.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WORKER = r"""
import os, signal, sys, time
expected = {signal.SIGUSR1, signal.SIGTERM}
signal.pthread_sigmask(signal.SIG_BLOCK, expected)
out = sys.stdout.buffer
out.write(b"ready %d\n" % time.monotonic_ns()); out.flush()
mode = os.environ.get("EXIT_MODE", "code:0")
while True:
    info = signal.sigwaitinfo(expected)
    now = time.monotonic_ns()
    if info.si_signo == signal.SIGUSR1:
        out.write(b"usr1 %d\n" % now); out.flush()
        continue
    out.write(b"term %d\n" % now)
    kind, _, value = mode.partition(":")
    out.write(b"exit %d\n" % time.monotonic_ns()); out.flush()
    if kind == "signal":
        os.kill(os.getpid(), int(value))
        time.sleep(5)
    os._exit(int(value))
"""

#: (exit mode, the status the wrapper must exit with), cycled through the runs.
EXIT_MODES = [("code:0", 0), ("code:3", 3), ("signal:9", 137)]

GOAL_LATENCY_MS = 5.0
GOAL_RSS_MB = 30.0


@dataclass
class Figures:
    """What one wrapper measured."""

    name: str
    usr1_ms: list[float] = field(default_factory=list)
    term_ms: list[float] = field(default_factory=list)
    exit_lag_ms: list[float] = field(default_factory=list)
    startup_ms: list[float] = field(default_factory=list)
    rss_kb: list[int] = field(default_factory=list)
    statuses: list[tuple[int, int]] = field(default_factory=list)  # (expected, got)
    errors: list[str] = field(default_factory=list)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(FileNotFoundError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                out += [
                    int(p) for p in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
                ]
    return out


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Run:
    """One wrapper process in front of the worker, its stdout read line by line."""

    def __init__(self, wrapper: list[str], worker: Path, env: dict[str, str], pid1: bool) -> None:
        command = [*wrapper, "sh", "-c", 'echo exec; exec "$0" "$@"', sys.executable, str(worker)]
        if pid1:
            unshare = shutil.which("unshare")
            assert unshare is not None
            command = [unshare, "--pid", "--fork", "--mount-proc", "--kill-child", *command]
        self.pid1 = pid1
        self.started = time.monotonic_ns()
        self.popen = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        assert self.popen.stdout is not None
        self._out = self.popen.stdout
        self.pidfd = os.pidfd_open(self.popen.pid)

    def line(self, timeout: float = 10.0) -> tuple[str, int]:
        """The next line the worker printed: (word, its number), and when we read it."""
        ready, _, _ = select.select([self._out], [], [], timeout)
        if not ready:
            raise TimeoutError("the worker said nothing")
        text = self._out.readline().decode().split()
        if not text:
            raise EOFError("the worker's stdout closed")
        return text[0], int(text[1]) if len(text) > 1 else time.monotonic_ns()

    def target(self) -> int:
        """The pid to signal: the wrapper (PID 1 of the namespace) as seen from here."""
        if not self.pid1:
            return self.popen.pid
        for _ in range(500):
            kids = _children(self.popen.pid)
            if kids:
                return kids[0]
            time.sleep(0.002)
        raise RuntimeError("no PID 1 under unshare")

    def wait(self, timeout: float = 10.0) -> tuple[int, int]:
        """(exit status, monotonic ns it exited)."""
        ready, _, _ = select.select([self.pidfd], [], [], timeout)
        at = time.monotonic_ns()
        if not ready:
            raise TimeoutError("the wrapper did not exit")
        code = self.popen.wait(5)
        return (128 - code if code < 0 else code), at

    def close(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(5)
        os.close(self.pidfd)
        self._out.close()


def measure(
    name: str,
    wrapper: list[str],
    worker: Path,
    env: dict[str, str],
    *,
    runs: int,
    samples: int,
    pid1: bool,
    baseline: bool = False,
) -> Figures:
    """Start the wrapper ``runs`` times; the first run also takes the latency samples."""
    figures = Figures(name)
    modes = [m for m in EXIT_MODES if not (baseline and m[0].startswith("signal"))]
    for i in range(runs):
        mode, expected = modes[i % len(modes)]
        run = Run(wrapper, worker, {**env, "EXIT_MODE": mode}, pid1)
        try:
            word, _ = run.line()
            assert word == "exec", word
            figures.startup_ms.append((time.monotonic_ns() - run.started) / 1e6)
            run.line()  # ready: its signals are blocked, sigwaitinfo is next
            target = run.target()
            if i == 0:
                for _ in range(samples):
                    sent = time.monotonic_ns()
                    os.kill(target, signal.SIGUSR1)
                    word, got = run.line()
                    figures.usr1_ms.append((got - sent) / 1e6)
                    time.sleep(0.001)
                if not baseline:
                    figures.rss_kb.append(_rss_kb(target))
            # Steady state: right after its exec the wrapper may still be loading (wrap+
            # imports its HTTP client then, and a signal waits for the import).
            time.sleep(0.25)
            sent = time.monotonic_ns()
            os.kill(target, signal.SIGTERM)
            word, got = run.line()
            figures.term_ms.append((got - sent) / 1e6)
            _, last_act = run.line()
            code, exited = run.wait()
            figures.exit_lag_ms.append((exited - last_act) / 1e6)
            figures.statuses.append((expected, code))
        except (TimeoutError, EOFError, RuntimeError, AssertionError) as exc:
            figures.errors.append(f"run {i}: {type(exc).__name__}: {exc}")
        finally:
            run.close()
    return figures


@contextlib.contextmanager
def stand_ins() -> Iterator[dict[str, str]]:
    """ECS agent and IMDS stand-ins; the environment that points ``wrap+`` at them."""
    from fleetdrain.drill.aws.endpoints import EcsAgentStandIn, ImdsStandIn

    ecs = EcsAgentStandIn()
    ecs.add_task("bench")
    imds = ImdsStandIn()
    with ecs.serve(), imds.serve():
        env = ecs.env_for("bench")
        env["FLEETDRAIN_IMDS_ENDPOINT"] = imds.base_url_for(imds.instance().instance_id)
        # Any JSON 200 will do for the probe: it then says "busy", so protection goes on too.
        env["FLEETDRAIN_BUSY_PROBE"] = env["ECS_CONTAINER_METADATA_URI_V4"] + "/task"
        yield env


def _fmt_latency(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):.2f} / {_percentile(values, 99):.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--samples", type=int, default=300, help="SIGUSR1 samples per wrapper")
    parser.add_argument("--runs", type=int, default=9, help="start-ups per wrapper")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    ns = parser.parse_args(argv)

    from fleetdrain.drill.world.processes import pid_namespaces_available

    pid1, why = pid_namespaces_available()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    wrap = [sys.executable, "-m", "fleetdrain.agent.cli", "wrap", "--"]
    wrappers: list[tuple[str, list[str] | None, str]] = [
        ("none", [], ""),
        ("tini", ["tini", "--"] if pid1 else ["tini", "-s", "--"], "tini"),
        ("dumb-init", ["dumb-init", "--"], "dumb-init"),
        ("wrap", wrap, ""),
        ("wrap+", [*wrap[:-1], "--task-protection", "--watch-imds", "--"], ""),
    ]
    notes = [] if pid1 else [f"not PID 1 ({why}): every wrapper ran as an ordinary child"]
    results: list[Figures] = []
    with tempfile.TemporaryDirectory(prefix="bench-wrap-") as tmp:
        worker = Path(tmp) / "worker.py"
        worker.write_text(WORKER)
        with stand_ins() as aws_env:
            for name, command, binary in wrappers:
                if binary and shutil.which(binary) is None:
                    notes.append(f"{binary} is not installed: its column is left out")
                    continue
                assert command is not None
                print(f"measuring {name} ...", flush=True)
                run_env = {**env, **aws_env} if name == "wrap+" else env
                results.append(
                    measure(
                        name,
                        command,
                        worker,
                        run_env,
                        runs=ns.runs,
                        samples=ns.samples,
                        pid1=pid1,
                        baseline=name == "none",
                    )
                )

    by_name = {f.name: f for f in results}
    base_start = statistics.median(by_name["none"].startup_ms) if "none" in by_name else 0.0
    rows: list[tuple[str, list[str]]] = [
        ("SIGUSR1 forward ms (median / p99)", [_fmt_latency(f.usr1_ms) for f in results]),
        ("first SIGTERM forward ms (median / p99)", [_fmt_latency(f.term_ms) for f in results]),
        (
            "exit status passed through",
            [
                "n/a"
                if f.name == "none"
                else f"{sum(e == g for e, g in f.statuses)}/{len(f.statuses)} ok "
                f"({'/'.join(sorted({str(g) for _, g in f.statuses}, key=int))})"
                for f in results
            ],
        ),
        (
            "exit lag after the worker ms (median / max)",
            [
                f"{statistics.median(f.exit_lag_ms):.1f} / {max(f.exit_lag_ms):.1f}"
                if f.exit_lag_ms
                else "-"
                for f in results
            ],
        ),
        (
            "RSS MB",
            [f"{max(f.rss_kb) / 1024:.1f}" if f.rss_kb else "n/a" for f in results],
        ),
        (
            "start-up to exec ms (median)",
            [f"{statistics.median(f.startup_ms):.1f}" if f.startup_ms else "-" for f in results],
        ),
        (
            "  minus no-wrapper baseline",
            [
                f"{statistics.median(f.startup_ms) - base_start:+.1f}"
                if f.startup_ms and f.name != "none"
                else "-"
                for f in results
            ],
        ),
    ]
    header = ["", *[f.name for f in results]]
    widths = [max(len(r[0]) for r in rows)] + [
        max(len(f.name), *(len(r[1][i]) for r in rows)) for i, f in enumerate(results)
    ]
    print()
    print(
        f"wrappers as PID 1: {'yes' if pid1 else 'no'}; {ns.samples} SIGUSR1, {ns.runs} runs each"
    )
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for label, cells in rows:
        print("  ".join(c.ljust(w) for c, w in zip([label, *cells], widths, strict=True)).rstrip())

    missed: list[str] = []
    goals: list[str] = []
    wrap_figs = by_name.get("wrap")
    tini = by_name.get("tini")
    if wrap_figs is not None and wrap_figs.usr1_ms:
        p99 = _percentile(wrap_figs.usr1_ms, 99)
        if tini is not None and tini.usr1_ms:
            limit = _percentile(tini.usr1_ms, 99) + GOAL_LATENCY_MS
            ok = p99 <= limit
            goals.append(f"forward p99 {p99:.2f} ms <= tini p99 + 5 = {limit:.2f} ms: {_ok(ok)}")
            if not ok:
                missed.append("forward latency")
        for fig in (wrap_figs, by_name.get("wrap+")):
            if fig is not None and fig.rss_kb:
                rss = max(fig.rss_kb) / 1024
                ok = rss <= GOAL_RSS_MB
                goals.append(f"{fig.name} RSS {rss:.1f} MB <= {GOAL_RSS_MB:.0f} MB: {_ok(ok)}")
                if not ok:
                    missed.append(f"{fig.name} RSS")
        for fig in results:
            bad = [(e, g) for e, g in fig.statuses if e != g]
            if bad and fig.name != "none":
                missed.append(f"{fig.name} exit status {bad}")
    print()
    for goal in goals:
        print(f"goal: {goal}")
    for note in notes:
        print(f"note: {note}")
    for fig in results:
        for error in fig.errors:
            print(f"error: {fig.name}: {error}")
    if missed:
        print("missed: " + "; ".join(missed))
    return 1 if ns.strict and missed else 0


def _ok(ok: bool) -> str:
    return "ok" if ok else "MISSED"


if __name__ == "__main__":
    sys.exit(main())
