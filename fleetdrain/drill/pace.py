"""The drill's pace: how fast AWS's clock may run on this machine now, and how many scenarios
may run at once.

The drill compresses AWS's clock (a 120 s ``stopTimeout`` takes 12 s at the default pace), but
not everything in a scenario is on that clock: a Python process starting, a signal handled, a
finish posted, a moto call, the agents' own ping and heartbeat intervals take wall time, and
more of it when the CPU is shared. Compressed too far, a window that is 14.5 s on AWS (wrap's
force signal to its SIGKILL) becomes one wall second, and a busy machine can miss it although
nothing is wrong with the agent. So the pace comes from a short measurement at start
(:func:`calibrate`): the load average, and how much of a core a busy process gets right now
(:func:`cpu_share`: one spinning probe per core for a few tenths of a second). A machine that
gives a process half a core runs the drill twice as slow, and fewer scenarios side by side.

While a scenario runs, a :class:`Watch` in its process records the highest load average and
the longest stall (how late a 20 ms sleep woke: CPU and GIL contention together). A scenario
that failed without losing a build, on a machine that stalled for a good part of its tightest
window, is *inconclusive* (:func:`too_slow`), with the pace to retry at.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

#: At the default pace (``time_scale`` 1.0) one drill second is this many wall seconds.
WALL_PER_DRILL_SECOND = 0.1
#: Seconds each probe spins in :func:`cpu_share`; :func:`measure` takes the best of
#: :data:`PROBE_ROUNDS` rounds, :data:`PROBE_GAP` seconds apart (about a second in all).
PROBE_SECONDS = 0.25
PROBE_ROUNDS = 3
PROBE_GAP = 0.15
#: Scenarios side by side per core that is free: each takes ~1 CPU-second to set up (moto and
#: template.yaml, with the imports and AWS models loaded before the scenarios are forked) and
#: ~0.2 of a core while it runs (measured on the 2-core development machine).
SLOTS_PER_FREE_CORE = 4.0
#: Scenarios side by side at the least (a busy machine slows them; it need not serialise them).
MIN_SLOTS = 2
#: The slowest pace calibration picks (beyond it the machine is better left alone).
MAX_TIME_SCALE = 4.0
#: A process that gets less than this share of a core counts as getting this much (a probe can
#: be unlucky; the pace would otherwise jump far past what is needed).
MIN_SHARE = 1 / MAX_TIME_SCALE
#: The shortest wall-clock window the drill leaves between a forced stop and the SIGKILL that
#: follows it, at full speed (share 1.0); a machine that gives a process a share ``s`` of a core
#: gets ``1 / s`` times as long. The worker needs ~0.01 s on its own (bench/README.md, "drill
#: load"), and the drill's own processes share the CPU with it.
FORCE_WINDOW_FLOOR = 1.0
#: A scenario process that stalled for this fraction of the scenario's tightest window saw a
#: machine too slow for that window: a failure without a loss is then inconclusive.
STALL_FRACTION = 0.3
#: Or a 1-minute load average above this many runnable processes per core.
LOAD_PER_CORE_LIMIT = 2.5


@dataclass(frozen=True)
class Machine:
    """What :func:`measure` saw."""

    cores: int
    load: float
    #: The share of a core a busy process got during the probe (1.0: a core of its own).
    share: float

    def describe(self) -> str:
        return f"load {self.load:.1f} on {self.cores} core{'s' if self.cores != 1 else ''}"


@dataclass(frozen=True)
class Pace:
    """The pace a drill runs at, and why."""

    #: Wall time per drill second, as a multiple of :data:`WALL_PER_DRILL_SECOND`.
    time_scale: float
    #: How many scenarios run side by side.
    slots: int
    machine: Machine
    #: False when ``time_scale`` was asked for (``--time-scale X``), True when calibrated.
    calibrated: bool = True
    #: What calibration would have chosen (equal to ``time_scale`` when calibrated).
    suggested: float = 1.0
    #: The shortest force-to-SIGKILL window, in wall seconds, the scenarios may give an agent.
    force_window: float = FORCE_WINDOW_FLOOR
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def speed(self) -> float:
        """Drill (AWS) seconds per wall second."""
        return 1.0 / (WALL_PER_DRILL_SECOND * self.time_scale)

    def describe(self) -> str:
        """One line: ``pace: 1.6x (load 2.1 on 2 cores, 0.62 of a core free), 3 at once``."""
        why = f"{self.machine.describe()}, {self.machine.share:.2f} of a core per process"
        line = f"pace: {self.time_scale:g}x ({why}), {self.slots} scenario(s) at once"
        if not self.calibrated:
            line += " (--time-scale as given"
            if self.suggested > self.time_scale:
                line += f"; this machine calls for {self.suggested:g}x now"
            line += ")"
        return line


def cores() -> int:
    """The CPUs this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def load() -> float:
    """The 1-minute load average (0.0 where there is none)."""
    try:
        return float(os.getloadavg()[0])
    except OSError:  # pragma: no cover
        return 0.0


_PROBE = (
    "import time\n"
    "t0 = time.monotonic(); c0 = time.process_time()\n"
    "while time.monotonic() - t0 < {seconds}: pass\n"
    "print(time.process_time() - c0, time.monotonic() - t0)\n"
)


def cpu_share(seconds: float = PROBE_SECONDS, probes: int | None = None) -> float:
    """The share of a core a busy process gets now: one probe per core spins for ``seconds``
    and reports its CPU time over its wall time; the mean of them (at most 1.0)."""
    n = probes or cores()
    code = _PROBE.format(seconds=seconds)
    procs = [
        subprocess.Popen(
            [sys.executable, "-S", "-c", code],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(n)
    ]
    shares: list[float] = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=30 + seconds * 10)
            cpu, wall = (float(x) for x in out.split())
            shares.append(cpu / wall if wall > 0 else 1.0)
        except (subprocess.TimeoutExpired, ValueError):
            proc.kill()
            proc.wait()
            shares.append(MIN_SHARE)
    return max(MIN_SHARE, min(1.0, sum(shares) / len(shares)))


def measure(seconds: float = PROBE_SECONDS, rounds: int = PROBE_ROUNDS) -> Machine:
    """Cores, load and the CPU share a process gets, now: the best of ``rounds`` probes of
    ``seconds`` each, a moment apart (another process's burst of a few tenths of a second is
    not the machine's state; CPU-burning neighbours show in every round)."""
    shares = []
    for i in range(max(1, rounds)):
        if i:
            time.sleep(PROBE_GAP)
        shares.append(cpu_share(seconds))
    share = max(shares)
    return Machine(cores=cores(), load=round(load(), 2), share=round(share, 2))


def round_up(value: float, step: float = 0.25) -> float:
    """``value`` rounded up to a multiple of ``step`` (paces read 1.25x, not 1.2345x)."""
    return math.ceil(value / step - 1e-9) * step


def round_near(value: float, step: float = 0.25) -> float:
    """``value`` rounded to the nearest multiple of ``step`` (a probe's 0.99 is a whole core)."""
    return max(step, round(value / step) * step)


def calibrate(
    requested: float | None = None,
    *,
    scenarios: int,
    base: float = 1.0,
    machine: Machine | None = None,
) -> Pace:
    """The pace for a drill of ``scenarios`` scenarios on this machine now.

    ``requested``: ``--time-scale X`` as given (used as it is; the suggestion is still
    measured, and said); None: calibrated. ``base``: the pace on a machine with a core free
    per process (1.0 for the drill; the tests run twice as fast, 0.5). The pace is ``base``
    divided by the share of a core a process gets (half a core: twice as slow); the scenarios
    side by side are :data:`SLOTS_PER_FREE_CORE` per free core (cores x share).
    """
    seen = machine or measure()
    suggested = min(MAX_TIME_SCALE, max(base, round_near(base / max(seen.share, MIN_SHARE))))
    scale = suggested if requested is None else requested
    free = seen.cores * seen.share
    slots = max(1, min(scenarios, max(MIN_SLOTS, math.floor(free * SLOTS_PER_FREE_CORE))))
    return Pace(
        time_scale=scale,
        slots=slots,
        machine=seen,
        calibrated=requested is None,
        suggested=suggested,
        force_window=FORCE_WINDOW_FLOOR / max(seen.share, MIN_SHARE),
    )


def too_slow(*, stall: float | None, load_seen: float | None, n_cores: int, window: float) -> bool:
    """Whether a scenario's machine was too slow for its tightest wall-clock ``window``: it
    stalled for :data:`STALL_FRACTION` of it, or ran above :data:`LOAD_PER_CORE_LIMIT`."""
    if stall is not None and stall >= STALL_FRACTION * window:
        return True
    return load_seen is not None and load_seen > LOAD_PER_CORE_LIMIT * n_cores


def retry_scale(time_scale: float, *, stall: float | None, window: float) -> float:
    """The pace to retry a scenario at that ran out of time or stalled: at least twice as
    slow, and slow enough that the stall seen would fit :data:`STALL_FRACTION` of the window."""
    factor = 2.0
    if stall is not None and window > 0:
        factor = max(factor, stall / (STALL_FRACTION * window))
    return round_up(time_scale * factor, 0.5)


class Watch:
    """How the machine treated one scenario's process: the highest 1-minute load average and
    the longest stall (a 20 ms sleep that woke this much late), from a thread of its own."""

    TICK = 0.02

    def __init__(self) -> None:
        self.max_load = load()
        self.max_stall = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pace-watch", daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def restart(self) -> None:
        """Forget the stalls so far (the set-up's), keep watching."""
        self.max_stall = 0.0

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(1.0)

    def _run(self) -> None:
        next_load = time.monotonic() + 1.0
        while True:
            before = time.monotonic()
            if self._stop.wait(self.TICK):
                return
            now = time.monotonic()
            self.max_stall = max(self.max_stall, now - before - self.TICK)
            if now >= next_load:
                self.max_load = max(self.max_load, load())
                next_load = now + 1.0
