"""The drain core's pieces one at a time: event models, handlers' rejection policy, settings,
the coordinator client over loopback, Secrets Manager caching, and the AWS wrappers' error
mapping (botocore Stubber for throttling and expired tokens)."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.stub import Stubber
from moto import mock_aws

from fleetdrain.agent.buildkite.models import RegisterRequest
from fleetdrain.controller import drain_monitor, lifecycle_hook, runtime, spot_interruption
from fleetdrain.controller.drain.config import Settings
from fleetdrain.controller.drain.coordinator import CoordinatorClient, SecretToken
from fleetdrain.controller.drain.ecs_fleet import EcsFleet
from fleetdrain.controller.drain.errors import CoordinatorUnavailable, LifecycleGone, Retryable
from fleetdrain.controller.drain.events import MalformedEvent, parse_event, parse_message
from fleetdrain.controller.drain.lifecycle import LifecycleActions
from fleetdrain.controller.drain.ports import DrainRecord
from fleetdrain.controller.drain.signals import (
    Ignored,
    InstanceDrainingSignal,
    LifecycleSignal,
    MaintenanceSignal,
    RebalanceSignal,
    Several,
    SpotSignal,
    StoppingSignal,
    TaskStoppedSignal,
    TickSignal,
)
from fleetdrain.controller.drain.state import DynamoDrainStore
from fleetdrain.controller.drain.ticks import SqsTicks, tick_body
from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer

pytestmark = pytest.mark.timeout(30)

TOKEN = "87654321-4321-4321-4321-210987654321"
EVENTS = Path(__file__).resolve().parents[1] / "events"


def sample(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / name).read_text()))


class Ctx:
    function_name = "fn"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:fn"
    aws_request_id = "req-1"


class ExplodingController:
    """A controller that must not be reached (rejections happen before it)."""

    def handle(self, signal: Any) -> Any:
        raise AssertionError(f"controller reached with {signal!r}")


@pytest.fixture
def no_controller() -> Iterator[None]:
    runtime.set_controller(ExplodingController())  # type: ignore[arg-type]
    yield
    runtime.set_controller(None)


# ---------------------------------------------------------------------------- events


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("asg-terminate-lifecycle-action.eventbridge.json", LifecycleSignal),
        ("ec2-spot-interruption-warning.json", SpotSignal),
        ("ec2-rebalance-recommendation.json", RebalanceSignal),
        ("ecs-task-state-change.stopped.json", TaskStoppedSignal),
        ("ecs-container-instance-state-change.draining.json", InstanceDrainingSignal),
        ("ec2-instance-state-change.stopping.json", StoppingSignal),
        ("ec2-instance-state-change.shutting-down.json", StoppingSignal),
        ("aws-health-scheduled-change.instance-retirement.json", MaintenanceSignal),
    ],
)
def test_every_sample_event_parses(name: str, kind: type) -> None:
    raw = sample(name)
    signal = parse_event(raw)
    assert isinstance(signal, kind)
    # Extra fields anywhere are never fatal.
    raw["brand-new-top-level"] = {"x": 1}
    raw["detail"]["brandNewDetailField"] = [1, 2, 3]
    assert parse_event(raw) == signal


def test_sqs_bodies_parse_raw_and_in_an_sns_envelope() -> None:
    body = (EVENTS / "asg-terminate-lifecycle-action.sqs-body.json").read_text()
    signal = parse_message(body)
    assert isinstance(signal, LifecycleSignal)
    assert signal.instance_id == "i-0b1c2d3e4f5a6b7c8" and signal.asg_name == "ci-agents"
    envelope = json.dumps({"Type": "Notification", "MessageId": "m", "Message": body})
    assert parse_message(envelope) == signal
    test = parse_message((EVENTS / "asg-test-notification.sqs-body.json").read_text())
    assert isinstance(test, Ignored) and "test notification" in test.reason
    tick = parse_message(tick_body("i-1", "d1", "t1"))
    assert tick == TickSignal("i-1", "d1", "t1")


def test_event_details_that_are_not_acted_on_are_ignored_cleanly() -> None:
    launching = sample("asg-terminate-lifecycle-action.eventbridge.json")
    launching["detail"]["LifecycleTransition"] = "autoscaling:EC2_INSTANCE_LAUNCHING"
    assert isinstance(parse_event(launching), Ignored)
    running = sample("ecs-task-state-change.stopped.json")
    running["detail"]["lastStatus"] = "RUNNING"
    assert isinstance(parse_event(running), Ignored)
    active = sample("ecs-container-instance-state-change.draining.json")
    active["detail"]["status"] = "ACTIVE"
    assert isinstance(parse_event(active), Ignored)


# ---------------------------------------------------------------------------- issue 11


def test_real_world_variants_are_accepted() -> None:
    # Finding 4: rejected events dropped real-world variants that mean no harm.
    spot = sample("ec2-spot-interruption-warning.json")
    spot["time"] = ""  # aws-node-termination-handler's test events; NTH takes now
    signal = parse_event(spot)
    assert isinstance(signal, SpotSignal) and signal.time is None
    spot["version"] = 0  # a number
    assert parse_event(spot) == signal
    del spot["version"]
    assert parse_event(spot) == signal
    body = json.loads((EVENTS / "asg-terminate-lifecycle-action.sqs-body.json").read_text())
    del body["Time"]
    lifecycle = parse_message(json.dumps(body))
    assert isinstance(lifecycle, LifecycleSignal) and lifecycle.time is None
    # A test notification in the lifecycle envelope says what it is, not what it lacks.
    test = sample("asg-terminate-lifecycle-action.eventbridge.json")
    test["detail"] = {
        "Event": "autoscaling:TEST_NOTIFICATION",
        "LifecycleTransition": "autoscaling:TEST_NOTIFICATION",
    }
    assert parse_event(test) == Ignored("lifecycle transition autoscaling:TEST_NOTIFICATION")


def test_state_changes_stopping_and_shutting_down_are_signals_the_rest_ignored() -> None:
    event = sample("ec2-instance-state-change.stopping.json")
    signal = parse_event(event)
    assert signal == StoppingSignal(
        "i-0b1c2d3e4f5a6b7c8",
        "stopping",
        signal.time,
        event["id"],  # type: ignore[union-attr]
    )
    for state in ("pending", "running", "stopped", "terminated"):
        event["detail"]["state"] = state
        assert parse_event(event) == Ignored(f"instance state {state}")
    # Powertools' sample spells the id instance_id.
    event["detail"] = {"instance_id": "i-1", "state": "shutting-down"}
    assert isinstance(parse_event(event), StoppingSignal)


def test_health_scheduled_changes_become_one_drain_per_instance() -> None:
    event = sample("aws-health-scheduled-change.instance-retirement.json")
    signal = parse_event(event)
    assert isinstance(signal, MaintenanceSignal)
    assert signal.instance_id == "i-0b1c2d3e4f5a6b7c8"
    assert signal.start is not None and signal.start.isoformat() == "2026-02-16T03:00:00+00:00"
    assert signal.kind == "AWS_EC2_INSTANCE_RETIREMENT_SCHEDULED"
    # Every update of the same change (a new event id each) is the same change...
    again = copy.deepcopy(event)
    again["id"] = "another-event-id"
    again["detail"]["statusCode"] = "open"
    assert parse_event(again) == signal
    # ... unless it moves (ISO times too).
    moved = copy.deepcopy(event)
    moved["detail"]["startTime"] = "2026-02-10T03:00:00Z"
    assert parse_event(moved).event_id != signal.event_id  # type: ignore[union-attr]
    several = copy.deepcopy(event)
    several["detail"]["affectedEntities"] = [
        {"entityValue": "i-1"},
        {"entityValue": "i-2"},
        {"entityValue": "vol-3"},
    ]
    out = parse_event(several)
    assert isinstance(out, Several)
    assert [s.instance_id for s in out.signals] == ["i-1", "i-2"]  # type: ignore[union-attr]
    for change, reason in [
        ({"statusCode": "closed"}, "is closed"),
        ({"eventTypeCategory": "issue"}, "EC2 issue"),
        ({"service": "RDS"}, "RDS scheduledChange"),
        ({"affectedEntities": [{"entityValue": "vol-1"}]}, "names no instance"),
    ]:
        other = copy.deepcopy(event)
        other["detail"].update(change)
        if "affectedEntities" in change:
            other["resources"] = []
        got = parse_event(other)
        assert isinstance(got, Ignored) and reason in got.reason, (change, got)
    bad = copy.deepcopy(event)
    bad["detail"]["startTime"] = "next tuesday"
    with pytest.raises(MalformedEvent, match="startTime"):
        parse_event(bad)


def _sns_lambda_event(*messages: str) -> dict[str, Any]:
    """What Lambda invokes a function subscribed to an SNS topic with."""
    return {
        "Records": [
            {
                "EventSource": "aws:sns",
                "EventVersion": "1.0",
                "EventSubscriptionArn": "arn:aws:sns:us-east-1:123456789012:lifecycle:abc",
                "Sns": {
                    "Type": "Notification",
                    "MessageId": f"m-{n}",
                    "TopicArn": "arn:aws:sns:us-east-1:123456789012:lifecycle",
                    "Subject": "Auto Scaling: Lifecycle action",
                    "Message": message,
                    "Timestamp": "2026-02-02T03:44:13.000Z",
                    "SignatureVersion": "1",
                    "Signature": "x",
                    "SigningCertUrl": "https://sns.example/cert.pem",
                    "UnsubscribeUrl": "https://sns.example/unsubscribe",
                    "MessageAttributes": {},
                },
            }
            for n, message in enumerate(messages)
        ]
    }


class RecordingController:
    """Stands in for the drain controller behind the handlers: records each signal, answers
    ``outcome``, and fails instance ``i-throttled`` as a throttled (retryable) step would."""

    def __init__(self, outcome: str) -> None:
        self.outcome = outcome
        self.seen: list[Any] = []

    def handle(self, signal: Any) -> Any:
        from fleetdrain.controller.drain.core import Result

        self.seen.append(signal)
        if signal.instance_id == "i-throttled":
            raise Retryable("ECS ListTasks: throttled")
        return Result(self.outcome, signal.instance_id, "d", "soft")

    def handle_batch(self, signals: Any) -> list[Any]:
        """As the controller's: each signal's result, or what it raised."""
        out: list[Any] = []
        for signal in signals:
            try:
                out.append(self.handle(signal))
            except Exception as exc:
                out.append(exc)
        return out


def test_an_sns_to_lambda_event_is_handled_not_crashed_on() -> None:
    # Finding 5: Records[].Sns crashed in the batch processor (KeyError: 'messageId').
    ctl = RecordingController("started")
    runtime.set_controller(ctl)  # type: ignore[arg-type]
    try:
        body = (EVENTS / "asg-terminate-lifecycle-action.sqs-body.json").read_text()
        out = lifecycle_hook.handler(_sns_lambda_event(body), Ctx())
        assert out["status"] == "started" and isinstance(ctl.seen[0], LifecycleSignal)
        test = (EVENTS / "asg-test-notification.sqs-body.json").read_text()
        assert lifecycle_hook.handler(_sns_lambda_event(test), Ctx())["status"] == "ignored"
        assert lifecycle_hook.handler(_sns_lambda_event("not json"), Ctx())["status"] == "rejected"
        # Invoked asynchronously: a retryable failure raises (Lambda retries, then the DLQ).
        throttled = json.loads(body) | {"EC2InstanceId": "i-throttled"}
        with pytest.raises(Retryable):
            lifecycle_hook.handler(_sns_lambda_event(json.dumps(throttled)), Ctx())
    finally:
        runtime.set_controller(None)


@pytest.mark.parametrize(
    "records",
    [
        [{"eventSource": "aws:s3", "s3": {}}],
        [{"eventSource": "aws:sqs", "body": "{}"}],  # no messageId: no batch item to fail
        [{"EventSource": "aws:sns"}],  # no Sns
        ["a string"],
        [],
    ],
)
def test_records_that_are_neither_sqs_nor_sns_are_rejected_with_what_they_are(
    no_controller: None, records: list[Any]
) -> None:
    out = lifecycle_hook.handler({"Records": records}, Ctx())
    assert out["status"] == "rejected"
    assert "neither SQS messages" in out["reason"]


def test_rejections_are_counted_for_the_alarm(no_controller: None) -> None:
    metrics = runtime.metrics
    metrics.clear_metrics()
    runtime._reject("why", "where")
    assert metrics.metric_set["EventsRejected"]["Value"] == [1.0]
    metrics.clear_metrics()


def test_a_health_event_about_several_instances_is_handled_for_each() -> None:
    class Controller:
        def __init__(self) -> None:
            self.seen: list[str] = []

        def handle(self, signal: Any) -> Any:
            from fleetdrain.controller.drain.core import Result

            self.seen.append(signal.instance_id)
            return Result("ignored" if signal.instance_id == "i-2" else "started")

        def handle_batch(self, signals: Any) -> list[Any]:
            return [self.handle(s) for s in signals]

    ctl = Controller()
    runtime.set_controller(ctl)  # type: ignore[arg-type]
    try:
        event = sample("aws-health-scheduled-change.instance-retirement.json")
        event["detail"]["affectedEntities"] = [{"entityValue": "i-1"}, {"entityValue": "i-2"}]
        out = spot_interruption.handler(event, Ctx())
        assert ctl.seen == ["i-1", "i-2"]
        assert out["status"] == "ignored,started" and len(out["results"]) == 2
    finally:
        runtime.set_controller(None)


def _malformed_events() -> list[tuple[str, Any]]:
    lifecycle = sample("asg-terminate-lifecycle-action.eventbridge.json")
    no_token = copy.deepcopy(lifecycle)
    del no_token["detail"]["LifecycleActionToken"]
    spot = sample("ec2-spot-interruption-warning.json")
    bad_time = copy.deepcopy(spot)
    bad_time["time"] = "yesterday"
    no_detail = copy.deepcopy(spot)
    del no_detail["detail"]
    task = sample("ecs-task-state-change.stopped.json")
    bad_exit = copy.deepcopy(task)
    bad_exit["detail"]["containers"][0]["exitCode"] = "zero"
    wrong_source = copy.deepcopy(spot)
    wrong_source["source"] = "aws.autoscaling"
    return [
        ("not an object", ["a", "list"]),
        ("a string", "hello"),
        ("empty object", {}),
        ("unknown detail-type", {**spot, "detail-type": "EC2 Instance Launch Successful"}),
        ("missing token", no_token),
        ("bad time", bad_time),
        ("no detail", no_detail),
        ("exit code not a number", bad_exit),
        ("source does not match", wrong_source),
        ("detail is a string", {**spot, "detail": "instance-id"}),
    ]


@pytest.mark.parametrize(("what", "raw"), _malformed_events())
def test_malformed_events_raise_a_one_line_reason(what: str, raw: Any) -> None:
    with pytest.raises(MalformedEvent) as info:
        parse_event(raw)
    assert "\n" not in str(info.value) and str(info.value)


@pytest.mark.parametrize(
    "body",
    [
        "not json",
        "[1, 2]",
        '"a string"',
        '{"kind": "fleetdrain.tick", "instance_id": "i-1"}',
        '{"LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING"}',
        '{"Type": "Notification", "Message": {"not": "a string"}}',
        '{"hello": "world"}',
    ],
)
def test_malformed_messages_raise(body: str) -> None:
    with pytest.raises(MalformedEvent):
        parse_message(body)


@pytest.mark.parametrize(("what", "raw"), _malformed_events())
def test_handlers_drop_malformed_events_without_raising(
    no_controller: None, what: str, raw: Any
) -> None:
    for handler in (lifecycle_hook.handler, spot_interruption.handler, drain_monitor.handler):
        assert handler(raw, Ctx())["status"] == "rejected"


def test_events_for_another_function_are_rejected(no_controller: None) -> None:
    spot = sample("ec2-spot-interruption-warning.json")
    assert lifecycle_hook.handler(spot, Ctx())["status"] == "rejected"
    lifecycle = sample("asg-terminate-lifecycle-action.eventbridge.json")
    assert drain_monitor.handler(lifecycle, Ctx())["status"] == "rejected"
    assert spot_interruption.handler(lifecycle, Ctx())["status"] == "rejected"


def test_sqs_batch_drops_poison_and_fails_only_retryable_records() -> None:
    ctl = RecordingController("stepped")
    runtime.set_controller(ctl)  # type: ignore[arg-type]
    try:
        records = [
            ("poison", "{not json"),
            ("test", (EVENTS / "asg-test-notification.sqs-body.json").read_text()),
            ("good", tick_body("i-good", "d", "t")),
            ("throttled", tick_body("i-throttled", "d", "t")),
            ("wrong", (EVENTS / "asg-terminate-lifecycle-action.sqs-body.json").read_text()),
        ]
        event = {
            "Records": [
                {
                    "messageId": mid,
                    "receiptHandle": "h",
                    "body": body,
                    "attributes": {
                        "ApproximateReceiveCount": "1",
                        "SentTimestamp": "1",
                        "SenderId": "s",
                        "ApproximateFirstReceiveTimestamp": "1",
                    },
                    "messageAttributes": {},
                    "md5OfBody": "0",
                    "eventSource": "aws:sqs",
                    "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:q",
                    "awsRegion": "us-east-1",
                }
                for mid, body in records
            ]
        }
        response = drain_monitor.handler(event, Ctx())
        assert response == {"batchItemFailures": [{"itemIdentifier": "throttled"}]}
        assert [s.instance_id for s in ctl.seen] == ["i-good", "i-throttled"]
    finally:
        runtime.set_controller(None)


# ---------------------------------------------------------------------------- settings


def test_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "FLEETDRAIN_CLUSTER": "ci",
            "FLEETDRAIN_DRAIN_BUDGET_SECONDS": "1800",
            "FLEETDRAIN_REBALANCE_ACTION": "IGNORE",
            "FLEETDRAIN_AGENT_CONTAINERS": "agent, sidecar",
            "FLEETDRAIN_COORDINATOR_URL": "https://api.example.com/",
            "FLEETDRAIN_AUTOSCALING_GROUP": "ci-agents",
            "FLEETDRAIN_LIFECYCLE_HOOK": "fleetdrain-terminating",
        }
    )
    assert s.asg_name == "ci-agents" and s.hook_name == "fleetdrain-terminating"
    assert s.step_lease == 60.0
    assert s.drain_budget == 1800 and s.rebalance_action == "ignore"
    assert s.agent_containers == {"agent", "sidecar"}
    assert s.coordinator_url == "https://api.example.com"
    with pytest.raises(ValueError, match="FLEETDRAIN_CLUSTER"):
        Settings.from_env({})
    with pytest.raises(ValueError, match="number"):
        Settings.from_env({"FLEETDRAIN_CLUSTER": "ci", "FLEETDRAIN_TICK_SECONDS": "soon"})


# ---------------------------------------------------------------------------- coordinator


@pytest.fixture
def served() -> Iterator[tuple[Coordinator, CoordinatorServer]]:
    coord = Coordinator(org="acme", api_token="api-token")
    with CoordinatorServer(coord) as server:
        yield coord, server


def _agent(coord: Coordinator, task_arn: str) -> str:
    reg = coord.register(
        coord.registration_token,
        RegisterRequest(name=task_arn[-6:], meta_data=[f"ecs:task-arn={task_arn}"]),
    )
    coord.connect(reg.access_token, {})
    return reg.id


def test_coordinator_client_pages_pauses_and_stops(
    served: tuple[Coordinator, CoordinatorServer],
) -> None:
    coord, server = served
    ids = {f"arn:aws:ecs:us-east-1:1:task/ci/{n:06d}": "" for n in range(130)}
    for arn in ids:
        ids[arn] = _agent(coord, arn)
    client = CoordinatorClient(server.url, "acme", lambda: "api-token")
    wanted = [f"arn:aws:ecs:us-east-1:1:task/ci/{n:06d}" for n in (3, 129)]
    found = client.agents_for(wanted)
    assert sorted(a.task_arn for a in found) == sorted(wanted)
    assert client.requests == 2, "two pages of 100"
    agent = found[0]
    assert client.pause(agent.id, "draining", 30)
    assert coord.agent(agent.id).paused
    assert client.stop(agent.id, force=True)
    assert coord.agent(agent.id).stop_requested
    # One agent by id: one request; an id the coordinator does not know is None.
    before = client.requests
    one = client.agent(agent.id)
    assert one is not None and one.id == agent.id and one.task_arn == agent.task_arn
    assert client.agent("no-such-agent") is None
    assert client.requests == before + 2
    assert not client.pause("no-such-agent", "x", 1), "404: nothing to signal"


def test_a_listing_past_its_page_limit_keeps_what_it_read_and_says_so(
    served: tuple[Coordinator, CoordinatorServer], caplog: pytest.LogCaptureFixture
) -> None:
    """An organization bigger than the page limit (10,000 agents as built) is listed in part:
    what was read is used, and the log says the rest is not found (their tasks are drained as
    agentless). A listing that ends within the limit says nothing."""
    coord, server = served
    arns = [f"arn:aws:ecs:us-east-1:1:task/ci/{n:06d}" for n in range(250)]
    for arn in arns:
        _agent(coord, arn)
    client = CoordinatorClient(server.url, "acme", lambda: "api-token", max_pages=2)
    with caplog.at_level(logging.WARNING, logger="fleetdrain.drain"):
        found = client.list_agents()
    assert len(found) == 200 and client.requests == 2 and client.truncated
    assert [r.pages for r in caplog.records if hasattr(r, "pages")] == [2]  # type: ignore[attr-defined]
    assert "not found" in caplog.records[-1].getMessage()
    caplog.clear()
    whole = CoordinatorClient(server.url, "acme", lambda: "api-token", max_pages=3)
    with caplog.at_level(logging.WARNING, logger="fleetdrain.drain"):
        assert len(whole.list_agents()) == 250
    assert not whole.truncated and caplog.records == []


def test_coordinator_client_refreshes_a_rejected_token_once(
    served: tuple[Coordinator, CoordinatorServer],
) -> None:
    _coord, server = served
    tokens = iter(["stale", "api-token"])
    current = {"token": next(tokens)}
    invalidated = []

    def invalidate() -> None:
        invalidated.append(True)
        current["token"] = next(tokens)

    client = CoordinatorClient(server.url, "acme", lambda: current["token"], invalidate)
    assert client.agents_for([]) == []
    assert invalidated == [True]
    bad = CoordinatorClient(server.url, "acme", lambda: "wrong")
    with pytest.raises(CoordinatorUnavailable, match="401"):
        bad.agents_for([])


def test_coordinator_client_gives_up_on_5xx_and_on_no_server(
    served: tuple[Coordinator, CoordinatorServer],
) -> None:
    from fleetdrain.drill.coordinator.faults import Fault

    coord, server = served
    coord.faults.add(Fault("rest_agents", "status", status=503, count=10))
    client = CoordinatorClient(server.url, "acme", lambda: "api-token", attempts=3, backoff=0)
    with pytest.raises(CoordinatorUnavailable, match="503"):
        client.agents_for(["x"])
    assert client.requests == 3
    server.stop()
    down = CoordinatorClient(server.url, "acme", lambda: "api-token", attempts=2, backoff=0)
    with pytest.raises(CoordinatorUnavailable):
        down.agents_for(["x"])


# ---------------------------------------------------------------------------- AWS wrappers


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(key, "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    with mock_aws():
        yield


def test_secret_token_is_cached_and_accepts_json(aws: None) -> None:
    sm = boto3.client("secretsmanager")
    arn = sm.create_secret(Name="t", SecretString=json.dumps({"token": "s3cr3t"}))["ARN"]
    now = [0.0]
    token = SecretToken(sm, arn, clock=lambda: now[0], ttl=300)
    assert [token.get() for _ in range(5)] == ["s3cr3t"] * 5
    assert token.fetches == 1 and "s3cr3t" not in repr(token)
    now[0] = 301
    token.get()
    assert token.fetches == 2
    token.invalidate()
    token.get()
    assert token.fetches == 3
    with pytest.raises(CoordinatorUnavailable):
        SecretToken(sm, "arn:aws:secretsmanager:us-east-1:123456789012:secret:nope").get()


def test_lifecycle_errors_map_to_gone_and_retryable() -> None:
    asg = boto3.client("autoscaling", region_name="us-east-1")
    actions = LifecycleActions(asg)
    with Stubber(asg) as stub:
        stub.add_client_error(
            "complete_lifecycle_action",
            service_error_code="ValidationError",
            service_message=f"No active Lifecycle Action found with token {TOKEN}",
        )
        with pytest.raises(LifecycleGone):
            actions.complete("g", "h", TOKEN, "i-1")
        stub.add_client_error("record_lifecycle_action_heartbeat", service_error_code="Throttling")
        with pytest.raises(Retryable):
            actions.heartbeat("g", "h", TOKEN, "i-1")
        stub.add_client_error(
            "complete_lifecycle_action",
            service_error_code="ValidationError",
            service_message="1 validation error detected",
        )
        with pytest.raises(Exception) as info:
            actions.complete("g", "h", TOKEN, "i-1")
        assert not isinstance(info.value, (LifecycleGone, Retryable))


def test_dynamodb_and_sqs_throttling_is_retryable() -> None:
    ddb = boto3.client("dynamodb", region_name="us-east-1")
    store = DynamoDrainStore(ddb, "drains", lambda: 0.0, 60)
    with Stubber(ddb) as stub:
        stub.add_client_error(
            "get_item", service_error_code="ProvisionedThroughputExceededException"
        )
        with pytest.raises(Retryable):
            store.get("i-1")
        stub.add_client_error(
            "get_item", service_error_code="InternalServerError", http_status_code=500
        )
        with pytest.raises(Retryable):
            store.get("i-1")
    sqs = boto3.client("sqs", region_name="us-east-1")
    with Stubber(sqs) as stub:
        stub.add_client_error("send_message", service_error_code="RequestThrottled")
        with pytest.raises(Retryable):
            SqsTicks(sqs, "https://q").schedule("i-1", "d", "t", 5)


def test_find_container_instance_asks_with_the_filter_and_believes_its_one_answer() -> None:
    ecs = boto3.client("ecs", region_name="us-east-1")
    fleet = EcsFleet(ecs, "ci", lambda: 0.0)
    arn = "arn:aws:ecs:us-east-1:1:container-instance/ci/"
    filtered = {"cluster": "ci", "filter": "ec2InstanceId == i-c"}
    with Stubber(ecs) as stub:
        # ECS's filter is exact: the one ARN it names is the instance, no describe needed.
        stub.add_response(
            "list_container_instances", {"containerInstanceArns": [arn + "c"]}, filtered
        )
        found = fleet.find_container_instance("i-c")
        stub.assert_no_pending_responses()
    assert found is not None and found.arn == arn + "c" and found.ec2_instance_id == "i-c"


def test_an_instance_of_another_cluster_costs_one_call_not_a_scan() -> None:
    # Finding 6: a spot warning for another cluster's instance (every one of a shared account
    # reaches the function): one filtered ListContainerInstances, nothing else.
    ecs = boto3.client("ecs", region_name="us-east-1")
    fleet = EcsFleet(ecs, "ci", lambda: 0.0)
    with Stubber(ecs) as stub:
        stub.add_response(
            "list_container_instances",
            {"containerInstanceArns": []},
            {"cluster": "ci", "filter": "ec2InstanceId == i-elsewhere"},
        )
        assert fleet.find_container_instance("i-elsewhere") is None
        stub.assert_no_pending_responses()  # and a second call would have failed: none left
    # An answer that names several (a filter not honoured) is described, and believed only
    # where the instance id matches.
    arn = "arn:aws:ecs:us-east-1:1:container-instance/ci/"
    with Stubber(ecs) as stub:
        stub.add_response(
            "list_container_instances", {"containerInstanceArns": [arn + "a", arn + "c"]}
        )
        stub.add_response(
            "describe_container_instances",
            {
                "containerInstances": [
                    {"containerInstanceArn": arn + "a", "ec2InstanceId": "i-a"},
                    {"containerInstanceArn": arn + "c", "ec2InstanceId": "i-c"},
                ]
            },
        )
        assert fleet.find_container_instance("i-b") is None
        stub.assert_no_pending_responses()


def test_a_tick_carries_its_record_and_a_copy_it_cannot_use_is_dropped_not_the_tick() -> None:
    rec = DrainRecord(instance_id="i-1", drain_id="d1", cluster="ci", started_at=1.0, version=4)
    signal = parse_message(tick_body("i-1", "d1", "t1", rec))
    assert isinstance(signal, TickSignal) and signal.record == rec
    assert signal.record is not None and signal.record.version == 4
    other = dataclasses.replace(rec, drain_id="d0")  # a copy of another drain's record
    assert parse_message(tick_body("i-1", "d1", "t1", other)) == TickSignal("i-1", "d1", "t1")
    assert parse_message(tick_body("i-1", "d1", "t1", other)).record is None  # type: ignore[union-attr]
    # A record too big for an SQS message is left out: the step reads it.
    big = dataclasses.replace(
        rec, looked_tasks=[[f"arn:{n:06d}", "service:x", "RUNNING"] for n in range(8000)]
    )
    assert "record" not in json.loads(tick_body("i-1", "d1", "t1", big))
    body = json.loads(tick_body("i-1", "d1", "t1"))
    body["record"] = '{"not": "a record"}'
    unreadable = parse_message(json.dumps(body))
    assert isinstance(unreadable, TickSignal) and unreadable.record is None


def test_sqs_ticks_send_a_delayed_tick(aws: None) -> None:
    sqs = boto3.client("sqs")
    url = sqs.create_queue(QueueName="drain-queue")["QueueUrl"]
    SqsTicks(sqs, url).schedule("i-1", "d1", "t1", 0)
    message = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0)["Messages"][0]
    assert parse_message(message["Body"]) == TickSignal("i-1", "d1", "t1")
