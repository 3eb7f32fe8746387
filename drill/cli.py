"""``fleetdrain``: the operator's command (``drill`` today; ``status`` arrives with the
controller)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from agent import __version__


def _parser() -> argparse.ArgumentParser:
    from drill.agent_drill import SCENARIOS

    parser = argparse.ArgumentParser(
        prog="fleetdrain",
        description="Keep CI build agents on ECS from losing builds when the fleet shrinks.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    drill = sub.add_parser(
        "drill",
        help="replay the scenarios that lose builds, on this machine, and report",
        description="Runs real agent processes (as PID 1 in their own PID namespace where the "
        "machine allows) against the embedded coordinator on loopback, stops them the way ECS "
        "does, and reports jobs passed / retried / lost per scenario. Exit status 1 if any "
        "scenario lost a job. Scenarios so far: " + ", ".join(SCENARIOS) + " (scale-in, spot, "
        "rebalance and the Lambda controller join with the drill issue).",
    )
    drill.add_argument(
        "--scenario",
        action="append",
        choices=list(SCENARIOS),
        help="run only this scenario (repeatable; default: all)",
    )
    drill.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    drill.add_argument("--workdir", metavar="DIR", help="keep agent logs and builds here")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fleetdrain``."""
    ns = _parser().parse_args(argv)
    if ns.command == "drill":
        return _drill(ns)
    _parser().print_help(sys.stderr)
    return 2


def _drill(ns: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from drill.agent_drill import run_agent_drill

    # Piped output (CI logs) would otherwise be cut to 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 120)
    started = time.monotonic()
    workdir = Path(ns.workdir) if ns.workdir else None
    with console.status("starting the embedded coordinator and agents") as status:
        results, fleet = run_agent_drill(
            ns.scenario, workdir, progress=lambda msg: status.update(f"drill: {msg}")
        )
    if not fleet.pid1:
        console.print(f"[yellow]agents ran without a PID namespace: {fleet.pid1_reason}[/]")

    table = Table(title="fleetdrain drill", title_justify="left")
    columns = (
        "scenario",
        "jobs",
        "passed",
        "retried",
        "lost",
        "drain s",
        "job end to exit s",
        "max hb gap",
        "result",
    )
    for column in columns:
        table.add_column(
            column,
            justify="left" if column in ("scenario", "result") else "right",
            no_wrap=column != "result",
        )
    for r in results:
        gap = "-"
        if r.max_heartbeat_gap is not None and r.heartbeat_interval:
            gap = f"{r.max_heartbeat_gap / r.heartbeat_interval:.2f}x"
        table.add_row(
            r.name,
            str(r.jobs_run),
            str(r.passed),
            str(r.retried),
            f"[red]{r.lost}[/]" if r.lost else "0",
            "-" if r.drain_seconds is None else f"{r.drain_seconds:.2f}",
            "-" if r.exit_after_job_seconds is None else f"{r.exit_after_job_seconds:.2f}",
            gap,
            "[green]ok[/]" if r.ok else "[red]FAILED[/] " + "; ".join(r.notes),
        )
    console.print(table)
    for r in results:
        console.print(f"  [bold]{r.name}[/]: {r.description}")
    console.print("  max hb gap: longest time without a heartbeat, in heartbeat intervals")
    console.print(
        f"{sum(r.passed for r in results)} passed, {sum(r.lost for r in results)} lost, "
        f"in {time.monotonic() - started:.1f}s; agent logs under {fleet.workdir.parent}"
    )
    if ns.json:
        Path(ns.json).write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
