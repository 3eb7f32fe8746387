"""``fleetdrain-agent wrap -- CMD...``: the PID-1 layer in front of any worker.

The :class:`fleetdrain.agent.host.Host` that ``start`` uses too (supervisor, task protection,
health server, IMDS watch, teardown), around :class:`fleetdrain.agent.external.ExternalWorker`
in place of the built-in Buildkite worker. What differs from ``start``:

- SIGHUP, SIGUSR1, SIGUSR2 and SIGWINCH are forwarded to the worker unchanged;
- the exit status is the worker's own (128 + n when signal n ended it), within half a second
  of its exit: what the worker leaves behind gets :data:`EXIT_GRACE` after a SIGTERM, turning
  protection off gets :data:`RELEASE_BUDGET`;
- health is "the command is starting or running" (or the host's hold after a soft drain).

Order matters at start-up: signal handlers, then the worker's exec, then everything else. As
PID 1 a signal without a handler is dropped, and the worker should not wait for our HTTP
client to load: ECS and IMDS support is imported only once the worker runs, and only if asked
(the host sees to both). Nothing here imports httpx or pydantic.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING, NoReturn

from fleetdrain.agent.busy import ChildrenBusy, ProbeBusy
from fleetdrain.agent.external import ExternalWorker
from fleetdrain.agent.host import Host, HostError, HostSettings
from fleetdrain.agent.logs import configure_logging
from fleetdrain.agent.reaper import Reaper
from fleetdrain.agent.wrap_settings import (
    OneLineParser,
    WrapSettings,
    WrapUsageError,
    add_wrap_arguments,
    settings_from_args,
)

if TYPE_CHECKING:
    import argparse

#: Forwarded to the worker unchanged (docs/design.md, "Signals").
FORWARDED = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGWINCH)
#: What the worker leaves running gets this long after SIGTERM before SIGKILL, so that we exit
#: within half a second of the worker's own exit.
EXIT_GRACE = 0.3
#: Turning protection off on the way out is a courtesy (the task is stopping, which ends it):
#: it must not hold up the exit.
RELEASE_BUDGET = 0.15

USAGE = "%(prog)s [options] -- CMD [ARGS...]"
DESCRIPTION = (
    "Run CMD as a child with every drain guarantee that needs no protocol: signals forwarded, "
    "orphans reaped, the exit status passed through, the force signal (the Go agent then "
    "cancels and reports its job as agent_stop) before the --stop-timeout deadline, ECS task "
    "scale-in protection while busy, /health and /status, and IMDS notices."
)


async def run_wrap(settings: WrapSettings) -> int:
    """Run the worker under the PID-1 layer; the exit status for this process."""
    reaper = Reaper()
    host: Host
    probe = ProbeBusy(settings.busy_probe) if settings.busy_probe else None
    worker = ExternalWorker(
        settings.command,
        reaper,
        graceful_signal=settings.graceful_signal,
        force_signal=settings.force_signal,
        busy_source=probe,
        busy_interval=settings.busy_interval,
        on_busy_change=lambda busy: host.busy_changed(busy),
    )
    if probe is not None:
        # Until the probe first answers (the Go agent serves it only once registered), busy
        # is the worker's child processes: a probe that never comes up must not hold task
        # protection on forever, and a job that runs meanwhile still counts.
        probe.before_serving = ChildrenBusy(lambda: worker.pid)
    host = Host(
        worker,
        reaper,
        HostSettings.of(settings, exit_grace=EXIT_GRACE, release_budget=RELEASE_BUDGET),
        health=lambda: worker.state == "starting" or worker.running(),
        forwarded=FORWARDED,
        forward=worker.forward,
        # At the deadline a worker that still runs gets the force signal, busy or not: the
        # busy source may be down, and an idle worker loses nothing by it.
        force_if=worker.running,
    )
    try:
        return await host.run()
    except HostError as exc:
        raise WrapUsageError(str(exc)) from None


def build_parser(prog: str = "fleetdrain-agent wrap") -> argparse.ArgumentParser:
    """The ``wrap`` parser on its own (the CLI's fast path uses it)."""
    parser = OneLineParser(prog=prog, usage=USAGE, description=DESCRIPTION)
    add_wrap_arguments(parser)
    return parser


def main_from_namespace(ns: argparse.Namespace) -> int:
    """Validate, configure logging and run; bad input is one line on stderr and exit 2/127."""
    try:
        settings = settings_from_args(ns)
    except WrapUsageError as exc:
        print(f"fleetdrain-agent wrap: {exc}", file=sys.stderr)
        return exc.status
    configure_logging(settings.log_level)
    try:
        code = asyncio.run(run_wrap(settings))
    except WrapUsageError as exc:
        print(f"fleetdrain-agent wrap: {exc}", file=sys.stderr)
        return exc.status
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's teardown: everything is closed and reaped by now, and
    tearing down the modules would add ~40 ms between the worker's exit and ours."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str]) -> int:
    """``fleetdrain-agent wrap ARGV...``."""
    return main_from_namespace(build_parser().parse_args(argv))
