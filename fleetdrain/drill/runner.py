"""``fleetdrain drill`` without ``--aws``: the scenarios, run on this machine, as a DrillReport.

Every scenario runs on a fleet of its own (:mod:`fleetdrain.drill.world.fleet`: moto with
template.yaml deployed, the embedded coordinator, the real Lambda handlers on a drill clock, real
agent processes as PID 1) in a process of its own, forked once the heavy imports are done, so
scenarios run side by side and one scenario's faults or moto state cannot touch another's.

Time: durations in the scenarios are AWS's (stopTimeout 120 s, spot's two minutes, the
lost-agent timeout, hook heartbeats, the template's budgets). At ``time_scale=1.0`` (the
default pace) one drill second takes :data:`WALL_PER_DRILL_SECOND` wall seconds;
``time_scale`` multiplies that (0.5: twice as fast, 2: twice as slow). Timeline times are
wall seconds since the scenario started; ``longest_drain_seconds`` and
``hook_completion_latency_seconds`` are drill seconds (comparable with stopTimeout).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fleetdrain.drill.report.model import DrillReport, ScenarioKind, ScenarioReport
from fleetdrain.drill.world.processes import pid_namespaces_available

#: At the default pace one drill second is this many wall seconds (10x compression).
WALL_PER_DRILL_SECOND = 0.1

#: Scenario name -> (kind, one-line description), in the order they run by default.
SCENARIOS: dict[str, tuple[ScenarioKind, str]] = {
    "stop-task": ("after", "ecs stop-task under a running build: it finishes there"),
    "deadline": (
        "after",
        "stop-task under a build longer than stopTimeout: cancelled, agent_stop, retried",
    ),
    "deploy": ("after", "service deployment: the busy task is protected and finishes"),
    "scale-in": (
        "after",
        "ASG scale-in under a build longer than stopTimeout: two-phase drain, hook completes",
    ),
    "spot": (
        "after",
        "spot interruption under a build that cannot finish: cancelled, reported, retried",
    ),
    "rebalance": ("after", "rebalance recommendation: soft drain, instance retired, nothing lost"),
    "faults": (
        "after",
        "coordinator 5xx/latency/401 bursts during drains; duplicate and reordered events",
    ),
    "wrapped-stop-task": (
        "after",
        "stop-task under a build, the agent behind wrap: SIGTERM passed on, it finishes there",
    ),
    "wrapped-scale-in": (
        "after",
        "scale-in under a long build, every agent behind wrap: IMDS soft drain, wraps hold, "
        "hook completes",
    ),
    "wrapped-spot": (
        "after",
        "spot under a build that cannot finish, agents behind wrap (IMDS notice): cancelled "
        "before the instance goes, agent_stop, retried",
    ),
    "wrapped-worker-scale-in": (
        "after",
        "scale-in under a non-Buildkite queue worker behind wrap: busy from its children, "
        "protected, its unit completes",
    ),
    "shell-pid1": ("before", "sh -c as PID 1 never forwards SIGTERM: SIGKILL, build lost"),
    "heartbeat-stops": (
        "before",
        "agent stops heartbeating while it drains (3.116.0): declared lost, build lost",
    ),
}

#: Wall seconds a scenario may take at the default pace before it is stopped as failed.
SCENARIO_WALL_LIMIT = 100.0


def run_local_drill(
    scenarios: list[str] | None = None,
    *,
    workdir: Path | None = None,
    time_scale: float = 1.0,
    progress: Callable[[str], None] = lambda _msg: None,
) -> DrillReport:
    """Run the named scenarios (all by default) on this machine, side by side; the report."""
    names = list(scenarios or SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(unknown)}")
    if time_scale <= 0:
        raise ValueError("time_scale must be > 0")
    started = time.monotonic()
    pid1, reason = pid_namespaces_available()
    report = DrillReport(
        mode="local",
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        time_scale=time_scale,
        pid_namespaces=pid1,
        pid_namespaces_reason=reason,
    )
    base = workdir or Path(tempfile.mkdtemp(prefix="fleetdrain-drill-"))
    base.mkdir(parents=True, exist_ok=True)
    _preload()
    speed = 1.0 / (WALL_PER_DRILL_SECOND * time_scale)  # drill seconds per wall second
    limit = SCENARIO_WALL_LIMIT * time_scale
    ctx = multiprocessing.get_context("fork")
    messages: Any = ctx.Queue()
    children: dict[str, tuple[Any, Connection]] = {}
    for name in names:
        parent_end, child_end = ctx.Pipe(duplex=False)
        proc = ctx.Process(
            target=_child,
            args=(name, base / name, speed, pid1, messages, child_end),
            name=f"drill-{name}",
        )
        proc.start()
        child_end.close()
        children[name] = (proc, parent_end)
        progress(f"{name}: started")
    results: dict[str, ScenarioReport] = {}
    deadline = time.monotonic() + limit
    while len(results) < len(children):
        _pump(messages, progress)
        for name, (proc, conn) in children.items():
            if name in results:
                continue
            if conn.poll():
                try:
                    results[name] = ScenarioReport.model_validate_json(conn.recv())
                except (EOFError, ValueError) as exc:
                    results[name] = _failed(name, f"no report from the scenario: {exc!r}")
                progress(f"{name}: {results[name].verdict}")
            elif not proc.is_alive():
                results[name] = _failed(name, f"the scenario process died ({proc.exitcode})")
                progress(f"{name}: FAILED")
            elif time.monotonic() > deadline:
                _stop(proc)
                results[name] = _failed(name, f"did not finish in {limit:.0f}s")
                progress(f"{name}: FAILED (timeout)")
        time.sleep(0.05)
    _pump(messages, progress)
    for proc, _conn in children.values():
        proc.join(10)
        if proc.is_alive():
            _stop(proc)
    report.scenarios = [results[n] for n in names]
    report.wall_seconds = round(time.monotonic() - started, 2)
    progress(f"done in {report.wall_seconds:.1f}s; logs under {base}")
    return report


def _preload() -> None:
    # Import everything heavy once, before forking: each scenario process starts warm.
    import boto3  # noqa: F401
    import moto  # noqa: F401
    import samtranslator.translator.transform  # noqa: F401


def _pump(messages: Any, progress: Callable[[str], None]) -> None:
    while True:
        try:
            msg = messages.get_nowait()
        except Exception:
            return
        progress(str(msg))


def _stop(proc: Any) -> None:
    # SIGTERM first: the scenario process cleans up its agent processes on the way out.
    with contextlib.suppress(Exception):
        proc.terminate()
        proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join(5)


def _failed(name: str, why: str) -> ScenarioReport:
    kind, description = SCENARIOS[name]
    return ScenarioReport(name=name, description=description, kind=kind, ok=False, notes=[why])


def _child(
    name: str, workdir: Path, speed: float, pid1: bool, messages: Any, conn: Connection
) -> None:
    """The scenario process: run it, send the report, exit (without the parent's atexit)."""
    workdir.mkdir(parents=True, exist_ok=True)
    # The handlers print EMF metrics and JSON logs to stdout: into the scenario's log file.
    log = open(workdir / "scenario.log", "ab", buffering=0)  # noqa: SIM115
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # Fresh stream objects: the parent's may have been locked by one of its other threads (the
    # live view) at the moment of the fork, and that thread does not exist here to unlock them.
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code = 0
    try:
        report = run_scenario(name, workdir, speed, pid1, lambda m: messages.put(m))
        conn.send(report.model_dump_json())
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        messages.close()
        messages.join_thread()
    os._exit(code)


def run_scenario(
    name: str,
    workdir: Path,
    speed: float,
    pid1: bool,
    progress: Callable[[str], None] = lambda _m: None,
) -> ScenarioReport:
    """Run one scenario on a fleet of its own, in this process; its report.

    ``speed``: drill seconds per wall second.
    """
    from fleetdrain.drill.metrics import fill_report
    from fleetdrain.drill.scenarios import SPECS, Run
    from fleetdrain.drill.world.fleet import local_fleet

    spec = SPECS[name]
    kind, description = SCENARIOS[name]
    report = ScenarioReport(name=name, description=description, kind=kind)
    started = time.monotonic()
    with local_fleet(
        name,
        workdir=workdir,
        time_scale=speed,
        instances=spec.instances,
        notification_queue=spec.notification_queue,
        pid1=pid1,
        progress=progress,
    ) as fleet:
        run = Run(fleet, report)
        fleet.timeline.t0 = started
        try:
            spec.run(run)
        except Exception as exc:
            report.notes.append(f"{type(exc).__name__}: {exc}")
            traceback.print_exc()
        # Let the last events reach the controller before the fleet goes down.
        with contextlib.suppress(TimeoutError):
            fleet.wait(fleet.router.idle, 5, "the router to settle")
        fill_report(run)
    report.wall_seconds = round(time.monotonic() - started, 2)
    return report
