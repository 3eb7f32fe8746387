"""``fleetdrain drill``'s wrapped scenarios and the agent behind wrap (issue 10): the Go
``buildkite-agent`` when one is given or on PATH, else fleetdrain's agent as its stand-in.

- the choice: ``--buildkite-agent PATH``, ``buildkite-agent`` on PATH, ``none``, and bad paths
  (exit status 2, one line), and the report saying which agent ran (terminal, HTML, JSON);
- the contract with the Go agent, held to its source (github.com/buildkite/agent, v3): how the
  wrapped task starts it (``<binary> start``), every ``BUILDKITE_*`` variable in the task's
  environment one ``buildkite-agent start`` reads, with the type it parses, and the
  coordinator's intervals in whole seconds;
- the drill end to end with a fake ``buildkite-agent`` on PATH (the plumbing, not the Go
  binary: none can be installed here), and with the real one where it is installed.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
from io import StringIO
from pathlib import Path
from types import SimpleNamespace

import pytest

from fleetdrain.agent.buildkite.models import RegisterRequest
from fleetdrain.agent.wrap_settings import OneLineParser, add_wrap_arguments, settings_from_args
from fleetdrain.cli import main
from fleetdrain.drill.aws.endpoints import EcsAgentStandIn
from fleetdrain.drill.coordinator import Coordinator
from fleetdrain.drill.report.html import render_html
from fleetdrain.drill.report.model import DrillReport, ScenarioReport, WrappedAgent
from fleetdrain.drill.report.terminal import make_console, print_report
from fleetdrain.drill.scenarios import WRAP_ENTRYPOINT, WRAPPED_FAMILY, Run
from fleetdrain.drill.world import task_runtime
from fleetdrain.drill.world.processes import agent_command, pid_namespaces_available
from fleetdrain.drill.world.task_runtime import DrillClock, TaskDefinition, TaskRuntime
from fleetdrain.drill.wrapped_agent import (
    AGENT_PROGRAM,
    GO_AGENT_ENV,
    GO_AGENT_STAND_IN,
    AgentChoiceError,
    agent_version,
    choose,
    go_cancel_grace,
    stand_in,
    wrapped_command,
)

ROOT = Path(__file__).resolve().parents[2]
FAKE_VERSION = "3.135.0+fake"

#: What ``buildkite-agent start`` (v3) reads from its environment, by its source: the flags'
#: ``EnvVar`` names, and the Go type each one parses.
GO_AGENT_START_READS = {
    # clicommand/global.go: AgentRegisterTokenFlag (--token), EndpointFlag (--endpoint,
    # default https://agent.buildkite.com/v3), LogLevelFlag, DebugFlag.
    "BUILDKITE_AGENT_TOKEN": "string",
    "BUILDKITE_AGENT_ENDPOINT": "string",
    "BUILDKITE_AGENT_LOG_LEVEL": "string",
    "BUILDKITE_AGENT_DEBUG": "bool",
    # clicommand/agent_start.go: --name, --tags (StringSliceFlag: comma separated),
    # --tags-from-ecs-meta-data, --build-path (validate:"required"), --health-check-addr.
    "BUILDKITE_AGENT_NAME": "string",
    "BUILDKITE_AGENT_TAGS": "[]string",
    "BUILDKITE_AGENT_TAGS_FROM_ECS_META_DATA": "bool",
    "BUILDKITE_BUILD_PATH": "string",
    "BUILDKITE_AGENT_HEALTH_CHECK_ADDR": "string",
    # clicommand/cancel_signal.go: cancelGracePeriodFlag and signalGracePeriodSecondsFlag are
    # cli.IntFlag: "1.5" does not parse, and the agent does not start.
    "BUILDKITE_CANCEL_GRACE_PERIOD": "int",
    "BUILDKITE_SIGNAL_GRACE_PERIOD_SECONDS": "int",
}


def fake_buildkite_agent(bin_dir: Path, *, version_line: str | None = None) -> Path:
    """A ``buildkite-agent`` that is not the Go binary: ``--version`` answers as the Go agent
    does; ``start`` records how it was started (argv, the variables the Go agent reads) and
    execs ``fleetdrain-agent start`` in its place. The Go agent's settings are all variables
    fleetdrain's agent reads under the same names (token, endpoint, name, tags, build path,
    health address, cancel grace); what the Go agent does not have, ours is told: no stop
    timeout of its own and no task protection (wrap does both)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    path = bin_dir / "buildkite-agent"
    line = version_line if version_line is not None else f"buildkite-agent version {FAKE_VERSION}"
    agent = shlex.join([*agent_command(), "start", "--no-task-protection", "--stop-timeout"])
    calls = shlex.quote(str(bin_dir / "calls.log"))
    path.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        f"  --version) echo {shlex.quote(line)}; exit 0 ;;\n"
        "  start)\n"
        "    shift\n"
        f'    {{ echo "argv: start $*"; env | grep "^BUILDKITE_" | sort; }} >> {calls}\n'
        f'    exec {agent} 86400 "$@" ;;\n'
        '  *) echo "fake buildkite-agent: only --version and start" >&2; exit 2 ;;\n'
        "esac\n"
    )
    path.chmod(0o755)
    return path


def go_agent(
    path: str = "/opt/bk/buildkite-agent", version: str | None = "3.135.0"
) -> WrappedAgent:
    return WrappedAgent(program="buildkite-agent", path=path, version=version, why="found on PATH")


# ------------------------------------------------------------------ the choice


def test_buildkite_agent_on_path_is_chosen_with_its_version(tmp_path: Path, monkeypatch) -> None:
    fake = fake_buildkite_agent(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    agent = choose(None)
    assert agent.go and agent.path == str(fake) and agent.version == FAKE_VERSION
    assert agent.why == "found on PATH" and agent.label == f"buildkite-agent {FAKE_VERSION}"
    assert agent.summary == (
        f"wrapped scenarios ran buildkite-agent {FAKE_VERSION} ({fake}, found on PATH)"
    )


def test_without_one_on_path_the_stand_in_runs_and_says_so(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing there
    agent = choose(None)
    assert not agent.go and agent.path is None
    assert agent.label == "fleetdrain-agent start (stand-in)"
    assert agent.summary == (
        "wrapped scenarios ran fleetdrain-agent start as the stand-in for buildkite-agent "
        "(none on PATH; --buildkite-agent PATH to use one)"
    )


def test_an_explicit_path_wins_over_the_one_on_path(tmp_path: Path, monkeypatch) -> None:
    on_path = fake_buildkite_agent(tmp_path / "bin")
    mine = fake_buildkite_agent(tmp_path / "mine", version_line="buildkite-agent version 3.99.1")
    monkeypatch.setenv("PATH", f"{on_path.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.chdir(tmp_path)
    agent = choose("mine/buildkite-agent")  # relative: made absolute
    assert agent.path == str(mine) and agent.version == "3.99.1"
    assert agent.why == "--buildkite-agent"
    # A bare name is looked up on PATH.
    assert choose("buildkite-agent").path == str(on_path)


def test_none_forces_the_stand_in_with_one_on_path(tmp_path: Path, monkeypatch) -> None:
    fake = fake_buildkite_agent(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    agent = choose("none")
    assert not agent.go
    assert agent.summary.endswith("stand-in for buildkite-agent (--buildkite-agent none)")


def _not_executable(tmp_path: Path) -> str:
    path = tmp_path / "buildkite-agent"
    path.write_text("#!/bin/sh\n")
    path.chmod(0o644)
    return str(path)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda tmp: str(tmp / "nope" / "buildkite-agent"), "does not exist"),
        (lambda tmp: str(tmp), "is not a file"),
        (_not_executable, "is not executable"),
        (lambda tmp: "buildkite-agent-nowhere", "no such program on PATH"),
        (lambda tmp: "  ", "empty"),
    ],
    ids=["missing", "directory", "not-executable", "not-on-path", "empty"],
)
def test_a_bad_path_is_exit_2_with_one_line(tmp_path: Path, capsys, make, says: str) -> None:
    option = make(tmp_path)
    if says == "is not executable":
        # Even root needs an execute bit somewhere for X_OK: 0o644 has none.
        assert not os.access(option, os.X_OK)
    with pytest.raises(AgentChoiceError, match=says):
        choose(option)

    def drill(*_args: object, **_kwargs: object) -> DrillReport:
        raise AssertionError("the drill must not start")

    assert main(["drill", "--buildkite-agent", option], run_local=drill) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fleetdrain: error: --buildkite-agent") and says in err
    assert len(err.splitlines()) == 1


def test_buildkite_agent_is_for_the_local_drill(capsys) -> None:
    assert main(["drill", "--aws", "--buildkite-agent", "none"]) == 2
    assert "--buildkite-agent is for the local drill" in capsys.readouterr().err


def test_a_version_that_cannot_be_read_is_unknown(tmp_path: Path) -> None:
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nsleep 5\n")
    slow.chmod(0o755)
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho 'flag provided but not defined: -version' >&2\nexit 1\n")
    failing.chmod(0o755)
    silent = fake_buildkite_agent(tmp_path / "silent", version_line="hello")
    assert agent_version(str(slow), timeout=0.3) == (None, "--version took more than 0.3s")
    version, why = agent_version(str(failing))
    assert version is None and why == "--version exited 1: flag provided but not defined: -version"
    assert agent_version(str(silent)) == (None, "--version said no version: hello")
    # The Go agent's own shape: "buildkite-agent version 3.135.0, build 12345".
    real_shape = fake_buildkite_agent(
        tmp_path / "shape", version_line="buildkite-agent version 3.135.0, build 12345"
    )
    assert agent_version(str(real_shape)) == ("3.135.0", None)
    agent = choose(str(failing))
    assert agent.go and agent.version is None and agent.label == "buildkite-agent (version unknown)"
    assert agent.summary.endswith(
        "--buildkite-agent, version unknown: --version exited 1: flag provided but not defined: "
        "-version)"
    )


def test_the_cli_hands_the_choice_to_the_drill(tmp_path: Path, monkeypatch) -> None:
    fake = fake_buildkite_agent(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    seen: list[WrappedAgent] = []

    def run_local(_names: object, **kwargs: object) -> DrillReport:
        agent = kwargs["wrapped_agent"]
        assert isinstance(agent, WrappedAgent)
        seen.append(agent)
        return DrillReport(started_at="2026-11-30T08:00:00+00:00", wrapped_agent=agent)

    assert main(["drill", "--scenario", "wrapped-stop-task"], run_local=run_local) == 0
    assert main(["drill", "--buildkite-agent", "none"], run_local=run_local) == 0
    assert [a.go for a in seen] == [True, False]
    assert seen[0].path == str(fake)


# ------------------------------------------------------------------ the report says which


def _report(agent: WrappedAgent) -> DrillReport:
    scenario = ScenarioReport(
        name="wrapped-stop-task", description="d", ok=True, jobs_run=1, passed=1, agent=agent.label
    )
    other = ScenarioReport(name="stop-task", description="d", ok=True, jobs_run=1, passed=1)
    return DrillReport(
        started_at="2026-11-30T08:00:00+00:00", wrapped_agent=agent, scenarios=[scenario, other]
    )


@pytest.mark.parametrize(
    "agent",
    [
        go_agent(),
        go_agent(version=None),
        stand_in("none on PATH; --buildkite-agent PATH to use one"),
    ],
    ids=["go", "go-version-unknown", "stand-in"],
)
def test_the_report_says_which_agent_ran(agent: WrappedAgent) -> None:
    report = _report(agent)
    out = StringIO()
    print_report(make_console(out), report)
    text = out.getvalue()
    assert agent.summary in " ".join(text.split()), "said (wrapped at 120 columns)"
    assert f"agent behind wrap: {agent.label}" in text
    assert text.count("agent behind wrap") == 1, "only the wrapped scenario ran it"
    html = render_html(report)
    assert agent.summary.replace("'", "&#x27;") in html
    assert f"agent behind wrap: {agent.label}" in html
    # JSON: the choice, its summary line, and each wrapped scenario's agent.
    data = json.loads(report.model_dump_json())
    assert data["wrapped_agent"]["summary"] == agent.summary
    assert data["wrapped_agent"]["program"] == agent.program
    assert data["scenarios"][0]["agent"] == agent.label and data["scenarios"][1]["agent"] is None
    back = DrillReport.model_validate_json(report.model_dump_json())
    assert back.wrapped_agent == agent and back.scenarios[0].agent == agent.label


def test_a_report_without_the_choice_still_reads() -> None:
    """Reports written before the choice existed (and --aws ones) have none: nothing shown."""
    report = DrillReport.model_validate({"started_at": "2026-11-30T08:00:00+00:00"})
    assert report.wrapped_agent is None
    out = StringIO()
    print_report(make_console(out), report)
    assert "wrapped scenarios" not in out.getvalue()
    assert "wrapped scenarios" not in render_html(report)


# ------------------------------------------------------------------ the contract with the Go agent


class _Runtime:
    def __init__(self) -> None:
        self.registered: list[TaskDefinition] = []

    def register(self, definition: TaskDefinition) -> None:
        self.registered.append(definition)


def _run(agent: WrappedAgent) -> tuple[Run, Coordinator, _Runtime]:
    """A Run on a fleet with only what ``wrapped_definition`` touches: the coordinator, the
    drill clock (10x: the default pace), the runtime it registers with."""
    coord = Coordinator(ping_interval=0.3, heartbeat_interval=0.5, job_status_interval=0.3)
    runtime = _Runtime()
    fleet = SimpleNamespace(coord=coord, runtime=runtime, clock=DrillClock(10.0))
    report = ScenarioReport(name="wrapped-stop-task", description="d")
    run = Run(fleet, report, wrapped_agent=agent)  # type: ignore[arg-type]
    return run, coord, runtime


def _task_environment(definition: TaskDefinition, tmp_path: Path) -> tuple[dict[str, str], str]:
    """The container's environment as the drill's task runtime gives it (what ECS and the
    task's secrets add included), and the task's ARN."""
    standin = EcsAgentStandIn(cluster="ci")
    standin.base_url = "http://127.0.0.1:9"
    task = standin.add_task("0123456789abcdef", family=WRAPPED_FAMILY, service_name=None)
    runtime = TaskRuntime(
        gaps=SimpleNamespace(),  # type: ignore[arg-type]
        ecs=None,
        cluster="ci",
        standin=standin,
        clock=DrillClock(10.0),
        coordinator_endpoint="http://127.0.0.1:8080/v3",
        registration_token="reg-token",
        workdir=tmp_path,
        lock=threading.RLock(),
        pid1=False,
    )
    env, _ports = runtime.task_environment(
        definition, "wrapped-stop-task-a1", task.task_id, "i-0abc"
    )
    return env, task.task_arn


def test_the_go_agent_is_started_with_only_what_it_reads(tmp_path: Path) -> None:
    agent = go_agent()
    run, coord, runtime = _run(agent)
    run.wrapped_definition()
    (definition,) = runtime.registered
    # wrap as PID 1, the Go agent behind it as its image runs it: `buildkite-agent start`,
    # every setting in the environment.
    assert definition.entry_point == WRAP_ENTRYPOINT
    assert definition.command == (agent.path, "start")
    env, arn = _task_environment(definition, tmp_path)
    buildkite = {k: v for k, v in env.items() if k.startswith("BUILDKITE_")}
    assert set(buildkite) <= set(GO_AGENT_START_READS), set(buildkite) - set(GO_AGENT_START_READS)
    assert set(buildkite) == set(GO_AGENT_ENV), "the module's table is what it sets"
    # Each value is of the type the Go agent parses.
    for name, value in buildkite.items():
        kind = GO_AGENT_START_READS[name]
        if kind == "int":
            int(value)  # cli.IntFlag: strconv.ParseInt
        assert "{" not in value, f"{name}={value}: a placeholder left in"
    assert buildkite["BUILDKITE_AGENT_ENDPOINT"].endswith("/v3")
    assert Path(buildkite["BUILDKITE_BUILD_PATH"]).is_relative_to(tmp_path)
    assert buildkite["BUILDKITE_AGENT_NAME"] == "wrapped-stop-task-a1"
    tags = buildkite["BUILDKITE_AGENT_TAGS"].split(",")
    assert f"ecs:task-arn={arn}" in tags, "the tag the controller finds agents by"
    assert "aws:instance-id=i-0abc" in tags and "queue=default" in tags
    assert arn.startswith("arn:aws:ecs:") and arn.endswith("/0123456789abcdef")
    # The cancel grace: whole seconds for the Go agent, rounded up; wrap keeps the drill's
    # exact one, in the variable it reads first.
    grace, _margin = run.margins()
    assert int(buildkite["BUILDKITE_CANCEL_GRACE_PERIOD"]) == go_cancel_grace(grace) >= grace
    assert float(env["FLEETDRAIN_CANCEL_GRACE_PERIOD"]) == pytest.approx(grace, abs=1e-3)
    assert _wrap_cancel_grace(env) == pytest.approx(grace, abs=1e-3)
    # The coordinator speaks whole seconds to it, and the scenario says which agent ran.
    assert coord.integer_intervals and coord.wire_seconds(0.3) == 1
    assert run.report.agent == "buildkite-agent 3.135.0"


def _wrap_cancel_grace(env: dict[str, str]) -> float:
    """The cancel grace period wrap takes from this environment."""
    saved = dict(os.environ)
    try:
        os.environ.update(env)
        parser = OneLineParser(prog="wrap")
        add_wrap_arguments(parser)
        return settings_from_args(parser.parse_args(["--", "true"])).cancel_grace_period
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_the_stand_in_runs_as_before(tmp_path: Path) -> None:
    run, coord, runtime = _run(stand_in("--buildkite-agent none"))
    run.wrapped_definition()
    (definition,) = runtime.registered
    assert definition.command == GO_AGENT_STAND_IN
    assert GO_AGENT_STAND_IN[0] == task_runtime.AGENT_PROGRAM == AGENT_PROGRAM
    env, _arn = _task_environment(definition, tmp_path)
    assert "BUILDKITE_AGENT_TAGS" not in env, "it tags itself from ECS and IMDS"
    assert not coord.integer_intervals, "our agent takes the drill's fractions"
    assert run.report.agent == "fleetdrain-agent start (stand-in)"


def test_the_go_agent_needs_integer_intervals_before_any_agent_registers() -> None:
    run, coord, _runtime = _run(go_agent())
    coord.register(coord.registration_token, RegisterRequest(name="early"))
    with pytest.raises(RuntimeError, match="integer intervals"):
        run.wrapped_definition()


def test_go_cancel_grace_is_whole_seconds_rounded_up() -> None:
    assert [go_cancel_grace(s) for s in (0.2, 1.0, 1.0000000001, 1.2, 9.5, 10.0)] == [
        1,
        1,
        1,
        2,
        10,
        10,
    ]
    command, env = wrapped_command(go_agent(), 1.5)
    assert command == ("/opt/bk/buildkite-agent", "start")
    assert dict(env)["BUILDKITE_CANCEL_GRACE_PERIOD"] == "2"


# ------------------------------------------------------------------ end to end


def _drill(tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], Path]:
    ok, why = pid_namespaces_available()
    if not ok:
        pytest.skip(f"the drill's agents run as PID 1: {why}")
    report_path = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetdrain.cli",
            "drill",
            "--scenario",
            "wrapped-stop-task",
            "--json",
            str(report_path),
            "--html",
            str(tmp_path / "drill.html"),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,  # the pace is calibrated: a busy machine runs it slower
        cwd=ROOT,
        env=env,
    )
    if result.returncode == 3:  # inconclusive: this machine was too slow to tell
        pytest.skip("the drill was inconclusive: " + result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout + result.stderr
    return result, report_path


@pytest.mark.slow
@pytest.mark.pid1
@pytest.mark.timeout(700)
def test_the_drill_runs_a_buildkite_agent_found_on_path(tmp_path: Path) -> None:
    """The drill's path with a ``buildkite-agent`` on PATH, end to end: the plumbing, not the
    Go binary. The one on PATH is :func:`fake_buildkite_agent` (fleetdrain's agent under the
    Go agent's name and settings), so what this shows is that the drill finds it, asks its
    version, starts it behind wrap as the Go agent is started (``start``, the Go agent's
    variables, the task's tags) and says so in its report; the Go agent itself is
    :func:`test_the_drill_runs_the_real_buildkite_agent`'s, where one is installed."""
    fake = fake_buildkite_agent(tmp_path / "bin")
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}"}
    result, report_path = _drill(tmp_path, env)
    report = DrillReport.read_json(report_path)
    agent = report.wrapped_agent
    assert agent is not None and agent.go and agent.path == str(fake)
    assert agent.version == FAKE_VERSION and agent.why == "found on PATH"
    (scenario,) = report.scenarios
    assert scenario.name == "wrapped-stop-task" and scenario.ok
    assert scenario.agent == f"buildkite-agent {FAKE_VERSION}"
    assert (scenario.jobs_run, scenario.passed, scenario.lost) == (1, 1, 0)
    # Said at the start, and in the report (lines wrap at 120 columns in a log).
    said = " ".join(result.stdout.split())
    assert f"wrapped scenarios run buildkite-agent {FAKE_VERSION} ({fake}" in said
    assert agent.summary in said
    assert agent.summary in (tmp_path / "drill.html").read_text(encoding="utf-8")
    # It was started as the Go agent is: `start`, its settings in its environment.
    calls = (fake.parent / "calls.log").read_text()
    assert "argv: start \n" in calls, calls
    started = dict(line.split("=", 1) for line in calls.splitlines() if "=" in line)
    assert set(started) <= set(GO_AGENT_START_READS), set(started) - set(GO_AGENT_START_READS)
    assert "ecs:task-arn=arn:aws:ecs:" in started["BUILDKITE_AGENT_TAGS"]
    int(started["BUILDKITE_CANCEL_GRACE_PERIOD"])


@pytest.mark.slow
@pytest.mark.pid1
@pytest.mark.timeout(700)
def test_the_drill_runs_the_real_buildkite_agent(tmp_path: Path) -> None:
    """The Go ``buildkite-agent`` itself behind wrap, against the embedded coordinator: runs
    where one is on PATH (none can be installed here)."""
    real = shutil.which("buildkite-agent")
    if real is None:
        pytest.skip(
            "buildkite-agent is not on PATH: the drill with the real Go agent runs where one is "
            "installed (tests cannot count on it; the fake-agent test covers the plumbing)"
        )
    _result, report_path = _drill(tmp_path, dict(os.environ))
    report = DrillReport.read_json(report_path)
    agent = report.wrapped_agent
    assert agent is not None and agent.go and agent.path == os.path.abspath(real)
    (scenario,) = report.scenarios
    assert scenario.agent is not None and scenario.agent.startswith("buildkite-agent ")
    assert scenario.ok and scenario.lost == 0, (scenario.cause, scenario.notes)
