"""Benchmark: the real agent process draining against the embedded coordinator on loopback.

    python bench/agent_drain.py            # ~80 s: 256 MB of job output, 10 idle runs
    python bench/agent_drain.py --quick    # ~25 s: 32 MB, fewer runs

Not a test: it prints a table of figures with the goal beside each and exits 0 whatever they
are (``--strict`` exits 1 when a goal is missed). The agent runs as PID 1 of its own PID
namespace when ``unshare`` works here (the table says which), exactly as
:func:`fleetdrain.drill.world.processes.spawn_agent` runs it for the tests; signals come from
outside the namespace, as ECS sends them.

The coordinator runs in a process of its own by default (this script re-executed with
``--serve-coordinator``, driven over a JSON-lines pipe), so that its HTTP handling, gunzip and
the benchmark's own bookkeeping do not share an interpreter (and a GIL) with anything else; on a
small machine it still shares the cores, and the table shows how much CPU it used.
``--coordinator-in-process`` runs it in a thread of this process instead, as the tests do.

Figures:

1. idle SIGTERM -> agent process exit (pidfd of the agent's host pid: the exact moment).
2. job end -> agent exit after a SIGTERM mid-job. The job prints ``time.monotonic()`` as its
   very last act; CLOCK_MONOTONIC is system-wide, so it compares with this process's clock and
   with the coordinator's event times (also monotonic), which give "finish -> exit" too.
3. the longest heartbeat gap (``Coordinator.heartbeat_gaps``: connect to disconnect) during
   such a drain, as a multiple of the heartbeat interval; also during each output job below.
4. idle RSS of the agent (VmRSS of the agent's host pid, 1 s after it connected).
5. a job writing 256 MB of output through the agent, against the same command with
   ``> /dev/null`` (its stderr still goes to the agent), runs interleaved in pairs: peak RSS
   (VmRSS sampled every 50 ms, and the kernel's VmHWM) and throughput. The ratio is the job's
   coordinator-seen duration (``start`` event to ``finish`` event: the job ran *and* its whole
   log was delivered) with /dev/null over with the agent. The job's own wall time (bash
   ``$EPOCHREALTIME`` around the command) is shown too: what back-pressure cost the job itself.
   The log-like job is a Python generator of varied log lines (~35 MB/s on one core, gzip -1
   to ~0.3): a job that computes its output, like a test runner, so the ratio says how much
   streaming its log slows it down. Beside it: the CPU ceiling (the best ratio the CPU this run
   needed, spread over the cores, allows), the agent's CPU cost per MB, and the CPU used
   meanwhile by anything else on the machine (a shared machine makes the ratio noisy).
   Two fast producers follow, for memory and the agent's own capacity: ``cat`` of the same kind
   of log text, and ``head -c 256M /dev/zero``. Their /dev/null baseline is a bare pipe copy,
   so their ratio only says how far the agent is from memcpy speed; their MB/s is the figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MB = 1024 * 1024

#: The job output generator: varied log-like lines, computed line by line (stdlib only).
LOG_GENERATOR = r"""
import random, sys
total = int(sys.argv[1])
r = random.Random(7)
W = ("compile link test fetch resolve install build cache hit miss warn ok done step module "
     "package artifact upload download checksum verify runner worker shard retry timeout "
     "request response handler service config index node layer image digest manifest").split()
LV = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")
MOD = ("pytest", "gradle", "webpack", "cargo", "go", "docker", "npm", "mvn")
out = sys.stdout.buffer
choice, rnd, ri = r.choice, r.random, r.randrange
n = i = 0
while n < total:
    lines = []
    for _ in range(2000):
        i += 1
        lines.append(
            f"2024-05-17T12:{i // 60000 % 60:02d}:{i // 1000 % 60:02d}.{i % 1000:03d}Z "
            f"{choice(LV)} [{choice(MOD)}] {choice(W)} {choice(W)} {choice(W)} {choice(W)} "
            f"id={ri(1 << 30):x} t={rnd() * 1000:.3f}ms "
            f"path=src/{choice(W)}/{choice(W)}_{ri(1000)}.py\n"
        )
    b = "".join(lines).encode()[: total - n]
    out.write(b)
    n += len(b)
out.flush()
"""

#: A secret in every job's environment, so the redactor is on as in a real pipeline.
JOB_ENV = {"BENCH_GITHUB_TOKEN": "ghp_benchmarkSecretValue0123456789"}


# =============================================================================== coordinator


class CoordinatorControl:
    """What the benchmark asks of the coordinator: plain JSON in and out.

    Runs next to the coordinator (in its process, or in this one with
    ``--coordinator-in-process``); the chunks of a job stay there, only sizes and tails leave.
    """

    def __init__(self, **coord_kwargs: Any) -> None:
        from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer

        self.coord = Coordinator(**coord_kwargs)
        self.server = CoordinatorServer(self.coord).start()

    def info(self) -> dict[str, Any]:
        return {
            "agent_endpoint": self.server.agent_endpoint,
            "registration_token": self.coord.registration_token,
            "heartbeat_interval": self.coord.heartbeat_interval,
            "pid": os.getpid(),
        }

    def add_job(self, command: str, env: dict[str, str] | None = None) -> str:
        return self.coord.add_job(command, env=env).id

    def agent_named(self, name: str) -> dict[str, Any] | None:
        agent = self.coord.agent_named(name)
        if agent is None:
            return None
        return {"id": agent.id, "connection_state": agent.connection_state}

    def job(self, job_id: str, tail: int = 4096) -> dict[str, Any]:
        job = self.coord.job(job_id)
        chunks = sorted(job.chunks.values(), key=lambda c: (c[0], c[1]))
        end, parts = 0, []
        for offset, size, _ in chunks:
            end = max(end, offset + size)
        for offset, _size, data in reversed(chunks):
            parts.append(data)
            if end - offset >= tail:
                break
        text = b"".join(reversed(parts))[-tail:].decode("utf-8", "replace")
        return {
            "state": job.state,
            "exit_status": job.exit_status,
            "signal_reason": job.signal_reason,
            "chunks_failed_count": job.chunks_failed_count,
            "chunks": len(job.chunks),
            "log_bytes": sum(size for _, size, _ in chunks),
            "log_complete": job.log_complete,
            "started_at": job.started_at,
            "finished_at": job.finished_at,
            "tail": text,
        }

    def drop_log(self, job_id: str) -> None:
        """Free a big job's stored chunks (after :meth:`job` has read what it needs)."""
        self.coord.job(job_id).chunks.clear()

    def heartbeat_gaps(self, agent_id: str) -> float:
        return self.coord.heartbeat_gaps(agent_id)

    def heartbeats(self, agent_id: str) -> list[float]:
        return list(self.coord.agent(agent_id).heartbeats)

    def event_times(
        self, kind: str, agent_id: str | None = None, job_id: str | None = None
    ) -> list[float]:
        return [e.time for e in self.coord.events_of(kind, agent_id=agent_id, job_id=job_id)]

    def cpu_seconds(self) -> float:
        t = os.times()
        return t.user + t.system

    def close(self) -> None:
        self.server.stop()


def serve_coordinator(config: str) -> int:
    """``--serve-coordinator CONFIG``: one JSON request per stdin line, one reply per line."""
    control = CoordinatorControl(**json.loads(config))
    out = sys.stdout
    out.write(json.dumps({"ok": control.info()}) + "\n")
    out.flush()
    try:
        for line in sys.stdin:
            request = json.loads(line)
            if request["method"] == "quit":
                break
            try:
                result = getattr(control, request["method"])(**request.get("args", {}))
                reply: dict[str, Any] = {"ok": result}
            except Exception as exc:  # the benchmark wants the message, not a dead server
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
    finally:
        control.close()
    return 0


class RemoteCoordinator:
    """The same methods as :class:`CoordinatorControl`, over a pipe to a child process."""

    def __init__(self, config: dict[str, Any]) -> None:
        config_json = json.dumps(config)
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--serve-coordinator", config_json],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self._lock = threading.Lock()
        self._info = self._read()

    def _read(self) -> Any:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the coordinator process died")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(reply["error"])
        return reply["ok"]

    def _call(self, method: str, **args: Any) -> Any:
        assert self.proc.stdin is not None
        with self._lock:
            self.proc.stdin.write(json.dumps({"method": method, "args": args}) + "\n")
            self.proc.stdin.flush()
            return self._read()

    def __getattr__(self, method: str) -> Callable[..., Any]:
        if method.startswith("_"):
            raise AttributeError(method)
        if method == "info":
            return lambda: self._info
        return lambda **args: self._call(method, **args)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write(json.dumps({"method": "quit"}) + "\n")
            self.proc.stdin.flush()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ==================================================================================== agents


def read_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) of ``pid``; empty once it is gone."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":", 1)
                    out[key] = int(value.split()[0])
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (0.0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """VmRSS of one pid every ``interval`` seconds in a thread; ``peak_kb`` is the maximum."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            rss = read_status(self.pid).get("VmRSS")
            if rss is not None:
                self.peak_kb = max(self.peak_kb, rss)
                self.samples += 1
            self._stop.wait(self.interval)


@dataclass
class Agent:
    """One agent process under the benchmark, with a pidfd for its exact exit time."""

    proc: Any  # fleetdrain.drill.world.processes.AgentProcess
    name: str
    agent_id: str
    pid: int
    pidfd: int
    connect_seconds: float

    def exited_at(self, timeout: float) -> float:
        """Block until the agent's process has exited; the monotonic time it did."""
        poller = select.poll()
        poller.register(self.pidfd, select.POLLIN)
        if not poller.poll(timeout * 1000):
            raise TimeoutError(f"agent {self.name} still running after {timeout}s")
        return time.monotonic()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(5)


@dataclass
class Bench:
    coord: Any
    pid1: bool
    tmp: Path
    heartbeat_interval: float
    remote: bool = True
    counter: int = 0
    agents: list[Agent] = field(default_factory=list)

    def start_agent(self) -> Agent:
        from fleetdrain.drill.world.processes import spawn_agent

        self.counter += 1
        name = f"bench-{self.counter}"
        info = self.coord.info()
        args = [
            "start",
            "--token",
            info["registration_token"],
            "--endpoint",
            info["agent_endpoint"],
            "--name",
            name,
            "--build-path",
            str(self.tmp / "builds"),
            "--log-level",
            "info",
        ]
        started = time.monotonic()
        proc = spawn_agent(args, log_path=self.tmp / f"{name}.log", pid1=self.pid1)
        pid = proc.pid
        pidfd = os.pidfd_open(pid)
        deadline = started + 20
        while True:
            agent = self.coord.agent_named(name=name)
            if agent is not None and agent["connection_state"] == "connected":
                break
            if time.monotonic() > deadline or not proc.alive():
                os.close(pidfd)
                proc.kill()
                raise RuntimeError(f"{name} did not connect:\n{proc.output()[-3000:]}")
            time.sleep(0.01)
        handle = Agent(proc, name, agent["id"], pid, pidfd, time.monotonic() - started)
        self.agents.append(handle)
        return handle

    def wait_job(self, job_id: str, states: tuple[str, ...], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            job = self.coord.job(job_id=job_id, tail=0)
            if job["state"] in states:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {job['state']}, wanted {states}")
            time.sleep(0.02)

    def close(self) -> None:
        for agent in self.agents:
            agent.close()


# ============================================================================ measurements


@dataclass
class IdleRun:
    exit_seconds: float
    rss_kb: int
    connect_seconds: float
    exit_code: int


def idle_run(bench: Bench, idle: float) -> IdleRun:
    agent = bench.start_agent()
    time.sleep(idle)
    rss = read_status(agent.pid).get("VmRSS", 0)
    sent = time.monotonic()
    os.kill(agent.pid, signal.SIGTERM)
    exited = agent.exited_at(10)
    code = agent.proc.wait(10)
    agent.close()
    return IdleRun(exited - sent, rss, agent.connect_seconds, code)


@dataclass
class DrainRun:
    job_end_to_exit: float
    finish_to_exit: float
    sigterm_to_exit: float
    heartbeat_gap: float
    heartbeats: int
    exit_code: int
    job_ok: bool


def drain_run(bench: Bench, job_seconds: float) -> DrainRun:
    agent = bench.start_agent()
    steps = max(1, round(job_seconds / 0.1))
    end = f"{shutil.which('python3') or sys.executable} -I -S -c " + (
        "\"import time; print('JOB_END %.6f' % time.monotonic())\""
    )
    command = f'for i in $(seq 1 {steps}); do echo "step $i"; sleep 0.1; done; {end}'
    job_id = bench.coord.add_job(command=command, env=JOB_ENV)
    bench.wait_job(job_id, ("running",), 10)
    time.sleep(min(0.5, job_seconds / 3))
    sent = time.monotonic()
    os.kill(agent.pid, signal.SIGTERM)
    exited = agent.exited_at(job_seconds + 30)
    code = agent.proc.wait(10)
    job = bench.coord.job(job_id=job_id)
    match = re.search(r"JOB_END (\d+\.\d+)", job["tail"])
    job_end = float(match.group(1)) if match else float("nan")
    finish = bench.coord.event_times(kind="finish", job_id=job_id)
    gap = bench.coord.heartbeat_gaps(agent_id=agent.agent_id)
    beats = len(bench.coord.heartbeats(agent_id=agent.agent_id))
    agent.close()
    return DrainRun(
        job_end_to_exit=exited - job_end,
        finish_to_exit=exited - finish[-1] if finish else float("nan"),
        sigterm_to_exit=exited - sent,
        heartbeat_gap=gap,
        heartbeats=beats,
        exit_code=code,
        job_ok=job["exit_status"] == "0" and job["log_complete"] and match is not None,
    )


def system_busy_seconds() -> float:
    """CPU-seconds all cores have spent busy so far (/proc/stat: not idle, not iowait)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


@dataclass
class OutputRun:
    label: str
    to_null: bool
    size: int
    coord_seconds: float  # start event -> finish event
    job_seconds: float  # the job's own wall time
    log_bytes: int
    chunks: int
    peak_rss_kb: int  # sampled every 50 ms
    hwm_kb: int  # the kernel's VmHWM
    agent_cpu: float
    coord_cpu: float
    job_cpu: float
    other_cpu: float  # everything else on the machine meanwhile (other processes, kernel)
    heartbeat_gap: float
    ok: bool
    detail: str = ""

    @property
    def ours_cpu(self) -> float:
        return self.job_cpu + self.agent_cpu + self.coord_cpu


def output_run(bench: Bench, label: str, inner: str, size: int, to_null: bool) -> OutputRun:
    agent = bench.start_agent()
    target = " > /dev/null" if to_null else ""
    # bash -e -c: $EPOCHREALTIME around the command; `times` gives the job's own CPU.
    command = (
        f's=$EPOCHREALTIME; {inner}{target}; e=$EPOCHREALTIME; echo "JOB_WALL $s $e" >&2; times >&2'
    )
    cpu0 = cpu_of(agent.pid)
    coord_cpu0 = bench.coord.cpu_seconds()
    self0 = os.times()
    busy0 = system_busy_seconds()
    with RssSampler(agent.pid) as sampler:
        job_id = bench.coord.add_job(command=command, env=JOB_ENV)
        bench.wait_job(job_id, ("finished", "canceled"), 600)
    busy = system_busy_seconds() - busy0
    self1 = os.times()
    hwm = read_status(agent.pid).get("VmHWM", 0)
    agent_cpu = cpu_of(agent.pid) - cpu0
    coord_cpu = bench.coord.cpu_seconds() - coord_cpu0
    gap = bench.coord.heartbeat_gaps(agent_id=agent.agent_id)
    job = bench.coord.job(job_id=job_id)
    bench.coord.drop_log(job_id=job_id)
    os.kill(agent.pid, signal.SIGTERM)
    agent.exited_at(30)
    agent.close()
    tail = job["tail"]
    wall = re.search(r"JOB_WALL (\d+\.\d+) (\d+\.\d+)", tail)
    job_seconds = float(wall.group(2)) - float(wall.group(1)) if wall else float("nan")
    # `times`: the shell's user/sys, then its children's: "0m7.310s 0m0.090s".
    spans = re.findall(r"(\d+)m(\d+\.\d+)s (\d+)m(\d+\.\d+)s", tail)
    job_cpu = float("nan")
    if len(spans) >= 2:
        a, b, c, d = spans[-1]
        job_cpu = int(a) * 60 + float(b) + int(c) * 60 + float(d)
    self_cpu = (self1.user + self1.system) - (self0.user + self0.system)
    if not bench.remote:
        coord_cpu -= self_cpu  # the in-process coordinator's figure is this whole process
    ours = job_cpu + agent_cpu + coord_cpu + max(self_cpu, 0.0)
    ok = (
        job["exit_status"] == "0"
        and job["chunks_failed_count"] == 0
        and job["log_complete"]
        and (to_null or job["log_bytes"] >= size)  # the log also holds the JOB_WALL lines
    )
    return OutputRun(
        label=label,
        to_null=to_null,
        size=size,
        coord_seconds=job["finished_at"] - job["started_at"],
        job_seconds=job_seconds,
        log_bytes=job["log_bytes"],
        chunks=job["chunks"],
        peak_rss_kb=sampler.peak_kb,
        hwm_kb=hwm,
        agent_cpu=agent_cpu,
        coord_cpu=coord_cpu,
        job_cpu=job_cpu,
        other_cpu=max(0.0, busy - ours),
        heartbeat_gap=gap,
        ok=ok,
        detail=""
        if ok
        else f"exit={job['exit_status']} failed={job['chunks_failed_count']} "
        f"complete={job['log_complete']} bytes={job['log_bytes']}",
    )


# ================================================================================== report


def machine_info(pid1: bool, why: str, coordinator: str) -> list[str]:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    cores = len(os.sched_getaffinity(0))
    lines = [
        f"machine: {cores} usable core(s) of {os.cpu_count()} ({model or platform.machine()}), "
        f"Linux {platform.release()}, Python {platform.python_version()}",
        "agent:   "
        + (
            "PID 1 of its own PID namespace (unshare --pid --fork --mount-proc)"
            if pid1
            else f"NOT PID 1 (plain child process: {why})"
        ),
        f"coordinator: {coordinator}",
    ]
    return lines


def gzip_calibration(sample: bytes) -> float:
    """gzip -1 MB/s of this machine on ``sample`` (one core), to scale the throughput rows."""
    import gzip

    best = 0.0
    for _ in range(3):
        t = time.perf_counter()
        gzip.compress(sample, 1, mtime=0)
        best = max(best, len(sample) / (time.perf_counter() - t) / MB)
    return best


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), max(values)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def print_table(rows: list[tuple[str, str, str, str]]) -> None:
    headers = ("figure", "measured", "goal", "")
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*headers))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(fmt.format(*row).rstrip())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="32 MB of output and fewer runs (~30 s)")
    p.add_argument("--size-mb", type=int, default=None, help="job output in MB (default 256)")
    p.add_argument("--idle-runs", type=int, default=None, help="idle SIGTERM runs (default 10)")
    p.add_argument("--drain-runs", type=int, default=None, help="mid-job drains (default 5)")
    p.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="/dev/null + agent pairs of the log-like job, interleaved (default 2; quick 1)",
    )
    p.add_argument("--heartbeat-interval", type=float, default=0.5, help="seconds (default 0.5)")
    p.add_argument("--no-pid1", action="store_true", help="run the agent as a plain child")
    p.add_argument(
        "--coordinator-in-process",
        action="store_true",
        help="serve the coordinator from a thread of this process (as the tests do)",
    )
    p.add_argument(
        "--no-fast",
        action="store_true",
        help="skip the fast producers (cat of log text, /dev/zero)",
    )
    p.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    p.add_argument("--serve-coordinator", metavar="CONFIG", help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.serve_coordinator is not None:
        return serve_coordinator(ns.serve_coordinator)

    from fleetdrain.drill.world.processes import pid_namespaces_available

    size = (ns.size_mb if ns.size_mb is not None else (32 if ns.quick else 256)) * MB
    idle_runs = ns.idle_runs or (5 if ns.quick else 10)
    drain_runs = ns.drain_runs or (3 if ns.quick else 5)
    pairs = ns.pairs or (1 if ns.quick else 2)
    interval = ns.heartbeat_interval
    cores = len(os.sched_getaffinity(0))

    can, why = pid_namespaces_available()
    pid1 = can and not ns.no_pid1
    if ns.no_pid1:
        why = "--no-pid1"
    config = {
        "ping_interval": 0.2,
        "heartbeat_interval": interval,
        "job_status_interval": 1.0,
        "lost_agent_timeout": 60.0,
        "chunks_interval_seconds": 1.0,
    }
    where = (
        "a thread of the benchmark process (--coordinator-in-process)"
        if ns.coordinator_in_process
        else "a separate process (uvicorn, h11) on loopback, same machine"
    )
    for line in machine_info(pid1, why, where):
        print(line)
    print(
        f"settings: heartbeat {interval}s, ping 0.2s, chunks <= 100 KiB / 1 s flush, job output "
        f"{size // MB} MB, {idle_runs} idle runs, {drain_runs} drains, {pairs} log-like pair(s)",
        flush=True,
    )

    tmp = Path(tempfile.mkdtemp(prefix="fleetdrain-bench-"))
    gen = tmp / "loggen.py"
    gen.write_text(LOG_GENERATOR)
    py = shutil.which("python3") or sys.executable
    sample = subprocess.run(
        [py, "-I", "-S", str(gen), str(16 * MB)], capture_output=True, check=True
    ).stdout
    sample_path = tmp / "sample.log"
    sample_path.write_bytes(sample)
    calib = gzip_calibration(sample)
    import gzip

    text_ratio = len(gzip.compress(sample, 1)) / len(sample)
    print(
        f"calibration: gzip -1 of the job's log text {calib:.0f} MB/s on one core "
        f"(to {text_ratio:.2f} of its size)",
        flush=True,
    )

    coord: Any = (
        CoordinatorControl(**config) if ns.coordinator_in_process else RemoteCoordinator(config)
    )
    bench = Bench(
        coord=coord,
        pid1=pid1,
        tmp=tmp,
        heartbeat_interval=interval,
        remote=not ns.coordinator_in_process,
    )
    rows: list[tuple[str, str, str, str]] = []
    missed: list[str] = []
    notes: list[str] = []
    t_start = time.monotonic()

    def row(figure: str, measured: str, goal: str = "", ok: bool | None = None) -> None:
        rows.append((figure, measured, goal, "" if ok is None else verdict(ok)))
        if ok is False:
            missed.append(figure.strip())

    try:
        # -- 1 and 4: idle agents
        print(f"[1/4] idle SIGTERM x{idle_runs} ...", flush=True)
        idle = [idle_run(bench, idle=1.0) for _ in range(idle_runs)]

        # -- 2 and 3: drains mid-job
        print(f"[2/4] SIGTERM mid-job x{drain_runs} ...", flush=True)
        drains = [drain_run(bench, job_seconds=2.0) for _ in range(drain_runs)]

        # -- 5: output throughput and memory, /dev/null and agent runs interleaved
        print(
            f"[3/4] log-like job, {size // MB} MB, {pairs} x (/dev/null, through the agent) ...",
            flush=True,
        )
        inner = f"{py} -I -S {gen} {size}"
        log_pairs = [
            (
                output_run(bench, "log-like", inner, size, to_null=True),
                output_run(bench, "log-like", inner, size, to_null=False),
            )
            for _ in range(pairs)
        ]
        fast_pairs: list[tuple[str, list[tuple[OutputRun, OutputRun]]]] = []
        if not ns.no_fast:
            print(
                f"[4/4] fast producers, {size // MB} MB: cat of log text, /dev/zero ...", flush=True
            )
            # The same kind of text as the log-like job, as fast as a pipe takes it: what the
            # agent itself can carry (its capacity) when the job costs nothing.
            copies = max(1, size // (16 * MB))
            cat = f"for i in $(seq {copies}); do cat {sample_path}; done"
            for label, command, n in (
                ("log text, cat", cat, copies * 16 * MB),
                ("/dev/zero", f"head -c {size} /dev/zero", size),
            ):
                pair = (
                    output_run(bench, label, command, n, to_null=True),
                    output_run(bench, label, command, n, to_null=False),
                )
                fast_pairs.append((label, [pair]))
    finally:
        bench.close()
        coord.close()

    med, mx = stats([r.exit_seconds for r in idle])
    row("1. idle SIGTERM -> exit (s)", f"median {med:.3f}, max {mx:.3f}", "<= 0.5", mx <= 0.5)
    if any(r.exit_code != 0 for r in idle):
        notes.append(f"idle exit codes: {[r.exit_code for r in idle]}")

    med, mx = stats([d.job_end_to_exit for d in drains])
    row(
        "2. job end -> exit, SIGTERM mid-job (s)",
        f"median {med:.3f}, max {mx:.3f}",
        "<= 0.5",
        mx <= 0.5,
    )
    med, mx = stats([d.finish_to_exit for d in drains])
    row("   coordinator finish -> exit (s)", f"median {med:.3f}, max {mx:.3f}")
    med, mx = stats([d.heartbeat_gap / interval for d in drains])
    row(
        f"3. max heartbeat gap, drain (x {interval:g} s)",
        f"median {med:.2f}, max {mx:.2f}",
        "<= 1.5",
        mx <= 1.5,
    )
    if any(not d.job_ok or d.exit_code != 0 for d in drains):
        notes.append(f"drains with a bad job or exit: {[(d.exit_code, d.job_ok) for d in drains]}")

    med, mx = stats([r.rss_kb / 1024 for r in idle])
    row("4. idle RSS (MB)", f"median {med:.1f}, max {mx:.1f}", "<= 40", mx <= 40)

    for label, runs in [("log-like", log_pairs), *fast_pairs]:
        n_bytes = runs[0][1].size
        reals = [real for _, real in runs]
        peak = max(max(r.peak_rss_kb, r.hwm_kb) for r in reals) / 1024
        sampled = max(r.peak_rss_kb for r in reals) / 1024
        row(
            f"5. peak RSS, {label} {n_bytes // MB} MB (MB)",
            f"{sampled:.1f} sampled, {peak:.1f} VmHWM",
            "<= 64",
            peak <= 64,
        )
        ratios = [null.coord_seconds / real.coord_seconds for null, real in runs]
        own = [null.job_seconds / real.job_seconds for null, real in runs]
        rate = statistics.median(n_bytes / MB / real.coord_seconds for real in reals)
        base = statistics.median(n_bytes / MB / null.coord_seconds for null, _ in runs)
        agent_rate = statistics.median(n_bytes / MB / r.agent_cpu for r in reals)
        if label == "log-like":
            ratio = statistics.median(ratios)
            spread = f" [{min(ratios):.2f}-{max(ratios):.2f}]" if len(ratios) > 1 else ""
            row(
                f"   throughput ratio, {label} (null/agent)",
                f"{ratio:.2f}{spread} ({rate:.0f} vs {base:.0f} MB/s); "
                f"job's own {statistics.median(own):.2f}",
                ">= 0.8",
                ratio >= 0.8,
            )
            # Wall time can be no less than the job's own CPU, nor than all the CPU this run
            # needed spread over every core: the best ratio this machine allows.
            ceilings = [
                null.coord_seconds / max(real.job_cpu, (real.ours_cpu + real.other_cpu) / cores)
                for null, real in runs
            ]
            row(
                "   CPU ceiling for that ratio here",
                f"{min(1.0, statistics.median(ceilings)):.2f}"
                f" (job + agent + coordinator + others over {cores} cores)",
            )
        else:
            row(
                f"   throughput, {label}",
                f"{rate:.0f} MB/s via the agent ({base:.0f} to /dev/null: ratio "
                f"{statistics.median(ratios):.2f})",
                "(info)",
            )
        row(
            f"   agent CPU cost, {label}",
            f"{agent_rate:.0f} MB per agent CPU-second"
            + ("" if label == "/dev/zero" else f" (gzip -1 alone: {calib:.0f})"),
        )
        gaps = [r.heartbeat_gap / interval for r in reals]
        row(
            f"   max heartbeat gap, {label} job (x {interval:g} s)",
            f"{max(gaps):.2f}",
            "<= 1.5",
            max(gaps) <= 1.5,
        )
        for null, real in runs:
            for run in (null, real):
                if not run.ok:
                    notes.append(f"{run.label} {'null' if run.to_null else 'agent'}: {run.detail}")

    print()
    print_table(rows)
    print()
    print(
        "detail (times in s, CPU in CPU-seconds; 'others' = CPU used meanwhile by anything "
        "else on the machine):"
    )
    connect = statistics.median(r.connect_seconds for r in idle)
    print(
        f"  idle: start -> connected median {connect:.2f}; exits "
        + " ".join(f"{r.exit_seconds:.3f}" for r in idle)
    )
    print(
        "  drains: SIGTERM -> exit "
        + " ".join(f"{d.sigterm_to_exit:.2f}" for d in drains)
        + "; job end -> exit "
        + " ".join(f"{d.job_end_to_exit:.3f}" for d in drains)
        + "; heartbeat gaps "
        + " ".join(f"{d.heartbeat_gap:.2f}" for d in drains)
    )
    for run in [r for _, runs in [("", log_pairs), *fast_pairs] for pair in runs for r in pair]:
        wall = run.coord_seconds
        print(
            f"  {run.label:13} {'> /dev/null' if run.to_null else 'via agent  '}: "
            f"start->finish {wall:6.2f}, job wall {run.job_seconds:6.2f}, "
            f"log {run.log_bytes / MB:5.1f} MB/{run.chunks:4d} chunks, "
            f"RSS peak {max(run.peak_rss_kb, run.hwm_kb) / 1024:4.1f} MB; CPU job "
            f"{run.job_cpu:5.2f} agent {run.agent_cpu:5.2f} coordinator {run.coord_cpu:5.2f} "
            f"others {run.other_cpu:5.2f}"
            + (f" = {(run.ours_cpu + run.other_cpu) / wall:.2f} cores" if wall >= 1 else "")
        )
    busy_others = [
        r.other_cpu / r.coord_seconds for pair in log_pairs for r in pair if r.coord_seconds >= 1
    ]
    noisy = None
    if busy_others and max(busy_others) > 0.15:
        noisy = (
            f"other processes used up to {max(busy_others):.2f} cores during the runs: "
            "throughput figures are noisy; re-run on a quiet machine or raise --pairs"
        )
    for note in notes:
        print(f"  NOTE: {note}")
    if noisy:
        print(f"  NOTE: {noisy}")
    print(f"total {time.monotonic() - t_start:.0f} s")
    if missed:
        print("missed: " + "; ".join(missed))
    if notes:
        print(f"agent logs kept in {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if ns.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
