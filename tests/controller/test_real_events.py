"""Real events (tests/events/real/: as AWS emitted or documented them, collected from public
sources) through template.yaml's own patterns and the real handlers, on the in-memory world
(tests/controller/memory.py): what each should cause, as ``tests/events/real/index.json`` says.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fleetdrain.controller import drain_monitor, lifecycle_hook, runtime, spot_interruption
from fleetdrain.controller.drain.events import parse_event, parse_message
from fleetdrain.controller.drain.signals import LifecycleSignal
from fleetdrain.drill.aws.rules import EventRule, event_rules
from fleetdrain.drill.aws.template import load_template
from tests.controller.memory import Action, World, at

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
REAL = ROOT / "tests" / "events" / "real"
INDEX = json.loads((REAL / "index.json").read_text())
WORLD = INDEX["world"]
PARAMS = {
    "ClusterName": WORLD["cluster"],
    "AutoScalingGroupName": WORLD["asg"],
    "LifecycleHookName": WORLD["hook"],
    "CoordinatorOrg": "acme",
    "CoordinatorTokenSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:tok",
}
HANDLERS = {
    "LifecycleHookFunction": lifecycle_hook.handler,
    "SpotInterruptionFunction": spot_interruption.handler,
    "DrainMonitorFunction": drain_monitor.handler,
}


class Ctx:
    function_name = "fn"
    memory_limit_in_mb = 256
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:fn"
    aws_request_id = "req-1"


@pytest.fixture(scope="module")
def rules() -> list[EventRule]:
    return event_rules(load_template(ROOT / "template.yaml"), PARAMS)


def fit(entry: dict[str, Any], world: World) -> str:
    text = (REAL / "samples" / entry["file"]).read_text()
    values = {
        "${INSTANCE}": next(iter(world.instances)),
        "${ASG}": WORLD["asg"],
        "${HOOK}": WORLD["hook"],
        "${CLUSTER}": WORLD["cluster"],
        "${ACCOUNT}": WORLD["account"],
        "${TIME}": at(world.now).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    for old, new in [*entry.get("text_fit", []), *(entry.get("fit") or [])]:
        for name, value in values.items():
            new = new.replace(name, value)
        text = text.replace(old, new)
    return text


def vary(entry: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    variant = entry.get("variant", {})
    data.update(variant.get("set", {}))
    for key in variant.get("drop", []):
        data.pop(key, None)
    return data


def sqs_event(body: str) -> dict[str, Any]:
    return {
        "Records": [
            {
                "messageId": "m-1",
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
                "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:lifecycle",
                "awsRegion": "us-east-1",
            }
        ]
    }


def sns_notification(message: str) -> dict[str, Any]:
    return {
        "Type": "Notification",
        "MessageId": "d88d4479-6ec0-54fe-b63f-1cf9df4bb16e",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:ci-agents-lifecycle",
        "Subject": "Auto Scaling: Lifecycle action",
        "Message": message,
        "Timestamp": "2026-02-02T02:40:00.000Z",
        "SignatureVersion": "1",
        "Signature": "x",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/cert.pem",
        "UnsubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe",
    }


class Outcomes:
    """What the handlers answered for each event (a batch's records included)."""

    def __init__(self) -> None:
        self.statuses: list[str] = []
        self.reasons: list[str] = []


@pytest.fixture
def outcomes(monkeypatch: pytest.MonkeyPatch) -> Iterator[Outcomes]:
    seen = Outcomes()
    run_all, reject = runtime._run_all, runtime._reject

    def _run_all(units: Any, accept: Any, where: str) -> list[Any]:
        answers = run_all(units, accept, where)
        for answer in answers:
            if isinstance(answer, dict):  # an event about several instances: each of them
                for one in answer.get("results", [answer]):
                    seen.statuses.append(str(one["status"]))
                    seen.reasons.append(str(one.get("detail") or ""))
        return answers

    def _reject(reason: str, where: str) -> dict[str, Any]:
        seen.statuses.append("rejected")
        seen.reasons.append(reason)
        return reject(reason, where)

    monkeypatch.setattr(runtime, "_run_all", _run_all)
    monkeypatch.setattr(runtime, "_reject", _reject)
    yield seen
    runtime.set_controller(None)


def prepare(entry: dict[str, Any], world: World, text: str) -> None:
    """The world the entry asks for: its instance's agents, and its lifecycle action."""
    iid = next(iter(world.instances))
    want = entry.get("world") or {}
    if want.get("agent") == "busy":
        world.busy_agent(iid, 3600)
    elif want.get("agent") == "idle":
        world.place(iid)
    if want.get("lifecycle_action"):
        data = json.loads(text)
        if entry["shape"] in ("eventbridge",) or "detail-type" in data:
            signal = parse_event(data)
        else:
            signal = parse_message(text)
        assert isinstance(signal, LifecycleSignal), signal
        world.actions[signal.token] = Action(signal.token, iid, world.now, world.now, 300.0)


def deliver(
    entry: dict[str, Any], world: World, text: str, rules: list[EventRule]
) -> tuple[list[str], list[dict[str, Any]]]:
    """Deliver the sample as it would arrive; the routes it took and what was answered."""
    shape = entry["shape"]
    if shape == "eventbridge":
        event = vary(entry, json.loads(text))
        if "account" in event and not entry.get("foreign_account"):
            event["account"] = WORLD["account"]
        routes = sorted(f"{r.function}.{r.name}" for r in rules if r.matches(event))
        answers = [HANDLERS[r.split(".")[0]](event, Ctx()) for r in routes]
        direct = entry["expect"].get("direct")
        if not routes and direct:
            answers = [HANDLERS[direct["function"]](event, Ctx())]
        return routes, answers
    if shape == "lambda-event":
        return [], [HANDLERS[entry["function"]](json.loads(text), Ctx())]
    body = json.dumps(vary(entry, json.loads(text))) if entry.get("variant") else text
    inner = json.loads(body)
    routes = []
    if isinstance(inner, dict) and "detail-type" in inner:  # an EventBridge event in a queue
        inner["account"] = WORLD["account"]
        routes = sorted(f"{r.function}.{r.name}" for r in rules if r.matches(inner))
    if shape == "sns-message":
        body = json.dumps(sns_notification(body))
    if shape == "sns-lambda":
        note = sns_notification(body)
        event = {
            "Records": [
                {
                    "EventSource": "aws:sns",
                    "EventVersion": "1.0",
                    "EventSubscriptionArn": note["TopicArn"] + ":sub",
                    "Sns": {**note, "SigningCertUrl": "x", "UnsubscribeUrl": "x"},
                }
            ]
        }
        return routes, [lifecycle_hook.handler(event, Ctx())]
    return routes, [lifecycle_hook.handler(sqs_event(body), Ctx())]


SAMPLES = INDEX["samples"]


@pytest.mark.parametrize("entry", SAMPLES, ids=[s["id"] for s in SAMPLES])
def test_a_real_event_does_what_it_should(
    entry: dict[str, Any], rules: list[EventRule], outcomes: Outcomes
) -> None:
    world = World(1, drain_budget=3600.0)  # the production default
    runtime.set_controller(world.ctl)
    text = fit(entry, world)
    prepare(entry, world, text)
    routes, answers = deliver(entry, world, text, rules)
    expect = entry["expect"]
    if "routing" in expect:
        assert routes == sorted(expect["routing"]), entry["should"]
    want = expect["handler"]
    if want["outcome"] == ["not-delivered"]:
        assert routes == [], entry["should"]
        want = expect.get("direct")
        if want is None:
            assert answers == [] and outcomes.statuses == [], entry["should"]
            return
    assert outcomes.statuses and all(s in want["outcome"] for s in outcomes.statuses), (
        outcomes.statuses,
        outcomes.reasons,
        entry["should"],
    )
    if "reason_contains" in want:
        assert any(want["reason_contains"] in r for r in outcomes.reasons), outcomes.reasons
    if "batch_failures" in want:
        assert [len(a.get("batchItemFailures", [])) for a in answers] == [want["batch_failures"]]
    iid = next(iter(world.instances))
    if "phase" in want:
        assert world.record(iid).phase == want["phase"]
    if "reasons" in want:
        assert world.record(iid).reasons == want["reasons"]
    if "force_in" in want:
        rec = world.record(iid)
        assert rec.force_at is not None and rec.force_at - world.now == want["force_in"]
    if "hook" in want:
        if want["hook"] == "completed":
            world.advance(5)  # the idle agents' tasks stop on their SIGTERM
        (action,) = world.actions.values()
        assert action.state == want["hook"]
    world.ok()


def test_the_index_covers_every_sample_file() -> None:
    files = {p.name for p in (REAL / "samples").iterdir()}
    assert files == {s["file"] for s in SAMPLES}
    assert len(files) == 33


def test_another_accounts_events_reach_no_function(rules: list[EventRule]) -> None:
    world = World(1)
    for entry in SAMPLES:
        if entry["shape"] != "eventbridge" or not entry["expect"].get("routing"):
            continue
        event = vary(entry, json.loads(fit(entry, world)))
        event["account"] = "210987654321"
        assert not [r for r in rules if r.matches(event)], entry["id"]
