"""``fleetdrain``: the operator's command: ``drill`` (local or ``--aws``) and ``status``."""

from __future__ import annotations

import argparse
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


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a number > 0: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from fleetdrain.drill.runner import SCENARIOS

    parser = argparse.ArgumentParser(
        prog="fleetdrain",
        description="Keep CI build agents on ECS from losing builds when the fleet shrinks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    scenario_list = "; ".join(
        f"{name} ({kind}): {desc}" for name, (kind, desc) in SCENARIOS.items()
    )
    drill = sub.add_parser(
        "drill",
        help="replay the scenarios that lose builds (on this machine, or --aws) and report",
        description="Runs the game day on this machine: real agent processes (as PID 1 in their "
        "own PID namespace where the machine allows) against the embedded coordinator on "
        "loopback, stopped the way ECS stops them, and reports per scenario jobs run, passed, "
        "retried and lost, the longest drain, the lifecycle hook's completion latency and the "
        "longest heartbeat gap. 'after' scenarios are fleetdrain's behaviour and must lose "
        "nothing; 'before' cases are what fleets run today and must show their loss. Exit "
        "status: 0 when both hold, 1 when not, 2 on bad input or when the drill could not run. "
        f"Scenarios: {scenario_list}. With --aws: the same game day against a real deployment "
        "(see the --aws options).",
    )
    drill.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        metavar="NAME",
        help="run only this scenario (repeatable; default: all): " + ", ".join(SCENARIOS),
    )
    drill.add_argument(
        "--time-scale",
        type=_positive_float,
        default=1.0,
        metavar="X",
        help="pace of drill time against the default, which already runs AWS's clock 10x fast "
        "(stopTimeout's 120 s, spot's 120 s notice, hook heartbeats and budgets take a tenth "
        "of that in wall time); X multiplies the wall time taken (default 1.0; 0.5 is twice as "
        "fast, 2 twice as slow: try 2 on a loaded machine)",
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
    parser = _parser()
    ns = parser.parse_args(argv)
    try:
        if ns.command == "drill":
            return _drill(ns, run_local)
        if ns.command == "status":
            from fleetdrain.ops.status import run_status

            return run_status(ns)
    except UsageError as exc:
        print(f"fleetdrain: error: {exc}", file=sys.stderr)
        return 2
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

        names = ns.scenario or list(SCENARIOS)
        workdir = Path(ns.workdir) if ns.workdir else None
        with ProgressView(console, scenarios=names) as view:
            report = run_local(
                ns.scenario, workdir=workdir, time_scale=ns.time_scale, progress=view.update
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
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
