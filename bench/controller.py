"""Benchmark: the drain controller (``fleetdrain/controller/``) in moto, with the embedded
coordinator.

    .venv/bin/python bench/controller.py             # ~6 min (1,000-instance scale-in)
    .venv/bin/python bench/controller.py --quick     # ~1 min (100-instance scale-in)
    .venv/bin/python bench/controller.py --sections 4,5 --before   # before issue 12

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
2. AWS calls per drained instance, idle (2 idle agents) and busy (a 5-minute job, ticks and
   heartbeats as deployed; ``--before``: 20 s ticks, 60 s heartbeats): every call of the
   controller's clients, counted by a botocore ``before-call`` hook, by operation; coordinator
   REST requests beside them.
3. Handler cold import: a fresh CPython 3.12 importing ``fleetdrain.controller.lifecycle_hook``
   from an artifact built by ``fleetdrain/controller/Makefile`` for this machine's architecture
   (Lambda's is aarch64, which cannot be imported here), with ``.pyc`` and without; boto3 beside
   it, as the runtime provides it. Skipped (with the reason) when no CPython 3.12 is found.
4. A scale-in of N instances (default 1,000) in a 1,000-agent organization, the lifecycle
   actions arriving at ``--scale-in-per-minute`` (100) of AWS time; one agent and a daemon task
   an instance, every tenth agent busy for 5 minutes from its own drain's start.
5. A spot storm: ``--storm`` instances (100) interrupted in the same second in a 1,000-agent
   organization; two agents an instance, on every other instance one busy with a job that cannot
   finish before the two minutes are up (so its drain must force it through the coordinator).

4 and 5 run against Buildkite's REST limit as the embedded coordinator enforces it (200
requests a minute for the organization, ``RateLimit-*`` headers, 429 beyond; its windows on the
fake clock, so they are AWS minutes), drive the world one second of AWS time at a time, deliver
every event and tick on its own, and charge each AWS call and coordinator request to the
instance that event is about. Failures are redelivered as AWS would (a tick after the drain
queue's 360 s visibility timeout, an EventBridge invocation by Lambda's two retries). An agent
drains as fleetdrain's does: on SIGTERM it finishes its job, or cancels it and reports
``agent_stop`` 105 s after the SIGTERM (``stopTimeout`` 120 - cancel grace 10 - margin 5); a
forced stop through the coordinator cancels it at once. A spot instance dies 120 s after its
notice: a job still running then is lost.

They print: coordinator requests a minute (the most in one of the limit's fixed windows, against
the limit; and the most in any 60 s, which can straddle two windows and reach twice the limit),
429s received, requests held back by the client, fallbacks to ECS, coordinator requests and AWS
calls per drained instance (idle and busy instances apart), drains forced before their deadline
(through the coordinator), jobs cancelled by the agents' own deadline, jobs lost.

``--before`` runs 2, 4 and 5 with the REST client not honouring the rate limit (a 429 retried
like a 5xx, a spent budget not holding requests back) and the ECS adapter reading both task
listings every step: the controller as it was before issue 12.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
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

from fleetdrain.agent.buildkite.models import RegisterRequest  # noqa: E402
from fleetdrain.controller import runtime  # noqa: E402
from fleetdrain.controller.drain import core  # noqa: E402
from fleetdrain.controller.drain.config import Settings  # noqa: E402
from fleetdrain.controller.drain.coordinator import CoordinatorClient  # noqa: E402
from fleetdrain.controller.drain.graphql_agents import (  # noqa: E402
    GraphqlAgentLookup,
    GraphqlCoordinator,
)
from fleetdrain.controller.drain.ports import DrainRecord, Tick  # noqa: E402
from fleetdrain.controller.drain.shared_listing import SharedAgentListing  # noqa: E402
from fleetdrain.controller.drain.state import DynamoDrainStore, DynamoListingCache  # noqa: E402
from fleetdrain.controller.drain.ticks import SqsTicks  # noqa: E402
from fleetdrain.drill.aws.gaps import AwsGaps  # noqa: E402
from fleetdrain.drill.aws.rules import event_rules  # noqa: E402
from fleetdrain.drill.aws.template import load_template  # noqa: E402
from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer  # noqa: E402
from tests.controller.test_drains import (  # noqa: E402
    HANDLERS,
    REGION,
    Clock,
    SimAgent,
    World,
    sqs_event,
)

#: The three Lambda functions of template.yaml: deployed, each is its own process, so each has
#: its own controller (its memory of drains, tasks and listings, its REST budget).
FUNCTIONS = tuple(HANDLERS)
GOALS = {"hook_latency": 2.0, "import_pyc": 0.35}
#: Issue 12's goals for 4 and 5.
FLEET_GOALS = {
    "peak_per_minute": 200,
    "limited": 0,
    "aws_idle": 10,
    "aws_busy": 40,
    "coordinator_per_instance": 3,
    "lost": 0,
}
#: Buildkite's REST limit, as the embedded coordinator enforces it in 4 and 5.
REST_LIMIT = 200
#: What template.yaml sets: a failed tick comes back after the queue's visibility timeout; an
#: EventBridge invocation that raised is retried twice by Lambda.
#: A notice whose batch item failed shows again after its queue's visibility timeout.
NOTICE_REDELIVERY = 60.0
TICK_REDELIVERY = 360.0
EVENT_RETRIES = (60.0, 120.0)
#: An agent's own deadline after SIGTERM: stopTimeout 120 - cancel grace 10 - margin 5.
AGENT_CANCEL_AFTER = 105.0
SPOT_NOTICE = 120.0


class Calls:
    """Every AWS API call of the clients this counter is attached to (botocore ``before-call``:
    once per call, whatever the retries), by ``Service.Operation``; and when a named one
    happened last (wall time)."""

    def __init__(self) -> None:
        self.by_op: Counter[str] = Counter()
        self.last_at: dict[str, float] = {}
        self.total = 0
        self._lock = threading.Lock()

    def attach(self, client: Any) -> Any:
        client.meta.events.register("before-call", self._on_call)
        return client

    def _on_call(self, model: Any, **_: Any) -> None:
        name = f"{model.service_model.service_id.hyphenize()}.{model.name}"
        with self._lock:
            self.by_op[name] += 1
            self.total += 1
            self.last_at[name] = time.perf_counter()

    def snapshot(self) -> Counter[str]:
        with self._lock:
            return Counter(self.by_op)


class BenchWorld(World):
    """The tests' world, with any number of instances and counted controller clients, one
    controller per Lambda function (as deployed: each function is its own process, with its
    own memory of drains, tasks and listings)."""

    #: Function name -> its controller (:meth:`counted_controllers`); empty: the tests' one.
    ctls: dict[str, core.DrainController]

    def build_many(self, instances: int) -> list[str]:
        """The tests' world with ``instances`` instances."""
        return self.build(instances)

    def counted_controllers(
        self, calls: Calls, **overrides: Any
    ) -> dict[str, core.DrainController]:
        """:meth:`counted_controller` once per function of template.yaml."""
        self.ctls = {f: self.counted_controller(calls, **overrides) for f in FUNCTIONS}
        return self.ctls

    def invoke(self, function: str, event: dict[str, Any]) -> dict[str, Any]:
        ctls = getattr(self, "ctls", {})
        if ctls:
            runtime.set_controller(ctls[function])
        return super().invoke(function, event)

    def counted_controller(self, calls: Calls, **overrides: Any) -> core.DrainController:
        """The tests' controller wiring, its four AWS clients counted."""
        ctl: Any = self.controller(**overrides)  # its objects' clients are swapped below
        ctl.fleet._ecs = calls.attach(boto3.client("ecs", region_name=REGION))
        self.ecs_client = ctl.fleet._ecs
        ctl.store._ddb = calls.attach(boto3.client("dynamodb", region_name=REGION))
        if isinstance(ctl.coordinator, SharedAgentListing):  # its table reads count too
            ctl.coordinator._cache = DynamoListingCache(
                ctl.store._ddb, "drains", ctl.settings.cluster, self.clock, 3600
            )
        ctl.lifecycle._asg = calls.attach(boto3.client("autoscaling", region_name=REGION))
        self.token._sm = calls.attach(boto3.client("secretsmanager", region_name=REGION))
        # Ticks: a real SendMessage to a moto queue is counted; delivery follows the fake clock.
        sqs = calls.attach(boto3.client("sqs", region_name=REGION))
        url = sqs.create_queue(QueueName="drain-queue")["QueueUrl"]
        fake = self.ticks

        # The messages as the controller's adapter sends them (the record a tick carries
        # included), at once: delivery follows the fake clock.
        sent = SqsTicks(sqs, url)

        class CountedTicks:
            def schedule(
                self,
                instance_id: str,
                drain_id: str,
                tick_id: str,
                delay: int,
                record: DrainRecord | None = None,
            ) -> None:
                sent.schedule(instance_id, drain_id, tick_id, 0, record)
                fake.schedule(instance_id, drain_id, tick_id, delay, record)

            def schedule_many(self, ticks: Sequence[Tick]) -> set[str]:
                failed = sent.schedule_many([dataclasses.replace(t, delay=0) for t in ticks])
                for t in ticks:
                    if t.tick_id not in failed:
                        fake.schedule(t.instance_id, t.drain_id, t.tick_id, t.delay, t.record)
                return failed

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
        """Coordinator requests so far, by every controller's clients (REST, and GraphQL's
        lookups with ``--graphql``)."""
        clients = getattr(self, "clients", None) or [self.rest]
        lookups = getattr(self, "lookups", [])
        return sum(int(c.requests) for c in clients) + sum(int(g.requests) for g in lookups)


@contextlib.contextmanager
def world(rest_rate_limit: int | None = None, kind: type[BenchWorld] = BenchWorld) -> Iterator[Any]:
    """The world; ``rest_rate_limit``: the coordinator's REST limit (None: not enforced), its
    windows on the world's fake clock (AWS minutes)."""
    with mock_aws():
        clock = Clock()
        with AwsGaps(clock=clock) as gaps:
            # The simulated agents do not heartbeat: they must not be marked lost.
            coord = Coordinator(
                org="acme",
                api_token="api-token",
                lost_agent_timeout=1e9,
                clock=clock,
                rest_rate_limit=rest_rate_limit,
            )
            with CoordinatorServer(coord) as server:
                try:
                    yield kind(clock, gaps, coord, server)
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
        w.counted_controllers(calls)
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


#: The tick's cap and the heartbeat as deployed (``MaxTickSeconds``', ``HeartbeatSeconds``'
#: defaults); ``--before`` takes the fixed 20 s tick and the 60 s heartbeat of then.
DEPLOYED_MAX_TICK = Settings(cluster="bench").max_tick_interval
DEPLOYED_HEARTBEAT = Settings(cluster="bench").heartbeat_interval
BEFORE_HEARTBEAT = 60.0


def bench_calls(
    job_seconds: float, before: bool = False, max_tick: float | None = None
) -> dict[str, Any]:
    """One idle and one busy instance drained; ``max_tick`` None: as deployed (--before: 0)."""
    if max_tick is None:
        max_tick = 0.0 if before else DEPLOYED_MAX_TICK
    out: dict[str, Any] = {}
    with world() as w:
        idle_i, busy_i = w.build_many(2)
        calls = Calls()
        ctls = w.counted_controllers(
            calls,
            tick_interval=20,
            heartbeat_interval=BEFORE_HEARTBEAT if before else DEPLOYED_HEARTBEAT,
            max_tick_interval=max_tick,
        )
        for ctl in ctls.values():
            if before and hasattr(ctl.fleet, "full_listing_every"):
                ctl.fleet.full_listing_every = 0.0  # both task listings every step
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


# ---------------------------------------------------------------------------- 4, 5: fleets


class DrivenWorld(BenchWorld):
    """The tests' world driven one second of AWS time at a time: every event and tick is
    delivered on its own and its AWS calls and coordinator requests are charged to the
    instance it is about; failures are redelivered as AWS would; agents drain as fleetdrain's
    do (their own deadline after SIGTERM); a spot instance dies 120 s after its notice."""

    #: The controllers' REST clients and GraphQL lookups (:func:`fleet_controller`).
    clients: list[CoordinatorClient]
    lookups: list[GraphqlAgentLookup]

    def drive(self, calls: Calls, batching: dict[str, float] | None = None, most: int = 10) -> None:
        """Count ``calls``; ``batching``: the functions fed by a notice queue, with their
        batching windows (None: every notice straight to its function, as before); ``most``:
        the most notices a batch holds (the mapping's BatchSize; less: what Lambda's several
        pollers, each gathering its own batch, may come to)."""
        self.calls = calls
        self.batching = batching
        self.most = most
        self.charged_aws: Counter[str] = Counter()
        self.charged_rest: Counter[str] = Counter()
        #: Instance -> its AWS calls by operation (for the breakdown of idle and busy drains).
        self.charged_ops: dict[str, Counter[str]] = {}
        self.iid_of_ci = {arn: iid for iid, arn in self.ci_arn.items()}
        self.later: list[tuple[float, dict[str, Any], int]] = []
        self.failures = 0
        self.dropped = 0
        #: Notices on their way through a queue, by function: (when sent, event).
        self.notices: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        #: The batches the notice queues delivered (their sizes).
        self.batches: list[int] = []
        #: Instances whose drain has begun (only their agents are simulated), spot deaths.
        self.active: set[str] = set()
        self.deaths: dict[str, float] = {}
        #: Agent id -> when its job was cancelled by a forced stop through the coordinator.
        self.forced: dict[str, float] = {}
        self.self_cancelled: set[str] = set()
        self.lost: list[str] = []

    # ------------------------------------------------------------------ delivery, charged

    def instance_of(self, event: dict[str, Any]) -> str | None:
        detail = event.get("detail")
        if not isinstance(detail, dict):
            return None
        for key in ("EC2InstanceId", "instance-id", "ec2InstanceId"):
            if detail.get(key):
                return str(detail[key])
        return self.iid_of_ci.get(str(detail.get("containerInstanceArn", "")))

    def charged(self, iid: str | None, fn: Any) -> Any:
        """Run ``fn``; its AWS calls and coordinator requests are charged to ``iid``."""
        return self.charged_many([iid] if iid is not None else [], fn)

    def charged_many(self, iids: list[str], fn: Any) -> Any:
        """Run ``fn``; its calls and requests are shared evenly by ``iids`` (one batch)."""
        aws, rest = self.calls.total, self.coordinator_requests()
        ops = self.calls.snapshot()
        try:
            return fn()
        finally:
            share = 1.0 / max(1, len(iids))
            spent = delta(self.calls.snapshot(), ops)
            for iid in iids:
                self.charged_aws[iid] += (self.calls.total - aws) * share
                self.charged_rest[iid] += (self.coordinator_requests() - rest) * share
                mine = self.charged_ops.setdefault(iid, Counter())
                for op, n in spent.items():
                    mine[op] += n * share

    def route(self, event: dict[str, Any], tries: int = 0) -> list[dict[str, Any]]:
        out = []
        iid = self.instance_of(event)
        for rule in self.rules:
            if not rule.matches(event):
                continue
            if rule.queue is not None and self.batching is not None:
                # EventBridge puts it on the rule's queue; the function gets it in a batch.
                self.notices.setdefault(rule.function, []).append((self.clock(), event))
                continue
            try:
                out.append(self.charged(iid, lambda f=rule.function: self.invoke(f, event)))
            except Exception:  # Lambda's asynchronous retries, then the DLQ
                self.failures += 1
                if tries < len(EVENT_RETRIES):
                    self.later.append((self.clock() + EVENT_RETRIES[tries], event, tries + 1))
                else:
                    self.dropped += 1
        return out

    def deliver_notices(self) -> None:
        """The notice queues' event source mappings: a batch of up to 10 once it is full or its
        oldest message has waited the function's batching window (one poller each)."""
        now = self.clock()
        for function, pending in self.notices.items():
            window = (self.batching or {}).get(function, 0.0)
            most = self.most
            while pending and (len(pending) >= most or now - pending[0][0] >= window):
                batch, pending[:] = pending[:most], pending[most:]
                events = [e for _, e in batch]
                iids = [i for e in events if (i := self.instance_of(e))]
                event = sqs_event(*(json.dumps(e) for e in events))
                response = self.charged_many(iids, lambda f=function, e=event: self.invoke(f, e))
                self.batches.append(len(batch))
                failed = {f["itemIdentifier"] for f in response.get("batchItemFailures", [])}
                for record, (_, notice) in zip(event["Records"], batch, strict=True):
                    if record["messageId"] in failed:
                        self.failures += 1
                        pending.append((now + NOTICE_REDELIVERY, notice))

    def deliver_ticks(self) -> None:
        for body in self.ticks.due():
            iid = str(json.loads(body).get("instance_id", "")) or None
            response = self.charged(
                iid, lambda b=body: self.invoke("DrainMonitorFunction", sqs_event(b))
            )
            if response["batchItemFailures"]:
                self.failures += 1
                self.ticks.pending.append((self.clock() + TICK_REDELIVERY, body))

    # ------------------------------------------------------------------ agents

    def _run_agents(self) -> None:
        now = self.clock()
        for agent in list(self.agents.values()):
            if agent.exited or agent.instance_id not in self.active:
                continue
            death = self.deaths.get(agent.instance_id)
            job = self.coord.job(agent.job_id) if agent.job_id else None
            state = job.state if job else None
            running = state in ("accepted", "running")
            if death is not None and now >= death:
                if running or state == "canceling":
                    self.lost.append(agent.job_id or "")
                self._exit(agent, 137)  # the instance is gone
                continue
            if not agent.ignores_sigterm and agent.sigterm_at is not None and not agent.token:
                self._exit(agent, 0)  # a wrapped worker: nothing to finish here
                continue
            if not agent.token:
                continue
            if state == "canceling":  # a forced stop through the coordinator
                self.forced[agent.agent_id] = now
                self._finish_job(agent, "-1", "agent_stop")
                self._exit(agent, 0)
                continue
            if running and agent.job_ends_at is not None and now >= agent.job_ends_at:
                self._finish_job(agent, "0", None)
                running = False
            elif (
                running
                and agent.sigterm_at is not None
                and now >= agent.sigterm_at + AGENT_CANCEL_AFTER
            ):
                # fleetdrain's agent: its own deadline, before SIGKILL can come.
                self.self_cancelled.add(agent.agent_id)
                self._finish_job(agent, "143", "agent_stop")
                self._exit(agent, 0)
                continue
            if running:
                continue
            told = agent.sigterm_at is not None or self.coord.agent(agent.agent_id).stop_requested
            if told:
                self._exit(agent, 0)

    def second(self) -> None:
        """One second of AWS time."""
        self.clock.advance(1.0)
        self._run_agents()
        self.pump()
        self.gaps.expire_lifecycle_actions()
        now = self.clock()
        due = [x for x in self.later if x[0] <= now]
        self.later = [x for x in self.later if x[0] > now]
        for _, event, tries in due:
            self.route(event, tries)
        self.deliver_notices()
        self.deliver_ticks()
        self.pump()


def other_agents(w: DrivenWorld, count: int) -> None:
    """Agents of the organization on other fleets (registered, connected, never drained)."""
    for n in range(count):
        reg = w.coord.register(
            w.coord.registration_token,
            RegisterRequest(
                name=f"elsewhere-{n}",
                meta_data=[f"ecs:task-arn=arn:aws:ecs:{REGION}:1:task/other/{n:06d}"],
            ),
        )
        w.coord.connect(reg.access_token, {})


def fleet_controller(
    w: DrivenWorld, calls: Calls, before: bool, graphql: bool = False, most: int = 10
) -> list[CoordinatorClient]:
    """One counted controller per function (as deployed: one warm container each), events and
    ticks delivered to the controller of the function that handles them; their REST clients.
    ``graphql``: agents found with GraphQL lookups (``CoordinatorGraphqlUrl``) instead of the
    shared REST listing."""
    clients = []
    w.lookups = []
    # The tick and heartbeat as deployed; --before: the fixed 20 s tick and 60 s heartbeat.
    grow = {"max_tick_interval": 0.0, "heartbeat_interval": BEFORE_HEARTBEAT} if before else {}
    ctls = w.counted_controllers(calls, tick_interval=20, spot_margin=20, **grow)
    for ctl in ctls.values():
        # The client on the world's clock (a wait for the rate-limit window moves it).
        client = w.rest_client(honour_rate_limit=not before)
        clients.append(client)
        # As deployed: every drain shares one listing of the organization through the drain
        # table (its reads counted); --before: each drain lists on its own.
        if graphql:
            lookup = w.graphql_lookup()
            w.lookups.append(lookup)
            ctl.coordinator = GraphqlCoordinator(client, lookup)
            continue
        ctl.coordinator = (
            client
            if before
            else SharedAgentListing(
                client,
                DynamoListingCache(ctl.store._ddb, "drains", ctl.settings.cluster, w.clock, 3600),
                ctl.settings.cluster,
                w.clock,
                sleep=w.clock.advance,
            )
        )
        if before and hasattr(ctl.fleet, "full_listing_every"):
            ctl.fleet.full_listing_every = 0.0  # both task listings every step
    w.rest = clients[0]
    w.clients = clients
    # As deployed: notices through their queues, in batches (--before: one by one).
    w.drive(calls, None if before else notice_windows(), most)
    return clients


def notice_windows() -> dict[str, float]:
    """template.yaml's functions fed by a queue that EventBridge puts notices on, with their
    batching windows (the queue's event source mapping's ``MaximumBatchingWindowInSeconds``,
    a parameter's default resolved)."""
    template = load_template(ROOT / "template.yaml")
    params = template.get("Parameters", {})
    queues = {
        rule.function: rule.queue
        for rule in event_rules(template, {"ClusterName": "ci", "AutoScalingGroupName": "g"})
        if rule.queue is not None
    }
    windows: dict[str, float] = {}
    for resource in template.get("Resources", {}).values():
        props = resource.get("Properties", {})
        if resource.get("Type") != "AWS::Lambda::EventSourceMapping":
            continue
        att = (props.get("EventSourceArn") or {}).get("Fn::GetAtt")
        queue = att[0] if isinstance(att, list) else str(att or "").split(".")[0]
        function = (props.get("FunctionName") or {}).get("Ref")
        if function not in queues or queues[function] != queue:
            continue
        window = props.get("MaximumBatchingWindowInSeconds", 0)
        if isinstance(window, dict) and "Ref" in window:
            window = params[window["Ref"]].get("Default", 0)
        windows[function] = float(window)
    return windows


def fleet_figures(
    w: DrivenWorld,
    clients: list[CoordinatorClient],
    ids: list[str],
    busy: set[str],
    wall: float,
    aws_seconds: float,
) -> dict[str, Any]:
    stats = w.coord.rest_rate.stats()
    gql = w.coord.graphql_rate.stats()
    idle = [i for i in ids if i not in busy]
    records = {iid: w.record(iid) for iid in ids}
    return {
        "instances": len(ids),
        "busy": len(busy),
        "wall": wall,
        "aws_seconds": aws_seconds,
        "rest_requests": stats.requests,
        "peak": stats.window_peak,
        "sliding_peak": stats.peak,
        "limited": stats.limited,
        "held_back": sum(c.rate_refused for c in clients),
        "waits": sum(c.rate_waits for c in clients),
        "fallbacks": int(w.metrics.counts.get(core.COORDINATOR_FALLBACKS, 0)),
        "coordinator_per_instance": (stats.requests + gql.requests) / max(1, len(ids)),
        "graphql_requests": gql.requests,
        "graphql_limited": gql.limited,
        "aws_idle": statistics.mean(w.charged_aws[i] for i in idle) if idle else 0.0,
        "aws_busy": statistics.mean(w.charged_aws[i] for i in busy) if busy else 0.0,
        "ops_idle": mean_ops([w.charged_ops.get(i, Counter()) for i in idle]),
        "ops_busy": mean_ops([w.charged_ops.get(i, Counter()) for i in busy]),
        "rest_idle": statistics.mean(w.charged_rest[i] for i in idle) if idle else 0.0,
        "rest_busy": statistics.mean(w.charged_rest[i] for i in busy) if busy else 0.0,
        "failures": w.failures,
        "dropped": w.dropped,
        "done": sum(1 for r in records.values() if r.phase == "done"),
        "outcomes": Counter(str(r.outcome) for r in records.values()),
        "self_cancelled": len(w.self_cancelled),
        "lost": len(w.lost),
        "forced": w.forced,
        "batches": list(w.batches),
    }


def bench_scale_in(
    instances: int,
    org_agents: int,
    per_minute: float,
    before: bool,
    graphql: bool = False,
    most: int = 10,
) -> dict[str, Any]:
    with world(REST_LIMIT, DrivenWorld) as w:
        t = time.perf_counter()
        ids = w.build_many(instances)
        busy = set(ids[::10])
        gap = 60.0 / per_minute
        for n, iid in enumerate(ids):
            # Busy for 300 s from the moment its own drain begins (the n-th, n gaps from now).
            w.add_agent(iid, job_seconds=300.0 + n * gap if iid in busy else None)
        other_agents(w, max(0, org_agents - instances))
        setup = time.perf_counter() - t
        calls = Calls()
        clients = fleet_controller(w, calls, before, graphql, most)
        t, start = time.perf_counter(), w.clock()
        pending = list(ids)
        next_at = start
        limit = start + len(ids) * gap + 1800
        while w.clock() < limit:
            while pending and w.clock() >= next_at:
                iid = pending.pop(0)
                w.active.add(iid)
                w.emit(w.gaps.begin_termination(iid))
                next_at += gap
            if not pending and not any(a.waiting for a in w.gaps.actions.values()):
                break
            w.second()
            if len(pending) % 100 == 0 and pending and w.clock() >= next_at - 1:
                done = len(ids) - len(pending)
                print(f"   ... {done} begun, {time.perf_counter() - t:.0f} s", file=sys.stderr)
        wall = time.perf_counter() - t
        out = fleet_figures(w, clients, ids, busy, wall, w.clock() - start)
        actions = [w.gaps.actions[i] for i in ids]
        out["setup"] = setup
        out["completed"] = sum(1 for a in actions if a.state == "completed")
        out["expired"] = sum(1 for a in actions if a.state == "expired")
        out["cut_short"] = sum(
            1 for j in w.coord.jobs() if j.signal_reason == "agent_stop" and j.attempt == 1
        )
        return out


def bench_storm(
    instances: int, org_agents: int, before: bool, graphql: bool = False, most: int = 10
) -> dict[str, Any]:
    with world(REST_LIMIT, DrivenWorld) as w:
        t = time.perf_counter()
        ids = w.build_many(instances)
        busy = set(ids[::2])
        busy_agents: dict[str, SimAgent] = {}
        for iid in ids:
            if iid in busy:
                busy_agents[iid] = w.add_agent(iid, job_seconds=3600.0)
            else:
                w.add_agent(iid)
            w.add_agent(iid)
        other_agents(w, max(0, org_agents - 2 * instances))
        setup = time.perf_counter() - t
        calls = Calls()
        clients = fleet_controller(w, calls, before, graphql, most)
        t, start = time.perf_counter(), w.clock()
        for iid in ids:
            w.active.add(iid)
            w.deaths[iid] = start + SPOT_NOTICE
        for iid in ids:
            w.emit(w.gaps.spot_interruption(iid))
        while w.clock() < start + SPOT_NOTICE + 60:
            w.second()
        wall = time.perf_counter() - t
        out = fleet_figures(w, clients, ids, busy, wall, w.clock() - start)
        out["setup"] = setup
        out["forced_in_time"] = sum(
            1
            for a in busy_agents.values()
            if a.agent_id in w.forced and w.forced[a.agent_id] <= start + SPOT_NOTICE
        )
        return out


def mean_ops(counters: list[Counter[str]]) -> dict[str, float]:
    """The mean count of each operation over these instances."""
    total: Counter[str] = Counter()
    for c in counters:
        total.update(c)
    n = max(1, len(counters))
    return {op: v / n for op, v in total.items()}


#: The services whose API the controller's calls can be throttled by per account and Region
#: (ECS's token buckets; Auto Scaling's lifecycle-action calls). DynamoDB on demand and SQS
#: standard queues have no request rate a fleet's drains come near.
CONTROL_PLANES = ("ecs", "auto-scaling")


def control_plane(ops: dict[str, float]) -> float:
    """The mean calls per instance to :data:`CONTROL_PLANES`."""
    return sum(v for op, v in ops.items() if op.split(".", 1)[0] in CONTROL_PLANES)


def show_mean_ops(ops: dict[str, float], indent: str) -> None:
    ranked = sorted(ops.items(), key=lambda kv: -kv[1])
    print(indent + ", ".join(f"{op} {v:.1f}" for op, v in ranked))


def show_fleet(f: dict[str, Any], indent: str = "   ") -> list[str]:
    """Print a fleet's figures; the goals it missed."""
    g = FLEET_GOALS
    missed = []
    print(
        f"{indent}coordinator: {f['rest_requests']} requests, peak {f['peak']} in a minute "
        f"window (limit {REST_LIMIT}; goal <= {g['peak_per_minute']}; in any 60 s "
        f"{f['sliding_peak']}), 429s {f['limited']} "
        f"(goal {g['limited']}), held back by the client {f['held_back']}, waits "
        f"{f['waits']}, fallbacks to ECS {f['fallbacks']}"
    )
    if f["graphql_requests"]:
        print(
            f"{indent}GraphQL: {f['graphql_requests']} requests (its own limit, in points), "
            f"429s {f['graphql_limited']}"
        )
    print(
        f"{indent}per drained instance: coordinator {f['coordinator_per_instance']:.1f} requests "
        f"(idle {f['rest_idle']:.1f}, busy {f['rest_busy']:.1f}; goal <= "
        f"{g['coordinator_per_instance']}); AWS calls idle {f['aws_idle']:.1f} (goal <= "
        f"{g['aws_idle']}), busy {f['aws_busy']:.1f} (goal <= {g['aws_busy']})"
    )
    busy_part = f", busy {control_plane(f['ops_busy']):.1f}" if f["busy"] else ""
    print(
        f"{indent}  of these, to the throttled control planes (ECS, Auto Scaling): idle "
        f"{control_plane(f['ops_idle']):.1f}{busy_part}; the rest is DynamoDB, SQS and "
        "Secrets Manager"
    )
    print(f"{indent}  idle, by operation:", end=" ")
    show_mean_ops(f["ops_idle"], "")
    if f["busy"]:
        print(f"{indent}  busy, by operation:", end=" ")
        show_mean_ops(f["ops_busy"], "")
    sizes = f["batches"]
    if sizes:
        print(
            f"{indent}notices through their queues: {len(sizes)} batches, "
            f"{statistics.mean(sizes):.1f} notices a batch (the first steps of one batch share "
            "their ECS and SQS calls)"
        )
    else:
        print(f"{indent}notices: each to its function on its own (no queue)")
    print(
        f"{indent}drains done {f['done']}/{f['instances']} "
        f"({', '.join(f'{k} {v}' for k, v in sorted(f['outcomes'].items()))}); "
        f"failed deliveries {f['failures']} (to the DLQ {f['dropped']}); jobs cancelled by "
        f"the agents' own deadline {f['self_cancelled']}, lost {f['lost']} (goal {g['lost']})"
    )
    print(
        f"{indent}wall {f['wall']:.0f} s for {f['aws_seconds']:.0f} s of AWS time "
        f"(set-up {f['setup']:.0f} s)"
    )
    if f["peak"] > g["peak_per_minute"]:
        missed.append("peak per minute")
    if f["limited"] > g["limited"]:
        missed.append("429s")
    if f["aws_idle"] > g["aws_idle"] or (f["busy"] and f["aws_busy"] > g["aws_busy"]):
        missed.append("AWS calls per instance")
    if f["coordinator_per_instance"] > g["coordinator_per_instance"]:
        missed.append("coordinator requests per instance")
    if f["lost"] > g["lost"]:
        missed.append("jobs lost")
    return missed


# ---------------------------------------------------------------------------- report


def show_ops(by_op: Counter[str], indent: str = "      ") -> None:
    for op, n in sorted(by_op.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"{indent}{op:<44}{n:>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="100-instance scale-in, 20-instance storm, fewer samples",
    )
    parser.add_argument("--instances", type=int, help="the scale-in's size (default 1000)")
    parser.add_argument(
        "--scale-in-per-minute",
        type=float,
        default=100.0,
        help="lifecycle actions a minute of AWS time in 4 (default 100)",
    )
    parser.add_argument("--storm", type=int, help="the spot storm's size (default 100)")
    parser.add_argument(
        "--org-agents", type=int, default=1000, help="agents in the organization (default 1000)"
    )
    parser.add_argument(
        "--before",
        action="store_true",
        help="2, 4 and 5 with the controller as before issue 12 (rate limits not honoured, "
        "both task listings every step)",
    )
    parser.add_argument(
        "--sections", default="1,2,3,4,5", help="which sections to run (default 1,2,3,4,5)"
    )
    parser.add_argument(
        "--graphql",
        action="store_true",
        help="4 and 5 with agents found by GraphQL lookups (CoordinatorGraphqlUrl) instead of "
        "the shared REST listing",
    )
    parser.add_argument(
        "--notices-a-batch",
        type=int,
        default=10,
        help="4 and 5: the most notices a batch holds (default 10, the mappings' BatchSize; "
        "this bench's one poller fills it, Lambda's several pollers each gather their own)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    args = parser.parse_args(argv)
    instances = args.instances or (100 if args.quick else 1000)
    storm = args.storm or (20 if args.quick else 100)
    sections = {int(x) for x in args.sections.split(",") if x.strip()}
    missed: list[str] = []

    print("fleetdrain drain controller benchmark (moto in-process, coordinator on loopback)")
    if 1 in sections:
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

    if 2 in sections:
        per = bench_calls(300.0, args.before)
        print(
            "\n2. AWS calls per drained instance (before-call hook on every controller client)"
            + ("; ECS adapter before issue 12 (--before)" if args.before else "")
        )
        for name, what in (
            ("idle", "2 idle agents + a daemon task"),
            (
                "busy",
                "a 300 s job + an idle agent; ticks 20 s"
                + ("" if args.before else f" growing to {DEPLOYED_MAX_TICK:g} s")
                + f", heartbeats {BEFORE_HEARTBEAT if args.before else DEPLOYED_HEARTBEAT:g} s",
            ),
        ):
            f = per[name]
            print(
                f"   {name}: {f['total']} AWS calls + {f['coordinator']} coordinator requests "
                f"({what}; {f['steps']} steps, {f['ticks']} ticks sent)"
            )
            show_ops(f["by_op"])
        if not args.before:
            fixed = bench_calls(300.0, max_tick=0.0)["busy"]
            print(
                f"   busy, a fixed 20 s tick (FLEETDRAIN_MAX_TICK_SECONDS=0): "
                f"{fixed['total']} AWS calls + {fixed['coordinator']} coordinator requests "
                f"({fixed['steps']} steps)"
            )

    if 3 in sections:
        imp = bench_import(3 if args.quick else 7)
        print(
            "\n3. handler cold import"
            " (a fresh CPython 3.12: import fleetdrain.controller.lifecycle_hook)"
        )
        if "skipped" in imp:
            print(f"   skipped: {imp['skipped']}")
        else:
            print(
                f"   with .pyc: median {imp['pyc'] * 1000:.0f} ms (min "
                f"{imp['pyc_min'] * 1000:.0f})   without: {imp['no_pyc'] * 1000:.0f} ms   "
                f"goal <= {GOALS['import_pyc']:.2f} s"
            )
            print(f"   artifact check: {imp['check']}")
            print("   self import time by package (with .pyc): ", end="")
            print(", ".join(f"{name} {sec * 1000:.0f} ms" for name, sec in imp["top"]))
            if imp["pyc"] > GOALS["import_pyc"]:
                missed.append("import time")

    which = "before issue 12 (--before)" if args.before else "as built"
    if args.graphql:
        which += ", agents found with GraphQL (--graphql)"
    if 4 in sections:
        scale = bench_scale_in(
            instances,
            args.org_agents,
            args.scale_in_per_minute,
            args.before,
            args.graphql,
            args.notices_a_batch,
        )
        print(
            f"\n4. scale-in of {scale['instances']} instances ({scale['busy']} busy for 300 s) "
            f"in a {max(args.org_agents, instances)}-agent organization, "
            f"{args.scale_in_per_minute:g} lifecycle actions a minute; controller {which}"
        )
        missed += [f"scale-in: {m}" for m in show_fleet(scale)]
        print(
            f"   hooks completed {scale['completed']}/{scale['instances']}, expired "
            f"{scale['expired']}; jobs cut short (agent_stop, retried) {scale['cut_short']}"
        )
        if scale["completed"] != scale["instances"]:
            missed.append("scale-in: hooks")

    if 5 in sections:
        spot = bench_storm(storm, args.org_agents, args.before, args.graphql, args.notices_a_batch)
        print(
            f"\n5. spot storm: {spot['instances']} instances interrupted at once "
            f"({spot['busy']} with a job that cannot finish in time) in a "
            f"{max(args.org_agents, 2 * storm)}-agent organization; controller {which}"
        )
        missed += [f"storm: {m}" for m in show_fleet(spot)]
        print(
            f"   drains forced through the coordinator before their deadline: "
            f"{spot['forced_in_time']}/{spot['busy']} (goal: all)"
        )
        if spot["forced_in_time"] != spot["busy"]:
            missed.append("storm: forced in time")

    print(f"\ngoals missed: {', '.join(missed) or 'none'}")
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
