"""``fleetdrain drill`` without ``--aws``: the scenarios, run on this machine, as a DrillReport.

Every scenario runs on a fleet of its own (:mod:`fleetdrain.drill.world.fleet`: moto with
template.yaml deployed, the embedded coordinator, the real Lambda handlers on a drill clock, real
agent processes as PID 1) in a process of its own, forked once the heavy imports are done, so
one scenario's faults or moto state cannot touch another's. As many run side by side as the
machine has room for (:mod:`fleetdrain.drill.pace`: cores and the CPU a process gets), the
longest first; the others wait their turn.

Time: durations in the scenarios are AWS's (stopTimeout 120 s, spot's two minutes, the
lost-agent timeout, hook heartbeats, the template's budgets). At ``time_scale=1.0`` one drill
second takes :data:`WALL_PER_DRILL_SECOND` wall seconds; ``time_scale`` multiplies that (0.5:
twice as fast, 2: twice as slow). By default it is calibrated at the start from a short
measurement (:func:`fleetdrain.drill.pace.calibrate`). Timeline times and every figure of the
report are AWS seconds (drill seconds); wall seconds are given beside them.

The agent behind wrap in the wrapped scenarios is the drill's ``wrapped_agent``
(:mod:`fleetdrain.drill.wrapped_agent`: the Go ``buildkite-agent``, or fleetdrain's agent as its
stand-in): said in a progress line at the start, handed to every scenario process, and kept in
the report.

Verdicts: a scenario has :data:`SCENARIO_WALL_LIMIT` x the pace, from its own start. At the
limit it stops itself and reports what it saw, its timeline included (if it cannot, its
timeline is read from its work directory): *inconclusive*, with the machine's load and the pace
to retry at, never passed and never lost. A failure without a lost build on a machine that
stalled the scenario's process for a good part of its tightest window is inconclusive too
(:func:`fleetdrain.drill.metrics.judge`).

Nothing a drill starts outlives it (:func:`_contained`, around :func:`run_local_drill`), on
every way out: a normal end, a scenario past its time limit, an exception, SIGINT or SIGTERM to
the drill (every scenario process is stopped, SIGTERM then SIGKILL, and the drill exits with
:class:`DrillInterrupted`: 130 or 143 and a line saying what was stopped), or the drill
SIGKILLed. A scenario process dies with the drill (PR_SET_PDEATHSIG), its agents die with it
(the same, on ``unshare``) and their PID namespaces with them; everything the drill starts
carries the run's marker in its environment and is swept on the way out, by the drill or, if
the drill was SIGKILLed, by its guard process (:mod:`fleetdrain.drill.world.processes`). A
scenario process that fails sends the exception as its report's note; one that dies without a
word gets its exit status and the last line of its ``scenario.log`` there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import multiprocessing
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from fleetdrain.drill.pace import WALL_PER_DRILL_SECOND, Pace, calibrate
from fleetdrain.drill.report.model import DrillReport, ScenarioKind, ScenarioReport, WrappedAgent
from fleetdrain.drill.world.processes import contained, die_with_parent, pid_namespaces_available

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

#: Event sequences a real fleet produces (issue 11; bodies in
#: :mod:`fleetdrain.drill.scenarios_sequences`): run by name (``--scenario``), not by default,
#: so that the default drill stays about a minute.
SEQUENCE_SCENARIOS: dict[str, tuple[ScenarioKind, str]] = {
    "rebalance-then-spot": (
        "after",
        "rebalance on an idle instance, an agent placed there, then the spot warning: a new "
        "drain, forced, agent_stop, retried",
    ),
    "rebalance-then-scale-in": (
        "after",
        "rebalance on an idle instance, then CapacityRebalance's scale-in under a build: soft "
        "drain on its own budget, the build finishes, hook completes",
    ),
    "stopped-outside-the-group": (
        "after",
        "instance stopped from the console under a long build: forced at once, agent_stop, retried",
    ),
    "scheduled-change": (
        "after",
        "AWS Health instance retirement ahead: soft drain, the build finishes, instance retired",
    ),
}

#: The spot storm (issue 12; body in :mod:`fleetdrain.drill.scenarios_storm`): by name only
#: (it runs 4 agents a core at once, up to 20), so that the default drill stays about a minute.
STORM_SCENARIOS: dict[str, tuple[ScenarioKind, str]] = {
    "spot-storm": (
        "after",
        "spot storm: up to 20 instances (4 a core, half busy) interrupted in the same second in "
        "a 1,000-agent org, REST limit enforced: every build cancelled, reported, retried; "
        "every drain ends",
    ),
    "spot-storm-graphql": (
        "after",
        "the spot storm with agents found by GraphQL lookups (CoordinatorGraphqlUrl): the same "
        "outcome, no REST listing",
    ),
}

#: Every scenario a name can select.
ALL_SCENARIOS: dict[str, tuple[ScenarioKind, str]] = {
    **SCENARIOS,
    **SEQUENCE_SCENARIOS,
    **STORM_SCENARIOS,
}

#: Wall seconds a scenario may take at ``time_scale`` 1.0 (scaled by it), from its own start,
#: before it stops itself as inconclusive.
SCENARIO_WALL_LIMIT = 100.0
#: Wall seconds (times the pace) a scenario at its limit gets to send its report; then it is
#: stopped and its report made from its timeline file.
REPORT_GRACE = 20.0
#: Wall seconds each scenario takes alone at ``time_scale`` 1.0 on the development machine:
#: the longest start first, so that the last one to start is a short one.
EXPECTED_WALL = {
    "shell-pid1": 36,
    "spot-storm": 20,
    "scale-in": 28,
    "wrapped-scale-in": 27,
    "wrapped-worker-scale-in": 25,
    "heartbeat-stops": 25,
    "deploy": 20,
    "faults": 20,
    "deadline": 17,
    "wrapped-spot": 17,
    "spot": 17,
    "rebalance": 12,
    "stop-task": 8,
    "wrapped-stop-task": 8,
}


# ------------------------------------------------------------------ containment


class DrillInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM reached the drill; every scenario process it ran was stopped."""

    def __init__(self, signum: int, stopped: list[str] | None = None, processes: int = 0) -> None:
        self.signum = signum
        self.stopped = list(stopped or [])
        self.processes = processes
        #: Processes of the run still alive after the stop and the sweep (0, or a bug).
        self.left = 0
        super().__init__(signal.Signals(signum).name)

    @property
    def exit_status(self) -> int:
        """128 + the signal's number: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum

    def __str__(self) -> str:
        what = signal.Signals(self.signum).name
        if not self.stopped:
            return f"interrupted by {what}: no scenario was running"
        names = ", ".join(self.stopped)
        left = f"{self.left} still running" if self.left else "nothing left running"
        return (
            f"interrupted by {what}: stopped {len(self.stopped)} scenario(s) ({names}) and "
            f"the {self.processes} process(es) they ran; {left}"
        )


#: Wall seconds a stopped scenario process gets to take its fleet down before SIGKILL.
STOP_GRACE = 5.0


def _stop_all(procs: list[Any], hurry: Callable[[], bool] = lambda: False) -> None:
    """SIGTERM every scenario process (each takes its fleet down), SIGKILL what is left after
    :data:`STOP_GRACE` (or at once when ``hurry()``), and reap them."""
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.terminate()
    deadline = time.monotonic() + STOP_GRACE
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline and not hurry():
        time.sleep(0.05)
    for proc in procs:
        with contextlib.suppress(Exception):
            if proc.is_alive():
                proc.kill()
            proc.join(5)


def _contained(run: Callable[..., DrillReport]) -> Callable[..., DrillReport]:
    """The drill, contained: everything it starts is marked and swept on the way out
    (:func:`~fleetdrain.drill.world.processes.contained`, with its guard for a SIGKILLed
    drill); SIGINT and SIGTERM stop every scenario process it started and raise
    :class:`DrillInterrupted`; an exception stops them too."""

    @functools.wraps(run)
    def contained_run(*args: Any, **kwargs: Any) -> DrillReport:
        progress: Callable[[str], None] = kwargs.get("progress") or (lambda _m: None)
        before = set(multiprocessing.active_children())
        caught: list[int] = []
        done = threading.Event()

        def on_signal(signum: int, _frame: object) -> None:
            caught.append(signum)
            if len(caught) == 1 and not done.is_set():
                raise DrillInterrupted(signum)
            # A second one while the scenarios are being stopped: SIGKILL them now.

        old: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        report: DrillReport | None = None
        interrupted: DrillInterrupted | None = None
        try:
            with contained() as box:
                try:
                    report = run(*args, **kwargs)
                except KeyboardInterrupt as exc:
                    done.set()
                    signum = exc.signum if isinstance(exc, DrillInterrupted) else signal.SIGINT
                    procs = [p for p in multiprocessing.active_children() if p not in before]
                    running = len(box.marked())
                    progress(f"{signal.Signals(signum).name}: stopping every scenario")
                    _stop_all(procs, hurry=lambda: len(caught) > 1)
                    names = [str(p.name).removeprefix("drill-") for p in procs]
                    interrupted = DrillInterrupted(signum, names, running)
                finally:
                    done.set()
                    # Every way out: no scenario process of this run stays.
                    _stop_all([p for p in multiprocessing.active_children() if p not in before])
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
        if box.swept:
            progress(f"killed {len(box.swept)} process(es) left running: " + "; ".join(box.swept))
        if interrupted is None and caught:  # it came as the drill was finishing
            interrupted = DrillInterrupted(caught[0])
        if interrupted is not None:
            interrupted.left = len(box.marked())
            raise interrupted from None
        assert report is not None
        return report

    return contained_run


@_contained
def run_local_drill(
    scenarios: list[str] | None = None,
    *,
    workdir: Path | None = None,
    time_scale: float | None = None,
    concurrency: int | None = None,
    base_time_scale: float = 1.0,
    progress: Callable[[str], None] = lambda _msg: None,
    wrapped_agent: WrappedAgent | None = None,
) -> DrillReport:
    """Run the named scenarios (all by default) on this machine; the report.

    ``time_scale``: None calibrates it (:func:`fleetdrain.drill.pace.calibrate`, from
    ``base_time_scale`` on an idle machine); a number is used as it is. ``concurrency``: how
    many scenarios run side by side (default: what the machine has room for).
    ``wrapped_agent``: what the wrapped scenarios run behind wrap
    (:func:`fleetdrain.drill.wrapped_agent.choose`; default: fleetdrain's agent as the
    stand-in, ``fleetdrain drill`` looks for ``buildkite-agent`` on PATH)."""
    names = list(scenarios or SCENARIOS)
    unknown = [n for n in names if n not in ALL_SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s): {', '.join(unknown)}")
    if time_scale is not None and time_scale <= 0:
        raise ValueError("time_scale must be > 0")
    if concurrency is not None and concurrency < 1:
        raise ValueError("concurrency must be >= 1")
    started = time.monotonic()
    pid1, reason = pid_namespaces_available()
    pace = calibrate(time_scale, scenarios=len(names), base=base_time_scale)
    if concurrency is not None:
        pace = dataclasses.replace(pace, slots=min(concurrency, len(names)))
    progress(pace.describe())
    if wrapped_agent is None:
        from fleetdrain.drill.wrapped_agent import DEFAULT, stand_in

        wrapped_agent = stand_in(DEFAULT)
    progress(wrapped_agent.sentence("run"))
    report = DrillReport(
        mode="local",
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
        time_scale=pace.time_scale,
        pace=pace.describe(),
        cores=pace.machine.cores,
        load=pace.machine.load,
        concurrency=pace.slots,
        pid_namespaces=pid1,
        pid_namespaces_reason=reason,
        wrapped_agent=wrapped_agent,
    )
    base = workdir or Path(tempfile.mkdtemp(prefix="fleetdrain-drill-"))
    base.mkdir(parents=True, exist_ok=True)
    _preload()
    limit = SCENARIO_WALL_LIMIT * pace.time_scale
    hard_limit = limit + REPORT_GRACE * pace.time_scale
    global _PACE
    _PACE = (pace, limit)  # what each forked scenario process runs by (run_scenario)
    ctx = multiprocessing.get_context("fork")
    messages: Any = ctx.Queue()
    pending = sorted(names, key=lambda n: -EXPECTED_WALL.get(n, 0))
    children: dict[str, tuple[Any, Connection, float]] = {}
    results: dict[str, ScenarioReport] = {}
    while len(results) < len(names):
        while pending and len(children) - len(results) < pace.slots:
            name = pending.pop(0)
            parent_end, child_end = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_child,
                args=(name, base / name, pace.speed, pid1, messages, child_end, wrapped_agent),
                name=f"drill-{name}",
            )
            proc.start()
            child_end.close()
            children[name] = (proc, parent_end, time.monotonic())
            progress(f"{name}: started")
        _pump(messages, progress)
        for name, (proc, conn, since) in children.items():
            if name in results:
                continue
            if conn.poll():
                try:
                    results[name] = ScenarioReport.model_validate_json(conn.recv())
                except (EOFError, ValueError) as exc:
                    why = f"no report from the scenario ({_exit_text(proc)})"
                    if isinstance(exc, ValueError):
                        why = f"a report that does not parse ({exc})"
                    results[name] = _failed(name, why + _log_tail(base / name))
                # One that failed before it could fill in its report keeps what it recorded.
                _keep_timeline(results[name], base / name)
                progress(f"{name}: {results[name].verdict}")
            elif not proc.is_alive():
                why = f"the scenario process died ({_exit_text(proc)})"
                results[name] = _failed(name, why + _log_tail(base / name))
                _keep_timeline(results[name], base / name)
                progress(f"{name}: FAILED")
            elif time.monotonic() > since + hard_limit:
                _stop(proc)
                results[name] = _out_of_time(name, base / name, pace, time.monotonic() - since)
                progress(f"{name}: {results[name].verdict} (out of time)")
        time.sleep(0.05)
    _pump(messages, progress)
    for proc, _conn, _since in children.values():
        proc.join(10)
        if proc.is_alive():
            _stop(proc)
    report.scenarios = [results[n] for n in names]
    report.wall_seconds = round(time.monotonic() - started, 2)
    progress(f"done in {report.wall_seconds:.1f}s; logs under {base}")
    return report


#: (pace, wall limit) of the drill that forked this scenario process (see run_scenario).
_PACE: tuple[Pace, float] | None = None


def _keep_timeline(report: ScenarioReport, workdir: Path) -> None:
    """A scenario that sent no report of its own keeps the timeline it recorded."""
    from fleetdrain.drill.world.fleet import TIMELINE_FILE, read_timeline

    if not report.timeline:
        report.timeline = read_timeline(workdir / TIMELINE_FILE)


def _out_of_time(name: str, workdir: Path, pace: Pace, wall: float) -> ScenarioReport:
    """The report of a scenario that did not even report at its limit: inconclusive, its
    timeline from its file."""
    from fleetdrain.drill.metrics import out_of_time_cause
    from fleetdrain.drill.pace import load, retry_scale

    kind, description = ALL_SCENARIOS[name]
    report = ScenarioReport(name=name, description=description, kind=kind)
    _keep_timeline(report, workdir)
    report.wall_seconds = round(wall, 2)
    report.load = round(load(), 2)
    report.retry_time_scale = retry_scale(pace.time_scale, stall=None, window=pace.force_window)
    report.notes.append(
        f"did not finish (nor report) in {wall:.0f}s wall; the timeline is what it recorded"
    )
    report.judge("inconclusive", out_of_time_cause(report, pace.machine.cores, wall))
    if report.timeline:
        report.aws_seconds = max(e.t for e in report.timeline)
    return report


#: Imported before the scenario processes are forked, so that none of them imports (and
#: compiles, and builds the classes of) ~450 modules of its own: moto's backends that
#: template.yaml's resources need, the handlers, the coordinator, the scenarios.
PRELOAD = (
    "boto3",
    "moto",
    "moto.backends",
    "moto.cloudformation.parsing",
    "moto.cloudformation.responses",
    "moto.autoscaling.responses",
    "moto.ec2.responses",
    "moto.ecs.responses",
    "moto.dynamodb.responses",
    "moto.sqs.responses",
    "moto.awslambda.responses",
    "moto.events.responses",
    "moto.iam.responses",
    "moto.s3.responses",
    "moto.secretsmanager.responses",
    "moto.sts.responses",
    "moto.logs.responses",
    *(
        f"moto.{backend}.models"
        for backend in (
            "autoscaling",
            "awslambda",
            "cloudformation",
            "dynamodb",
            "ec2",
            "ecs",
            "events",
            "iam",
            "s3",
            "secretsmanager",
            "sqs",
        )
    ),
    "httpcore",
    "uvicorn.protocols.http.h11_impl",
    "uvicorn.lifespan.on",
    "uvicorn.loops.asyncio",
    "samtranslator.translator.transform",
    "aws_lambda_powertools",
    "httpx",
    "uvicorn",
    "fleetdrain.controller.runtime",
    "fleetdrain.controller.lifecycle_hook",
    "fleetdrain.controller.spot_interruption",
    "fleetdrain.controller.drain_monitor",
    "fleetdrain.drill.scenarios",
    "fleetdrain.drill.scenarios_sequences",
    "fleetdrain.drill.scenarios_storm",
    "fleetdrain.drill.metrics",
)


def _preload() -> None:
    # Everything heavy once, before forking: each scenario process starts warm (a fleet's
    # set-up then takes ~2 CPU-seconds instead of ~4: on 2 cores, 13 of them add up).
    import importlib

    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    from fleetdrain.drill.world.fleet import preload_aws_models

    preload_aws_models()


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


def _exit_text(proc: Any) -> str:
    """How a scenario process ended, for a note: ``exit 1``, ``SIGKILL``, ``still running``."""
    proc.join(1)
    code = proc.exitcode
    if code is None:
        return "still running"
    return signal.Signals(-code).name if code < 0 else f"exit {code}"


def _log_tail(workdir: Path) -> str:
    """``; scenario.log ends: <its last line>`` (the exception, usually), or nothing."""
    try:
        lines = (workdir / "scenario.log").read_text(errors="replace").splitlines()
    except OSError:
        return ""
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    return f"; scenario.log ends: {last[:300]}" if last else ""


def _failed(name: str, why: str) -> ScenarioReport:
    kind, description = ALL_SCENARIOS[name]
    return ScenarioReport(name=name, description=description, kind=kind, ok=False, notes=[why])


def _child(
    name: str,
    workdir: Path,
    speed: float,
    pid1: bool,
    messages: Any,
    conn: Connection,
    wrapped_agent: WrappedAgent | None = None,
) -> None:
    """The scenario process: run it, send the report, exit (without the parent's atexit)."""
    # Die with the drill, even a SIGKILLed one (the agents die with this process in turn).
    parent = multiprocessing.parent_process()
    if parent is not None and parent.pid is not None:
        die_with_parent(parent.pid)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # A Ctrl-C reaches the terminal's whole foreground group: the drill stops the scenarios.
    # (A no-op handler, not SIG_IGN: an ignored signal would stay ignored in the agents.)
    signal.signal(signal.SIGINT, lambda *_: None)
    workdir.mkdir(parents=True, exist_ok=True)
    # The handlers print EMF metrics and JSON logs to stdout: into the scenario's log file.
    log = open(workdir / "scenario.log", "ab", buffering=0)  # noqa: SIM115
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    # Fresh stream objects: the parent's may have been locked by one of its other threads (the
    # live view) at the moment of the fork, and that thread does not exist here to unlock them.
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    code = 0
    try:
        report = run_scenario(
            name, workdir, speed, pid1, lambda m: messages.put(m), wrapped_agent=wrapped_agent
        )
        conn.send(report.model_dump_json())
    except BaseException as exc:
        traceback.print_exc()
        code = 1
        # The cause goes into the report, not only into scenario.log.
        if isinstance(exc, SystemExit) and exc.code == 143:
            why = "stopped by SIGTERM"
        else:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        note = f"the scenario failed: {why} (traceback in {workdir / 'scenario.log'})"
        with contextlib.suppress(Exception):
            conn.send(_failed(name, note).model_dump_json())
        messages.cancel_join_thread()  # the drill may no longer read its messages
    finally:
        conn.close()
        sys.stdout.flush()
        sys.stderr.flush()
        messages.close()
        messages.join_thread()
    os._exit(code)


class ScenarioTimeout(BaseException):
    """The scenario reached its wall-clock limit (raised in its main thread; a BaseException,
    so that no ``except Exception`` on the way swallows it)."""


class _TimeLimit:
    """Raises :class:`ScenarioTimeout` in the main thread after ``seconds`` wall seconds, once
    (a SIGUSR1 from a timer thread, so that a sleep or a wait is interrupted too), unless
    :meth:`disarm` came first. Inert off the main thread or without ``seconds``."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._armed = False
        self._timer: threading.Timer | None = None
        self._old: Any = None

    def __enter__(self) -> _TimeLimit:
        if self.seconds is None or threading.current_thread() is not threading.main_thread():
            return self
        main = threading.main_thread().ident
        assert main is not None
        self._armed = True
        self._old = signal.signal(signal.SIGUSR1, self._on_signal)
        self._timer = threading.Timer(self.seconds, signal.pthread_kill, (main, signal.SIGUSR1))
        self._timer.daemon = True
        self._timer.start()
        return self

    def _on_signal(self, _signum: int, _frame: object) -> None:
        if self._armed:
            self._armed = False
            raise ScenarioTimeout(f"ran out of time after {self.seconds:.0f}s wall")

    def disarm(self) -> None:
        self._armed = False  # a signal already on its way no longer raises
        if self._timer is not None:
            self._timer.cancel()

    def __exit__(self, *_exc: object) -> None:
        self.disarm()
        if self._old is not None:
            signal.signal(signal.SIGUSR1, self._old)
            self._old = None


def run_scenario(
    name: str,
    workdir: Path,
    speed: float,
    pid1: bool,
    progress: Callable[[str], None] = lambda _m: None,
    *,
    pace: Pace | None = None,
    limit: float | None = None,
    wrapped_agent: WrappedAgent | None = None,
) -> ScenarioReport:
    """Run one scenario on a fleet of its own, in this process; its report, judged.

    ``speed``: drill seconds per wall second. ``pace`` and ``limit`` (wall seconds) default to
    the drill's that forked this process. ``wrapped_agent``: the agent a wrapped scenario runs
    behind wrap (default: the stand-in). At the limit the scenario stops where it is, and its
    report (counts, notes, the timeline so far) is made from what the fleet saw.
    """
    from fleetdrain.drill.metrics import fill_report, judge
    from fleetdrain.drill.pace import Watch, calibrate
    from fleetdrain.drill.scenarios import SPECS, Run
    from fleetdrain.drill.scenarios_sequences import SPECS as SEQUENCE_SPECS
    from fleetdrain.drill.scenarios_storm import SPECS as STORM_SPECS
    from fleetdrain.drill.world.fleet import TIMELINE_FILE, local_fleet, read_timeline

    if pace is None and _PACE is not None:
        pace, limit = _PACE[0], (_PACE[1] if limit is None else limit)
    if pace is None:
        pace = calibrate(1.0 / (WALL_PER_DRILL_SECOND * speed), scenarios=1)
    spec = {**SPECS, **SEQUENCE_SPECS, **STORM_SPECS}[name]
    kind, description = ALL_SCENARIOS[name]
    report = ScenarioReport(name=name, description=description, kind=kind)
    started = time.monotonic()
    timed_out: str | None = None
    run: Run | None = None
    with Watch() as watch:
        try:
            with (
                _TimeLimit(limit) as time_limit,
                local_fleet(
                    name,
                    workdir=workdir,
                    time_scale=speed,
                    instances=spec.instances,
                    notification_queue=spec.notification_queue,
                    graphql=spec.graphql,
                    pid1=pid1,
                    progress=progress,
                ) as fleet,
            ):
                run = Run(fleet, report, force_window=pace.force_window)
                if wrapped_agent is not None:
                    run.wrapped_agent = wrapped_agent
                fleet.timeline.t0 = started
                # What the set-up built (moto's backends, the deployed template: a big heap) is
                # never garbage: out of the collector's way, or every full collection stalls
                # this process (the coordinator, the handlers) for tenths of a second, seconds
                # on a busy machine, in the middle of a drain.
                gc.collect()
                gc.freeze()
                watch.restart()  # the set-up's stalls are not the scenario's
                try:
                    spec.run(run)
                except ScenarioTimeout as exc:
                    timed_out = str(exc)
                except Exception as exc:
                    run.note(f"{type(exc).__name__}: {exc}")
                    traceback.print_exc()
                time_limit.disarm()  # what follows is quick and must not be cut short
                if timed_out is None:
                    # Let the last events reach the controller before the fleet goes down.
                    with contextlib.suppress(TimeoutError):
                        fleet.wait(fleet.router.idle, 5 * run.time_scale, "the router to settle")
                fill_report(run)
        except ScenarioTimeout as exc:  # while the fleet was set up or taken down
            timed_out = timed_out or str(exc)
            if run is None:
                report.timeline = read_timeline(workdir / TIMELINE_FILE)
        watch.stop()
    report.wall_seconds = round(time.monotonic() - started, 2)
    report.load = round(watch.max_load, 2)
    report.max_stall_seconds = round(watch.max_stall, 3)
    if report.timeline:
        report.aws_seconds = round(max(e.t for e in report.timeline), 2)
    judge(
        report,
        pace=pace,
        window=run.force_window if run is not None else pace.force_window,
        timed_out=timed_out,
        expected=run.expected if run is not None else None,
    )
    return report
