"""The drill's AWS world: template.yaml deployed into moto (samtranslator + create_stack), and
the router that delivers events to the handlers the way EventBridge and Lambda would."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fleetdrain.drill.aws.rules import event_rules
from fleetdrain.drill.aws.template import load_template
from fleetdrain.drill.aws.world import Deployment, EventRouter, deploy_stack, stack_params
from tests.conftest import FAKE_AWS_ENV

# Slow: the stack of template.yaml deployed in moto for each test.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(60)]

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "tests" / "events"
PARAMS = stack_params(
    cluster="ci",
    asg_name="ci-agents",
    coordinator_url="http://127.0.0.1:9",
    coordinator_org="acme",
    token_secret_arn="arn:aws:secretsmanager:us-east-1:123456789012:secret:coordinator",
)


def sample(name: str) -> dict[str, Any]:
    return json.loads((EVENTS / name).read_text())


@pytest.fixture(scope="module")
def deployed() -> Iterator[Deployment]:
    with pytest.MonkeyPatch.context() as mp:
        for key, value in FAKE_AWS_ENV.items():
            mp.setenv(key, value)
        with mock_aws():
            yield deploy_stack(PARAMS)


def test_the_stack_creates_what_sam_deploy_would(deployed: Deployment) -> None:
    fns = {f.logical_id: f for f in deployed.functions.values()}
    assert {k: f.handler for k, f in fns.items()} == {
        "LifecycleHookFunction": "fleetdrain.controller.lifecycle_hook.handler",
        "SpotInterruptionFunction": "fleetdrain.controller.spot_interruption.handler",
        "DrainMonitorFunction": "fleetdrain.controller.drain_monitor.handler",
    }
    # The functions' environment is the template's Globals, resolved against the stack.
    env = fns["DrainMonitorFunction"].environment
    assert env["FLEETDRAIN_CLUSTER"] == "ci"
    assert env["FLEETDRAIN_TABLE"] == deployed.outputs["DrainTableName"]
    assert env["FLEETDRAIN_QUEUE_URL"] == deployed.outputs["DrainQueueUrl"]
    assert env["FLEETDRAIN_COORDINATOR_TOKEN_SECRET_ARN"] == PARAMS["CoordinatorTokenSecretArn"]
    assert all(
        f.dead_letter_arn and "DrainDeadLetterQueue" in f.dead_letter_arn for f in fns.values()
    )
    # Every EventBridge rule of the template exists with the template's own pattern.
    template = event_rules(load_template(ROOT / "template.yaml"), PARAMS)
    assert len(template) == 5
    assert sorted(json.dumps(r.pattern, sort_keys=True) for r in deployed.rules) == sorted(
        json.dumps(r.pattern, sort_keys=True) for r in template
    )
    for rule in template:
        targets = [r.target_arns for r in deployed.rules if r.pattern == rule.pattern]
        assert targets == [(fns[rule.function].arn,)]
    # The queue feeds the monitor in batches, partial failures reported.
    (mapping,) = deployed.mappings
    assert mapping.function_arn == fns["DrainMonitorFunction"].arn
    assert mapping.report_batch_item_failures and mapping.batch_size == 10
    assert mapping.visibility_timeout == 360
    ddb = boto3.client("dynamodb", region_name="us-east-1")
    ttl = ddb.describe_time_to_live(TableName=deployed.outputs["DrainTableName"])
    assert ttl["TimeToLiveDescription"]["AttributeName"] == "ttl"


def test_events_match_the_deployed_patterns(deployed: Deployment) -> None:
    router = EventRouter(deployed)

    def fn_of(event: dict[str, Any]) -> list[str]:
        return sorted(
            deployed.functions[a].logical_id for r in router.matching(event) for a in r.target_arns
        )

    assert fn_of(sample("asg-terminate-lifecycle-action.eventbridge.json")) == [
        "LifecycleHookFunction"
    ]
    assert fn_of(sample("ec2-spot-interruption-warning.json")) == ["SpotInterruptionFunction"]
    assert fn_of(sample("ec2-rebalance-recommendation.json")) == ["SpotInterruptionFunction"]
    assert fn_of(sample("ecs-task-state-change.stopped.json")) == ["DrainMonitorFunction"]
    # What the patterns keep out: another group, another cluster, a task that is not STOPPED.
    other_group = sample("asg-terminate-lifecycle-action.eventbridge.json")
    other_group["detail"]["AutoScalingGroupName"] = "web"
    other_cluster = sample("ecs-task-state-change.stopped.json")
    other_cluster["detail"]["clusterArn"] = "arn:aws:ecs:us-east-1:123456789012:cluster/web"
    running = sample("ecs-task-state-change.stopped.json")
    running["detail"]["lastStatus"] = "RUNNING"
    assert fn_of(other_group) == fn_of(other_cluster) == fn_of(running) == []


def test_sqs_batches_keep_only_the_failed_records(deployed: Deployment) -> None:
    seen: list[list[str]] = []

    def monitor(event: dict[str, Any], context: Any) -> dict[str, Any]:
        assert context.function_name == deployed.function("DrainMonitorFunction").name
        bodies = [r["body"] for r in event["Records"]]
        seen.append(bodies)
        failed = [r["messageId"] for r in event["Records"] if r["body"] == "fail-once"]
        if len(seen) > 1:
            failed = []
        return {"batchItemFailures": [{"itemIdentifier": m} for m in failed]}

    router = EventRouter(
        deployed, handlers={"DrainMonitorFunction": monitor}, visibility_seconds=lambda s: 0
    )
    sqs = boto3.client("sqs", region_name="us-east-1")
    url = deployed.mappings[0].queue_url
    for body in ("ok-1", "fail-once", "ok-2"):
        sqs.send_message(QueueUrl=url, MessageBody=body)
    assert router.poll_queues() == 1
    assert sorted(seen[0]) == ["fail-once", "ok-1", "ok-2"]
    # Only the failed record comes back (visibility timeout scaled to 0 here).
    assert router.poll_queues() == 1
    assert seen[1] == ["fail-once"]
    assert router.poll_queues() == 0


def test_a_failing_eventbridge_target_is_retried_then_dead_lettered(deployed: Deployment) -> None:
    calls: list[int] = []

    def spot(event: dict[str, Any], context: Any) -> None:
        calls.append(1)
        raise RuntimeError("boom")

    router = EventRouter(deployed, handlers={"SpotInterruptionFunction": spot})
    event = sample("ec2-spot-interruption-warning.json")
    invocations = router.deliver(event)
    assert len(calls) == 3, "one call and MaximumRetryAttempts (2) retries"
    assert [i.attempt for i in invocations] == [1, 2, 3]
    assert all(i.error == "RuntimeError: boom" for i in invocations)
    sqs = boto3.client("sqs", region_name="us-east-1")
    dlq = sqs.receive_message(QueueUrl=deployed.outputs["DrainDeadLetterQueueUrl"])
    assert [json.loads(m["Body"])["id"] for m in dlq["Messages"]] == [event["id"]]


def test_a_notification_queue_feeds_the_lifecycle_function(deployed: Deployment) -> None:
    # A second stack in the same (moto) account, with the group's SQS notification target.
    sqs = boto3.client("sqs", region_name="us-east-1")
    url = sqs.create_queue(QueueName="lifecycle-notifications")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    second = deploy_stack(
        {**PARAMS, "LifecycleNotificationQueueArn": arn}, stack_name="with-notifications"
    )
    fns = {f.logical_id: f for f in second.functions.values()}
    (mapping,) = [m for m in second.mappings if m.queue_arn == arn]
    assert mapping.function_arn == fns["LifecycleHookFunction"].arn
    assert mapping.report_batch_item_failures
    # The real handler, as an SQS batch: the test notification is ignored and consumed.
    router = EventRouter(second)
    sqs.send_message(
        QueueUrl=url, MessageBody=(EVENTS / "asg-test-notification.sqs-body.json").read_text()
    )
    assert router.poll_queues() >= 1
    (inv,) = [i for i in router.invocations if i.function == "LifecycleHookFunction"]
    assert inv.response == {"batchItemFailures": []} and inv.error is None
    assert "Messages" not in sqs.receive_message(QueueUrl=url)
