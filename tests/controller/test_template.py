"""template.yaml and infra/: lint-clean, SAM expands them, the EventBridge patterns match the
sample events (and not their near misses), and the IAM stays least-privilege."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fleetdrain.drill.aws.rules import EventRule, event_rules
from fleetdrain.drill.aws.template import load_template

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
EVENTS = ROOT / "tests" / "events"
PARAMS = {
    "ClusterName": "ci",
    "AutoScalingGroupName": "ci-agents",
    "CoordinatorOrg": "acme",
    "CoordinatorTokenSecretArn": "arn:aws:secretsmanager:us-east-1:123456789012:secret:tok",
}


def sample(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / name).read_text()))


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return load_template(ROOT / "template.yaml")


@pytest.fixture(scope="module")
def rules(template: dict[str, Any]) -> list[EventRule]:
    return event_rules(template, PARAMS)


def targets(rules: list[EventRule], event: dict[str, Any]) -> set[str]:
    return {f"{r.function}.{r.name}" for r in rules if r.matches(event)}


def test_cfn_lint_is_clean() -> None:
    files = [
        str(ROOT / "template.yaml"),
        *(str(p) for p in sorted((ROOT / "infra").glob("*.yaml"))),
    ]
    result = subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), *files],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_sam_expands_the_template(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from samtranslator.translator.transform import transform

    class NoManagedPolicies:
        def load(self) -> dict[str, str]:
            return {}

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fragment = copy.deepcopy(template)
    fragment["Globals"]["Function"]["CodeUri"] = "s3://bucket/lambdas.zip"
    out = transform(fragment, {**PARAMS}, NoManagedPolicies())
    resources = out["Resources"]
    functions = {k: v for k, v in resources.items() if v["Type"] == "AWS::Lambda::Function"}
    assert len(functions) == 3
    for fn in functions.values():
        props = fn["Properties"]
        assert props["Runtime"] == "python3.12" and props["Architectures"] == ["arm64"]
        assert props["Handler"].startswith("fleetdrain.controller.")
        assert props["Handler"].endswith(".handler")
        assert "DeadLetterConfig" in props
    rules = [v for v in resources.values() if v["Type"] == "AWS::Events::Rule"]
    assert len(rules) == 5
    mappings = [v for v in resources.values() if v["Type"] == "AWS::Lambda::EventSourceMapping"]
    assert any(
        m["Properties"].get("FunctionResponseTypes") == ["ReportBatchItemFailures"]
        for m in mappings
    )


def test_functions_build_with_the_makefile(template: dict[str, Any]) -> None:
    functions = {
        k: v for k, v in template["Resources"].items() if v["Type"] == "AWS::Serverless::Function"
    }
    assert len(functions) == 3
    makefile = (ROOT / "fleetdrain" / "controller" / "Makefile").read_text()
    for name, fn in functions.items():
        assert fn["Metadata"] == {"BuildMethod": "makefile"}
        assert f"build-{name}" in makefile
    glob = template["Globals"]["Function"]
    assert glob["Runtime"] == "python3.12" and glob["Architectures"] == ["arm64"]
    assert glob["CodeUri"] == "fleetdrain/controller/"
    result = subprocess.run(
        [
            "make",
            "-n",
            "-C",
            str(ROOT / "fleetdrain" / "controller"),
            "build-DrainMonitorFunction",
            "ARTIFACTS_DIR=/x",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "--platform manylinux2014_aarch64" in result.stdout
    assert "--python-version 3.12" in result.stdout


def test_state_queue_and_alarms(template: dict[str, Any]) -> None:
    res = template["Resources"]
    table = res["DrainTable"]["Properties"]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "ttl", "Enabled": True}
    assert table["KeySchema"] == [{"AttributeName": "pk", "KeyType": "HASH"}]
    redrive = res["DrainQueue"]["Properties"]["RedrivePolicy"]
    assert redrive["deadLetterTargetArn"] == {"Fn::GetAtt": ["DrainDeadLetterQueue", "Arn"]}
    alarms = {k: v["Properties"] for k, v in res.items() if v["Type"] == "AWS::CloudWatch::Alarm"}
    metrics = {(a["Namespace"], a["MetricName"]) for a in alarms.values()}
    assert ("AWS/SQS", "ApproximateNumberOfMessagesVisible") in metrics
    assert ("fleetdrain", "AgentsSigkilled") in metrics
    assert sum(1 for ns, m in metrics if (ns, m) == ("AWS/Lambda", "Errors")) >= 1
    assert len([a for a in alarms.values() if a["MetricName"] == "Errors"]) == 3
    # Finding 4: a rejected (dropped) event pages someone, on the metric the handlers emit
    # (Powertools adds the service dimension).
    rejected = alarms["EventsRejectedAlarm"]
    assert (rejected["Namespace"], rejected["MetricName"]) == ("fleetdrain", "EventsRejected")
    assert rejected["Dimensions"] == [{"Name": "service", "Value": "fleetdrain"}]
    assert rejected["Threshold"] == 0 and rejected["ComparisonOperator"] == "GreaterThanThreshold"
    env = template["Globals"]["Function"]["Environment"]["Variables"]
    assert env["POWERTOOLS_SERVICE_NAME"] == "fleetdrain"  # the dimension Powertools adds
    assert env["POWERTOOLS_METRICS_NAMESPACE"] == rejected["Namespace"]
    from fleetdrain.controller.drain.core import EVENTS_REJECTED

    assert EVENTS_REJECTED == "EventsRejected"


def test_functions_have_reserved_concurrency_and_the_queue_is_capped_to_it(
    template: dict[str, Any],
) -> None:
    # Finding 8: spot drains start within seconds even when the account's concurrency is taken.
    param = template["Parameters"]["ReservedConcurrency"]
    assert param["Type"] == "Number" and param["Default"] >= 10 and param["MinValue"] == 0
    glob = template["Globals"]["Function"]
    assert glob["ReservedConcurrentExecutions"] == {
        "Fn::If": [
            "HasReservedConcurrency",
            {"Ref": "ReservedConcurrency"},
            {"Ref": "AWS::NoValue"},
        ]
    }
    capped = {"MaximumConcurrency": {"Ref": "ReservedConcurrency"}}
    ticks = template["Resources"]["DrainMonitorFunction"]["Properties"]["Events"]["Ticks"]
    assert ticks["Properties"]["ScalingConfig"]["Fn::If"][1] == capped
    mapping = template["Resources"]["LifecycleNotificationMapping"]["Properties"]
    assert mapping["ScalingConfig"]["Fn::If"][1] == capped


def test_sam_expands_reserved_concurrency_onto_every_function(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from samtranslator.translator.transform import transform

    class NoManagedPolicies:
        def load(self) -> dict[str, str]:
            return {}

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    fragment = copy.deepcopy(template)
    fragment["Globals"]["Function"]["CodeUri"] = "s3://bucket/lambdas.zip"
    out = transform(fragment, {**PARAMS}, NoManagedPolicies())["Resources"]
    functions = [v for v in out.values() if v["Type"] == "AWS::Lambda::Function"]
    assert all("ReservedConcurrentExecutions" in f["Properties"] for f in functions)
    (ticks,) = [
        v
        for v in out.values()
        if v["Type"] == "AWS::Lambda::EventSourceMapping"
        and "DrainQueue" in json.dumps(v["Properties"]["EventSourceArn"])
    ]
    assert "ScalingConfig" in ticks["Properties"]


def test_functions_know_their_group_and_hook(template: dict[str, Any]) -> None:
    env = template["Globals"]["Function"]["Environment"]["Variables"]
    assert env["FLEETDRAIN_AUTOSCALING_GROUP"] == {"Ref": "AutoScalingGroupName"}
    assert env["FLEETDRAIN_LIFECYCLE_HOOK"] == {"Ref": "LifecycleHookName"}
    assert env["FLEETDRAIN_CLUSTER"] == {"Ref": "ClusterName"}


def test_iam_is_least_privilege(template: dict[str, Any]) -> None:
    statements = template["Resources"]["DrainPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    by_sid = {s["Sid"]: s for s in statements}
    for s in statements:
        actions = s["Action"] if isinstance(s["Action"], list) else [s["Action"]]
        assert all("*" not in a for a in actions), s
        if s["Resource"] == "*":
            assert "ecs:cluster" in json.dumps(s.get("Condition", {})), s
    lifecycle = by_sid["LifecycleActionsOfTheGroup"]
    assert "autoScalingGroupName/${AutoScalingGroupName}" in lifecycle["Resource"]["Fn::Sub"]
    assert by_sid["CoordinatorToken"]["Resource"] == {"Ref": "CoordinatorTokenSecretArn"}


# ---------------------------------------------------------------------------- patterns


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "asg-terminate-lifecycle-action.eventbridge.json",
            {"LifecycleHookFunction.TerminateLifecycleAction"},
        ),
        (
            "ec2-spot-interruption-warning.json",
            {"SpotInterruptionFunction.SpotInterruptionWarning"},
        ),
        (
            "ec2-rebalance-recommendation.json",
            {"SpotInterruptionFunction.RebalanceRecommendation"},
        ),
        (
            "ec2-instance-state-change.stopping.json",
            {"SpotInterruptionFunction.SpotInterruptionWarning"},
        ),
        (
            "ec2-instance-state-change.shutting-down.json",
            {"SpotInterruptionFunction.SpotInterruptionWarning"},
        ),
        (
            "aws-health-scheduled-change.instance-retirement.json",
            {"SpotInterruptionFunction.RebalanceRecommendation"},
        ),
        ("ecs-task-state-change.stopped.json", {"DrainMonitorFunction.TaskStopped"}),
        (
            "ecs-container-instance-state-change.draining.json",
            {"DrainMonitorFunction.InstanceDraining"},
        ),
    ],
)
def test_patterns_match_the_sample_events(
    rules: list[EventRule], name: str, expected: set[str]
) -> None:
    assert targets(rules, sample(name)) == expected


def _near_misses() -> list[tuple[str, dict[str, Any]]]:
    out = []

    def edit(name: str, what: str, change: Any) -> None:
        event = sample(name)
        change(event)
        out.append((what, event))

    lifecycle = "asg-terminate-lifecycle-action.eventbridge.json"
    edit(lifecycle, "another group", lambda e: e["detail"].update(AutoScalingGroupName="web"))
    edit(lifecycle, "another hook", lambda e: e["detail"].update(LifecycleHookName="other-hook"))
    edit(
        lifecycle,
        "launching",
        lambda e: e["detail"].update(LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING"),
    )
    edit(
        lifecycle,
        "launch event",
        lambda e: e.update({"detail-type": "EC2 Instance-launch Lifecycle Action"}),
    )
    edit(lifecycle, "from ec2", lambda e: e.update(source="aws.ec2"))
    edit(
        lifecycle, "group name case", lambda e: e["detail"].update(AutoScalingGroupName="CI-agents")
    )
    task = "ecs-task-state-change.stopped.json"
    edit(task, "running task", lambda e: e["detail"].update(lastStatus="RUNNING"))
    edit(
        task,
        "another cluster",
        lambda e: e["detail"].update(clusterArn="arn:aws:ecs:us-east-1:123456789012:cluster/web"),
    )
    edit(
        task,
        "another region",
        lambda e: e["detail"].update(clusterArn="arn:aws:ecs:eu-west-1:123456789012:cluster/ci"),
    )
    edit(task, "no cluster", lambda e: e["detail"].pop("clusterArn"))
    draining = "ecs-container-instance-state-change.draining.json"
    edit(draining, "instance active", lambda e: e["detail"].update(status="ACTIVE"))
    edit(draining, "instance deregistering", lambda e: e["detail"].update(status="DEREGISTERING"))
    edit(
        draining,
        "draining in another cluster",
        lambda e: e["detail"].update(clusterArn="arn:aws:ecs:us-east-1:123456789012:cluster/web"),
    )
    edit(
        draining,
        "status on a task event",
        lambda e: e.update({"detail-type": "ECS Task State Change"}),
    )
    edit(draining, "draining from ec2", lambda e: e.update(source="aws.ec2"))
    spot = "ec2-spot-interruption-warning.json"
    edit(spot, "spot from autoscaling", lambda e: e.update(source="aws.autoscaling"))
    edit(
        spot,
        "state change",
        lambda e: e.update({"detail-type": "EC2 Instance State-change Notification"}),
    )
    edit(
        "ec2-rebalance-recommendation.json",
        "rebalance lowercase",
        lambda e: e.update({"detail-type": "EC2 instance rebalance recommendation"}),
    )
    # Rules scoped to the stack's account: another account's events (an organization or a
    # shared bus) cost nothing.
    for name in (lifecycle, spot, "ec2-rebalance-recommendation.json", task, draining):
        edit(name, f"{name} of another account", lambda e: e.update(account="210987654321"))
    stopping = "ec2-instance-state-change.stopping.json"
    for state in ("pending", "running", "stopped", "terminated"):
        edit(stopping, f"instance {state}", lambda e, s=state: e["detail"].update(state=s))
    edit(stopping, "stopping of another account", lambda e: e.update(account="210987654321"))
    edit(stopping, "stopping from health", lambda e: e.update(source="aws.health"))
    health = "aws-health-scheduled-change.instance-retirement.json"
    edit(health, "health issue", lambda e: e["detail"].update(eventTypeCategory="issue"))
    edit(
        health,
        "health account notification",
        lambda e: e["detail"].update(eventTypeCategory="accountNotification"),
    )
    edit(health, "health of RDS", lambda e: e["detail"].update(service="RDS"))
    edit(health, "health of another account", lambda e: e.update(account="210987654321"))
    edit(health, "health from ec2", lambda e: e.update(source="aws.ec2"))
    return out


@pytest.mark.parametrize(("what", "event"), _near_misses())
def test_patterns_do_not_match_near_misses(
    rules: list[EventRule], what: str, event: dict[str, Any]
) -> None:
    assert targets(rules, event) == set(), what
