"""The whole drill, N times, with K CPU-burning processes beside it (issue 14).

    .venv/bin/python bench/drill_load.py                 # 5 runs, one busy loop per core
    .venv/bin/python bench/drill_load.py --burners 0     # 5 runs on the machine as it is
    .venv/bin/python bench/drill_load.py --runs 2 --burners 2 --scenario spot --scenario rebalance

Each run: K busy loops (``python -c 'while True: pass'``) are started, as a shell's ``&`` would
start them (in this script's session, so in the drill's scheduling group: with Linux's
autogroup scheduling a session is one group, and the agents, each a session of its own, are
not in it), or with ``--burner-session own`` each in a session of its own, as other work on the
machine would be (each loop then weighs as much as the drill's whole group and as each agent:
the harder case), a second later the
drill (``python -m fleetdrain.cli drill``, its pace calibrated unless ``--time-scale`` is
given), then the loops are stopped. Printed per run: pass / inconclusive / failed (the drill's
exit status 0 / 3 / 1) with the scenarios' count of each, the wall time, the pace the drill
chose, and the processes the run left over once the drill had exited (every process that
carries the run's marker in its environment or names its work directory: must be 0).

The exit status is 0 whatever the figures; ``--strict``: 1 unless every run passed and left
nothing over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Put in the drill's environment; everything the drill starts inherits it.
MARKER = "FLEETDRAIN_BENCH_RUN"
VERDICTS = {0: "pass", 1: "failed", 3: "inconclusive"}


@dataclass
class RunResult:
    run: int
    verdict: str
    exit_status: int
    wall_seconds: float
    pace: str
    time_scale: float | None
    passed: int = 0
    inconclusive: int = 0
    failed: int = 0
    left_over: list[str] = field(default_factory=list)
    causes: list[str] = field(default_factory=list)
    load_before: float = 0.0


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def start_burners(k: int, own_session: bool = False) -> list[subprocess.Popen[bytes]]:
    """K busy loops, in this session (the drill's scheduling group, as a shell's ``&``), or
    each in a session of its own."""
    # Each loop dies with this script, however it ends (PR_SET_PDEATHSIG: a SIGTERM or
    # SIGKILL to the script would otherwise leave them burning).
    loop = (
        "import ctypes, os, signal\n"
        "ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
        f"if os.getppid() != {os.getpid()}: raise SystemExit\n"
        "while True: pass\n"
    )
    return [
        subprocess.Popen(
            [sys.executable, "-c", loop],
            stdin=subprocess.DEVNULL,
            start_new_session=own_session,
        )
        for _ in range(k)
    ]


def stop_burners(burners: list[subprocess.Popen[bytes]]) -> None:
    for proc in burners:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
    for proc in burners:
        proc.wait(10)


def left_over(marker: str, workdir: Path) -> list[str]:
    """Live processes that carry ``MARKER=marker`` or name ``workdir`` (``pid cmdline``)."""
    needle_env = f"{MARKER}={marker}".encode()
    needle_dir = str(workdir).encode()
    found: list[str] = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as fh:
                env = fh.read()
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read()
            with open(f"/proc/{entry}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        if state == b"Z" and not cmdline:
            continue  # a zombie waiting for its (foreign) parent: nothing runs
        if needle_env in env.split(b"\0") or needle_dir in env or needle_dir in cmdline:
            words = cmdline.replace(b"\0", b" ").decode(errors="replace")
            found.append(f"{entry} {words[:120]}")
    return found


def run_once(i: int, args: argparse.Namespace, base: Path) -> RunResult:
    workdir = base / f"run-{i}"
    report = base / f"run-{i}.json"
    log = base / f"run-{i}.log"
    marker = uuid.uuid4().hex
    command = [sys.executable, "-m", "fleetdrain.cli", "drill", "--json", str(report)]
    command += ["--workdir", str(workdir)]
    for name in args.scenario or []:
        command += ["--scenario", name]
    if args.time_scale is not None:
        command += ["--time-scale", str(args.time_scale)]
    env = {**os.environ, MARKER: marker}
    load_before = os.getloadavg()[0]
    burners = start_burners(args.burners, own_session=args.burner_session == "own")
    try:
        time.sleep(1.0 if args.burners else 0.0)  # the loops run before the drill measures
        started = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.run(
                command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, check=False
            )
        wall = time.monotonic() - started
    finally:
        stop_burners(burners)
    time.sleep(0.5)  # what the drill's exit leaves gets a moment to go
    result = RunResult(
        run=i,
        verdict=VERDICTS.get(proc.returncode, f"error {proc.returncode}"),
        exit_status=proc.returncode,
        wall_seconds=round(wall, 1),
        pace="",
        time_scale=None,
        left_over=left_over(marker, workdir),
        load_before=round(load_before, 2),
    )
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(report.read_text())
        result.time_scale = data.get("time_scale")
        # A drill from before issue 14 has no pace line: its fixed time scale.
        result.pace = data.get("pace") or f"time scale {result.time_scale:g} (fixed)"
        for s in data.get("scenarios", []):
            outcome = s.get("outcome") or ("passed" if s.get("ok") else "failed")
            if outcome == "passed":
                result.passed += 1
            elif outcome == "inconclusive":
                result.inconclusive += 1
                result.causes.append(f"{s['name']}: inconclusive: {s.get('cause')}")
            else:
                result.failed += 1
                result.causes.append(f"{s['name']}: FAILED: {s.get('cause') or s.get('notes')}")
    if not result.pace:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        result.causes.append("no report: " + " | ".join(tail))
    return result


def print_run(r: RunResult, runs: int) -> None:
    print(
        f"run {r.run}/{runs}: {r.verdict:<12} wall {r.wall_seconds:6.1f}s  "
        f"scenarios {r.passed} passed, {r.inconclusive} inconclusive, {r.failed} failed  "
        f"left over: {len(r.left_over)}",
        flush=True,
    )
    print(f"    {r.pace or '(no pace: no report)'}  (load before the run {r.load_before})")
    for cause in r.causes:
        print(f"    {cause}")
    for proc in r.left_over:
        print(f"    left running: {proc}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="drills to run (default 5)")
    parser.add_argument(
        "--burners",
        type=int,
        default=cores(),
        help=f"busy loops beside each drill (default: one per core, {cores()} here)",
    )
    parser.add_argument(
        "--burner-session",
        choices=("same", "own"),
        default="same",
        help="same: the loops in this session, as a shell's & (default); own: each in a session "
        "(a scheduling group) of its own, as other work on the machine",
    )
    parser.add_argument("--scenario", action="append", help="only these scenarios (repeatable)")
    parser.add_argument("--time-scale", type=float, default=None, help="default: calibrated")
    parser.add_argument("--keep", metavar="DIR", help="keep the runs' reports and logs here")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 unless all passed clean")
    args = parser.parse_args(argv)
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="drill-load-"))
    base.mkdir(parents=True, exist_ok=True)
    print(
        f"drill_load: {args.runs} run(s) of the drill"
        f" ({', '.join(args.scenario) if args.scenario else 'every scenario'})"
        f" with {args.burners} busy loop(s) beside it ({args.burner_session} session),"
        f" {cores()} core(s); logs under {base}",
        flush=True,
    )
    results: list[RunResult] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for i in range(1, args.runs + 1):
        result = run_once(i, args, base)
        results.append(result)
        print_run(result, args.runs)
    counts = {v: sum(1 for r in results if r.verdict == v) for v in ("pass", "inconclusive")}
    others = len(results) - sum(counts.values())
    walls = sorted(r.wall_seconds for r in results)
    scales = sorted({r.time_scale for r in results if r.time_scale is not None})
    left = sum(len(r.left_over) for r in results)
    print(
        f"summary: {counts['pass']}/{len(results)} passed, {counts['inconclusive']} inconclusive,"
        f" {others} failed; wall {walls[0]:.0f}-{walls[-1]:.0f}s (median"
        f" {walls[len(walls) // 2]:.0f}s); pace {', '.join(f'{s:g}x' for s in scales) or '-'};"
        f" processes left over: {left}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    clean = counts["pass"] == len(results) and left == 0
    return 1 if args.strict and not clean else 0


if __name__ == "__main__":
    sys.exit(main())
