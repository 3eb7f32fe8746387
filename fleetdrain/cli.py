"""``fleetdrain``: the operator's command: ``drill`` (local or ``--aws``) and ``status``."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fleetdrain import __version__

if TYPE_CHECKING:
    from fleetdrain.drill.report.model import DrillReport

#: ``run_local_drill``'s shape; injectable so that the CLI's own logic is testable quickly.
LocalRunner = Callable[..., "DrillReport"]


class UsageError(Exception):
    """Bad input: reported as one line, exit status 2."""


#: What each command imports beyond the base install, and the extra that brings it.
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "drill": ("drill", ("boto3", "moto", "samtranslator", "aws_lambda_powertools", "yaml")),
    "drill --aws": ("drill", ("boto3",)),
    "status": ("controller", ("boto3",)),
}


def missing_extra(command: str) -> str | None:
    """The one line to print when ``command`` (a key of :data:`EXTRAS`) cannot import what it
    needs: which extra to install. None when everything imports."""
    extra, modules = EXTRAS[command]
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            return (
                f"fleetdrain {command}: needs the {extra} extra: "
                f"pip install 'fleetdrain[{extra}]' (no module named {exc.name or module!r})"
            )
    return None


def _time_scale(text: str) -> float | None:
    """``--time-scale``: a number > 0, or ``auto`` (None: calibrated)."""
    return None if text.strip().lower() == "auto" else _positive_float(text)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from fleetdrain.drill.runner import (
        ALL_SCENARIOS,
        SCENARIOS,
        SEQUENCE_SCENARIOS,
        STORM_SCENARIOS,
    )

    parser = argparse.ArgumentParser(
        prog="fleetdrain",
        description="Keep CI build agents on ECS from losing builds when the fleet shrinks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    scenario_list = "; ".join(
        f"{name} ({kind}): {desc}" for name, (kind, desc) in ALL_SCENARIOS.items()
    )
    drill = sub.add_parser(
        "drill",
        help="replay the scenarios that lose builds (on this machine, or --aws) and report",
        description="Runs the game day on this machine: real agent processes (as PID 1 in their "
        "own PID namespace where the machine allows) against the embedded coordinator on "
        "loopback, stopped the way ECS stops them, and reports per scenario jobs run, passed, "
        "retried and lost, the longest drain, the lifecycle hook's completion latency and the "
        "longest heartbeat gap. 'after' scenarios are fleetdrain's behaviour and must lose "
        "nothing; 'before' cases are what fleets run today and must show their loss. A "
        "scenario that runs out of time, or fails without losing a build on a machine too "
        "slow for it, is inconclusive (never passed, never lost), with the --time-scale to "
        "retry at. Exit status: 0 when every scenario passed, 1 when one failed, 3 when none "
        "failed but one was inconclusive, 2 on bad input or when the drill could not run. "
        f"Scenarios: {scenario_list}. With --aws: the same game day against a real deployment "
        "(see the --aws options).",
    )
    drill.add_argument(
        "--scenario",
        action="append",
        choices=list(ALL_SCENARIOS),
        metavar="NAME",
        help="run only this scenario (repeatable; default: all of "
        + ", ".join(SCENARIOS)
        + "; by name only, the event sequences "
        + ", ".join(SEQUENCE_SCENARIOS)
        + " and "
        + ", ".join(STORM_SCENARIOS)
        + ")",
    )
    drill.add_argument(
        "--time-scale",
        type=_time_scale,
        default=None,
        metavar="X",
        help="the pace: at 1 AWS's clock runs 10x fast (stopTimeout's 120 s, spot's 120 s "
        "notice, hook heartbeats and budgets take a tenth of that in wall time); X multiplies "
        "the wall time taken (0.5 is twice as fast, 2 twice as slow). Default 'auto': measured "
        "at the start (the load, the CPU a process gets), 1 on an idle machine, slower on a "
        "busy one, and printed ('pace: 2x (load 2.1 on 2 cores, ...)')",
    )
    drill.add_argument(
        "--concurrency",
        type=_positive_int,
        default=None,
        metavar="N",
        help="run at most N scenarios side by side (default: as many as the machine has room "
        "for, from the same measurement)",
    )
    drill.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    drill.add_argument(
        "--html",
        metavar="FILE",
        help="also write a self-contained HTML report with a timeline per scenario to FILE",
    )
    drill.add_argument(
        "--workdir", metavar="DIR", help="keep agent logs and builds here (default: a temp dir)"
    )
    drill.add_argument(
        "--buildkite-agent",
        metavar="PATH",
        help="the Go buildkite-agent the wrapped scenarios run behind wrap (a path, or a name "
        "on PATH; 'none': fleetdrain-agent start as its stand-in). Default: buildkite-agent "
        "if it is on PATH, else the stand-in. The choice (and the binary's --version) is "
        "printed at the start and kept in the report; every other scenario runs fleetdrain's "
        "agent",
    )
    aws = drill.add_argument_group(
        "--aws: the game day against a real deployment",
        "Starts a build of --pipeline through the coordinator's REST API, waits until one of "
        "its jobs runs on an agent, finds that agent's ECS task (its ecs:task-arn tag), stops "
        "it (or terminates its instance through Auto Scaling), waits for the build, and passes "
        "only if the build passed. AWS credentials and region come from the usual boto3 "
        "sources (AWS_PROFILE, AWS_REGION, AWS_ENDPOINT_URL, ...).",
    )
    aws.add_argument("--aws", action="store_true", help="run against real AWS (see above)")
    aws.add_argument("--cluster", help="the ECS cluster the agents run in")
    aws.add_argument("--service", help="the agents' ECS service (checked: the task must be in it)")
    aws.add_argument(
        "--api-url",
        default=os.environ.get("FLEETDRAIN_API_URL", "https://api.buildkite.com"),
        help="the coordinator's REST base URL [$FLEETDRAIN_API_URL] (default %(default)s)",
    )
    aws.add_argument(
        "--org",
        default=os.environ.get("FLEETDRAIN_ORG"),
        help="organization slug [$FLEETDRAIN_ORG]",
    )
    aws.add_argument(
        "--token-secret-arn",
        help="read the REST API token from this Secrets Manager secret (the token, or JSON with "
        "a 'token' key) instead of $FLEETDRAIN_API_TOKEN",
    )
    aws.add_argument(
        "--pipeline",
        help="slug of the pipeline to build (its job must run long enough to be stopped under it)",
    )
    aws.add_argument("--branch", default="main", help="branch to build (default %(default)s)")
    aws.add_argument("--commit", default="HEAD", help="commit to build (default %(default)s)")
    aws.add_argument(
        "--kill",
        choices=("task", "instance"),
        default="task",
        help="task: ECS StopTask on the job's agent task (default); instance: "
        "TerminateInstanceInAutoScalingGroup on its container instance",
    )
    aws.add_argument("--region", help="AWS region (default: boto3's)")
    aws.add_argument(
        "--table",
        default=os.environ.get("FLEETDRAIN_TABLE"),
        help="the drain table, for the drain's timeline [$FLEETDRAIN_TABLE]",
    )
    aws.add_argument(
        "--timeout",
        type=_positive_float,
        default=1800.0,
        metavar="SECONDS",
        help="give up on the build after this long (default %(default)s)",
    )
    aws.add_argument(
        "--poll",
        type=_positive_float,
        default=5.0,
        metavar="SECONDS",
        help="poll the build, task and table this often (default %(default)s)",
    )

    status = sub.add_parser(
        "status",
        help="list the drains in flight (from the drain table)",
        description="Lists drains not yet done from the controller's DynamoDB drain table: "
        "instance, phase, reasons, when it started, when it forces (force_at, spot deadline), "
        "agents paused/stopped, tasks left and busy (from ECS), lifecycle hook state. Works "
        "against AWS or any endpoint boto3 is pointed at (AWS_ENDPOINT_URL, e.g. a moto "
        "server).",
    )
    status.add_argument(
        "--table",
        default=os.environ.get("FLEETDRAIN_TABLE"),
        help="the drain table's name [$FLEETDRAIN_TABLE] (the stack's DrainTableName output)",
    )
    status.add_argument("--region", help="AWS region (default: boto3's)")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument(
        "--all", action="store_true", help="include finished drains (phase done) too"
    )
    status.add_argument(
        "--no-ecs",
        dest="ecs",
        action="store_false",
        help="do not ask ECS how many tasks are left on each instance and how many are busy "
        "(task scale-in protection on)",
    )
    return parser


def main(argv: list[str] | None = None, *, run_local: LocalRunner | None = None) -> int:
    """Entry point of ``fleetdrain``; ``run_local`` replaces ``run_local_drill`` (tests)."""
    from fleetdrain.drill.runner import DrillInterrupted

    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.command in ("drill", "status"):
        command = "drill --aws" if ns.command == "drill" and ns.aws else ns.command
        # An injected local drill (tests) needs none of the drill's own imports.
        problem = None if command == "drill" and run_local else missing_extra(command)
        if problem is not None:
            print(problem, file=sys.stderr)
            return 2
    try:
        if ns.command == "drill":
            return _drill(ns, run_local)
        if ns.command == "status":
            from fleetdrain.ops.status import run_status

            return run_status(ns)
    except UsageError as exc:
        print(f"fleetdrain: error: {exc}", file=sys.stderr)
        return 2
    except DrillInterrupted as exc:
        # The local drill, stopped by SIGINT or SIGTERM: every scenario it ran was stopped.
        print(f"fleetdrain drill: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("fleetdrain: interrupted", file=sys.stderr)
        return 130
    parser.print_help(sys.stderr)
    return 2


def _check_output_paths(ns: argparse.Namespace) -> None:
    # Find out now, not after a two-minute drill, that the report cannot be written.
    for flag in ("json", "html"):
        value = getattr(ns, flag)
        if value is None:
            continue
        parent = Path(value).resolve().parent
        if not parent.is_dir():
            raise UsageError(f"--{flag} {value}: directory {parent} does not exist")
        if Path(value).is_dir():
            raise UsageError(f"--{flag} {value} is a directory")


def _drill(ns: argparse.Namespace, run_local: LocalRunner | None) -> int:
    from fleetdrain.drill.report.terminal import (
        ProgressView,
        make_console,
        print_report,
        print_timeline,
    )

    _check_output_paths(ns)
    console = make_console()
    if ns.aws:
        if ns.scenario:
            raise UsageError("--scenario is for the local drill; --aws runs one game day")
        if ns.buildkite_agent is not None:
            raise UsageError(
                "--buildkite-agent is for the local drill; --aws runs against your own agents"
            )
        from fleetdrain.ops.game_day import GameDayError, config_from_args, run_game_day

        try:
            config = config_from_args(ns)
            with ProgressView(console, title="fleetdrain drill --aws") as view:
                report = run_game_day(config, progress=view.update)
        except GameDayError as exc:
            print(f"fleetdrain: error: {exc}", file=sys.stderr)
            return 2
        # The game day's evidence: build, task, agent and drain-table changes, in order.
        for scenario in report.scenarios:
            print_timeline(console, scenario)
        extra: list[str] = []
    else:
        if run_local is None:
            from fleetdrain.drill.runner import run_local_drill

            run_local = run_local_drill
        from fleetdrain.drill.runner import SCENARIOS
        from fleetdrain.drill.wrapped_agent import AgentChoiceError, choose

        try:
            wrapped_agent = choose(ns.buildkite_agent)
        except AgentChoiceError as exc:
            raise UsageError(str(exc)) from None
        names = ns.scenario or list(SCENARIOS)
        workdir = Path(ns.workdir) if ns.workdir else None
        with ProgressView(console, scenarios=names) as view:
            report = run_local(
                ns.scenario,
                workdir=workdir,
                time_scale=ns.time_scale,
                concurrency=ns.concurrency,
                progress=view.update,
                wrapped_agent=wrapped_agent,
            )
        extra = [f"  agent logs and builds under {workdir}"] if workdir else []
    if ns.json:
        report.write_json(Path(ns.json))
        extra.append(f"  JSON report: {ns.json}")
    if ns.html:
        from fleetdrain.drill.report.html import write_html

        write_html(report, Path(ns.html))
        extra.append(f"  HTML timeline: {ns.html}")
    print_report(console, report, extra=extra)
    # 0 passed, 1 failed, 3 inconclusive (nothing failed; a scenario could not tell).
    return report.exit_status


if __name__ == "__main__":
    sys.exit(main())
