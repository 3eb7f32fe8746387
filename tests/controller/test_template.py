"""template.yaml and infra/: lint-clean, SAM expands them, the EventBridge patterns match the
sample events (and not their near misses), the lifecycle and spot notices reach their
functions batched through a queue each, and the IAM stays least-privilege."""

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


class NoManagedPolicies:
    def load(self) -> dict[str, str]:
        return {}


def expand(template: dict[str, Any], params: dict[str, str] | None = None) -> dict[str, Any]:
    """The template as the SAM transform expands it (AWS_DEFAULT_REGION set by the caller)."""
    from samtranslator.translator.transform import transform

    fragment = copy.deepcopy(template)
    fragment["Globals"]["Function"]["CodeUri"] = "s3://bucket/lambdas.zip"
    return dict(transform(fragment, {**PARAMS, **(params or {})}, NoManagedPolicies()))


#: The notice rules: rule -> (its queue, the function that consumes the queue).
NOTICE_RULES = {
    "TerminateLifecycleAction": ("LifecycleNoticeQueue", "LifecycleHookFunction"),
    "SpotInterruptionWarning": ("InstanceNoticeQueue", "SpotInterruptionFunction"),
    "RebalanceRecommendation": ("InstanceNoticeQueue", "SpotInterruptionFunction"),
}


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
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    resources = expand(template)["Resources"]
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
    # The drain queue's ticks and the two notice queues, and the notification queue's (only
    # with LifecycleNotificationQueueArn).
    assert len(mappings) == 4
    assert [m["Condition"] for m in mappings if "Condition" in m] == ["HasNotificationQueue"]
    assert all(
        m["Properties"].get("FunctionResponseTypes") == ["ReportBatchItemFailures"]
        for m in mappings
    )
    # The expanded template routes as the template as written does.
    assert sorted(
        (r.function, r.name, r.queue) for r in event_rules(expand(template), PARAMS)
    ) == sorted(
        (r.function, r.name if r.queue else f"{r.function}{r.name}", r.queue)
        for r in event_rules(template, PARAMS)
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
    for name in MAPPINGS:
        mapping = template["Resources"][name]["Properties"]
        assert mapping["ScalingConfig"]["Fn::If"][1] == capped, name


def test_sam_expands_reserved_concurrency_onto_every_function(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    out = expand(template)["Resources"]
    functions = [v for v in out.values() if v["Type"] == "AWS::Lambda::Function"]
    assert all("ReservedConcurrentExecutions" in f["Properties"] for f in functions)
    mappings = [v for v in out.values() if v["Type"] == "AWS::Lambda::EventSourceMapping"]
    queues = {json.dumps(m["Properties"]["EventSourceArn"]) for m in mappings}
    assert queues == {
        json.dumps({"Ref": "LifecycleNotificationQueueArn"}),
        *(
            json.dumps({"Fn::GetAtt": [q, "Arn"]})
            for q in ("DrainQueue", "LifecycleNoticeQueue", "InstanceNoticeQueue")
        ),
    }
    assert all("ScalingConfig" in m["Properties"] for m in mappings)


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
    # The functions may send to the drain queue only (their ticks), not to the notice queues.
    sends = [s for s in statements if "sqs:SendMessage" in json.dumps(s["Action"])]
    assert [s["Resource"] for s in sends] == [{"Fn::GetAtt": ["DrainQueue", "Arn"]}]


#: The queues' event source mappings: queue, function, batching window parameter (None: none).
MAPPINGS = {
    "LifecycleNoticeMapping": (
        "LifecycleNoticeQueue",
        "LifecycleHookFunction",
        "LifecycleBatchingSeconds",
    ),
    "InstanceNoticeMapping": (
        "InstanceNoticeQueue",
        "SpotInterruptionFunction",
        "NoticeBatchingSeconds",
    ),
    "DrainTickMapping": ("DrainQueue", "DrainMonitorFunction", None),
}

#: Everything a function's role may have, as SAM expands it: AWS managed policies by name, and
#: the inline policies' statements. The queues' mappings are resources, not SAM SQS events, so
#: SAM attaches no AWSLambdaSQSQueueExecutionRole (the poller's actions on every queue, "*"):
#: each role may poll its own queue and nothing else.
AWS_MANAGED = "arn:aws:iam::aws:policy/service-role/"
ALLOWED_MANAGED = {
    "LifecycleHookFunction": {"AWSLambdaBasicExecutionRole"},
    "SpotInterruptionFunction": {"AWSLambdaBasicExecutionRole"},
    "DrainMonitorFunction": {"AWSLambdaBasicExecutionRole"},
}
POLL = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes"]
DLQ_SEND = {
    "Action": "sqs:SendMessage",
    "Resource": {"Fn::GetAtt": ["DrainDeadLetterQueue", "Arn"]},
    "Effect": "Allow",
}
NOTIFICATION_QUEUE_POLL = {
    "Effect": "Allow",
    "Action": POLL,
    "Resource": {"Ref": "LifecycleNotificationQueueArn"},
}


def own_queue_poll(function: str) -> dict[str, Any]:
    """The statement that lets ``function`` poll the queue its mapping reads."""
    (queue,) = [q for q, fn, _ in MAPPINGS.values() if fn == function]
    return {"Effect": "Allow", "Action": POLL, "Resource": {"Fn::GetAtt": [queue, "Arn"]}}


def assert_least_privilege(resources: dict[str, Any], function: str) -> None:
    """``function``'s role, as SAM expanded it, has DrainPolicy (checked above), the AWS managed
    policies of :data:`ALLOWED_MANAGED` and the inline statements it needs, and nothing more."""
    role = resources[f"{function}Role"]["Properties"]
    managed = set()
    for arn in role.get("ManagedPolicyArns", []):
        if arn == {"Ref": "DrainPolicy"}:
            continue
        assert isinstance(arn, str) and arn.startswith(AWS_MANAGED), arn
        managed.add(arn.removeprefix(AWS_MANAGED))
    assert managed == ALLOWED_MANAGED[function]
    assert {"Ref": "DrainPolicy"} in role["ManagedPolicyArns"]
    inline: list[Any] = []
    for policy in role.get("Policies", []):
        if "Fn::If" in policy:  # the notification queue's, when there is one
            _, policy, no = policy["Fn::If"]
            assert no == {"Ref": "AWS::NoValue"}
        inline.extend(policy["PolicyDocument"]["Statement"])
    allowed = [own_queue_poll(function), DLQ_SEND]
    if function == "LifecycleHookFunction":
        allowed.insert(1, NOTIFICATION_QUEUE_POLL)
    assert sorted(map(json.dumps, inline)) == sorted(map(json.dumps, allowed))


@pytest.mark.parametrize("function", sorted(ALLOWED_MANAGED))
def test_the_roles_have_nothing_but_the_drain_policy_logs_and_their_pollers(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch, function: str
) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    assert_least_privilege(expand(template)["Resources"], function)


@pytest.mark.parametrize(
    "grant",
    [
        "AWSLambdaSQSQueueExecutionRole",
        "AmazonSQSFullAccess",
        {"Statement": [{"Effect": "Allow", "Action": "sqs:*", "Resource": "*"}]},
        {"Statement": [{"Effect": "Allow", "Action": "ecs:StopTask", "Resource": "*"}]},
    ],
    ids=["managed-sqs-poller", "managed-sqs-full", "inline-sqs-star", "inline-ecs"],
)
def test_the_role_check_catches_a_broader_grant(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch, grant: Any
) -> None:
    # What the check above is for: a function given more than it needs is caught (AWS's
    # poller policy too: it would let the function read every queue).
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    broader = copy.deepcopy(template)
    props = broader["Resources"]["SpotInterruptionFunction"]["Properties"]
    props["Policies"].append(grant)

    class KnownPolicies(NoManagedPolicies):
        def load(self) -> dict[str, str]:
            return {
                "AmazonSQSFullAccess": "arn:aws:iam::aws:policy/AmazonSQSFullAccess",
                "AWSLambdaSQSQueueExecutionRole": AWS_MANAGED + "AWSLambdaSQSQueueExecutionRole",
            }

    from samtranslator.translator.transform import transform

    broader["Globals"]["Function"]["CodeUri"] = "s3://bucket/lambdas.zip"
    resources = transform(broader, {**PARAMS}, KnownPolicies())["Resources"]
    with pytest.raises(AssertionError):
        assert_least_privilege(resources, "SpotInterruptionFunction")


# ---------------------------------------------------------------------------- notice queues


def test_the_notice_rules_target_their_queues(template: dict[str, Any]) -> None:
    res = template["Resources"]
    for name, (queue, _) in NOTICE_RULES.items():
        rule = res[name]
        assert rule["Type"] == "AWS::Events::Rule", name
        assert rule["Properties"]["State"] == "ENABLED"
        (target,) = rule["Properties"]["Targets"]
        assert target == {"Id": queue, "Arn": {"Fn::GetAtt": [queue, "Arn"]}}, name
    # The two functions have no event of their own any more (their queues' mappings are
    # resources: see MAPPINGS); the monitor's rules stay.
    for fn in ("LifecycleHookFunction", "SpotInterruptionFunction"):
        assert "Events" not in res[fn]["Properties"], fn
    monitor = res["DrainMonitorFunction"]["Properties"]["Events"]
    assert {k: e["Type"] for k, e in monitor.items()} == {
        "TaskStopped": "EventBridgeRule",
        "InstanceDraining": "EventBridgeRule",
    }


def test_event_rules_say_which_queue_a_notice_goes_through(rules: list[EventRule]) -> None:
    routes = {(r.function, r.name): r.queue for r in rules}
    assert routes == {
        **{(fn, name): queue for name, (queue, fn) in NOTICE_RULES.items()},
        ("DrainMonitorFunction", "TaskStopped"): None,
        ("DrainMonitorFunction", "InstanceDraining"): None,
    }


def test_the_notice_queues_are_like_the_drain_queue(template: dict[str, Any]) -> None:
    res = template["Resources"]
    timeout = template["Globals"]["Function"]["Timeout"]
    # The drain queue's ticks: six times the functions' timeout (Lambda's advice for an SQS
    # event source; a failed step leaves its own retry tick 30 s later anyway).
    assert res["DrainQueue"]["Properties"]["VisibilityTimeout"] == 6 * timeout == 360
    for queue in ("LifecycleNoticeQueue", "InstanceNoticeQueue"):
        props = res[queue]["Properties"]
        assert props["SqsManagedSseEnabled"] is True
        # A notice whose batch failed as a whole comes back after the functions' timeout
        # (the least Lambda takes), while a spot notice (120 s) or a lifecycle action (300 s)
        # still has time: six times it would be too late for both.
        assert props["VisibilityTimeout"] == timeout == 60
        assert props["RedrivePolicy"] == {
            "deadLetterTargetArn": {"Fn::GetAtt": ["DrainDeadLetterQueue", "Arn"]},
            "maxReceiveCount": 5,
        }


def test_only_eventbridge_and_only_its_rules_may_send_to_a_notice_queue(
    template: dict[str, Any],
) -> None:
    res = template["Resources"]
    policies = {
        v["Properties"]["Queues"][0]["Ref"]: v["Properties"]["PolicyDocument"]
        for v in res.values()
        if v["Type"] == "AWS::SQS::QueuePolicy"
    }
    for queue in ("LifecycleNoticeQueue", "InstanceNoticeQueue"):
        doc = policies[queue]
        arn = {"Fn::GetAtt": [queue, "Arn"]}
        allows = [s for s in doc["Statement"] if s["Effect"] == "Allow"]
        (allow,) = allows
        assert allow["Principal"] == {"Service": "events.amazonaws.com"}
        assert allow["Action"] == "sqs:SendMessage"
        assert allow["Resource"] == arn
        # aws:SourceArn: exactly the rules that target this queue, no more, no fewer.
        (condition,) = allow["Condition"].items()
        assert condition[0] == "ArnEquals"
        (source,) = condition[1].items()
        assert source[0] == "aws:SourceArn"
        targeting = sorted(
            name
            for name, r in res.items()
            if r["Type"] == "AWS::Events::Rule"
            and any(t["Arn"] == arn for t in r["Properties"]["Targets"])
        )
        assert targeting == sorted(n for n, (q, _) in NOTICE_RULES.items() if q == queue)
        assert sorted(a["Fn::GetAtt"][0] for a in source[1]) == targeting
        assert all(a["Fn::GetAtt"][1] == "Arn" for a in source[1])
        (deny,) = [s for s in doc["Statement"] if s["Effect"] == "Deny"]
        assert deny["Sid"] == "DenyInsecureTransport" and deny["Resource"] == arn
        assert deny["Condition"] == {"Bool": {"aws:SecureTransport": "false"}}


def test_the_notices_are_batched_by_the_parameter(
    template: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Spot and Health notices: a short window (a spot notice gives 120 s in all); lifecycle
    # actions: a longer one (a scale-in's actions come spread out, and wait 300 s for a heartbeat).
    for name, bounds in (
        ("NoticeBatchingSeconds", (1, 0, 10)),
        ("LifecycleBatchingSeconds", (5, 0, 30)),
    ):
        param = template["Parameters"][name]
        assert param["Type"] == "Number"
        assert (param["Default"], param["MinValue"], param["MaxValue"]) == bounds
    res = template["Resources"]
    for name, (queue, fn, window) in MAPPINGS.items():
        props = res[name]["Properties"]
        assert res[name]["Type"] == "AWS::Lambda::EventSourceMapping"
        assert props["EventSourceArn"] == {"Fn::GetAtt": [queue, "Arn"]}
        assert props["FunctionName"] == {"Ref": fn}
        assert props["BatchSize"] == 10
        assert props.get("MaximumBatchingWindowInSeconds") == ({"Ref": window} if window else None)
        assert props["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert res["LifecycleNotificationMapping"]["Properties"]["MaximumBatchingWindowInSeconds"] == {
        "Ref": "LifecycleBatchingSeconds"
    }
    # ...and SAM leaves the mappings as written (the drain queue's ticks are not batched).
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    out = expand(template, {"LifecycleNotificationQueueArn": "arn:aws:sqs:us-east-1:1:n"})
    mappings = {
        k: v["Properties"]
        for k, v in out["Resources"].items()
        if v["Type"] == "AWS::Lambda::EventSourceMapping"
    }
    assert sorted(mappings) == sorted([*MAPPINGS, "LifecycleNotificationMapping"])
    windows = {k: m.get("MaximumBatchingWindowInSeconds") for k, m in mappings.items()}
    assert windows == {
        "LifecycleNoticeMapping": {"Ref": "LifecycleBatchingSeconds"},
        "LifecycleNotificationMapping": {"Ref": "LifecycleBatchingSeconds"},
        "InstanceNoticeMapping": {"Ref": "NoticeBatchingSeconds"},
        "DrainTickMapping": None,
    }


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
