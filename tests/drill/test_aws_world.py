"""The drill's AWS world: template.yaml deployed into moto (samtranslator + create_stack), and
the router that delivers events to the handlers the way EventBridge and Lambda would: the
monitor's events straight to it, the lifecycle and spot notices through their queues, in SQS
batches."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws

from fleetdrain.controller import runtime
from fleetdrain.controller.drain.config import Settings
from fleetdrain.drill.aws.gaps import AwsGaps
from fleetdrain.drill.aws.rules import event_rules
from fleetdrain.drill.aws.template import load_template
from fleetdrain.drill.aws.world import (
    Deployment,
    EventRouter,
    QueueMapping,
    deploy_stack,
    stack_params,
)
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


def mapping_of(deployed: Deployment, function: str) -> QueueMapping:
    """The event source mapping that feeds ``function`` (each has one in this stack)."""
    arn = deployed.function(function).arn
    (mapping,) = [m for m in deployed.mappings if m.function_arn == arn]
    return mapping


def routed_to(deployed: Deployment, event: dict[str, Any]) -> list[tuple[str, str]]:
    """Where the deployed rules send ``event``: (function, "direct" or the logical id of the
    queue it goes through)."""
    by_url = {m.queue_url: m for m in deployed.mappings}
    queues = {url: k for k, (kind, url) in deployed.resources.items() if kind == "AWS::SQS::Queue"}
    out = []
    for rule in EventRouter(deployed).matching(event):
        out += [(deployed.functions[a].logical_id, "direct") for a in rule.target_arns]
        for url in rule.queue_urls:
            out.append((deployed.functions[by_url[url].function_arn].logical_id, queues[url]))
    return sorted(out)


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
        (deployed_rule,) = [r for r in deployed.rules if r.pattern == rule.pattern]
        if rule.queue is None:  # the monitor's: the function itself
            assert deployed_rule.target_arns == (fns[rule.function].arn,)
            assert deployed_rule.queue_urls == ()
        else:  # a notice: the queue its function consumes
            assert deployed_rule.target_arns == ()
            mapping = mapping_of(deployed, rule.function)
            assert deployed_rule.queue_urls == (mapping.queue_url,)
            assert deployed.resources[rule.queue] == ("AWS::SQS::Queue", mapping.queue_url)
    # The queues feed their functions in batches, partial failures reported.
    assert len(deployed.mappings) == 3
    for mapping in deployed.mappings:
        assert mapping.report_batch_item_failures and mapping.batch_size == 10
    ticks = mapping_of(deployed, "DrainMonitorFunction")
    # A failed batch of notices comes back after the functions' timeout; the ticks' after six.
    assert ticks.visibility_timeout == 360
    assert mapping_of(deployed, "LifecycleHookFunction").visibility_timeout == 60
    assert mapping_of(deployed, "SpotInterruptionFunction").visibility_timeout == 60
    assert ticks.queue_url == deployed.outputs["DrainQueueUrl"]
    # The notices wait for a batch (LifecycleBatchingSeconds, default 5; NoticeBatchingSeconds,
    # default 1); the ticks do not.
    assert ticks.batching_window == 0
    assert mapping_of(deployed, "LifecycleHookFunction").batching_window == 5
    assert mapping_of(deployed, "SpotInterruptionFunction").batching_window == 1
    ddb = boto3.client("dynamodb", region_name="us-east-1")
    ttl = ddb.describe_time_to_live(TableName=deployed.outputs["DrainTableName"])
    assert ttl["TimeToLiveDescription"]["AttributeName"] == "ttl"


def test_events_match_the_deployed_patterns(deployed: Deployment) -> None:
    lifecycle = sample("asg-terminate-lifecycle-action.eventbridge.json")
    assert routed_to(deployed, lifecycle) == [("LifecycleHookFunction", "LifecycleNoticeQueue")]
    spot = routed_to(deployed, sample("ec2-spot-interruption-warning.json"))
    rebalance = routed_to(deployed, sample("ec2-rebalance-recommendation.json"))
    assert spot == rebalance == [("SpotInterruptionFunction", "InstanceNoticeQueue")]
    stopped = sample("ecs-task-state-change.stopped.json")
    assert routed_to(deployed, stopped) == [("DrainMonitorFunction", "direct")]
    # What the patterns keep out: another group, another cluster, a task that is not STOPPED.
    other_group = sample("asg-terminate-lifecycle-action.eventbridge.json")
    other_group["detail"]["AutoScalingGroupName"] = "web"
    other_cluster = sample("ecs-task-state-change.stopped.json")
    other_cluster["detail"]["clusterArn"] = "arn:aws:ecs:us-east-1:123456789012:cluster/web"
    running = sample("ecs-task-state-change.stopped.json")
    running["detail"]["lastStatus"] = "RUNNING"
    for event in (other_group, other_cluster, running):
        assert routed_to(deployed, event) == []


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
    url = mapping_of(deployed, "DrainMonitorFunction").queue_url
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

    def monitor(event: dict[str, Any], context: Any) -> None:
        calls.append(1)
        raise RuntimeError("boom")

    router = EventRouter(deployed, handlers={"DrainMonitorFunction": monitor})
    event = sample("ecs-task-state-change.stopped.json")
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


# ------------------------------------------------------------------ the notices, through a queue


@pytest.fixture
def controller(deployed: Deployment) -> Iterator[Settings]:
    """The handlers' controller, built from the deployed functions' environment (as Lambda's
    would be), with moto's gaps filled (the ``ec2InstanceId ==`` filter, DRAINING's effects)."""
    settings = Settings.from_env(deployed.function("SpotInterruptionFunction").environment)
    with AwsGaps(clock=time.time):
        runtime.set_controller(runtime.build_controller(settings))
        try:
            yield settings
        finally:
            runtime.set_controller(None)


def container_instances(count: int) -> dict[str, str]:
    """``count`` EC2 instances registered in the stack's cluster: instance id -> container
    instance ARN."""
    ec2 = boto3.client("ec2", region_name="us-east-1")
    ecs = boto3.client("ecs", region_name="us-east-1")
    ecs.create_cluster(clusterName=PARAMS["ClusterName"])
    out = {}
    for instance in ec2.run_instances(ImageId="ami-12c6146b", MinCount=count, MaxCount=count)[
        "Instances"
    ]:
        iid = instance["InstanceId"]
        ci = ecs.register_container_instance(
            cluster=PARAMS["ClusterName"], instanceIdentityDocument=json.dumps({"instanceId": iid})
        )
        out[iid] = ci["containerInstance"]["containerInstanceArn"]
    return out


def spot_warning(instance_id: str) -> dict[str, Any]:
    event = sample("ec2-spot-interruption-warning.json")
    event["id"] = f"spot-{instance_id}"
    event["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    event["resources"] = [f"arn:aws:ec2:us-east-1:123456789012:instance/{instance_id}"]
    event["detail"]["instance-id"] = instance_id
    return event


def test_spot_warnings_reach_the_spot_function_as_one_sqs_batch_and_drain(
    deployed: Deployment, controller: Settings
) -> None:
    instances = container_instances(2)
    router = EventRouter(deployed)
    notices = [spot_warning(iid) for iid in instances]
    for event in notices:
        # EventBridge's SQS target: nothing is invoked by the rule itself...
        assert router.deliver(event) == []
    # ...the function gets both notices in one batch from its queue, as Lambda polls it.
    assert router.poll_queues() == 1
    (inv,) = router.invocations
    mapping = mapping_of(deployed, "SpotInterruptionFunction")
    assert inv.function == "SpotInterruptionFunction"
    assert inv.source == f"sqs:{mapping.queue_arn}"
    assert [json.loads(r["body"]) for r in inv.event["Records"]] == notices
    assert inv.error is None and inv.response == {"batchItemFailures": []}
    # Each instance's drain started (spot: hard at once, DRAINING), and the queue is empty.
    store = runtime.controller().store
    for iid in instances:
        record = store.get(iid)
        assert record is not None and "spot" in " ".join(record.reasons), iid
    ecs = boto3.client("ecs", region_name="us-east-1")
    described = ecs.describe_container_instances(
        cluster=PARAMS["ClusterName"], containerInstances=list(instances.values())
    )["containerInstances"]
    assert [c["status"] for c in described] == ["DRAINING", "DRAINING"]
    sqs = boto3.client("sqs", region_name="us-east-1")
    assert "Messages" not in sqs.receive_message(QueueUrl=mapping.queue_url)


def test_the_service_thread_batches_the_notices_that_came_together(
    deployed: Deployment,
) -> None:
    batches: list[list[str]] = []

    def spot(event: dict[str, Any], context: Any) -> dict[str, Any]:
        batches.append([json.loads(r["body"])["id"] for r in event["Records"]])
        return {"batchItemFailures": []}

    router = EventRouter(deployed, handlers={"SpotInterruptionFunction": spot})
    notices = [spot_warning(f"i-0000000000000000{n}") for n in range(3)]
    for event in notices:
        router.put_event(event)
    with router.running():
        deadline = time.monotonic() + 10
        while sum(map(len, batches)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert batches == [[e["id"] for e in notices]]
    assert router.errors == []


def test_a_notice_that_keeps_failing_goes_to_the_dead_letter_queue(deployed: Deployment) -> None:
    def lifecycle(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return {"batchItemFailures": [{"itemIdentifier": r["messageId"]} for r in event["Records"]]}

    router = EventRouter(
        deployed, handlers={"LifecycleHookFunction": lifecycle}, visibility_seconds=lambda s: 0
    )
    event = sample("asg-terminate-lifecycle-action.eventbridge.json")
    event["id"] = "lifecycle-that-fails"
    router.deliver(event)
    # Five receives (the queue's maxReceiveCount), each a failed record; then SQS moves it.
    assert [router.poll_queues() for _ in range(6)] == [1, 1, 1, 1, 1, 0]
    assert [i.function for i in router.invocations] == ["LifecycleHookFunction"] * 5
    sqs = boto3.client("sqs", region_name="us-east-1")
    dlq = sqs.receive_message(
        QueueUrl=deployed.outputs["DrainDeadLetterQueueUrl"], MaxNumberOfMessages=10
    )
    assert event["id"] in [json.loads(m["Body"]).get("id") for m in dlq.get("Messages", [])]


def test_a_rule_moto_left_out_is_made_again_with_its_queue_target(deployed: Deployment) -> None:
    # moto's create_stack now and then leaves out a rule: the deploy makes it again, aimed at
    # the queue the template aims it at. (Last in this module: it replaces a rule of the stack.)
    from fleetdrain.drill.aws.world import (
        _ensure_rules,
        drop_no_values,
        expand_template,
        read_deployment,
    )

    events = boto3.client("events", region_name="us-east-1")
    spot = sample("ec2-spot-interruption-warning.json")
    (left_out,) = [r for r in deployed.rules if r.matches(spot)]
    targets = events.list_targets_by_rule(Rule=left_out.name)["Targets"]
    events.remove_targets(Rule=left_out.name, Ids=[t["Id"] for t in targets])
    events.delete_rule(Name=left_out.name)
    session = boto3.session.Session(region_name="us-east-1")
    body = drop_no_values(
        expand_template(load_template(ROOT / "template.yaml"), PARAMS, "s3://bucket/code.zip"),
        PARAMS,
    )
    _ensure_rules(session, deployed.stack_name, body, PARAMS, "us-east-1")
    (made,) = [
        r for r in read_deployment(session, deployed.stack_name, body).rules if r.matches(spot)
    ]
    assert made.name == f"{deployed.stack_name}-SpotInterruptionWarning"
    assert made.pattern == left_out.pattern
    assert (made.target_arns, made.queue_urls) == ((), left_out.queue_urls)
    (target,) = events.list_targets_by_rule(Rule=made.name)["Targets"]
    assert target["Id"] == "InstanceNoticeQueue"
