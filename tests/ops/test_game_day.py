"""``fleetdrain drill --aws`` against moto's threaded server and the embedded coordinator, with a
real agent process whose ECS task is a moto task: StopTask reaches it as SIGTERM (through the
fleetdrain.drill.aws.gaps gap fillers), its exit marks the task STOPPED with its exit code."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from fleetdrain.cli import main
from fleetdrain.drill.aws.endpoints import EcsAgentStandIn
from fleetdrain.drill.aws.gaps import AwsGaps
from fleetdrain.drill.aws.world import sqs_lambda_event
from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer, Fault, RetryRule
from fleetdrain.drill.coordinator.builds import PipelineStep
from fleetdrain.drill.report.html import render_html
from fleetdrain.drill.report.model import DrillReport
from fleetdrain.drill.world.processes import AgentProcess, pid_namespaces_available, spawn_agent
from fleetdrain.ops.buildkite_rest import ApiToken, BuildkiteRest
from fleetdrain.ops.game_day import GameDayConfig, GameDayError, run_game_day

pytestmark = [pytest.mark.slow, pytest.mark.timeout(90)]

REGION = "us-east-1"
CLUSTER = "ci"
SERVICE = "ci-agents"
TOKEN = "bk-api-Zq8secret-token-do-not-print"
RETRY = (RetryRule(exit_status="-1", limit=2), RetryRule(signal_reason="agent_stop", limit=2))


def gated_build(gate: Path) -> str:
    """The game day's job: it runs until the test opens ``gate`` (once the stop or the drain
    it is meant to run under has begun; at most 60 s), then 1 s of steps. So "the job finished
    after the SIGTERM / after the drain started" is an order the test sets up, not a race of
    a short job against a busy machine's polls."""
    return (
        f'for i in $(seq 1 600); do [ -e "{gate}" ] && break; sleep 0.1; done; '
        'for i in $(seq 1 10); do echo "step $i"; sleep 0.1; done'
    )


@dataclass
class Fleet:
    """moto (server) + gap fillers + coordinator + ECS stand-in + agent processes."""

    endpoint: str
    gaps: AwsGaps
    coord: Coordinator
    server: CoordinatorServer
    ecs_standin: EcsAgentStandIn
    workdir: Path
    ecs: object
    instance_id: str = ""
    ci_arn: str = ""

    @property
    def gate(self) -> Path:
        """The file whose creation lets the game day's job finish (see ``gated_build``)."""
        return self.workdir / "gate"

    def open_gate(self) -> None:
        self.gate.touch()

    def __post_init__(self) -> None:
        self.procs: dict[str, AgentProcess] = {}
        self.pid1 = pid_namespaces_available()[0]
        self.gaps.on_sigterm = self._sigterm

    def build_cluster(self, stop_timeout: int = 10) -> None:
        ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=self.endpoint)
        ecs = boto3.client("ecs", region_name=REGION, endpoint_url=self.endpoint)
        self.ecs = ecs
        reservation = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)
        self.instance_id = reservation["Instances"][0]["InstanceId"]
        ecs.create_cluster(clusterName=CLUSTER)
        ecs.register_task_definition(
            family="fleetdrain-agent",
            containerDefinitions=[
                {"name": "agent", "image": "agent", "memory": 512, "stopTimeout": stop_timeout}
            ],
        )
        ecs.create_service(cluster=CLUSTER, serviceName=SERVICE, taskDefinition="fleetdrain-agent")
        ci = ecs.register_container_instance(
            cluster=CLUSTER, instanceIdentityDocument=json.dumps({"instanceId": self.instance_id})
        )
        self.ci_arn = ci["containerInstance"]["containerInstanceArn"]

    def start_agent_task(self, name: str, *extra: str) -> str:
        """A moto task in the service, and a real agent process that is that task."""
        out = self.ecs.start_task(  # type: ignore[attr-defined]
            cluster=CLUSTER,
            taskDefinition="fleetdrain-agent",
            containerInstances=[self.ci_arn],
            group=f"service:{SERVICE}",
        )
        task_arn = str(out["tasks"][0]["taskArn"])
        task_id = task_arn.rsplit("/", 1)[-1]
        self.ecs_standin.add_task(task_id, service_name=SERVICE)
        assert self.ecs_standin.task(task_id).task_arn == task_arn
        proc = spawn_agent(
            [
                "start",
                "--token",
                self.coord.registration_token,
                "--endpoint",
                self.server.agent_endpoint,
                "--name",
                name,
                "--build-path",
                str(self.workdir / "builds"),
                "--tags-from-ecs-meta-data",
                *extra,
            ],
            log_path=self.workdir / f"{name}.log",
            env=self.ecs_standin.env_for(task_id),
            pid1=self.pid1,
        )
        self.procs[task_arn] = proc
        return task_arn

    def _sigterm(self, task_arn: str, reason: str) -> None:
        # What ECS does on StopTask: SIGTERM to the container's PID 1; the task is STOPPED,
        # with the process's exit code, only once it has exited.
        proc = self.procs[task_arn]
        proc.send(signal.SIGTERM)
        self.open_gate()  # the job under the stop may finish now, and only now

        def reap() -> None:
            code = proc.wait(timeout=60)
            self.gaps.task_exited(task_arn, code)

        threading.Thread(target=reap, daemon=True).start()

    def close(self) -> None:
        for proc in self.procs.values():
            proc.kill()

    def logs(self) -> str:
        return "\n".join(f"--- {p.log_path}\n{p.output()[-1500:]}" for p in self.procs.values())


@pytest.fixture
def fleet(aws_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # what the game day's boto3 will use
    coord = Coordinator(
        org="acme",
        api_token=TOKEN,
        ping_interval=0.3,
        heartbeat_interval=0.5,
        job_status_interval=0.3,
        lost_agent_timeout=5.0,
        chunks_interval_seconds=0.5,
    )
    standin = EcsAgentStandIn(cluster=CLUSTER)
    try:
        with AwsGaps() as gaps, CoordinatorServer(coord) as server, standin.serve():
            f = Fleet(endpoint, gaps, coord, server, standin, tmp_path, None)
            coord.pipelines.add(
                "game-day", [PipelineStep(gated_build(f.gate), key="build", retry=RETRY)]
            )
            f.build_cluster()
            try:
                yield f
            finally:
                f.close()
    finally:
        moto.stop()


def config(fleet: Fleet, **kw: object) -> GameDayConfig:
    values: dict[str, object] = {
        "cluster": CLUSTER,
        "service": SERVICE,
        "api_url": fleet.server.url,
        "org": "acme",
        "pipeline": "game-day",
        "token": ApiToken(TOKEN),
        "region": REGION,
        "timeout": 40.0,
        "poll": 0.2,
    }
    values.update(kw)
    return GameDayConfig(**values)  # type: ignore[arg-type]


def test_stop_task_under_a_build_the_build_passes(
    fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    task_arn = fleet.start_agent_task("agent-1")
    monkeypatch.setenv("FLEETDRAIN_API_TOKEN", TOKEN)
    # Two 502s from the REST API while the game day waits: retried on the next poll, not fatal.
    fleet.coord.faults.add(Fault("rest_agent", "status", status=502, count=2))
    report_path, html_path = tmp_path / "aws.json", tmp_path / "aws.html"
    code = main(
        [
            "drill",
            "--aws",
            "--cluster",
            CLUSTER,
            "--service",
            SERVICE,
            "--api-url",
            fleet.server.url,
            "--org",
            "acme",
            "--pipeline",
            "game-day",
            "--region",
            REGION,
            "--poll",
            "0.2",
            "--timeout",
            "40",
            "--json",
            str(report_path),
            "--html",
            str(html_path),
        ]
    )
    out = capsys.readouterr()
    assert code == 0, out.out + out.err + fleet.logs()
    report = DrillReport.read_json(report_path)
    assert report.mode == "aws" and report.ok
    (s,) = report.scenarios
    assert s.name == "aws-stop-task" and s.ok
    # The job was stopped under, yet finished on the same agent: nothing retried or lost.
    assert (s.jobs_run, s.passed, s.retried, s.lost) == (1, 1, 0, 0)
    assert s.longest_drain_seconds is not None and 0 < s.longest_drain_seconds < 10
    # The real sequence: StopTask (SIGTERM) while the job ran, the job passed, then the task
    # stopped with exit 0, all before the 10 s SIGKILL deadline.
    short = task_arn.rsplit("/", 1)[-1]
    events = [(e.kind, e.subject, e.what) for e in s.timeline]
    assert ("signal", short, "SIGTERM") in events
    assert ("task", short, "STOPPED exit 0") in events
    at = {(e.kind, e.what): e.t for e in s.timeline}
    job_passed = next(e.t for e in s.timeline if e.kind == "job" and e.what == "passed exit 0")
    deadline = next(e for e in s.timeline if e.kind == "deadline")
    assert at[("signal", "SIGTERM")] < job_passed <= at[("task", "STOPPED exit 0")] < deadline.t
    assert deadline.detail["stop_timeout"] == 10.0
    # The moto task really went through ECS's StopTask and ended with the agent's exit code.
    assert fleet.gaps.sigterms and fleet.gaps.sigterms[0][0] == task_arn
    assert fleet.gaps.exits[task_arn].exit_code == 0
    # Progress on the waits, the timeline and the table on stdout; the token nowhere.
    assert "waiting for" in out.out or "runs on agent-1" in out.out
    assert out.out.count("HTTP 502 injected fault: HTTP 502 (retrying") == 2
    assert "timeline of aws-stop-task" in out.out and "STOPPED exit 0" in out.out
    for text in (out.out, out.err, report_path.read_text(), html_path.read_text()):
        assert TOKEN not in text


def test_a_job_longer_than_stop_timeout_is_reported_and_retried_elsewhere(
    fleet: Fleet,
) -> None:
    fleet.coord.pipelines.add(
        "long",
        [
            PipelineStep(
                'if [ "$BUILDKITE_AGENT_NAME" = agent-1 ]; then sleep 600; fi; echo built',
                retry=RETRY,
            )
        ],
    )
    fleet.start_agent_task(
        "agent-1", "--stop-timeout", "6", "--cancel-grace-period", "2", "--drain-margin", "1"
    )
    messages: list[str] = []
    # The second agent may only start once the first holds the job.
    started: list[str] = []

    def progress(msg: str) -> None:
        messages.append(msg)
        if "runs on agent-1" in msg and not started:
            started.append(fleet.start_agent_task("agent-2"))

    report = run_game_day(config(fleet, pipeline="long"), progress=progress)
    (s,) = report.scenarios
    assert s.ok, (s.notes, fleet.logs())
    # Cancelled before SIGKILL, reported agent_stop, re-run on agent-2, passed: nothing lost.
    assert (s.jobs_run, s.passed, s.retried, s.lost) == (2, 1, 1, 0)
    assert any(e.kind == "job" and "(agent_stop)" in e.what for e in s.timeline)
    assert s.longest_drain_seconds is not None and s.longest_drain_seconds < 6


def test_a_build_that_never_reaches_an_agent_times_out_clearly(fleet: Fleet) -> None:
    messages: list[str] = []
    with pytest.raises(GameDayError) as exc:
        run_game_day(config(fleet, timeout=1.0), progress=messages.append)
    assert str(exc.value) == ("timed out after 1s waiting for a job of build #1 to run on an agent")
    assert any("waiting for a job of build #1" in m for m in messages)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"pipeline": "nope"}, "creating a build of nope: HTTP 404 No pipeline found"),
        ({"token": ApiToken("wrong-token")}, "the API refused the token (401)"),
        ({"org": "other"}, "HTTP 404 No organization found"),
    ],
)
def test_api_refusals_are_one_line_errors(
    fleet: Fleet, kw: dict[str, object], message: str
) -> None:
    with pytest.raises(GameDayError) as exc:
        run_game_day(config(fleet, **kw))
    assert message in str(exc.value)
    assert "\n" not in str(exc.value) and TOKEN not in str(exc.value)


def test_an_agent_without_a_task_arn_is_refused(fleet: Fleet) -> None:
    # An agent that is not an ECS task (no metadata endpoint): nothing to stop under it.
    proc = spawn_agent(
        [
            "start",
            "--token",
            fleet.coord.registration_token,
            "--endpoint",
            fleet.server.agent_endpoint,
            "--name",
            "bare",
            "--build-path",
            str(fleet.workdir / "builds"),
        ],
        log_path=fleet.workdir / "bare.log",
        pid1=False,
    )
    try:
        with pytest.raises(GameDayError) as exc:
            run_game_day(config(fleet))
        assert "agent bare has no ecs:task-arn tag" in str(exc.value)
    finally:
        proc.kill()


def test_the_token_comes_from_secrets_manager(fleet: Fleet, capsys) -> None:
    sm = boto3.client("secretsmanager", region_name=REGION, endpoint_url=fleet.endpoint)
    arn = sm.create_secret(Name="bk-token", SecretString=json.dumps({"token": TOKEN}))["ARN"]
    code = main(
        [
            "drill",
            "--aws",
            "--cluster",
            CLUSTER,
            "--api-url",
            fleet.server.url,
            "--org",
            "acme",
            "--pipeline",
            "game-day",
            "--token-secret-arn",
            arn,
            "--timeout",
            "1",
            "--poll",
            "0.2",
        ]
    )
    err = capsys.readouterr().err
    # The token was read and accepted (the build was created); no agent ever ran the job.
    assert code == 2
    assert "timed out after 1s waiting for a job of build #1" in err
    assert fleet.coord.pipelines.get("game-day", 1).number == 1


def test_missing_options_and_token_are_named(aws_env: None, capsys) -> None:
    assert main(["drill", "--aws", "--cluster", CLUSTER]) == 2
    assert "--aws needs --org, --pipeline" in capsys.readouterr().err
    argv = ["drill", "--aws", "--cluster", "c", "--org", "o", "--pipeline", "p"]
    assert main(argv) == 2
    assert "set $FLEETDRAIN_API_TOKEN or --token-secret-arn" in capsys.readouterr().err
    assert main([*argv, "--scenario", "stop-task"]) == 2
    assert "--scenario is for the local drill" in capsys.readouterr().err


def test_builds_api_shows_attempts_and_state(fleet: Fleet) -> None:
    rest = BuildkiteRest(fleet.server.url, "acme", ApiToken(TOKEN))
    try:
        build = rest.create_build("game-day", commit="abc", branch="main", message="m")
        assert (build["number"], build["state"], build["branch"]) == (1, "scheduled", "main")
        (job,) = build["jobs"]
        assert job["state"] == "scheduled" and job["agent"] is None
        assert job["exit_status"] is None and job["retried"] is False
        assert rest.get_build("game-day", 1)["id"] == build["id"]
        assert rest.create_build("game-day", commit="abc", branch="main", message="")["number"] == 2
    finally:
        rest.close()


# ------------------------------------------------------------------ --kill instance


ASG = "ci-agents"
HOOK = "fleetdrain-terminating"
ROOT = Path(__file__).resolve().parents[2]


class LambdaPump:
    """The controller as Lambda would run it: each event AWS emitted (the gap fillers' list)
    goes to the handler whose template.yaml rule matches it; due drain ticks go to the drain
    monitor as SQS batches. Runs in its own thread, as the Lambda service would."""

    def __init__(self, fleet: Fleet, secret_arn: str) -> None:
        from fleetdrain.controller import drain_monitor, lifecycle_hook, runtime, spot_interruption
        from fleetdrain.controller.drain.config import Settings
        from fleetdrain.controller.drain.coordinator import CoordinatorClient, SecretToken
        from fleetdrain.controller.drain.core import DrainController
        from fleetdrain.controller.drain.ecs_fleet import EcsFleet
        from fleetdrain.controller.drain.lifecycle import LifecycleActions
        from fleetdrain.controller.drain.state import DynamoDrainStore
        from fleetdrain.drill.aws.rules import event_rules
        from fleetdrain.drill.aws.template import load_template

        self.fleet = fleet
        self.runtime = runtime
        self.handlers = {
            "LifecycleHookFunction": lifecycle_hook.handler,
            "SpotInterruptionFunction": spot_interruption.handler,
            "DrainMonitorFunction": drain_monitor.handler,
        }
        self.monitor = drain_monitor.handler
        self.rules = event_rules(
            load_template(ROOT / "template.yaml"),
            {
                "ClusterName": CLUSTER,
                "AutoScalingGroupName": ASG,
                "LifecycleHookName": HOOK,
                "CoordinatorOrg": "acme",
                "CoordinatorTokenSecretArn": secret_arn,
            },
        )
        session = boto3.session.Session(region_name=REGION)
        settings = Settings(
            cluster=CLUSTER,
            table_name="drains",
            queue_url="unused",
            coordinator_url=fleet.server.url,
            coordinator_org="acme",
            coordinator_token_secret_arn=secret_arn,
            heartbeat_interval=1.0,
            tick_interval=1.0,
        )
        token = SecretToken(session.client("secretsmanager"), secret_arn)
        self.ticks: list[tuple[float, str]] = []
        self.errors: list[BaseException] = []
        ctl = DrainController(
            settings,
            DynamoDrainStore(session.client("dynamodb"), "drains", time.time, 3600),
            EcsFleet(session.client("ecs"), CLUSTER, time.time),
            CoordinatorClient(fleet.server.url, "acme", token.get, token.invalidate, timeout=2.0),
            LifecycleActions(session.client("autoscaling")),
            self,
            clock=time.time,
        )
        runtime.set_controller(ctl)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def schedule(
        self, instance_id: str, drain_id: str, tick_id: str, delay: int, record: Any = None
    ) -> None:
        from fleetdrain.controller.drain.ticks import tick_body

        body = tick_body(instance_id, drain_id, tick_id, record)
        self.ticks.append((time.time() + delay, body))

    def _deliver(self, bodies: list[str]) -> None:
        """Due ticks as the SQS event source mapping invokes the drain monitor with them (the
        whole SQS record, ``eventSource`` and all: the handlers tell SQS batches by it). A
        record the batch reports failed comes back after a visibility timeout, as from SQS; a
        batch the handler rejects is an error of the test's plumbing, surfaced."""
        import uuid

        messages = [
            {
                "MessageId": str(uuid.uuid4()),
                "ReceiptHandle": uuid.uuid4().hex,
                "Body": body,
                "Attributes": {"ApproximateReceiveCount": "1"},
            }
            for body in bodies
        ]
        queue_arn = f"arn:aws:sqs:{REGION}:123456789012:fleetdrain-ticks"
        out = self.monitor(sqs_lambda_event(messages, queue_arn), _Ctx())
        if out.get("status") == "rejected":
            raise AssertionError(f"the drain monitor rejected the tick batch: {out}")
        by_id = {m["MessageId"]: m["Body"] for m in messages}
        for failure in out.get("batchItemFailures", []):
            self.ticks.append((time.time() + 1.0, by_id[failure["itemIdentifier"]]))

    def _run(self) -> None:
        cursor = 0
        while not self._stop.is_set():
            try:
                while cursor < len(self.fleet.gaps.events):
                    event = self.fleet.gaps.events[cursor]
                    cursor += 1
                    for rule in self.rules:
                        if rule.matches(event):
                            out = self.handlers[rule.function](event, _Ctx())
                            if out.get("status") == "rejected":
                                raise AssertionError(f"{rule.function} rejected {event}: {out}")
                            if rule.function == "LifecycleHookFunction":
                                # The drain has started: the job under it may finish now.
                                self.fleet.open_gate()
                now = time.time()
                due = [body for at, body in self.ticks if at <= now]
                self.ticks = [(at, body) for at, body in self.ticks if at > now]
                if due:
                    self._deliver(due)
            except BaseException as exc:  # surfaced by the test, not swallowed
                self.errors.append(exc)
                return
            self._stop.wait(0.05)

    def __enter__(self) -> LambdaPump:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self.runtime.set_controller(None)


@dataclass
class _Ctx:
    function_name: str = "fleetdrain-fn"
    memory_limit_in_mb: int = 256
    invoked_function_arn: str = f"arn:aws:lambda:{REGION}:123456789012:function:fleetdrain-fn"
    aws_request_id: str = "req-1"


def test_kill_instance_drains_through_the_controller_and_shows_the_drain_table(
    fleet: Fleet,
) -> None:
    endpoint = fleet.endpoint
    asg = boto3.client("autoscaling", region_name=REGION, endpoint_url=endpoint)
    ec2 = boto3.client("ec2", region_name=REGION, endpoint_url=endpoint)
    ecs = fleet.ecs
    ec2.create_launch_template(
        LaunchTemplateName="ci-agents", LaunchTemplateData={"ImageId": "ami-12c6146b"}
    )
    asg.create_auto_scaling_group(
        AutoScalingGroupName=ASG,
        LaunchTemplate={"LaunchTemplateName": "ci-agents", "Version": "$Latest"},
        MinSize=0,
        MaxSize=2,
        DesiredCapacity=1,
        AvailabilityZones=[f"{REGION}a"],
    )
    asg.put_lifecycle_hook(
        LifecycleHookName=HOOK,
        AutoScalingGroupName=ASG,
        LifecycleTransition="autoscaling:EC2_INSTANCE_TERMINATING",
        HeartbeatTimeout=300,
        DefaultResult="CONTINUE",
    )
    group = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[ASG])["AutoScalingGroups"][0]
    fleet.instance_id = group["Instances"][0]["InstanceId"]
    ci = ecs.register_container_instance(  # type: ignore[attr-defined]
        cluster=CLUSTER, instanceIdentityDocument=json.dumps({"instanceId": fleet.instance_id})
    )
    fleet.ci_arn = ci["containerInstance"]["containerInstanceArn"]
    boto3.client("dynamodb", region_name=REGION, endpoint_url=endpoint).create_table(
        TableName="drains",
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    sm = boto3.client("secretsmanager", region_name=REGION, endpoint_url=endpoint)
    secret_arn = sm.create_secret(Name="coordinator", SecretString=TOKEN)["ARN"]

    task_arn = fleet.start_agent_task("agent-1")
    with LambdaPump(fleet, secret_arn) as pump:
        report = run_game_day(config(fleet, kill="instance", table="drains", timeout=60.0))
    assert not pump.errors, pump.errors
    (s,) = report.scenarios
    assert s.name == "aws-terminate-instance"
    assert s.ok, (s.notes, fleet.logs())
    assert (s.jobs_run, s.passed, s.retried, s.lost) == (1, 1, 0, 0)
    what = [(e.kind, e.what) for e in s.timeline]
    # The drain as the table recorded it: started by the hook, soft first (the job finished
    # on its agent), then DRAINING, the task stopped, the hook completed.
    assert ("instance", "terminate requested") in what
    assert ("controller", "drain started: scale_in") in what
    assert ("instance", "DRAINING") in what
    assert ("hook", "completed (drained)") in what
    t = {e.what: e.t for e in s.timeline}
    # The soft drain let the job finish on its agent; only then DRAINING stopped the idle
    # task, and the hook was completed right after the task stopped.
    assert t["terminate requested"] < t["drain started: scale_in"] < t["passed exit 0"]
    # (moto sets no stoppedAt, so STOPPED is placed when the game day saw it, a poll late.)
    assert t["passed exit 0"] < t["DRAINING"] <= t["STOPPED exit 0"]
    assert t["DRAINING"] < t["completed (drained)"]
    # The soft drain's pause, as the coordinator's REST API showed the agent.
    assert any(k == "agent" and "paused" in w for k, w in what)
    assert s.hook_completion_latency_seconds is not None
    assert 0 <= s.hook_completion_latency_seconds < 3
    assert fleet.gaps.actions[fleet.instance_id].result == "CONTINUE"
    assert fleet.gaps.exits[task_arn].exit_code == 0
    # The same report draws as a timeline: the drain's lanes, the far force_at at the edge.
    html = render_html(report)
    assert "hook: " + fleet.instance_id in html and "completed (drained)" in html
    assert "force at (" + fleet.instance_id in html and TOKEN not in html
    if os.environ.get("FLEETDRAIN_KEEP_HTML"):  # to look at it: FLEETDRAIN_KEEP_HTML=FILE
        Path(os.environ["FLEETDRAIN_KEEP_HTML"]).write_text(html)


def test_a_job_is_placed_on_the_timeline_when_the_api_stamped_it_not_when_polled() -> None:
    from fleetdrain.ops.game_day import _job_state

    running = {"state": "running", "agent": {"name": "a"}, "started_at": "2026-12-03T00:00:01.250Z"}
    done = {"state": "passed", "exit_status": 0, "finished_at": "2026-12-03T00:00:04.500Z"}
    assert _job_state(running) == (
        "running on a",
        datetime(2026, 12, 3, 0, 0, 1, 250000, UTC).timestamp(),
    )
    assert _job_state(done) == (
        "passed exit 0",
        datetime(2026, 12, 3, 0, 0, 4, 500000, UTC).timestamp(),
    )
    # Unstamped (or not yet in a stamped state): the poll's own time is used.
    assert _job_state({"state": "scheduled"}) == ("scheduled", None)
    assert _job_state({"state": "passed", "exit_status": 0}) == ("passed exit 0", None)
