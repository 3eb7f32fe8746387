"""Whole drains: moto (in-process) + fleetdrain.drill.aws.gaps gap fillers + the embedded
coordinator
over loopback HTTP + the real Lambda handlers, fed by template.yaml's own event patterns.

Agents are simulated at the coordinator level (registered and driven through the
coordinator's Python API, with the ``ecs:task-arn`` tag of a moto ECS task); the controller
talks to the coordinator over real REST. What a real agent process does on SIGTERM is
simulated by :class:`World` (graceful: finish the job then exit; forced stop: cancel, report
``agent_stop``, exit; a "bad" agent ignores SIGTERM and is SIGKILLed at stopTimeout).
Real agent processes are the drill's job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from fleetdrain.agent.buildkite.models import RegisterRequest
from fleetdrain.controller import drain_monitor, lifecycle_hook, runtime, spot_interruption
from fleetdrain.controller.drain import core
from fleetdrain.controller.drain.config import Settings
from fleetdrain.controller.drain.coordinator import CoordinatorClient, SecretToken
from fleetdrain.controller.drain.core import DrainController
from fleetdrain.controller.drain.ecs_fleet import EcsFleet
from fleetdrain.controller.drain.errors import Retryable
from fleetdrain.controller.drain.events import parse_message
from fleetdrain.controller.drain.graphql_agents import GraphqlAgentLookup, GraphqlCoordinator
from fleetdrain.controller.drain.lifecycle import LifecycleActions
from fleetdrain.controller.drain.ports import DrainRecord
from fleetdrain.controller.drain.shared_listing import SharedAgentListing
from fleetdrain.controller.drain.state import DynamoDrainStore, DynamoListingCache
from fleetdrain.controller.drain.ticks import tick_body
from fleetdrain.drill.aws.gaps import AwsGaps
from fleetdrain.drill.aws.rules import event_rules
from fleetdrain.drill.aws.template import load_template
from fleetdrain.drill.aws.world import sqs_lambda_event
from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer, RetryRule
from fleetdrain.drill.coordinator.faults import Fault

pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

REGION = "us-east-1"
ACCOUNT = "123456789012"
T0 = 1_770_000_000.0
ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "ci"
ASG = "ci-agents"
HOOK = "fleetdrain-terminating"
STOP_TIMEOUT = 120.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingMetrics:
    def __init__(self) -> None:
        self.counts: dict[str, float] = {}
        self.timings: dict[str, list[float]] = {}

    def count(self, name: str, value: float = 1.0) -> None:
        self.counts[name] = self.counts.get(name, 0.0) + value

    def seconds(self, name: str, value: float) -> None:
        self.timings.setdefault(name, []).append(value)


class FakeTicks:
    """The drain queue's delayed messages, delivered by :meth:`World.advance`."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.pending: list[tuple[float, str]] = []
        self.sent = 0

    def schedule(
        self,
        instance_id: str,
        drain_id: str,
        tick_id: str,
        delay: int,
        record: DrainRecord | None = None,
    ) -> None:
        self.sent += 1
        body = tick_body(instance_id, drain_id, tick_id, record)
        self.pending.append((self.clock() + delay, body))

    def due(self) -> list[str]:
        now = self.clock()
        ready = [body for due, body in self.pending if due <= now]
        self.pending = [(due, body) for due, body in self.pending if due > now]
        return ready


@dataclass
class Ctx:
    function_name: str = "fleetdrain-fn"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = f"arn:aws:lambda:{REGION}:{ACCOUNT}:function:fleetdrain-fn"
    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))


HANDLERS: dict[str, Callable[[dict[str, Any], Any], dict[str, Any]]] = {
    "LifecycleHookFunction": lifecycle_hook.handler,
    "SpotInterruptionFunction": spot_interruption.handler,
    "DrainMonitorFunction": drain_monitor.handler,
}


def sqs_event(*bodies: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": str(uuid.uuid4()),
                "receiptHandle": "handle",
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": "1770000000000",
                    "SenderId": "AIDAEXAMPLE",
                    "ApproximateFirstReceiveTimestamp": "1770000000000",
                },
                "messageAttributes": {},
                "md5OfBody": "0",
                "eventSource": "aws:sqs",
                "eventSourceARN": f"arn:aws:sqs:{REGION}:{ACCOUNT}:drain-queue",
                "awsRegion": REGION,
            }
            for body in bodies
        ]
    }


@dataclass
class SimAgent:
    task_arn: str
    instance_id: str
    agent_id: str
    token: str
    job_id: str | None = None
    job_ends_at: float | None = None
    sigterm_at: float | None = None
    ignores_sigterm: bool = False
    exited: bool = False


class World:
    """A cluster of container instances in an ASG, agents, the controller, and a clock."""

    def __init__(self, clock: Clock, gaps: AwsGaps, coord: Coordinator, server: CoordinatorServer):
        self.clock = clock
        self.gaps = gaps
        self.coord = coord
        self.server = server
        self.ec2 = boto3.client("ec2", region_name=REGION)
        self.asg = boto3.client("autoscaling", region_name=REGION)
        self.ecs = boto3.client("ecs", region_name=REGION)
        self.ddb = boto3.client("dynamodb", region_name=REGION)
        self.sm = boto3.client("secretsmanager", region_name=REGION)
        self.rules = event_rules(
            load_template(ROOT / "template.yaml"),
            {
                "ClusterName": CLUSTER,
                "AutoScalingGroupName": ASG,
                "LifecycleHookName": HOOK,
                "CoordinatorOrg": coord.org,
                "CoordinatorTokenSecretArn": "arn:aws:secretsmanager:us-east-1:1:secret:x",
            },
        )
        self.agents: dict[str, SimAgent] = {}
        self.cursor = 0
        self.results: list[dict[str, Any]] = []
        self.ticks = FakeTicks(clock)
        self.metrics = RecordingMetrics()
        gaps.on_sigterm = self._on_sigterm

    # ------------------------------------------------------------------ building

    def build(self, instances: int = 2, hook_timeout: int = 300) -> list[str]:
        """The group with its hook, the cluster, its services and daemon, the table, the secret;
        the instance ids (bench/controller.py builds a thousand with this too)."""
        self.ec2.create_launch_template(
            LaunchTemplateName="ci-agents",
            LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": "c6g.large"},
        )
        self.asg.create_auto_scaling_group(
            AutoScalingGroupName=ASG,
            LaunchTemplate={"LaunchTemplateName": "ci-agents", "Version": "$Latest"},
            MinSize=0,
            MaxSize=max(20, instances),
            DesiredCapacity=instances,
            AvailabilityZones=[f"{REGION}a"],
        )
        self.asg.put_lifecycle_hook(
            LifecycleHookName=HOOK,
            AutoScalingGroupName=ASG,
            LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
            HeartbeatTimeout=hook_timeout,
            DefaultResult="CONTINUE",
        )
        ids: list[str] = []
        token: str | None = None
        while True:  # paged: describe_auto_scaling_groups lists at most 50 instances here
            page = self.asg.describe_auto_scaling_instances(
                MaxRecords=50, **({"NextToken": token} if token else {})
            )
            ids.extend(i["InstanceId"] for i in page["AutoScalingInstances"])
            token = page.get("NextToken")
            if not token:
                break
        self.ecs.create_cluster(clusterName=CLUSTER)
        self.ecs.register_task_definition(
            family="fleetdrain-agent",
            containerDefinitions=[{"name": "agent", "image": "agent", "memory": 512}],
        )
        self.ecs.register_task_definition(
            family="log-router",
            containerDefinitions=[{"name": "router", "image": "router", "memory": 64}],
        )
        self.ecs.create_service(
            cluster=CLUSTER, serviceName="ci-agents", taskDefinition="fleetdrain-agent"
        )
        self.ecs.create_service(
            cluster=CLUSTER,
            serviceName="log-router",
            taskDefinition="log-router",
            schedulingStrategy="DAEMON",
        )
        self.ci_arn: dict[str, str] = {}
        for iid in ids:
            ci = self.ecs.register_container_instance(
                cluster=CLUSTER, instanceIdentityDocument=json.dumps({"instanceId": iid})
            )
            self.ci_arn[iid] = ci["containerInstance"]["containerInstanceArn"]
            self.start_task(iid, "log-router", "service:log-router")
        self.ddb.create_table(
            TableName="drains",
            KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
            AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
            BillingMode="PAY_PER_REQUEST",
        )
        secret = self.sm.create_secret(Name="coordinator-token", SecretString=self.coord.api_token)
        self.secret_arn = secret["ARN"]
        self.instances = ids
        return ids

    def controller(self, **overrides: Any) -> DrainController:
        values: dict[str, Any] = {
            "cluster": CLUSTER,
            "table_name": "drains",
            "queue_url": "unused",
            "coordinator_url": self.server.url,
            "coordinator_org": self.coord.org,
            "coordinator_token_secret_arn": self.secret_arn,
            "asg_name": ASG,
            "hook_name": HOOK,
        }
        grace = overrides.pop("coordinator_grace", 30.0)
        #: Find agents with GraphQL (by meta-data) instead of the shared REST listing.
        graphql = overrides.pop("graphql", False)
        metrics = overrides.pop("metrics", self.metrics)
        values.update(overrides)
        settings = Settings(**values)
        self.token = SecretToken(self.sm, self.secret_arn, clock=self.clock)
        self.ecs_client = boto3.client("ecs", region_name=REGION)
        #: The REST client; the controller reaches it through the shared listing, as deployed.
        self.rest = self.rest_client()
        self.listing: Any
        if graphql:
            self.graphql = self.graphql_lookup()
            self.listing = GraphqlCoordinator(self.rest, self.graphql)
        else:
            self.listing = SharedAgentListing(
                self.rest,
                DynamoListingCache(self.ddb, "drains", CLUSTER, self.clock, settings.record_ttl),
                CLUSTER,
                self.clock,
                sleep=self.clock.advance,
            )
        ctl = DrainController(
            settings,
            DynamoDrainStore(self.ddb, "drains", self.clock, settings.record_ttl),
            EcsFleet(self.ecs_client, CLUSTER, self.clock),
            self.listing,
            LifecycleActions(self.asg),
            self.ticks,
            metrics,
            self.clock,
            coordinator_grace=grace,
        )
        runtime.set_controller(ctl)
        self.ctl = ctl
        return ctl

    def _client_options(self) -> dict[str, Any]:
        """The coordinator clients' options here: short, few retries, and on the world's clock
        (the coordinator's rate-limit windows are on it: so is the budget, and a wait for a
        window moves it)."""
        return {
            "timeout": 2.0,
            "attempts": 2,
            "backoff": 0.0,
            "clock": self.clock,
            "sleep": self.clock.advance,
        }

    def rest_client(self, **options: Any) -> CoordinatorClient:
        """A REST client of the embedded coordinator, with the world's token."""
        return CoordinatorClient(
            self.server.url,
            self.coord.org,
            self.token.get,
            self.token.invalidate,
            **{**self._client_options(), **options},
        )

    def graphql_lookup(self) -> GraphqlAgentLookup:
        """A GraphQL lookup of the embedded coordinator (``/graphql/v1``), the world's token."""
        return GraphqlAgentLookup(
            f"{self.server.url}/graphql/v1",
            self.coord.org,
            self.token.get,
            self.token.invalidate,
            **self._client_options(),
        )

    def start_task(self, iid: str, family: str, group: str) -> str:
        out = self.ecs.start_task(
            cluster=CLUSTER,
            taskDefinition=family,
            containerInstances=[self.ci_arn[iid]],
            group=group,
        )
        return str(out["tasks"][0]["taskArn"])

    def add_agent(
        self,
        iid: str,
        job_seconds: float | None = None,
        *,
        group: str = "service:ci-agents",
        ignores_sigterm: bool = False,
        retry: list[RetryRule] | None = None,
        coordinator: bool = True,
    ) -> SimAgent:
        """An agent task on ``iid``; busy for ``job_seconds`` if given."""
        task_arn = self.start_task(iid, "fleetdrain-agent", group)
        if not coordinator:  # a wrapped worker: no coordinator agent, protection only
            agent = SimAgent(task_arn, iid, "", "", ignores_sigterm=ignores_sigterm)
            self.agents[task_arn] = agent
            return agent
        reg = self.coord.register(
            self.coord.registration_token,
            RegisterRequest(
                name=f"agent-{len(self.agents) + 1}",
                meta_data=[f"ecs:task-arn={task_arn}", f"ecs:cluster={CLUSTER}"],
            ),
        )
        self.coord.connect(reg.access_token, {})
        agent = SimAgent(task_arn, iid, reg.id, reg.access_token, ignores_sigterm=ignores_sigterm)
        if job_seconds is not None:
            job = self.coord.add_job("make test", retry=retry or [])
            ping = self.coord.ping(agent.token, {})
            assert ping.job is not None and ping.job.id == job.id
            self.coord.accept(agent.token, job.id, {})
            self.coord.start(agent.token, job.id, {}, "2026-02-02T03:00:00Z")
            agent.job_id = job.id
            agent.job_ends_at = self.clock() + job_seconds
        self.agents[task_arn] = agent
        return agent

    # ------------------------------------------------------------------ the task runtime

    def _on_sigterm(self, task_arn: str, reason: str) -> None:
        agent = self.agents.get(task_arn)
        if agent is None:
            self.gaps.task_exited(task_arn, 0)  # not an agent: exits at once
            return
        agent.sigterm_at = self.clock()
        if not agent.ignores_sigterm and not self._busy(agent):
            self._exit(agent, 0)

    def _busy(self, agent: SimAgent) -> bool:
        return agent.job_id is not None and self.coord.job(agent.job_id).state in (
            "accepted",
            "running",
            "canceling",
        )

    def _exit(self, agent: SimAgent, code: int) -> None:
        if agent.exited:
            return
        agent.exited = True
        if agent.token and code != 137:
            self.coord.disconnect(agent.token, {})
        self.gaps.task_exited(agent.task_arn, code)

    def _finish_job(self, agent: SimAgent, exit_status: str, reason: str | None) -> None:
        assert agent.job_id is not None
        self.coord.finish(
            agent.token,
            agent.job_id,
            {},
            exit_status=exit_status,
            signal="SIGTERM" if reason else None,
            signal_reason=reason,
            chunks_failed_count=0,
            finished_at="2026-02-02T03:50:00Z",
        )

    def _run_agents(self) -> None:
        now = self.clock()
        for agent in list(self.agents.values()):
            if agent.exited:
                continue
            if agent.sigterm_at is not None and now >= agent.sigterm_at + STOP_TIMEOUT:
                self._exit(agent, 137)  # SIGKILL: the job (if any) is lost
                continue
            if not agent.token:
                continue
            state = self.coord.job(agent.job_id).state if agent.job_id else None
            if state == "canceling":  # forced stop through the coordinator
                self._finish_job(agent, "-1", "agent_stop")
                self._exit(agent, 0)
                continue
            if state == "running" and agent.job_ends_at is not None and now >= agent.job_ends_at:
                self._finish_job(agent, "0", None)
                state = "finished"
            record = self.coord.agent(agent.agent_id)
            idle = state not in ("accepted", "running", "canceling")
            told = record.stop_requested or (
                agent.sigterm_at is not None and not agent.ignores_sigterm
            )
            if idle and told:
                self._exit(agent, 0)

    # ------------------------------------------------------------------ events

    def invoke(self, function: str, event: dict[str, Any]) -> dict[str, Any]:
        """Invoke one function's handler with ``event`` (as Lambda does)."""
        return HANDLERS[function](event, Ctx())

    def route(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """Deliver one event to every function whose template rule matches it."""
        out = []
        for rule in self.rules:
            if rule.matches(event):
                out.append(self.invoke(rule.function, event))
        self.results.extend(out)
        return out

    def pump(self) -> None:
        """Deliver the events AWS emitted since the last pump (and those that follows)."""
        while self.cursor < len(self.gaps.events):
            event = self.gaps.events[self.cursor]
            self.cursor += 1
            self.route(event)

    def emit(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        """An event just emitted by the gaps: deliver it (and whatever it causes) now."""
        assert self.gaps.events[-1] is event
        self.cursor = len(self.gaps.events)
        out = self.route(event)
        self.pump()
        return out

    def advance(self, seconds: float, step: float = 1.0) -> None:
        end = self.clock() + seconds
        while self.clock() < end:
            self.clock.advance(step)
            self._run_agents()
            self.pump()
            self.gaps.expire_lifecycle_actions()
            due = self.ticks.due()
            if due:
                response = self.invoke("DrainMonitorFunction", sqs_event(*due))
                assert response == {"batchItemFailures": []}, response
            self.pump()

    def run_until(self, predicate: Callable[[], bool], limit: float, step: float = 1.0) -> float:
        start = self.clock()
        while not predicate():
            assert self.clock() - start < limit, "condition not reached in time"
            self.advance(step, step)
        return self.clock() - start

    # ------------------------------------------------------------------ looking

    def record(self, iid: str) -> DrainRecord:
        rec = self.ctl.store.get(iid)
        assert rec is not None
        return rec

    def task_status(self, task_arn: str) -> str:
        out = self.ecs.describe_tasks(cluster=CLUSTER, tasks=[task_arn])
        return str(out["tasks"][0]["lastStatus"])

    def ci_status(self, iid: str) -> str:
        out = self.ecs.describe_container_instances(
            cluster=CLUSTER, containerInstances=[self.ci_arn[iid]]
        )
        return str(out["containerInstances"][0]["status"])

    def coord_events(self, kind: str, agent: SimAgent) -> int:
        return len(self.coord.events_of(kind, agent_id=agent.agent_id))


@contextlib.contextmanager
def make_world() -> Iterator[World]:
    """A :class:`World` in moto, with the gap fillers and the embedded coordinator (the
    fixture's; other modules' fixtures take it from here)."""
    with mock_aws():
        clock = Clock()
        with AwsGaps(clock=clock) as gaps:
            coord = Coordinator(org="acme", api_token="api-token")
            with CoordinatorServer(coord) as server:
                w = World(clock, gaps, coord, server)
                try:
                    yield w
                finally:
                    runtime.set_controller(None)


@pytest.fixture
def world(aws_env: None) -> Iterator[World]:
    with make_world() as w:
        yield w


# ============================================================================ scenarios


def test_scale_in_with_a_long_job_waits_heartbeating_then_completes(world: World) -> None:
    a, b = world.build(instances=2, hook_timeout=300)
    ctl = world.controller(heartbeat_interval=60, tick_interval=20)
    busy = world.add_agent(a, job_seconds=400)
    idle = world.add_agent(a)
    other = world.add_agent(b, job_seconds=50)

    out = world.emit(world.gaps.begin_termination(a))
    assert out[0]["status"] == "started" and out[0]["phase"] == "soft"
    assert world.coord.agent(busy.agent_id).paused and world.coord.agent(idle.agent_id).paused
    assert not world.coord.agent(other.agent_id).paused
    assert world.ci_status(a) == "ACTIVE"  # soft: nothing stopped while the job runs

    world.advance(390)
    action = world.gaps.actions[a]
    assert action.waiting, "heartbeats must keep the action alive past its 300 s timeout"
    assert action.heartbeats >= 5
    assert world.record(a).phase == "soft"
    assert world.task_status(busy.task_arn) == "RUNNING"

    world.run_until(lambda: not world.gaps.actions[a].waiting, limit=60)
    assert action.result == "CONTINUE" and action.state == "completed"
    job = world.coord.job(busy.job_id or "")
    assert job.passed, "the job finished normally"
    assert world.ci_status(a) == "DRAINING"
    assert world.task_status(busy.task_arn) == "STOPPED"
    assert world.task_status(idle.task_arn) == "STOPPED"
    # The daemon task is left alone; the other instance is untouched.
    daemon = [
        t
        for t in world.ecs.list_tasks(cluster=CLUSTER, containerInstance=world.ci_arn[a])[
            "taskArns"
        ]
        if t not in world.agents
    ]
    assert all(world.task_status(t) == "RUNNING" for t in daemon)
    assert world.ci_status(b) == "ACTIVE"
    rec = world.record(a)
    assert rec.phase == "done" and rec.outcome == "drained" and rec.lifecycle_state == "completed"
    assert rec.forced_at is None
    m = world.metrics
    assert m.counts[core.DRAINS_STARTED] == 1 and m.counts[core.DRAINS_COMPLETED] == 1
    assert core.DRAINS_FORCED not in m.counts
    # Event-driven: the hook completed as the last task's STOPPED event arrived.
    assert m.timings[core.HOOK_COMPLETION_LATENCY] == [0.0]
    assert action.completed_at == world.gaps.exits[busy.task_arn].stopped_at or (
        action.completed_at == world.gaps.exits[idle.task_arn].stopped_at
    )
    assert ctl.metrics is m


def test_spot_with_a_job_that_cannot_finish_is_forced_and_reported(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(spot_margin=20)
    agent = world.add_agent(
        a, job_seconds=3600, retry=[RetryRule(signal_reason="agent_stop", limit=2)]
    )
    out = world.emit(world.gaps.spot_interruption(a))
    assert out[0]["status"] == "started" and out[0]["phase"] == "hard"
    # No time for a soft phase: paused and DRAINING at once, the agent got SIGTERM.
    assert world.coord.agent(agent.agent_id).paused
    assert world.ci_status(a) == "DRAINING"
    assert agent.sigterm_at == T0
    world.advance(99)
    assert world.coord.job(agent.job_id or "").state == "running"
    world.advance(3)  # the deadline: notice + 120 s - 20 s margin
    job = world.coord.job(agent.job_id or "")
    assert job.state == "canceled" and job.signal_reason == "agent_stop"
    assert job.retried, "agent_stop is what retry rules re-run"
    rec = world.record(a)
    assert rec.phase == "done" and rec.forced_at == T0 + 100
    assert rec.jobs_force_cancelled == 1
    assert world.metrics.counts[core.DRAINS_FORCED] == 1
    assert world.metrics.counts[core.JOBS_FORCE_CANCELLED] == 1
    assert world.gaps.exits[agent.task_arn].exit_code == 0  # reported, not SIGKILLed


def test_spot_during_scale_in_moves_the_deadline_and_completes_the_hook(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(drain_budget=3600)
    agent = world.add_agent(a, job_seconds=3600)
    world.emit(world.gaps.begin_termination(a))
    assert world.record(a).force_at == T0 + 3600
    world.advance(10)
    out = world.emit(world.gaps.spot_interruption(a))
    assert out[0]["status"] == "joined"
    rec = world.record(a)
    assert rec.force_at == T0 + 10 + 100 and rec.phase == "hard"
    assert set(rec.reasons) == {"scale_in", "spot"}
    world.run_until(lambda: world.record(a).phase == "done", limit=150)
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.coord.job(agent.job_id or "").signal_reason == "agent_stop"


def test_a_forced_stop_reaches_an_agent_whose_task_began_stopping_between_two_looks(
    world: World,
) -> None:
    """A soft look reads RUNNING tasks only; the forced stop reads the stopping ones too, so an
    agent placed and stopped (by someone else) between two looks, still finishing its job,
    gets its forced stop: the job is reported, not cut by SIGKILL or the instance's end."""
    (a,) = world.build(instances=1)
    world.controller(drain_budget=90)
    world.add_agent(a, job_seconds=3600)
    world.emit(world.gaps.begin_termination(a))
    assert world.record(a).phase == "soft"
    world.advance(25)
    late = world.add_agent(a, job_seconds=3600)  # placed while the instance was ACTIVE
    world.ecs.stop_task(cluster=CLUSTER, task=late.task_arn, reason="someone else's stop")
    assert late.sigterm_at is not None and not late.exited, "finishing its job"
    world.advance(5)
    assert late.task_arn not in {row[0] for row in world.record(a).looked_tasks}
    world.run_until(lambda: world.record(a).forced_at is not None, limit=120)
    assert late.agent_id in world.record(a).stopped_agents
    world.advance(2)
    job = world.coord.job(late.job_id or "")
    assert job.signal_reason == "agent_stop", "cancelled and reported by the forced stop"
    assert world.gaps.exits[late.task_arn].exit_code == 0, "not SIGKILLed"


def test_a_hard_drain_waiting_for_its_force_asks_the_coordinator_nothing(world: World) -> None:
    """Between its first step and its force, nothing a hard drain does turns on what its agents
    are doing: its looks (ticks, and the STOPPED event of a task that ends meanwhile) ask the
    coordinator nothing (in a big organization's spot storm those reads took the window its
    forced stops needed). The force then finds and stops the agent."""
    (a,) = world.build(instances=1)
    world.controller()
    agent = world.add_agent(a, job_seconds=3600)
    other = world.add_agent(a, job_seconds=30)  # ends its job after the SIGTERM, and exits
    world.emit(world.gaps.spot_interruption(a))
    rec = world.record(a)
    assert rec.phase == "hard" and agent.agent_id in rec.paused_agents
    assert rec.force_at is not None
    sent, steps = world.rest.requests, rec.steps
    world.advance(rec.force_at - world.clock() - 1)
    assert other.exited and world.coord.job(other.job_id or "").passed
    looked = [row[0] for row in world.record(a).looked_tasks]
    assert looked == [agent.task_arn], "the STOPPED event's step looked at ECS"
    assert world.record(a).steps >= steps + 3, "its ticks and that event looked"
    assert world.record(a).forced_at is None
    assert world.rest.requests == sent, "and asked the coordinator nothing"
    world.run_until(lambda: world.record(a).forced_at is not None, limit=10)
    assert world.rest.requests > sent
    world.advance(2)
    assert world.coord.job(agent.job_id or "").signal_reason == "agent_stop"
    assert world.metrics.counts[core.JOBS_FORCE_CANCELLED] == 1, "the force read the agent"


def test_a_hard_drain_whose_action_is_gone_reads_its_agents_before_it_forces(
    world: World,
) -> None:
    """A hard drain that only waits takes its agents by id, but when its lifecycle action is
    gone it forces at once: it reads them first, so the job it cancels is counted."""
    (a,) = world.build(instances=1)
    world.controller(heartbeat_interval=30)
    agent = world.add_agent(a, job_seconds=3600)
    world.emit(world.gaps.begin_termination(a))
    world.advance(5)
    assert world.emit(world.gaps.spot_interruption(a))[0]["status"] == "joined"
    rec = world.record(a)
    assert rec.phase == "hard" and rec.force_at is not None
    world.gaps.actions[a].heartbeat_timeout = 1  # it is gone at the next heartbeat
    world.clock.advance(2)
    world.gaps.expire_lifecycle_actions()
    world.run_until(lambda: world.record(a).phase == "done", limit=90)
    rec = world.record(a)
    assert rec.outcome == "lifecycle_gone" and rec.forced_at is not None
    assert rec.forced_at < rec.force_at, "forced when the action went, not at the deadline"
    world.advance(2)
    assert world.coord.job(agent.job_id or "").signal_reason == "agent_stop"
    assert world.metrics.counts[core.JOBS_FORCE_CANCELLED] == 1


def test_rebalance_is_a_soft_drain_that_never_forces(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(drain_budget=60)
    agent = world.add_agent(a, job_seconds=200)
    out = world.emit(world.gaps.rebalance_recommendation(a))
    assert out[0]["status"] == "started" and out[0]["phase"] == "soft"
    world.advance(150)
    assert world.ci_status(a) == "ACTIVE" and world.coord.agent(agent.agent_id).paused
    # The job ends at 200 s: found by the next tick, grown to 60 s by then.
    world.run_until(lambda: world.record(a).phase == "done", limit=120)
    rec = world.record(a)
    assert rec.outcome == "drained" and rec.forced_at is None and rec.lifecycle_state == "none"
    assert world.coord.job(agent.job_id or "").passed


def test_rebalance_can_be_ignored(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(rebalance_action="ignore")
    world.add_agent(a, job_seconds=10)
    out = world.emit(world.gaps.rebalance_recommendation(a))
    assert out[0]["status"] == "ignored"
    assert world.ctl.store.get(a) is None


def test_duplicate_and_reordered_events_change_nothing(world: World) -> None:
    a, b = world.build(instances=2)
    world.controller()
    agent = world.add_agent(a, job_seconds=100)
    lifecycle = world.gaps.begin_termination(a)
    world.emit(lifecycle)
    version = world.record(a).version
    for _ in range(3):
        out = world.route(lifecycle)
        assert out[0]["status"] == "duplicate"
    # The same notification through SQS (another event id, same token): still a duplicate.
    body = json.dumps(world.gaps.sqs_body(lifecycle))
    assert lifecycle_hook.handler(sqs_event(body), Ctx()) == {"batchItemFailures": []}
    assert world.record(a).version == version
    assert world.coord_events("pause", agent) == 1

    # Reordered: a spot notice first, the lifecycle action second (it joins, deadline kept).
    world.add_agent(b, job_seconds=1000)
    world.emit(world.gaps.spot_interruption(b))
    deadline = world.record(b).force_at
    world.advance(5)
    out = world.emit(world.gaps.begin_termination(b))
    assert out[0]["status"] == "joined"
    assert world.record(b).force_at == deadline and world.record(b).lifecycle_state == "pending"

    world.run_until(lambda: world.record(a).phase == "done", limit=200)
    world.run_until(lambda: world.record(b).phase == "done", limit=200)
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.gaps.actions[b].result == "CONTINUE"
    # Late events after the end: nothing happens.
    done = world.record(a)
    assert world.route(lifecycle)[0]["status"] == "duplicate"
    stopped = [e for e in world.gaps.events if e["detail-type"] == "ECS Task State Change"]
    assert world.route(stopped[0])[0]["status"] in ("ignored", "duplicate")
    stale = tick_body(a, "not-this-drain", "t1")
    assert drain_monitor.handler(sqs_event(stale), Ctx()) == {"batchItemFailures": []}
    # A spot notice for the instance that went: ECS has deregistered its container instance
    # (as it does for a terminated instance), so it is not one of the cluster: ignored, and
    # nothing written (a drain that ended does not swallow a spot notice that needs action).
    world.ecs.deregister_container_instance(
        cluster=CLUSTER, containerInstance=world.ci_arn[a], force=True
    )
    assert world.route(world.gaps.spot_interruption(a))[0]["status"] == "ignored"
    assert world.record(a) == done


def test_coordinator_down_falls_back_to_stop_task(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(coordinator_grace=30)
    agent = world.add_agent(a, job_seconds=60)
    world.server.stop()
    world.emit(world.gaps.begin_termination(a))
    rec = world.record(a)
    assert rec.phase == "soft" and not rec.fallback, "a blip is waited out first"
    assert agent.sigterm_at is None
    world.advance(31)
    rec = world.record(a)
    assert rec.fallback and rec.phase == "hard"
    assert agent.sigterm_at is not None, "StopTask: the agent's own drain takes over"
    assert world.gaps.calls["StopTask"] >= 1
    assert world.metrics.counts[core.COORDINATOR_FALLBACKS] == 1
    world.run_until(lambda: world.record(a).phase == "done", limit=60)
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.coord.job(agent.job_id or "").passed, "the job finished within stopTimeout"


def test_throttling_is_retried_not_lost(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    world.add_agent(a)
    lifecycle = world.gaps.begin_termination(a)
    body = json.dumps(world.gaps.sqs_body(lifecycle))
    with Stubber(world.ecs_client) as stub:
        stub.add_client_error(
            "list_container_instances",
            service_error_code="ThrottlingException",
            service_message="Rate exceeded",
            http_status_code=400,
        )
        event = sqs_event(body)
        response = lifecycle_hook.handler(event, Ctx())
        assert response == {
            "batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]
        }
        stub.assert_no_pending_responses()
    # Redelivered by SQS: the drain goes on from where it was.
    assert world.record(a).steps == 0
    response = lifecycle_hook.handler(sqs_event(body), Ctx())
    assert response == {"batchItemFailures": []}
    world.pump()
    assert world.record(a).phase == "done"
    assert world.gaps.actions[a].result == "CONTINUE"

    # Straight from EventBridge, a throttled step raises (Lambda's async retries, then the DLQ).
    reopened = dataclasses.replace(world.record(a), phase="hard")
    world.ctl.store.save(reopened)
    world.controller()  # a container that has not seen this drain end (one would ignore it)
    task_arn = world.ecs.list_tasks(cluster=CLUSTER, desiredStatus="STOPPED")["taskArns"][0]
    stopped = {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "ECS Task State Change",
        "source": "aws.ecs",
        "account": ACCOUNT,
        "time": "2026-02-02T03:44:14Z",
        "region": REGION,
        "resources": [task_arn],
        "detail": {
            "clusterArn": f"arn:aws:ecs:{REGION}:{ACCOUNT}:cluster/{CLUSTER}",
            "containerInstanceArn": world.ci_arn[a],
            "taskArn": task_arn,
            "lastStatus": "STOPPED",
            "desiredStatus": "STOPPED",
            "stoppedAt": "2026-02-02T03:44:14Z",
            "containers": [],
        },
    }
    with Stubber(world.ecs_client) as stub:
        stub.add_client_error("list_tasks", service_error_code="ThrottlingException")
        with pytest.raises(Retryable):
            drain_monitor.handler(stopped, Ctx())


def test_expired_lifecycle_token_forces_and_ends_cleanly(world: World) -> None:
    (a,) = world.build(instances=1, hook_timeout=30)
    world.controller(heartbeat_interval=60)  # too slow for a 30 s hook: the action expires
    agent = world.add_agent(a, job_seconds=600)
    world.emit(world.gaps.begin_termination(a))
    world.run_until(lambda: world.record(a).phase == "done", limit=120)
    rec = world.record(a)
    assert rec.outcome == "lifecycle_gone" and rec.lifecycle_state == "gone"
    assert world.gaps.actions[a].state == "expired"
    world.advance(2)  # the agent's side of the forced stop
    job = world.coord.job(agent.job_id or "")
    assert job.signal_reason == "agent_stop", "the instance is going: the job is reported"
    assert world.metrics.counts[core.DRAINS_ABANDONED] == 1


def test_completing_with_a_dead_token_is_an_answer_not_an_error(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    agent = world.add_agent(a, job_seconds=30)
    world.emit(world.gaps.begin_termination(a))
    world.gaps.actions[a].heartbeat_timeout = 1  # it will be gone at the next look
    world.clock.advance(2)
    world.gaps.expire_lifecycle_actions()
    world._finish_job(agent, "0", None)
    world.advance(25)
    rec = world.record(a)
    assert rec.phase == "done" and rec.outcome == "lifecycle_gone"


def test_instance_not_in_the_cluster_ends_at_once(world: World) -> None:
    a, b = world.build(instances=2)
    world.controller()
    world.ecs.deregister_container_instance(
        cluster=CLUSTER, containerInstance=world.ci_arn[b], force=True
    )
    out = world.emit(world.gaps.begin_termination(b))
    assert out[0]["phase"] == "done"
    rec = world.record(b)
    assert rec.outcome == "not_in_cluster" and rec.lifecycle_state == "completed"
    assert world.gaps.actions[b].result == "CONTINUE"
    # Spot and rebalance for an instance outside the cluster: ignored, nothing written.
    world.ddb.delete_item(TableName="drains", Key={"pk": {"S": f"drain#{b}"}})
    assert (
        world.route(world.gaps.spot_interruption("i-0123456789abcdef0"))[0]["status"] == "ignored"
    )
    assert world.ctl.store.get("i-0123456789abcdef0") is None
    assert world.ci_status(a) == "ACTIVE"


def test_instance_with_no_tasks_completes_at_once(world: World) -> None:
    (a,) = world.build(instances=1)  # only the daemon task runs there
    world.controller()
    out = world.emit(world.gaps.begin_termination(a))
    assert out[0]["phase"] == "done"
    assert world.record(a).outcome == "no_tasks"
    assert world.gaps.actions[a].result == "CONTINUE"
    # The instance goes: DRAINING first, so nothing is placed on it before it is gone.
    assert world.gaps.calls.get("UpdateContainerInstancesState", 0) == 1
    assert world.ci_status(a) == "DRAINING"


def test_wrapped_worker_is_busy_while_its_task_protection_is_on(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    worker = world.add_agent(a, coordinator=False)
    world.gaps.set_protection(worker.task_arn, True, minutes=60)
    world.emit(world.gaps.begin_termination(a))
    world.advance(100)
    assert world.record(a).phase == "soft" and world.ci_status(a) == "ACTIVE"
    world.gaps.set_protection(worker.task_arn, False)
    world.run_until(lambda: world.record(a).phase == "done", limit=30)
    assert world.gaps.actions[a].result == "CONTINUE"


def test_the_step_a_task_stopped_event_wakes_does_not_describe_that_task(world: World) -> None:
    """Issue 12: STOPPED is final, and the event says so; the step that ends an idle drain reads
    the two listings and describes nothing the event named."""
    (a,) = world.build(instances=1)
    world.controller()
    agent = world.add_agent(a)
    described: list[str] = []
    world.ecs_client.meta.events.register(
        "before-parameter-build.ecs.DescribeTasks",
        lambda params, **_: described.extend(params.get("tasks", [])),
    )
    world.emit(world.gaps.begin_termination(a))
    world.run_until(lambda: not world.gaps.actions[a].waiting, limit=60)
    assert world.record(a).outcome == "drained"
    assert world.task_status(agent.task_arn) == "STOPPED"
    assert described.count(agent.task_arn) == 1, "the first step's look only"


def test_sigkilled_agent_is_counted(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(spot_margin=0)
    world.server.stop()  # nobody can force it: it dies at stopTimeout
    agent = world.add_agent(a, job_seconds=1000, ignores_sigterm=True)
    world.emit(world.gaps.spot_interruption(a))
    world.run_until(lambda: agent.exited, limit=130)
    assert world.gaps.exits[agent.task_arn].exit_code == 137
    assert world.metrics.counts[core.AGENTS_SIGKILLED] == 1


def test_crash_between_steps_resumes_on_the_next_tick(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    agent = world.add_agent(a, job_seconds=40)
    world.emit(world.gaps.begin_termination(a))
    world.ticks.pending.clear()  # the tick is lost and the record says one is pending
    world._finish_job(agent, "0", None)
    world.advance(core.LOST_TICK_SLACK + 30)
    assert world.record(a).phase == "soft"
    # Any later event (here the lifecycle notification redelivered) re-arms the drain.
    world.route(world.gaps.events[0])
    world.run_until(lambda: world.record(a).phase == "done", limit=60)
    assert world.gaps.actions[a].result == "CONTINUE"


def test_logs_carry_instance_and_drain_ids_and_the_token_never(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    (a,) = world.build(instances=1)
    world.controller(metrics=runtime.PowertoolsMetrics())
    world.add_agent(a, job_seconds=5)
    capsys.readouterr()
    buffer = io.StringIO()
    handlers = {
        h for name in ("fleetdrain", "fleetdrain.drain") for h in logging.getLogger(name).handlers
    }
    streams = {h: h.setStream(buffer) for h in handlers if isinstance(h, logging.StreamHandler)}
    try:
        world.emit(world.gaps.begin_termination(a))
        world.advance(30)
    finally:
        for h, stream in streams.items():
            h.setStream(stream)
    out = buffer.getvalue() + capsys.readouterr().out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    drain_lines = [x for x in lines if x.get("message") in ("drain started", "drain done")]
    assert len(drain_lines) == 2
    drain_id = world.record(a).drain_id
    for line in drain_lines:
        assert line["instance_id"] == a and line["drain_id"] == drain_id
    emf = [x for x in lines if "_aws" in x]
    names = {m["Name"] for x in emf for d in x["_aws"]["CloudWatchMetrics"] for m in d["Metrics"]}
    assert {core.DRAINS_STARTED, core.DRAINS_COMPLETED, core.DRAIN_SECONDS} <= names
    assert world.coord.api_token not in out
    assert world.token.fetches == 1, "the token is cached"


# ============================================================================ the next increment

EVENTS = ROOT / "tests" / "events"


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """What the handlers' and the core's loggers write (JSON lines), into a buffer."""
    buffer = io.StringIO()
    handlers = {
        h for name in ("fleetdrain", "fleetdrain.drain") for h in logging.getLogger(name).handlers
    }
    streams = {h: h.setStream(buffer) for h in handlers if isinstance(h, logging.StreamHandler)}
    try:
        yield buffer
    finally:
        for h, stream in streams.items():
            h.setStream(stream)


def draining_event(world: World, iid: str) -> dict[str, Any]:
    """The sample ``ECS Container Instance State Change`` (DRAINING) for ``iid``'s instance."""
    event = json.loads((EVENTS / "ecs-container-instance-state-change.draining.json").read_text())
    event["id"] = str(uuid.uuid4())
    event["resources"] = [world.ci_arn[iid]]
    event["detail"].update(
        clusterArn=f"arn:aws:ecs:{REGION}:{ACCOUNT}:cluster/{CLUSTER}",
        containerInstanceArn=world.ci_arn[iid],
        ec2InstanceId=iid,
    )
    return dict(event)


def deliver_queue(
    sqs: Any, queue_url: str, handler: Callable[[dict[str, Any], Any], dict[str, Any]]
) -> int:
    """What Lambda's SQS event source mapping does: receive a batch, invoke the handler with
    it, delete the records that did not fail. Returns how many records were delivered."""
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    delivered = 0
    while True:
        out = sqs.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, AttributeNames=["All"], WaitTimeSeconds=0
        )
        messages = out.get("Messages", [])
        if not messages:
            return delivered
        event = sqs_lambda_event(messages, arn)
        response = handler(event, Ctx())
        failed = {f["itemIdentifier"] for f in response["batchItemFailures"]}
        assert not failed, response
        for m in messages:
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
        delivered += len(messages)


def test_lifecycle_notification_through_sns_and_sqs_drains_the_instance(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    agent = world.add_agent(a, job_seconds=30)
    sns = boto3.client("sns", region_name=REGION)
    sqs = boto3.client("sqs", region_name=REGION)
    topic = sns.create_topic(Name="ci-agents-lifecycle")["TopicArn"]
    queue_url = sqs.create_queue(QueueName="ci-agents-lifecycle")["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])[
        "Attributes"
    ]["QueueArn"]
    sns.subscribe(TopicArn=topic, Protocol="sqs", Endpoint=queue_arn)  # not raw: SNS envelope

    # Attaching the notification target: Auto Scaling's test notification comes first.
    test_body = (EVENTS / "asg-test-notification.sqs-body.json").read_text()
    sns.publish(TopicArn=topic, Message=test_body, Subject="Auto Scaling: test notification")
    peek = sqs.receive_message(QueueUrl=queue_url, VisibilityTimeout=0)["Messages"][0]
    assert json.loads(peek["Body"])["Type"] == "Notification", "SNS envelope, as configured"
    assert deliver_queue(sqs, queue_url, lifecycle_hook.handler) == 1
    assert world.ctl.store.get(a) is None, "the test notification starts nothing"

    # Scale-in: the group notifies through SNS only (the EventBridge copy is not delivered).
    lifecycle = world.gaps.begin_termination(a)
    world.cursor = len(world.gaps.events)
    body = json.dumps(world.gaps.sqs_body(lifecycle))
    sns.publish(TopicArn=topic, Message=body, Subject="Auto Scaling: Lifecycle action")
    assert deliver_queue(sqs, queue_url, lifecycle_hook.handler) == 1
    rec = world.record(a)
    assert (
        rec.phase == "soft" and rec.lifecycle_token == lifecycle["detail"]["LifecycleActionToken"]
    )
    assert world.coord.agent(agent.agent_id).paused
    # SNS delivers at least once: the same notification again is a duplicate.
    sns.publish(TopicArn=topic, Message=body, Subject="Auto Scaling: Lifecycle action")
    assert deliver_queue(sqs, queue_url, lifecycle_hook.handler) == 1
    assert world.record(a).version == rec.version

    world.run_until(lambda: world.record(a).phase == "done", limit=60)
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.coord.job(agent.job_id or "").passed
    assert world.record(a).outcome == "drained"
    attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0"
    assert attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


def test_a_short_401_burst_refreshes_the_token_once_and_the_drain_goes_on(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(coordinator_grace=30)
    agent = world.add_agent(a, job_seconds=40)
    burst = world.coord.faults.add(Fault("*", "status", status=401, count=1))
    world.emit(world.gaps.begin_termination(a))
    assert burst.fired == 1
    assert world.token.fetches == 2, "one 401: the token was read again once, and it worked"
    rec = world.record(a)
    assert rec.phase == "soft" and not rec.fallback and rec.coordinator_down_at is None
    assert world.coord.agent(agent.agent_id).paused
    world.run_until(lambda: world.record(a).phase == "done", limit=80)
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.coord.job(agent.job_id or "").passed
    assert core.COORDINATOR_FALLBACKS not in world.metrics.counts


def test_a_long_401_burst_falls_back_to_ecs_and_loses_nothing(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(coordinator_grace=30)
    busy = world.add_agent(a, job_seconds=50)
    idle = world.add_agent(a)
    burst = world.coord.faults.add(Fault("*", "status", status=401))
    world.emit(world.gaps.begin_termination(a))
    # Refreshed once for the request, rejected again: no retry loop on a token that fails.
    assert world.token.fetches == 2 and burst.fired == 2
    rec = world.record(a)
    assert rec.phase == "soft" and not rec.fallback, "a burst is waited out first"
    world.advance(31)
    rec = world.record(a)
    assert rec.fallback and rec.phase == "hard"
    assert busy.sigterm_at is not None and idle.exited, "StopTask: the agents drain themselves"
    assert world.metrics.counts[core.COORDINATOR_FALLBACKS] == 1
    fetches_at_fallback = world.token.fetches
    world.run_until(lambda: world.record(a).phase == "done", limit=100)
    world.coord.faults.remove(burst)
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.coord.job(busy.job_id or "").passed, "the job finished inside stopTimeout"
    assert all(world.gaps.exits[x.task_arn].exit_code == 0 for x in (busy, idle))
    assert core.AGENTS_SIGKILLED not in world.metrics.counts
    # After the fallback the coordinator is not asked again (so no more token reads).
    assert world.token.fetches == fetches_at_fallback


def test_lifecycle_action_of_another_group_or_hook_is_ignored_with_a_reason(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(metrics=runtime.PowertoolsMetrics())
    agent = world.add_agent(a, job_seconds=30)
    lifecycle = world.gaps.begin_termination(a)
    world.cursor = len(world.gaps.events)
    others = []
    for field_name, value in (("AutoScalingGroupName", "web"), ("LifecycleHookName", "backup")):
        notice = world.gaps.sqs_body(lifecycle)
        notice[field_name] = value
        others.append(json.dumps(notice))
    with captured_logs() as logs:
        assert lifecycle_hook.handler(sqs_event(*others), Ctx()) == {"batchItemFailures": []}
    assert world.ctl.store.get(a) is None
    assert not world.coord.agent(agent.agent_id).paused
    assert world.gaps.calls.get("CompleteLifecycleAction", 0) == 0
    assert world.gaps.actions[a].waiting, "not ours to complete"
    lines = [json.loads(x) for x in logs.getvalue().splitlines() if x.startswith("{")]
    reasons = [x.get("reason", "") for x in lines if x.get("message") == "lifecycle action ignored"]
    assert any("group 'web', not ours ('ci-agents')" in r for r in reasons), lines
    assert any("hook 'backup', not ours" in r for r in reasons), lines
    assert all(x.get("instance_id") == a for x in lines if x.get("reason") in reasons)
    # Our own group's action for the same instance still starts the drain.
    body = json.dumps(world.gaps.sqs_body(lifecycle))
    assert lifecycle_hook.handler(sqs_event(body), Ctx()) == {"batchItemFailures": []}
    assert world.record(a).phase == "soft"


def test_more_than_100_tasks_on_one_instance(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    agents = [world.add_agent(a, job_seconds=20 if i % 50 == 0 else None) for i in range(150)]
    world.emit(world.gaps.begin_termination(a))
    # ListTasks pages at 100 and DescribeTasks takes 100 (fleetdrain.drill.aws.gaps enforces both):
    # every agent was found, the ones past the first page too, and paused as far as the rate
    # limit allows: pauses leave a quarter of the organization's 200 a minute to reads and
    # forced stops, so the last few wait for the window (here the jobs end first, and DRAINING
    # stops the idle agents, paused or not).
    first = [x for x in agents if world.coord.agent(x.agent_id).paused]
    assert len(first) > 100 and world.record(a).phase == "soft"
    assert world.record(a).agent_ids == {x.task_arn: x.agent_id for x in agents}
    world.run_until(lambda: world.record(a).phase == "done", limit=60)
    assert world.record(a).outcome == "drained"
    assert world.gaps.actions[a].result == "CONTINUE"
    assert all(world.task_status(x.task_arn) == "STOPPED" for x in agents)
    assert all(world.coord.job(x.job_id).passed for x in agents if x.job_id)


class SlowFleet:
    """The fleet with a slow ``tasks_on`` that records how many steps looked at once."""

    def __init__(self, fleet: Any, delay: float) -> None:
        self._fleet = fleet
        self._delay = delay
        self._lock = threading.Lock()
        self.inside = 0
        self.most_inside = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fleet, name)

    def tasks_on(self, arn: str, known: Any = (), exact: bool = False) -> Any:
        with self._lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            threading.Event().wait(self._delay)
            return self._fleet.tasks_on(arn, known, exact=exact)
        finally:
            with self._lock:
                self.inside -= 1


def test_two_steps_racing_on_one_drain_record_act_once(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    first, second = world.add_agent(a), world.add_agent(a)
    sigterms: list[str] = []
    world.gaps.on_sigterm = lambda arn, reason: sigterms.append(arn)  # they exit later, together
    world.emit(world.gaps.begin_termination(a))
    assert world.record(a).phase == "hard"
    assert sorted(sigterms) == sorted([first.task_arn, second.task_arn])
    # Both agents exit at the same instant: two STOPPED events, two monitors at once.
    events = [world.gaps.task_exited(arn, 0) for arn in sigterms]
    world.cursor = len(world.gaps.events)
    slow = SlowFleet(world.ctl.fleet, 0.05)  # widen the window: a step takes a while
    world.ctl.fleet = slow
    start = threading.Barrier(len(events))
    results: list[dict[str, Any]] = []
    errors: list[BaseException] = []

    def invoke(event: dict[str, Any]) -> None:
        start.wait()
        try:
            results.extend(world.route(event))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=invoke, args=(e,)) for e in events]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    assert len(results) == 2
    # Both claim at once (in the write that reads the record): one takes it and acts, the
    # other finds it held, waits, and finds it done.
    assert world.gaps.calls["CompleteLifecycleAction"] == 1, "the hook was completed once"
    assert world.gaps.actions[a].result == "CONTINUE"
    rec = world.record(a)
    assert rec.outcome == "drained" and rec.lifecycle_state == "completed"
    assert rec.lease_id is None and rec.lease_until is None
    assert world.metrics.counts[core.DRAINS_COMPLETED] == 1
    assert core.DRAINS_ABANDONED not in world.metrics.counts
    assert sorted(r["status"] for r in results) in (["ignored", "stepped"], ["stepped", "stepped"])


def test_a_look_that_fails_claims_nothing_and_leaves_a_retry_tick(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    world.add_agent(a, job_seconds=30)
    world.emit(world.gaps.begin_termination(a))
    version = world.record(a).version
    tick = tick_body(a, world.record(a).drain_id, "t-fail")
    world.clock.advance(core.TASKS_LOOK_EVERY)  # the look reads ECS again
    with Stubber(world.ecs_client) as stub:
        stub.add_client_error("list_tasks", service_error_code="ThrottlingException")
        response = drain_monitor.handler(sqs_event(tick), Ctx())
    assert len(response["batchItemFailures"]) == 1
    rec = world.record(a)
    assert rec.lease_id is None and rec.version == version + 1, "no claim: the merge is kept"
    assert world.clock() + core.RETRY_TICK in [due for due, _ in world.ticks.pending]
    # The redelivered tick steps at once.
    assert drain_monitor.handler(sqs_event(tick), Ctx()) == {"batchItemFailures": []}
    assert world.record(a).steps == rec.steps + 1


class DrainingFails:
    """The fleet whose ``set_draining`` is throttled (what the retries gave up on)."""

    def __init__(self, fleet: Any) -> None:
        self._fleet = fleet

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fleet, name)

    def set_draining(self, arn: str) -> None:
        raise Retryable("ECS UpdateContainerInstancesState: ThrottlingException")


def test_a_step_that_fails_releases_the_record(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    world.add_agent(a, job_seconds=30)
    world.emit(world.gaps.begin_termination(a))
    assert world.record(a).phase == "soft"
    world.clock.advance(31)
    world._run_agents()  # the job ends; no tick has looked yet
    version = world.record(a).version
    tick = tick_body(a, world.record(a).drain_id, "t-fail")
    fleet = world.ctl.fleet
    world.ctl.fleet = DrainingFails(fleet)  # type: ignore[assignment]
    response = drain_monitor.handler(sqs_event(tick), Ctx())
    assert len(response["batchItemFailures"]) == 1
    rec = world.record(a)
    assert rec.lease_id is None and rec.version == version + 2, "claimed, then given back"
    assert rec.phase == "soft" and rec.draining_at is None
    # The redelivered tick steps at once: nobody waits for a lease.
    world.ctl.fleet = fleet
    assert drain_monitor.handler(sqs_event(tick), Ctx()) == {"batchItemFailures": []}
    assert world.record(a).steps == rec.steps + 1
    assert world.record(a).draining_at is not None


def test_a_crashed_steps_lease_expires(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(step_lease=60)
    world.ctl.lease_wait = 0.3
    world.add_agent(a, job_seconds=30)
    world.emit(world.gaps.begin_termination(a))
    # A step that died without a word (the function timed out): its claim stays.
    rec = world.record(a)
    world.ctl.store.save(dataclasses.replace(rec, lease_id="dead", lease_until=T0 + 60))
    tick = tick_body(a, rec.drain_id, "t-1")
    sent = world.ticks.sent
    with pytest.raises(Retryable, match="held by another step"):
        world.ctl.handle(parse_message(tick))
    # Giving up left a tick for just after the lease (the failed one comes back only after the
    # queue's 360 s): it steps the drain as soon as the dead step's claim has lapsed.
    assert world.ticks.sent == sent + 1
    assert T0 + 61 in [due for due, _ in world.ticks.pending]
    # Only that one is left (the drain's own pending tick would be given up on again, as this
    # one was, while the claim stands).
    world.ticks.pending = [(due, body) for due, body in world.ticks.pending if due >= T0 + 61]
    steps = world.record(a).steps
    world.advance(61)
    assert world.record(a).lease_id is None and world.record(a).steps > steps


def test_ecs_sends_an_instance_event_at_draining_and_at_each_task_change_after(
    world: World,
) -> None:
    """The gap filler's container instance events, as ECS sends them (what the bench and the
    drill then count and deliver)."""
    from fleetdrain.controller.drain.events import parse_event
    from fleetdrain.controller.drain.signals import InstanceDrainingSignal

    a, b = world.build(instances=2)
    agent, other = world.add_agent(a), world.add_agent(b)
    world.gaps.on_sigterm = lambda arn, reason: None  # they exit when the test says
    world.gaps.task_exited(other.task_arn, 0)
    assert world.gaps.events[-1]["detail-type"] == "ECS Task State Change", "ACTIVE: none"
    world.ecs.update_container_instances_state(
        cluster=CLUSTER, containerInstances=[world.ci_arn[a]], status="DRAINING"
    )
    draining = world.gaps.events[-1]
    assert draining["detail-type"] == "ECS Container Instance State Change"
    signal = parse_event(draining)
    assert isinstance(signal, InstanceDrainingSignal)
    assert (signal.instance_id, signal.container_instance_arn) == (a, world.ci_arn[a])
    world.gaps.task_exited(agent.task_arn, 0)
    kinds = [e["detail-type"] for e in world.gaps.events[-2:]]
    assert kinds == ["ECS Task State Change", "ECS Container Instance State Change"]
    assert world.gaps.events[-1]["detail"]["status"] == "DRAINING"


def test_later_steps_ask_for_known_agents_one_by_one(world: World) -> None:
    a, b = world.build(instances=2)
    world.controller(tick_interval=20, heartbeat_interval=60)
    busy = world.add_agent(a, job_seconds=100)
    idle = world.add_agent(a)
    for _ in range(300):  # the organization's agents fill four pages
        world.add_agent(b)
    client = world.rest
    world.emit(world.gaps.begin_termination(a))
    rec = world.record(a)
    assert rec.agent_ids == {busy.task_arn: busy.agent_id, idle.task_arn: idle.agent_id}
    assert rec.listing_pages == 4, "what a listing costs: the per-agent asks are cheaper"
    before = client.requests
    world.advance(20)  # one tick, one step
    assert world.record(a).steps == rec.steps + 1
    assert client.requests - before == 2, "one GET an agent, not four pages of the organization"

    # The idle task's agent re-registers (a new id under the same task): the step cannot trust
    # what it knew, lists again, and pauses the new agent too.
    world.coord.disconnect(idle.token, {})
    reg = world.coord.register(
        world.coord.registration_token,
        RegisterRequest(name="agent-again", meta_data=[f"ecs:task-arn={idle.task_arn}"]),
    )
    world.coord.connect(reg.access_token, {})
    idle.agent_id, idle.token = reg.id, reg.access_token
    world.advance(20)
    assert world.coord.agent(reg.id).paused
    assert world.record(a).agent_ids[idle.task_arn] == reg.id
    world.run_until(lambda: world.record(a).phase == "done", limit=120)
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.coord.job(busy.job_id or "").passed
