"""The controller inside the real rate limits (issue 12):

- the REST adapter reads Buildkite's ``RateLimit-*`` headers into a budget, waits for the reset
  when that fits its time budget and otherwise gives up at once, without spending more of the
  organization's requests (the embedded coordinator enforces the limit, on a fake clock);
- the ECS adapter lists a container instance's tasks once a step and describes them 100 at a
  time;
- AWS throttling (``fleetdrain.drill.aws.gaps``' :meth:`~AwsGaps.throttle`) of ECS
  DescribeTasks / ListTasks / DescribeContainerInstances and Auto Scaling
  RecordLifecycleActionHeartbeat is retryable in the adapters, and drains still complete: in the
  moto world of ``test_drains.py``, with failed events and ticks redelivered as Lambda and SQS
  redeliver them;
- a spot storm that spends the organization's REST budget falls back to ECS without hammering
  the coordinator, and every drain still ends.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from moto import mock_aws

from fleetdrain.agent.buildkite.models import RegisterRequest
from fleetdrain.controller import drain_monitor, runtime
from fleetdrain.controller.drain import core
from fleetdrain.controller.drain.coordinator import CoordinatorClient, RateBudget
from fleetdrain.controller.drain.ecs_fleet import EcsFleet
from fleetdrain.controller.drain.errors import CoordinatorUnavailable, Retryable
from fleetdrain.controller.drain.lifecycle import LifecycleActions
from fleetdrain.drill.aws.gaps import THROTTLEABLE, AwsGaps
from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer, RetryRule
from fleetdrain.drill.coordinator.faults import Fault
from tests.controller.test_drains import (
    HANDLERS,
    REGION,
    T0,
    Clock,
    Ctx,
    World,
    sqs_event,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

#: What template.yaml sets: the drain queue's visibility timeout (a failed tick comes back
#: after it), and Lambda's asynchronous retries of an EventBridge invocation that raised.
TICK_REDELIVERY = 360.0
EVENT_RETRIES = (60.0, 120.0)
NO_RETRIES = Config(retries={"total_max_attempts": 1})


# ============================================================================ REST rate limit


@pytest.fixture
def limited() -> Iterator[tuple[Coordinator, CoordinatorServer, Clock]]:
    clock = Clock()
    clock.now = 6000.0  # the start of a 60 s window
    coord = Coordinator(org="acme", clock=clock, rest_rate_limit=3, lost_agent_timeout=1e9)
    with CoordinatorServer(coord) as server:
        yield coord, server, clock


def client(server: CoordinatorServer, clock: Clock, **kwargs: Any) -> CoordinatorClient:
    """A REST client on the test's clock whose waits move that clock."""
    return CoordinatorClient(
        server.url, "acme", lambda: "api-token", clock=clock, sleep=clock.advance, **kwargs
    )


def test_the_headers_become_a_budget_a_caller_can_ask(
    limited: tuple[Coordinator, CoordinatorServer, Clock],
) -> None:
    _coord, server, clock = limited
    rest = client(server, clock)
    assert rest.budget is None
    clock.advance(18)
    rest.agents_for([])
    budget = rest.budget
    assert budget == RateBudget(limit=3, remaining=2, reset_at=6060.0, seen_at=6018.0)
    assert budget.affords(2, clock()) and not budget.affords(3, clock())
    assert budget.reset_in(clock()) == 42
    assert budget.remaining_at(6060.0) == 3, "a reset window has the whole limit again"
    assert RateBudget.from_headers({"RateLimit-Limit": "x"}, 0.0) is None


def test_a_spent_budget_waits_for_the_reset_when_that_fits(
    limited: tuple[Coordinator, CoordinatorServer, Clock],
) -> None:
    coord, server, clock = limited
    rest = client(server, clock, max_rate_wait=10)
    clock.advance(52)
    for _ in range(3):
        rest.agents_for([])
    assert rest.budget is not None and rest.budget.remaining == 0
    rest.agents_for([])  # held back 8 s until the window resets: never refused
    assert clock() == 6060.0 and rest.rate_waits == 1 and rest.rate_waited == 8
    stats = coord.rest_rate.stats()
    assert (stats.requests, stats.limited) == (4, 0)


def test_a_spent_budget_gives_up_at_once_when_the_reset_is_too_far(
    limited: tuple[Coordinator, CoordinatorServer, Clock],
) -> None:
    coord, server, clock = limited
    rest = client(server, clock, max_rate_wait=10)
    for _ in range(3):
        rest.agents_for([])
    with pytest.raises(CoordinatorUnavailable, match="rate limit spent"):
        rest.stop("any", force=True)
    assert rest.requests == 3 and rest.rate_refused == 1, "nothing sent that would be refused"
    assert coord.rest_rate.stats().requests == 3


def test_a_429_from_a_budget_others_spent_is_waited_out_or_given_up_at_once(
    limited: tuple[Coordinator, CoordinatorServer, Clock],
) -> None:
    coord, server, clock = limited
    other = client(server, clock)
    for _ in range(3):
        other.agents_for([])  # another user of the organization spends the window
    clock.advance(55)
    patient = client(server, clock, max_rate_wait=10)
    assert patient.agents_for([]) == []  # 429 (reset in 5 s), waited, then answered
    assert (patient.rate_limited, patient.rate_waits, patient.requests) == (1, 1, 2)
    for _ in range(2):
        other.agents_for([])  # with the patient one's, the new window is spent
    hurried = client(server, clock, max_rate_wait=10)
    with pytest.raises(CoordinatorUnavailable, match="rate limit spent"):
        hurried.agents_for([])
    assert (hurried.rate_limited, hurried.requests) == (1, 1), "one 429, no retry into it"
    assert coord.rest_rate.stats().limited == 2


def test_without_honouring_the_limit_a_429_is_retried_like_a_5xx(
    limited: tuple[Coordinator, CoordinatorServer, Clock],
) -> None:
    coord, server, clock = limited
    old = client(server, clock, honour_rate_limit=False, attempts=3, backoff=0)
    for _ in range(3):
        old.agents_for([])
    with pytest.raises(CoordinatorUnavailable, match="429"):
        old.agents_for([])
    assert old.rate_limited == 3 and coord.rest_rate.stats().limited == 3
    # A 429 without the headers (a proxy's, a fault) is retried like a 5xx, honoured or not.
    coord.faults.add(Fault("rest_agents", "status", status=429, count=1))
    clock.advance(60)
    assert client(server, clock, attempts=2, backoff=0).agents_for([]) == []


# ============================================================================ ECS reads


class Calls:
    """Calls a boto3 client makes, by operation (botocore ``before-call``: retries not counted
    apart)."""

    def __init__(self, client: Any) -> None:
        self.by_op: Counter[str] = Counter()
        self.described: list[str] = []
        client.meta.events.register("before-call", self._on_call)
        # The call's own parameters (before-call has the serialized request, not them).
        client.meta.events.register("before-parameter-build.ecs.DescribeTasks", self._on_describe)

    def _on_call(self, model: Any, **_: Any) -> None:
        self.by_op[model.name] += 1

    def _on_describe(self, params: dict[str, Any], **_: Any) -> None:
        self.described.extend(params.get("tasks", []))

    def take(self) -> dict[str, int]:
        out = dict(self.by_op)
        self.by_op.clear()
        return out


@pytest.fixture
def ecs_world(aws_env: None) -> Iterator[tuple[Any, AwsGaps, Clock, str]]:
    """A cluster with one container instance, in moto with the gap fillers (ECS page sizes)."""
    with mock_aws():
        clock = Clock()
        with AwsGaps(clock=clock) as gaps:
            ecs = boto3.client("ecs", region_name=REGION)
            ecs.create_cluster(clusterName="ci")
            for family in ("agent", "log-router"):
                ecs.register_task_definition(
                    family=family,
                    containerDefinitions=[{"name": family, "image": family, "memory": 64}],
                )
            ecs.create_service(cluster="ci", serviceName="agents", taskDefinition="agent")
            ecs.create_service(
                cluster="ci",
                serviceName="log-router",
                taskDefinition="log-router",
                schedulingStrategy="DAEMON",
            )
            ec2 = boto3.client("ec2", region_name=REGION)
            iid = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0][
                "InstanceId"
            ]
            ci = ecs.register_container_instance(
                cluster="ci", instanceIdentityDocument=json.dumps({"instanceId": iid})
            )["containerInstance"]["containerInstanceArn"]
            yield ecs, gaps, clock, ci


def start(ecs: Any, ci: str, family: str, group: str) -> str:
    out = ecs.start_task(cluster="ci", taskDefinition=family, containerInstances=[ci], group=group)
    return str(out["tasks"][0]["taskArn"])


def test_tasks_are_listed_once_a_step_and_described_a_hundred_at_a_time(
    ecs_world: tuple[Any, AwsGaps, Clock, str],
) -> None:
    ecs, gaps, clock, ci = ecs_world
    daemon = start(ecs, ci, "log-router", "service:log-router")
    agents = [start(ecs, ci, "agent", "service:agents") for _ in range(150)]
    gaps.on_sigterm = lambda arn, reason: None  # stopping tasks take their time
    controller = boto3.client("ecs", region_name=REGION)
    fleet = EcsFleet(controller, "ci", clock)
    calls = Calls(controller)

    first = fleet.tasks_on(ci)
    assert len(first) == 151 and [t.arn for t in first if t.daemon] == [daemon]
    # No look of this instance yet: RUNNING only (2 pages of 100); what is stopping already is
    # read when the answer would end the drain.
    assert calls.take() == {"ListTasks": 2, "DescribeTasks": 2, "DescribeServices": 1}

    ecs.stop_task(cluster="ci", task=agents[0])  # stopping: desired STOPPED, still running
    clock.advance(20)
    calls.described.clear()
    later = fleet.tasks_on(ci)
    # RUNNING only; a task live at the last look and still listed is taken as it was: only
    # the one that left the listing is described.
    assert calls.take() == {"ListTasks": 2, "DescribeTasks": 1}, "RUNNING only"
    assert calls.described == [agents[0]]
    calls.described.clear()
    stopping = [t for t in later if t.arn == agents[0]]
    assert stopping and stopping[0].desired_status == "STOPPED", "known live: still described"
    assert len(later) == 151 and [t.arn for t in later if t.daemon] == [daemon]

    gaps.task_exited(agents[0], 0)
    clock.advance(10)
    assert len(fleet.tasks_on(ci)) == 150
    calls.take()
    calls.described.clear()
    clock.advance(10)
    assert len(fleet.tasks_on(ci)) == 150
    assert calls.take() == {"ListTasks": 2}, "every task known: none described"
    assert agents[0] not in calls.described, "a task seen STOPPED is not asked again"

    clock.advance(600)  # however long since: a look reads RUNNING only
    fleet.tasks_on(ci)
    assert calls.take() == {"ListTasks": 2}
    # A task placed and stopped between two looks: one listing misses it, an exact look (a
    # forced stop) finds it stopping.
    late = start(ecs, ci, "agent", "service:agents")
    ecs.stop_task(cluster="ci", task=late)
    clock.advance(20)
    assert late not in {t.arn for t in fleet.tasks_on(ci)}
    calls.take()
    exact = fleet.tasks_on(ci, exact=True)
    assert calls.take()["ListTasks"] == 3, "RUNNING (2 pages), then STOPPED"
    assert [t.desired_status for t in exact if t.arn == late] == ["STOPPED"]


def test_a_look_in_another_container_takes_the_records_tasks_as_its_last_look(
    ecs_world: tuple[Any, AwsGaps, Clock, str],
) -> None:
    ecs, gaps, clock, ci = ecs_world
    daemon = start(ecs, ci, "log-router", "service:log-router")
    agents = [start(ecs, ci, "agent", "service:agents") for _ in range(2)]
    gaps.on_sigterm = lambda arn, reason: None
    first = EcsFleet(boto3.client("ecs", region_name=REGION), "ci", clock).tasks_on(ci)
    ecs.stop_task(cluster="ci", task=agents[0])  # stopping since that look
    clock.advance(20)
    controller = boto3.client("ecs", region_name=REGION)
    other = EcsFleet(controller, "ci", clock)  # another Lambda container: no look of its own
    calls = Calls(controller)
    seen = other.tasks_on(ci, known=first)
    # What the record knew and ECS still lists RUNNING is not described, nor is the daemon's
    # service asked about again; the task that left the listing is.
    assert calls.take() == {"ListTasks": 1, "DescribeTasks": 1}
    assert calls.described == [agents[0]]
    by_arn = {t.arn: t for t in seen}
    assert set(by_arn) == {daemon, *agents}
    assert by_arn[daemon].daemon and not by_arn[agents[1]].daemon
    assert by_arn[agents[0]].desired_status == "STOPPED"
    assert by_arn[agents[1]].group == "service:agents"


def test_an_answer_with_nothing_left_but_daemons_is_always_exact(
    ecs_world: tuple[Any, AwsGaps, Clock, str],
) -> None:
    ecs, gaps, clock, ci = ecs_world
    start(ecs, ci, "log-router", "service:log-router")
    agent = start(ecs, ci, "agent", "service:agents")
    gaps.on_sigterm = lambda arn, reason: None
    controller = boto3.client("ecs", region_name=REGION)
    fleet = EcsFleet(controller, "ci", clock)
    calls = Calls(controller)
    fleet.tasks_on(ci)
    calls.take()
    ecs.stop_task(cluster="ci", task=agent)
    # A new adapter (another Lambda container) has no look of the instance: both listings.
    cold = EcsFleet(boto3.client("ecs", region_name=REGION), "ci", clock)
    assert [t.arn for t in cold.tasks_on(ci) if not t.daemon] == [agent]
    # This one remembers the agent, but an answer of daemons only would end the drain: so
    # the stopping tasks are listed too before it is believed.
    clock.advance(20)
    assert [t.arn for t in fleet.tasks_on(ci) if not t.daemon] == [agent]
    assert calls.take()["ListTasks"] == 1
    gaps.task_exited(agent, 0)
    clock.advance(20)
    assert [t for t in fleet.tasks_on(ci) if not t.daemon] == []
    assert calls.take()["ListTasks"] == 2, "RUNNING, then STOPPED to be sure"


def test_a_task_an_event_said_is_stopped_is_not_described_again(
    ecs_world: tuple[Any, AwsGaps, Clock, str],
) -> None:
    """The step a task-STOPPED event wakes (the one that ends an idle drain) takes the event's
    word: STOPPED is final, so only the listings are read, in a warm container and a new one
    (nor is a daemon's task described twice)."""
    ecs, gaps, clock, ci = ecs_world
    daemon = start(ecs, ci, "log-router", "service:log-router")
    agent = start(ecs, ci, "agent", "service:agents")
    other = start(ecs, ci, "agent", "service:agents")
    controller = boto3.client("ecs", region_name=REGION)
    warm = EcsFleet(controller, "ci", clock)
    calls = Calls(controller)
    warm.tasks_on(ci)
    calls.take()
    calls.described.clear()
    gaps.task_exited(agent, 0)
    gaps.task_exited(other, 0)
    clock.advance(20)
    warm.saw_stopped(ci, agent)
    # ``other`` stopped too, with no event yet: it is read, and the answer is still exact.
    # The daemon's task, still listed RUNNING, is taken as last described.
    assert [t for t in warm.tasks_on(ci) if not t.daemon] == []
    assert calls.take() == {"ListTasks": 2, "DescribeTasks": 1}
    assert calls.described == [other]
    warm.saw_stopped(ci, other)
    calls.described.clear()
    clock.advance(20)
    tasks = warm.tasks_on(ci)
    assert [t.arn for t in tasks] == [daemon] and tasks[0].daemon
    assert calls.take() == {"ListTasks": 2}, "nothing to describe"

    cold_client = boto3.client("ecs", region_name=REGION)
    cold = EcsFleet(cold_client, "ci", clock)
    cold_calls = Calls(cold_client)
    cold.saw_stopped(ci, agent)
    cold.saw_stopped(ci, other)
    assert [t for t in cold.tasks_on(ci) if not t.daemon] == []
    # RUNNING names the daemon (described, its service asked once), STOPPED names the two
    # agents: nothing more to describe.
    assert cold_calls.take() == {"ListTasks": 2, "DescribeTasks": 1, "DescribeServices": 1}
    assert agent not in cold_calls.described and other not in cold_calls.described
    # Only the event's word counts, never a guess: a task the event did not name is described.
    third = start(ecs, ci, "agent", "service:agents")
    cold.saw_stopped(ci, "arn:aws:ecs:us-east-1:123456789012:task/ci/not-here")
    assert [t.arn for t in cold.tasks_on(ci) if not t.daemon] == [third]


# ============================================================================ AWS throttling


def test_throttled_calls_are_retryable_in_every_adapter(
    ecs_world: tuple[Any, AwsGaps, Clock, str],
) -> None:
    ecs, gaps, clock, ci = ecs_world
    start(ecs, ci, "agent", "service:agents")
    iid = ecs.describe_container_instances(cluster="ci", containerInstances=[ci])[
        "containerInstances"
    ][0]["ec2InstanceId"]
    fleet = EcsFleet(boto3.client("ecs", region_name=REGION, config=NO_RETRIES), "ci", clock)
    lifecycle = LifecycleActions(boto3.client("autoscaling", region_name=REGION, config=NO_RETRIES))
    expected = {
        "DescribeTasks",
        "ListTasks",
        "DescribeContainerInstances",
        "ListContainerInstances",
    }
    assert expected | {"RecordLifecycleActionHeartbeat"} == THROTTLEABLE
    for operation, call in (
        ("ListTasks", lambda: fleet.tasks_on(ci)),
        ("ListContainerInstances", lambda: fleet.find_container_instance(iid)),
        ("RecordLifecycleActionHeartbeat", lambda: lifecycle.heartbeat("g", "h", "t" * 36, "i")),
    ):
        throttle = gaps.throttle(operation)
        with pytest.raises(Retryable, match=r"ThrottlingException"):
            call()
        gaps.unthrottle(throttle)
    fleet.tasks_on(ci)  # warm: the next look asks RUNNING only, then describes what is new
    start(ecs, ci, "agent", "service:agents")
    gaps.throttle("DescribeTasks", count=1)
    with pytest.raises(Retryable):
        fleet.tasks_on(ci)
    assert len(fleet.tasks_on(ci)) == 2, "count=1: the next call goes through"
    assert gaps.throttled == {
        "ListTasks": 1,
        "ListContainerInstances": 1,
        "RecordLifecycleActionHeartbeat": 1,
        "DescribeTasks": 1,
    }
    # A window on the clock, and a rate: every other call, which botocore's own retries absorb.
    gaps.throttle("ListTasks", start=clock() + 10, until=clock() + 20)
    fleet.tasks_on(ci)
    clock.advance(10)
    with pytest.raises(Retryable):
        fleet.tasks_on(ci)
    clock.advance(10)
    fleet.tasks_on(ci)
    gaps.throttle("ListTasks", "DescribeTasks", rate=0.5)
    retrying = EcsFleet(
        boto3.client(
            "ecs",
            region_name=REGION,
            config=Config(retries={"mode": "standard", "total_max_attempts": 2}),
        ),
        "ci",
        clock,
    )
    before = sum(gaps.throttled.values())
    for _ in range(3):
        assert len(retrying.tasks_on(ci)) == 2
    assert sum(gaps.throttled.values()) > before
    with pytest.raises(ValueError):
        gaps.throttle("StopTask")


class RedeliveringWorld(World):
    """The tests' world, with failures redelivered as AWS would: a tick (an SQS record reported
    as a batch item failure) after the queue's visibility timeout, an EventBridge invocation
    that raised by Lambda's two asynchronous retries."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.later: list[tuple[float, dict[str, Any], int]] = []
        self.failures = 0
        self.dropped = 0

    def route(self, event: dict[str, Any], tries: int = 0) -> list[dict[str, Any]]:
        out = []
        for rule in self.rules:
            if not rule.matches(event):
                continue
            try:
                out.append(HANDLERS[rule.function](event, Ctx()))
            except Retryable:
                self.failures += 1
                if tries < len(EVENT_RETRIES):
                    self.later.append((self.clock() + EVENT_RETRIES[tries], event, tries + 1))
                else:
                    self.dropped += 1  # to the DLQ
        self.results.extend(out)
        return out

    def advance(self, seconds: float, step: float = 1.0) -> None:
        end = self.clock() + seconds
        while self.clock() < end:
            self.clock.advance(step)
            self._run_agents()
            self.pump()
            self.gaps.expire_lifecycle_actions()
            now = self.clock()
            for due, event, tries in [x for x in self.later if x[0] <= now]:
                self.later.remove((due, event, tries))
                self.route(event, tries)
            for body in self.ticks.due():
                event = sqs_event(body)
                response = drain_monitor.handler(event, Ctx())
                if response["batchItemFailures"]:
                    self.failures += 1
                    self.ticks.pending.append((now + TICK_REDELIVERY, body))
            self.pump()


@pytest.fixture
def world(aws_env: None) -> Iterator[RedeliveringWorld]:
    with mock_aws():
        clock = Clock()
        with AwsGaps(clock=clock) as gaps:
            coord = Coordinator(
                org="acme", api_token="api-token", clock=clock, lost_agent_timeout=1e9
            )
            with CoordinatorServer(coord) as server:
                w = RedeliveringWorld(clock, gaps, coord, server)
                try:
                    yield w
                finally:
                    runtime.set_controller(None)


def unretried(world: World) -> None:
    """The controller's AWS clients without botocore's own retries (its back-off sleeps are
    real): every throttled call reaches the adapters."""
    ctl: Any = world.ctl
    ctl.fleet._ecs = boto3.client("ecs", region_name=REGION, config=NO_RETRIES)
    ctl.lifecycle._asg = boto3.client("autoscaling", region_name=REGION, config=NO_RETRIES)


def test_a_scale_in_throttled_for_a_while_still_completes_and_loses_nothing(
    world: RedeliveringWorld,
) -> None:
    (a,) = world.build(instances=1, hook_timeout=900)
    world.controller(heartbeat_interval=60, tick_interval=20)
    unretried(world)
    busy = world.add_agent(a, job_seconds=600)
    world.add_agent(a)
    world.emit(world.gaps.begin_termination(a))
    assert world.record(a).phase == "soft"
    # ECS reads and heartbeats throttled for a minute: every step in it fails, and its tick
    # comes back after the queue's visibility timeout.
    world.gaps.throttle(
        "ListTasks", "DescribeTasks", "RecordLifecycleActionHeartbeat", until=T0 + 90
    )
    world.advance(120)
    assert world.failures >= 1 and world.gaps.throttled
    assert world.gaps.actions[a].waiting and world.record(a).phase == "soft"
    world.run_until(lambda: world.record(a).phase == "done", limit=900)
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.record(a).outcome == "drained"
    assert world.coord.job(busy.job_id or "").passed, "the job finished; nothing lost"


def test_a_spot_drain_with_throttled_reads_is_still_forced_in_time(
    world: RedeliveringWorld,
) -> None:
    (a,) = world.build(instances=1)
    world.controller(spot_margin=20)
    agent = world.add_agent(
        a, job_seconds=3600, retry=[RetryRule(signal_reason="agent_stop", limit=2)]
    )
    # Every other ECS read throttled for the whole drain: botocore's own retries (as the
    # Lambda's adaptive ones) absorb it, and the adapters never see one.
    world.gaps.throttle("ListTasks", "DescribeTasks", "DescribeContainerInstances", rate=0.5)
    ctl: Any = world.ctl
    ctl.fleet._ecs = boto3.client(
        "ecs", region_name=REGION, config=Config(retries={"mode": "standard", "max_attempts": 3})
    )
    world.emit(world.gaps.spot_interruption(a))
    world.advance(105)
    job = world.coord.job(agent.job_id or "")
    assert job.signal_reason == "agent_stop" and job.retried
    assert world.record(a).forced_at == T0 + 100
    assert world.failures == 0 and sum(world.gaps.throttled.values()) > 0


def test_a_spot_storm_that_spends_the_rest_budget_waits_without_hammering(
    aws_env: None,
) -> None:
    """Eight spot drains at once against a 12-a-minute limit: the pauses and listings they
    cannot afford are held back (none sent into a spent window), the rate limit is not taken
    for an outage (no fallback to ECS: DRAINING's SIGTERM does the rest), nothing is lost."""
    with mock_aws():
        clock = Clock()
        with AwsGaps(clock=clock) as gaps:
            coord = Coordinator(org="acme", clock=clock, rest_rate_limit=12, lost_agent_timeout=1e9)
            with CoordinatorServer(coord) as server:
                try:
                    w = RedeliveringWorld(clock, gaps, coord, server)
                    ids = w.build(instances=8)
                    w.controller(spot_margin=20)
                    w.ctl.coordinator = CoordinatorClient(  # on the world's clock
                        server.url,
                        "acme",
                        w.token.get,
                        w.token.invalidate,
                        clock=clock,
                        sleep=clock.advance,
                        max_rate_wait=5,
                    )
                    for iid in ids:
                        w.add_agent(iid, job_seconds=60)  # done well before SIGKILL
                        w.add_agent(iid)
                    for iid in ids:
                        w.emit(w.gaps.spot_interruption(iid))
                    w.run_until(lambda: all(w.record(i).phase == "done" for i in ids), limit=200)
                    rest = w.ctl.coordinator
                    assert isinstance(rest, CoordinatorClient)
                    stats = coord.rest_rate.stats()
                    assert stats.peak_allowed <= 12
                    assert rest.rate_refused >= 1, "later calls gave up without a request"
                    assert stats.limited == 0, "and none was sent into a spent window"
                    assert w.metrics.counts.get(core.COORDINATOR_FALLBACKS, 0) == 0
                    assert not any(w.record(i).fallback for i in ids)
                    assert all(w.gaps.actions.get(i) is None for i in ids)  # spot: no hook
                    assert all(w.record(i).outcome == "drained" for i in ids)
                    lost = [j for j in coord.jobs() if j.lost]
                    assert lost == []
                finally:
                    runtime.set_controller(None)


def test_registering_agents_does_not_spend_the_rest_budget(
    limited: tuple[Coordinator, CoordinatorServer, Clock],
) -> None:
    coord, _server, _clock = limited
    for n in range(10):
        reg = coord.register(coord.registration_token, RegisterRequest(name=f"a{n}"))
        coord.connect(reg.access_token, {})
    assert coord.rest_rate.stats().requests == 0


def test_a_throttled_step_does_not_let_a_300s_hook_expire(world: RedeliveringWorld) -> None:
    """A step that fails on throttling gives its tick back to SQS, which redelivers it only
    after the queue's 360 s visibility timeout: longer than a 300 s hook (infra/'s) waits for a
    heartbeat. The failed step leaves a tick 30 s out (core.RETRY_TICK) that retries it."""
    (a,) = world.build(instances=1, hook_timeout=300)
    world.controller(heartbeat_interval=60, tick_interval=20)
    unretried(world)
    world.add_agent(a, job_seconds=600)
    world.emit(world.gaps.begin_termination(a))
    world.gaps.throttle("ListTasks", "RecordLifecycleActionHeartbeat", until=T0 + 60)
    world.run_until(lambda: not world.gaps.actions[a].waiting, limit=900)
    assert world.gaps.actions[a].state == "completed", "expired, not completed by the drain"
