"""``fleetdrain status`` against moto: records written by the controller's own store."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto import mock_aws
from moto.server import ThreadedMotoServer

from fleetdrain.cli import main
from fleetdrain.controller.drain.ports import DrainRecord
from fleetdrain.controller.drain.state import DynamoDrainStore
from fleetdrain.ops.status import run_status

pytestmark = pytest.mark.timeout(60)

REGION = "us-east-1"
NOW = 1_770_000_000.0
ROOT = Path(__file__).resolve().parents[2]


def create_table(client, name: str = "drains") -> None:
    client.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )


def seed(client) -> DynamoDrainStore:
    store = DynamoDrainStore(client, "drains", clock=lambda: NOW, ttl_seconds=3600)
    scale_in = store.create(
        DrainRecord(
            instance_id="i-0scalein",
            drain_id="d-1",
            cluster="ci",
            reasons=["scale-in"],
            started_at=NOW - 95,
            force_at=NOW + 3505,
            asg_name="ci-agents",
            hook_name="fleetdrain-terminating",
            lifecycle_token="tok-secret-looking",
            lifecycle_state="pending",
            last_heartbeat_at=NOW - 12,
            paused_agents=["a-1", "a-2"],
        )
    )
    scale_in = store.save(
        scale_in, link="arn:aws:ecs:us-east-1:123456789012:container-instance/ci/abc"
    )
    store.create(
        DrainRecord(
            instance_id="i-0spot",
            drain_id="d-2",
            cluster="ci",
            phase="hard",
            reasons=["spot", "scale-in"],
            started_at=NOW - 30,
            force_at=NOW + 70,
            spot_deadline=NOW + 90,
            stopped_agents=["a-3"],
            stopped_tasks=["t-1", "t-2"],
            forced_at=NOW - 1,
            jobs_force_cancelled=1,
        )
    )
    done = store.create(
        DrainRecord(
            instance_id="i-0done",
            drain_id="d-3",
            cluster="ci",
            started_at=NOW - 500,
            lifecycle_state="completed",
        )
    )
    store.save(dataclasses.replace(done, phase="done", completed_at=NOW - 400))
    assert scale_in.version == 2, "the link went with the save, one write"
    return store


def ns(**kw: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "table": "drains",
        "region": REGION,
        "json": True,
        "all": False,
        "ecs": False,
    }
    values.update(kw)
    return argparse.Namespace(**values)


def test_json_lists_drains_in_flight_not_the_done_ones(aws_env: None) -> None:
    with mock_aws():
        client = boto3.client("dynamodb", region_name=REGION)
        create_table(client)
        seed(client)
        out = io.StringIO()
        assert run_status(ns(), client=client, clock=lambda: NOW, out=out) == 0
        rows = json.loads(out.getvalue())
        assert [r["instance_id"] for r in rows] == ["i-0scalein", "i-0spot"]
        first, spot = rows
        assert first["phase"] == "soft" and first["reasons"] == ["scale-in"]
        assert first["age_seconds"] == 95.0 and first["forces_in_seconds"] == 3505.0
        assert first["agents_paused"] == 2
        assert first["hook"] == "pending (ci-agents/fleetdrain-terminating)"
        assert first["hook_heartbeat_age_seconds"] == 12.0
        assert first["started_at"] == "2026-02-02T02:38:25+00:00"
        assert spot["phase"] == "hard" and spot["forced"] is True
        assert spot["spot_deadline"] is not None and spot["tasks_stopped"] == 2
        assert spot["jobs_force_cancelled"] == 1
        # The lifecycle token is the controller's secret to complete the hook: never shown.
        assert "tok-secret-looking" not in out.getvalue()

        out = io.StringIO()
        assert run_status(ns(all=True), client=client, clock=lambda: NOW, out=out) == 0
        ids = [r["instance_id"] for r in json.loads(out.getvalue())]
        assert ids == ["i-0done", "i-0scalein", "i-0spot"]


def test_table_output_and_empty_table(aws_env: None) -> None:
    with mock_aws():
        client = boto3.client("dynamodb", region_name=REGION)
        create_table(client)
        out = io.StringIO()
        assert run_status(ns(json=False), client=client, clock=lambda: NOW, out=out) == 0
        assert out.getvalue().strip() == "no drains in flight in drains"
        seed(client)
        out = io.StringIO()
        assert run_status(ns(json=False), client=client, clock=lambda: NOW, out=out) == 0
        text = out.getvalue()
        line = next(row for row in text.splitlines() if "i-0scalein" in row)
        assert "soft" in line and "1m35s" in line and "58m25s" in line and "2/0" in line
        spot = next(row for row in text.splitlines() if "i-0spot" in row)
        assert "forced" in spot and "hard" in spot
        assert "i-0done" not in text


def test_missing_table_and_unknown_table_are_one_line_errors(
    aws_env: None, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fleetdrain: error: --table (or $FLEETDRAIN_TABLE) is required"
    )
    with mock_aws():
        assert main(["status", "--table", "nope", "--region", REGION]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fleetdrain: error: drain table 'nope' not found")
        assert "\n" not in err


@pytest.fixture
def moto_server() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_the_command_reads_the_table_at_aws_endpoint_url(aws_env: None, moto_server: str) -> None:
    client = boto3.client("dynamodb", region_name=REGION, endpoint_url=moto_server)
    create_table(client, "fleetdrain-drains")
    store = DynamoDrainStore(client, "fleetdrain-drains", clock=lambda: NOW, ttl_seconds=60)
    store.create(DrainRecord(instance_id="i-0remote", drain_id="d", cluster="ci", started_at=NOW))
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": moto_server,
        "FLEETDRAIN_TABLE": "fleetdrain-drains",
        "PYTHONPATH": str(ROOT),
    }
    result = subprocess.run(
        [sys.executable, "-m", "fleetdrain.cli", "status", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert [r["instance_id"] for r in json.loads(result.stdout)] == ["i-0remote"]


def test_tasks_left_and_busy_come_from_ecs_task_protection(aws_env: None) -> None:
    from fleetdrain.drill.aws.gaps import AwsGaps

    with mock_aws(), AwsGaps() as gaps:
        ddb = boto3.client("dynamodb", region_name=REGION)
        ecs = boto3.client("ecs", region_name=REGION)
        ec2 = boto3.client("ec2", region_name=REGION)
        create_table(ddb)
        iid = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"][0][
            "InstanceId"
        ]
        ecs.create_cluster(clusterName="ci")
        for family in ("agent", "router"):
            ecs.register_task_definition(
                family=family,
                containerDefinitions=[{"name": family, "image": family, "memory": 64}],
            )
        ecs.create_service(cluster="ci", serviceName="agents", taskDefinition="agent")
        ecs.create_service(
            cluster="ci", serviceName="router", taskDefinition="router", schedulingStrategy="DAEMON"
        )
        ci = ecs.register_container_instance(
            cluster="ci", instanceIdentityDocument=json.dumps({"instanceId": iid})
        )["containerInstance"]["containerInstanceArn"]

        def start(family: str, group: str) -> str:
            out = ecs.start_task(
                cluster="ci", taskDefinition=family, containerInstances=[ci], group=group
            )
            return str(out["tasks"][0]["taskArn"])

        busy = start("agent", "service:agents")
        start("agent", "service:agents")
        start("router", "service:router")  # a daemon: the drain never waits for it
        gaps.set_protection(busy, True, 60)
        store = DynamoDrainStore(ddb, "drains", clock=lambda: NOW, ttl_seconds=3600)
        store.create(
            DrainRecord(
                instance_id=iid,
                drain_id="d",
                cluster="ci",
                started_at=NOW - 5,
                container_instance_arn=ci,
            )
        )
        out = io.StringIO()
        assert run_status(ns(ecs=True), client=ddb, ecs=ecs, clock=lambda: NOW, out=out) == 0
        (row,) = json.loads(out.getvalue())
        assert (row["tasks_left"], row["tasks_busy"]) == (2, 1)
        out = io.StringIO()
        assert (
            run_status(ns(ecs=True, json=False), client=ddb, ecs=ecs, clock=lambda: NOW, out=out)
            == 0
        )
        line = next(r for r in out.getvalue().splitlines() if iid in r)
        assert "1/2" in line
