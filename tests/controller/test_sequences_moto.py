"""The sequences of issue 11 end to end: moto + fleetdrain.drill.aws.gaps, the embedded
coordinator over loopback HTTP, the real Lambda handlers fed by template.yaml's own patterns
(the world of tests/controller/test_drains.py). The same sequences run in memory, with
duplicates, reordering, crashes and a property-based test, in test_sequences.py and
test_properties.py.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from fleetdrain.controller import lifecycle_hook, spot_interruption
from fleetdrain.drill.coordinator import RetryRule
from tests.controller.test_drains import CLUSTER, Ctx, World, make_world, sqs_event

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture
def world(aws_env: None) -> Iterator[World]:
    with make_world() as w:
        yield w


AGENT_STOP = [RetryRule(signal_reason="agent_stop", limit=2)]


def replayed(event: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    """``event`` again under a new id (an archive replay, a late redelivery through another
    path), with another token if given."""
    again = copy.deepcopy(event)
    again["id"] = str(uuid.uuid4())
    if token is not None:
        again["detail"]["LifecycleActionToken"] = token
    return again


def calls(world: World, *names: str) -> dict[str, int]:
    return {n: world.gaps.calls.get(n, 0) for n in names}


def test_1_rebalance_on_an_idle_instance_then_the_spot_warning(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(spot_margin=20)
    out = world.emit(world.gaps.rebalance_recommendation(a))
    assert out[0]["status"] == "started" and out[0]["phase"] == "done"
    assert world.record(a).outcome == "no_tasks" and world.ci_status(a) == "ACTIVE"
    agent = world.add_agent(a, job_seconds=3600, retry=AGENT_STOP)  # placed there later
    world.advance(60)
    out = world.emit(world.gaps.spot_interruption(a))
    assert out[0]["status"] == "started", "a finished drain does not swallow the warning"
    rec = world.record(a)
    assert (rec.episode, rec.phase, rec.reasons) == (2, "hard", ["spot"])
    assert [h.outcome for h in rec.history] == ["no_tasks"]
    world.advance(102)
    job = world.coord.job(agent.job_id or "")
    assert job.state == "canceled" and job.signal_reason == "agent_stop" and job.retried
    assert world.record(a).forced_at is not None
    assert world.gaps.exits[agent.task_arn].exit_code == 0, "reported, not SIGKILLed"


def test_2_rebalance_then_scale_in_is_a_soft_drain_with_its_own_budget(world: World) -> None:
    (a,) = world.build(instances=1, hook_timeout=300)
    world.controller(drain_budget=3600, heartbeat_interval=60)
    world.emit(world.gaps.rebalance_recommendation(a))
    assert world.record(a).outcome == "no_tasks"
    agent = world.add_agent(a, job_seconds=400)
    world.advance(100)
    out = world.emit(world.gaps.begin_termination(a))  # what CapacityRebalance does next
    assert out[0]["status"] == "started" and out[0]["phase"] == "soft"
    rec = world.record(a)
    assert rec.episode == 2 and rec.force_at == world.clock() + 3600
    assert rec.lifecycle_verified, "AWS accepted the token (the first step's heartbeat)"
    assert world.ci_status(a) == "ACTIVE" and agent.sigterm_at is None, "no SIGTERM at once"
    world.run_until(lambda: world.record(a).phase == "done", limit=420)
    assert world.coord.job(agent.job_id or "").passed
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.record(a).forced_at is None


def test_3_a_stale_token_never_replaces_the_live_one(world: World) -> None:
    (a,) = world.build(instances=1, hook_timeout=300)
    world.controller(heartbeat_interval=60)
    agent = world.add_agent(a, job_seconds=450)
    lifecycle = world.gaps.begin_termination(a)
    world.emit(lifecycle)
    world.advance(30)
    stale = replayed(lifecycle, token=str(uuid.uuid4()))  # AWS never issued it, or it is dead
    assert world.route(stale)[0]["status"] == "joined"
    rec = world.record(a)
    assert rec.lifecycle_token == lifecycle["detail"]["LifecycleActionToken"]
    assert rec.other_tokens == [] and stale["detail"]["LifecycleActionToken"] in rec.dead_tokens
    assert rec.phase == "soft" and rec.forced_at is None, "a refused token is not the drain"
    world.run_until(lambda: world.record(a).phase == "done", limit=480)
    action = world.gaps.actions[a]
    assert action.result == "CONTINUE" and action.heartbeats >= 7, "kept alive past 300 s"
    assert world.coord.job(agent.job_id or "").passed
    assert world.record(a).forced_at is None
    # The live token, replayed after the end (an SQS redelivery, an archive replay): spent.
    before = world.record(a)
    assert world.route(replayed(lifecycle))[0]["status"] == "duplicate"
    body = json.dumps(world.gaps.sqs_body(lifecycle))
    assert lifecycle_hook.handler(sqs_event(body), Ctx()) == {"batchItemFailures": []}
    assert world.record(a) == before
    assert world.gaps.calls["CompleteLifecycleAction"] == 1


def test_3_a_stale_token_alone_drives_nothing(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    agent = world.add_agent(a, job_seconds=300)
    lifecycle = world.gaps.begin_termination(a)
    world.cursor = len(world.gaps.events)  # only the stale copy is delivered
    world.gaps.actions[a].state = "completed"  # that action is over (e.g. a warm pool's)
    out = world.route(replayed(lifecycle))
    assert out[0]["status"] == "started" and out[0]["phase"] == "done"
    assert world.record(a).outcome == "stale_token"
    assert not world.coord.agent(agent.agent_id).paused and world.ci_status(a) == "ACTIVE"
    assert world.coord.job(agent.job_id or "").state == "running"


def test_5_an_sns_to_lambda_lifecycle_notification_drains_the_instance(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    agent = world.add_agent(a, job_seconds=30)
    lifecycle = world.gaps.begin_termination(a)
    world.cursor = len(world.gaps.events)
    message = json.dumps(world.gaps.sqs_body(lifecycle))
    event = {
        "Records": [
            {
                "EventSource": "aws:sns",
                "EventVersion": "1.0",
                "EventSubscriptionArn": "arn:aws:sns:us-east-1:123456789012:lifecycle:s",
                "Sns": {
                    "Type": "Notification",
                    "MessageId": str(uuid.uuid4()),
                    "TopicArn": "arn:aws:sns:us-east-1:123456789012:lifecycle",
                    "Subject": "Auto Scaling: Lifecycle action",
                    "Message": message,
                    "Timestamp": "2026-02-02T02:40:00.000Z",
                },
            }
        ]
    }
    out = lifecycle_hook.handler(event, Ctx())
    assert out["status"] == "started" and out["phase"] == "soft"
    world.run_until(lambda: world.record(a).phase == "done", limit=60)
    assert world.gaps.actions[a].result == "CONTINUE"
    assert world.coord.job(agent.job_id or "").passed


def test_6_a_spot_warning_for_another_clusters_instance_costs_one_lookup(world: World) -> None:
    ids = world.build(instances=30)
    world.controller()
    world.ecs.create_cluster(clusterName="web")
    world.ecs.deregister_container_instance(
        cluster=CLUSTER, containerInstance=world.ci_arn[ids[-1]], force=True
    )
    world.ecs.register_container_instance(
        cluster="web", instanceIdentityDocument=json.dumps({"instanceId": ids[-1]})
    )
    names = ("ListContainerInstances", "DescribeContainerInstances")
    before = calls(world, *names)
    out = world.emit(world.gaps.spot_interruption(ids[-1]))
    assert out[0]["status"] == "ignored" and "not in the cluster" in out[0]["detail"]
    after = calls(world, *names)
    assert {n: after[n] - before[n] for n in names} == {
        "ListContainerInstances": 1,
        "DescribeContainerInstances": 0,
    }, "one filtered lookup, no scan of the 29 others"
    assert world.ctl.store.get(ids[-1]) is None
    # One of ours: the filter names it (ECS's filter is exact: nothing to describe).
    before = calls(world, *names)
    world.emit(world.gaps.rebalance_recommendation(ids[0]))
    after = calls(world, *names)
    assert {n: after[n] - before[n] for n in names} == {
        "ListContainerInstances": 1,
        "DescribeContainerInstances": 0,
    }


def test_7_a_scheduled_change_is_a_soft_drain_forced_before_it_starts(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller(maintenance_margin=300, drain_budget=3600)
    agent = world.add_agent(a, job_seconds=10_000, retry=AGENT_STOP)
    start = world.clock() + 900
    out = world.emit(world.gaps.scheduled_change([a], start))
    assert [r["status"] for r in out] == ["started"] and out[0]["phase"] == "soft"
    rec = world.record(a)
    assert rec.reasons == ["maintenance"] and rec.force_at == start - 300
    assert world.coord.agent(agent.agent_id).paused and world.ci_status(a) == "ACTIVE"
    world.advance(590)
    assert world.coord.job(agent.job_id or "").state == "running"
    world.advance(15)
    job = world.coord.job(agent.job_id or "")
    assert job.state == "canceled" and job.signal_reason == "agent_stop", "before the start"
    world.run_until(lambda: world.record(a).phase == "done", limit=60)
    assert world.record(a).outcome == "drained" and world.ci_status(a) == "DRAINING"


def test_7_an_instance_stopped_outside_the_group_is_forced_at_once(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    busy = world.add_agent(a, job_seconds=1000, retry=AGENT_STOP)
    idle = world.add_agent(a)
    out = world.emit(world.gaps.instance_state_change(a, "stopping"))
    assert out[0]["status"] == "started" and out[0]["phase"] == "hard"
    rec = world.record(a)
    assert rec.reasons == ["stopping"] and rec.forced_at == world.clock()
    assert world.ci_status(a) == "DRAINING"
    # Stopped through the coordinator at once (a stop keeps new jobs away: no pause first).
    assert set(rec.stopped_agents) == {busy.agent_id, idle.agent_id}
    world.advance(2)
    job = world.coord.job(busy.job_id or "")
    assert job.signal_reason == "agent_stop" and job.retried, "reported before the instance goes"
    assert world.gaps.exits[busy.task_arn].exit_code == 0
    world.run_until(lambda: world.record(a).phase == "done", limit=30)


def test_7_the_shutting_down_that_follows_a_completed_scale_in_costs_nothing(
    world: World,
) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    world.add_agent(a, job_seconds=20)
    world.emit(world.gaps.begin_termination(a))
    world.run_until(lambda: world.record(a).phase == "done", limit=60)
    done = world.record(a)
    assert done.draining_at is not None
    names = ("ListContainerInstances", "DescribeContainerInstances", "ListTasks")
    before = calls(world, *names)
    out = world.emit(world.gaps.instance_state_change(a, "shutting-down"))
    assert out[0]["status"] == "duplicate"
    assert calls(world, *names) == before and world.record(a) == done


def test_7_the_new_sources_of_another_account_reach_no_function(world: World) -> None:
    (a,) = world.build(instances=1)
    world.controller()
    for event in (
        world.gaps.instance_state_change(a, "stopping"),
        world.gaps.scheduled_change([a], world.clock() + 3600),
        world.gaps.spot_interruption(a),
    ):
        event["account"] = "210987654321"
        assert world.route(event) == []
    assert world.ctl.store.get(a) is None


def test_4_a_rejected_event_is_counted_for_its_alarm(
    world: World, capsys: pytest.CaptureFixture[str]
) -> None:
    world.build(instances=1)
    world.controller()
    capsys.readouterr()
    spot = world.gaps.spot_interruption(world.instances[0])
    del spot["detail"]["instance-id"]
    assert spot_interruption.handler(spot, Ctx())["status"] == "rejected"
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    rejected = [x for x in lines if "_aws" in x and "EventsRejected" in x]
    assert rejected, lines
    (directive,) = rejected[0]["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "fleetdrain"  # EventsRejectedAlarm's (its "service"
    # dimension is POWERTOOLS_SERVICE_NAME, which template.yaml sets: test_template.py)
