"""Benchmark: the drain controller (``fleetdrain/controller/``) in moto, with the embedded
coordinator.

    .venv/bin/python bench/controller.py             # ~3-5 min (1,000-instance scale-in)
    .venv/bin/python bench/controller.py --quick     # ~1 min (100 instances, fewer samples)

Not a test: it prints figures with their goals and exits 0 whatever they are (``--strict``
exits 1 when a goal is missed). The world is the tests' (``tests/controller/test_drains.py``):
moto in-process with ``fleetdrain.drill.aws.gaps`` filling its gaps, the coordinator over loopback
HTTP, agents simulated at the coordinator (register, connect, a job; on SIGTERM an idle agent exits,
a busy one finishes its job first), events routed to the real handlers by ``template.yaml``'s
own patterns, drain ticks delivered when due. Time is a fake clock (so a 5-minute job takes no
5 minutes); latencies are wall time (``perf_counter``).

1. Hook completion latency: the last agent task's exit (``task_exited``, which emits its
   ``ECS Task State Change``) -> the controller's ``CompleteLifecycleAction`` call, delivered
   at once (EventBridge's own delivery, typically well under a second, is not in it; moto's
   calls take ~1 ms where AWS takes ~10-50 ms: the AWS calls on that path are printed too).
2. AWS calls per drained instance, idle (2 idle agents) and busy (a 5-minute job, 20 s ticks,
   60 s heartbeats): every call of the controller's clients, counted by a botocore
   ``before-call`` hook, by operation; coordinator REST requests beside them.
3. Handler cold import: a fresh CPython 3.12 importing ``fleetdrain.controller.lifecycle_hook``
   from an artifact built by ``fleetdrain/controller/Makefile`` for this machine's architecture
   (Lambda's is aarch64, which cannot be imported here), with ``.pyc`` and without; boto3 beside
   it, as the runtime provides it. Skipped (with the reason) when no CPython 3.12 is found.
4. A scale-in of N instances (default 1,000; one idle agent and a daemon task each), drained
   one after another through the handlers: wall time, calls, every hook completed, no errors.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

for _key, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "POWERTOOLS_LOG_LEVEL": "ERROR",  # the handlers' INFO lines would drown the figures
    "POWERTOOLS_METRICS_NAMESPACE": "fleetdrain",
}.items():
    os.environ.setdefault(_key, _value)

import warnings  # noqa: E402

# Powertools warns on every invocation that records no metric (ignored events): not a figure.
warnings.filterwarnings("ignore", message="No application metrics to publish")

import boto3  # noqa: E402
from moto import mock_aws  # noqa: E402

from fleetdrain.controller import runtime  # noqa: E402
from fleetdrain.controller.drain import core  # noqa: E402
from fleetdrain.controller.drain.ports import DrainRecord  # noqa: E402
from fleetdrain.controller.drain.state import DynamoDrainStore  # noqa: E402
from fleetdrain.drill.aws.gaps import AwsGaps  # noqa: E402
from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer  # noqa: E402
from tests.controller.test_drains import (  # noqa: E402
    REGION,
    Clock,
    World,
)

GOALS = {"hook_latency": 2.0, "import_pyc": 0.35}


class Calls:
    """Every AWS API call of the clients this counter is attached to (botocore ``before-call``:
    once per call, whatever the retries), by ``Service.Operation``; and when a named one
    happened last (wall time)."""

    def __init__(self) -> None:
        self.by_op: Counter[str] = Counter()
        self.last_at: dict[str, float] = {}
        self._lock = threading.Lock()

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-call", self._on_call)
        return client

    def _on_call(self, model: Any, **_: Any) -> None:
        name = f"{model.service_model.service_id.hyphenize()}.{model.name}"
        with self._lock:
            self.by_op[name] += 1
            self.last_at[name] = time.perf_counter()

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.by_op)


class BenchWorld(World):
    """The tests' world, with any number of instances and counted controller clients."""

    def build_many(self, instances: int) -> list[str]:
        """The tests' world with ``instances`` instances."""
        return self.build(instances)

    def counted_controller(self, calls: Calls, **overrides: Any) -> core.DrainController:
        """The tests' controller wiring, its four AWS clients counted."""
        ctl: Any = self.controller(**overrides)  # its objects' clients are swapped below
        ctl.fleet._ecs = calls.attach(boto3.client("ecs", region_name=REGION))
        self.ecs_client = ctl.fleet._ecs
        ctl.store._ddb = calls.attach(boto3.client("dynamodb", region_name=REGION))
        ctl.lifecycle._asg = calls.attach(boto3.client("autoscaling", region_name=REGION))
        self.token._sm = calls.attach(boto3.client("secretsmanager", region_name=REGION))
        # Ticks: a real SendMessage to a moto queue is counted; delivery follows the fake clock.
        sqs = calls.attach(boto3.client("sqs", region_name=REGION))
        url = sqs.create_queue(QueueName="drain-queue")["QueueUrl"]
        fake = self.ticks

        class CountedTicks:
            def schedule(self, instance_id: str, drain_id: str, tick_id: str, delay: int) -> None:
                sqs.send_message(QueueUrl=url, MessageBody="tick", DelaySeconds=0)
                fake.schedule(instance_id, drain_id, tick_id, delay)

        ctl.ticks = CountedTicks()
        return ctl

    def record(self, iid: str) -> DrainRecord:
        # The bench's own looking goes through an uncounted client: only the controller counts.
        if not hasattr(self, "_observer"):
            self._observer = DynamoDrainStore(
                boto3.client("dynamodb", region_name=REGION), "drains", self.clock, 3600
            )
        rec = self._observer.get(iid)
        assert rec is not None
        return rec

    def coordinator_requests(self) -> int:
        client = self.ctl.coordinator
        return int(getattr(client, "requests", 0))


@contextlib.contextmanager
def world() -> Iterator[BenchWorld]:
    with mock_aws():
        clock = Clock()
        with AwsGaps(clock=clock) as gaps:
            # The simulated agents do not heartbeat: a long scale-in must not see them marked
            # lost (the coordinator's lost-agent rule runs on wall time).
            coord = Coordinator(org="acme", api_token="api-token", lost_agent_timeout=1e9)
            with CoordinatorServer(coord) as server:
                try:
                    yield BenchWorld(clock, gaps, coord, server)
                finally:
                    runtime.set_controller(None)


def delta(after: Counter[str], before: Counter[str]) -> Counter[str]:
    out = Counter(after)
    out.subtract(before)
    return Counter({k: v for k, v in out.items() if v})


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---------------------------------------------------------------------------- 1. hook latency


def bench_hook_latency(samples: int) -> dict[str, Any]:
    with world() as w:
        ids = w.build_many(samples)
        calls = Calls()
        w.counted_controller(calls)
        latencies: list[float] = []
        path_calls: list[int] = []
        for iid in ids:
            first, second = w.add_agent(iid), w.add_agent(iid)
            held: list[str] = []
            w.gaps.on_sigterm = lambda arn, reason, held=held: held.append(arn)
            w.emit(w.gaps.begin_termination(iid))
            assert w.record(iid).phase == "hard", w.record(iid)
            assert sorted(held) == sorted([first.task_arn, second.task_arn])
            w.route(w.gaps.task_exited(held[0], 0))  # one task left
            w.cursor = len(w.gaps.events)
            before = calls.snapshot()
            t0 = time.perf_counter()
            w.route(w.gaps.task_exited(held[1], 0))  # the last one: completes the hook
            w.cursor = len(w.gaps.events)
            done = calls.last_at.get("auto-scaling.CompleteLifecycleAction", 0.0)
            assert done > t0 and w.gaps.actions[iid].result == "CONTINUE", iid
            latencies.append(done - t0)
            path_calls.append(sum(delta(calls.snapshot(), before).values()))
        return {
            "samples": len(latencies),
            "median": statistics.median(latencies),
            "p95": pct(latencies, 0.95),
            "max": max(latencies),
            "calls_on_path": statistics.median(path_calls),
            "metric": w.metrics.timings.get(core.HOOK_COMPLETION_LATENCY, []),
        }


# ---------------------------------------------------------------------------- 2. calls per drain


def bench_calls(job_seconds: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with world() as w:
        idle_i, busy_i = w.build_many(2)
        calls = Calls()
        w.counted_controller(calls, tick_interval=20, heartbeat_interval=60)
        w.add_agent(idle_i)
        w.add_agent(idle_i)
        w.add_agent(busy_i, job_seconds=job_seconds)
        w.add_agent(busy_i)
        for name, iid in (("idle", idle_i), ("busy", busy_i)):
            before, coord_before = calls.snapshot(), w.coordinator_requests()
            ticks_before = w.ticks.sent
            w.emit(w.gaps.begin_termination(iid))

            def done(iid: str = iid) -> bool:
                return w.record(iid).phase == "done"

            w.run_until(done, limit=job_seconds + 300)
            assert w.gaps.actions[iid].result == "CONTINUE"
            by_op = delta(calls.snapshot(), before)
            out[name] = {
                "total": sum(by_op.values()),
                "by_op": by_op,
                "coordinator": w.coordinator_requests() - coord_before,
                "ticks": w.ticks.sent - ticks_before,
                "steps": w.record(iid).steps,
            }
    return out


# ---------------------------------------------------------------------------- 3. cold import


def find_python312() -> str | None:
    out = subprocess.run(
        [
            *("make", "-s", "-C", str(ROOT / "fleetdrain" / "controller")),
            *("--eval", "p: ; @echo $(PYC_PYTHON)", "p"),
        ],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or None


IMPORT_ONE = """
import sys, time
sys.path[:] = [sys.argv[1], sys.argv[2], *sys.path[1:]]
t = time.perf_counter()
import fleetdrain.controller.lifecycle_hook
print(time.perf_counter() - t)
"""


def bench_import(runs: int) -> dict[str, Any]:
    py = find_python312()
    if py is None:
        return {"skipped": "no CPython 3.12 here (see fleetdrain/controller/Makefile: PYC_PYTHON)"}
    arch = os.uname().machine
    tmp = Path(tempfile.mkdtemp(prefix="fleetdrain-bench-"))
    try:
        artifact, rt = tmp / "artifact", tmp / "runtime"
        subprocess.run(
            [
                *("make", "-s", "-C", str(ROOT / "fleetdrain" / "controller"), "artifact"),
                *(f"PLATFORM=manylinux2014_{arch}", f"ARTIFACTS_DIR={artifact}", "REQUIRE_PYC=1"),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                *(sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"),
                *("--no-warn-conflicts", "--no-compile", "--platform", f"manylinux2014_{arch}"),
                *("--implementation", "cp", "--python-version", "3.12", "--only-binary=:all:"),
                *("--target", str(rt), "boto3"),
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run(
            [
                py,
                "-m",
                "compileall",
                "-q",
                "-j",
                "0",
                "--invalidation-mode=unchecked-hash",
                str(rt),
            ],
            check=True,
            capture_output=True,
        )
        check = subprocess.run(
            [
                py,
                str(ROOT / ".ci" / "check_artifact.py"),
                "imports",
                str(artifact),
                f"--runtime={rt}",
            ],
            capture_output=True,
            text=True,
        )
        bare = tmp / "artifact-no-pyc"
        shutil.copytree(artifact, bare, ignore=shutil.ignore_patterns("__pycache__"))

        def timed(where: Path) -> list[float]:
            env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
            return [
                float(
                    subprocess.run(
                        [py, "-c", IMPORT_ONE, str(where), str(rt)],
                        capture_output=True,
                        text=True,
                        check=True,
                        env=env,
                    ).stdout
                )
                for _ in range(runs)
            ]

        with_pyc, without = timed(artifact), timed(bare)
        top = subprocess.run(
            [py, "-X", "importtime", "-c", IMPORT_ONE, str(artifact), str(rt)],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        ).stderr
        return {
            "python": py,
            "check": check.stdout.strip() or check.stderr.strip(),
            "pyc": statistics.median(with_pyc),
            "pyc_min": min(with_pyc),
            "no_pyc": statistics.median(without),
            "top": heaviest(top, 6),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def heaviest(importtime: str, n: int) -> list[tuple[str, float]]:
    """Self import time summed by top-level package (``-X importtime``), the largest first."""
    by_package: Counter[str] = Counter()
    for line in importtime.splitlines():
        parts = line.split("|")
        if len(parts) != 3 or not parts[0].split(":")[-1].strip().isdigit():
            continue
        self_us = int(parts[0].split(":")[-1])
        by_package[parts[2].strip().split(".")[0]] += self_us
    return [(name, us / 1e6) for name, us in by_package.most_common(n)]


# ---------------------------------------------------------------------------- 4. scale-in


def bench_scale_in(instances: int) -> dict[str, Any]:
    with world() as w:
        t = time.perf_counter()
        ids = w.build_many(instances)
        for iid in ids:
            w.add_agent(iid)
        setup = time.perf_counter() - t
        calls = Calls()
        w.counted_controller(calls)
        errors = 0
        t = time.perf_counter()
        for n, iid in enumerate(ids, 1):
            results = w.emit(w.gaps.begin_termination(iid))
            errors += sum(1 for r in results if r.get("status") == "rejected")
            if n % 100 == 0:
                print(f"   ... {n} drained, {time.perf_counter() - t:.0f} s", file=sys.stderr)
        wall = time.perf_counter() - t
        total = calls.snapshot()
        completed = sum(1 for iid in ids if w.gaps.actions[iid].result == "CONTINUE")
        drained = sum(1 for iid in ids if w.record(iid).outcome == "drained")
        return {
            "instances": instances,
            "setup": setup,
            "wall": wall,
            "completed": completed,
            "drained": drained,
            "errors": errors,
            "calls": sum(total.values()),
            "by_op": total,
            "coordinator": w.coordinator_requests(),
        }


# ---------------------------------------------------------------------------- report


def show_ops(by_op: Counter[str], indent: str = "      ") -> None:
    for op, n in sorted(by_op.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{indent}{op:<44}{n:>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 instances, fewer samples")
    parser.add_argument("--instances", type=int, help="the scale-in's size (default 1000)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    instances = args.instances or (100 if args.quick else 1000)
    missed: list[str] = []

    print("fleetdrain drain controller benchmark (moto in-process, coordinator on loopback)")
    lat = bench_hook_latency(10 if args.quick else 30)
    print(
        f"\n1. hook completion latency, last task STOPPED -> CompleteLifecycleAction "
        f"({lat['samples']} drains, event delivered at once)"
    )
    print(
        f"   median {lat['median'] * 1000:.1f} ms, p95 {lat['p95'] * 1000:.1f} ms, "
        f"max {lat['max'] * 1000:.1f} ms   goal <= {GOALS['hook_latency']:.0f} s"
    )
    print(
        f"   AWS calls on that path: {lat['calls_on_path']:.0f} (at ~10-50 ms each on AWS: "
        f"~{lat['calls_on_path'] * 0.01:.2f}-{lat['calls_on_path'] * 0.05:.2f} s)"
    )
    if lat["p95"] > GOALS["hook_latency"]:
        missed.append("hook latency")

    per = bench_calls(300.0)
    print("\n2. AWS calls per drained instance (before-call hook on every controller client)")
    for name, what in (
        ("idle", "2 idle agents + a daemon task"),
        ("busy", "a 300 s job + an idle agent; ticks 20 s, heartbeats 60 s"),
    ):
        f = per[name]
        print(
            f"   {name}: {f['total']} AWS calls + {f['coordinator']} coordinator requests "
            f"({what}; {f['steps']} steps, {f['ticks']} ticks sent)"
        )
        show_ops(f["by_op"])

    imp = bench_import(3 if args.quick else 7)
    print(
        "\n3. handler cold import"
        " (a fresh CPython 3.12: import fleetdrain.controller.lifecycle_hook)"
    )
    if "skipped" in imp:
        print(f"   skipped: {imp['skipped']}")
    else:
        print(
            f"   with .pyc: median {imp['pyc'] * 1000:.0f} ms (min {imp['pyc_min'] * 1000:.0f}) "
            f"  without: {imp['no_pyc'] * 1000:.0f} ms   goal <= {GOALS['import_pyc']:.2f} s"
        )
        print(f"   artifact check: {imp['check']}")
        print("   self import time by package (with .pyc): ", end="")
        print(", ".join(f"{name} {sec * 1000:.0f} ms" for name, sec in imp["top"]))
        if imp["pyc"] > GOALS["import_pyc"]:
            missed.append("import time")

    scale = bench_scale_in(instances)
    print(f"\n4. scale-in of {scale['instances']} instances, drained one after another")
    print(
        f"   wall {scale['wall']:.1f} s ({scale['wall'] / scale['instances'] * 1000:.0f} ms an "
        f"instance; set-up {scale['setup']:.1f} s)   hooks completed {scale['completed']}/"
        f"{scale['instances']}, drained {scale['drained']}, errors {scale['errors']}"
    )
    print(
        f"   {scale['calls']} AWS calls ({scale['calls'] / scale['instances']:.1f} an instance), "
        f"{scale['coordinator']} coordinator requests "
        f"({scale['coordinator'] / scale['instances']:.1f} an instance)"
    )
    show_ops(scale["by_op"])
    if scale["completed"] != scale["instances"] or scale["errors"]:
        missed.append("scale-in")

    print(f"\ngoals missed: {', '.join(missed) or 'none'}")
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
