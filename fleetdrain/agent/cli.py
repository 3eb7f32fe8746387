"""``fleetdrain-agent``: ``start`` (the built-in agent), ``wrap`` (the PID-1 layer in front of
another agent) and ``health`` (container healthCheck).

Only parsing and dispatch: each command validates, sets up logging (:mod:`fleetdrain.agent.logs`)
and runs in its own module, imported once it is chosen. Imports go one way, from here to the
commands: ``wrap`` and ``health`` must not load ``start``'s settings (pydantic) or its HTTP
client (httpx).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from fleetdrain import __version__


def _parser() -> argparse.ArgumentParser:
    from fleetdrain.agent.settings import add_start_arguments

    parser = argparse.ArgumentParser(
        prog="fleetdrain-agent",
        description="A PID-1-safe build agent for ECS that drains without losing jobs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    start = sub.add_parser(
        "start",
        help="run the built-in Buildkite agent (as PID 1 in an ECS task)",
        description="Register, run jobs, and drain on SIGTERM without losing a job: heartbeats "
        "continue while draining, and a job that cannot finish before --stop-timeout is "
        "cancelled and reported (signal_reason agent_stop) before SIGKILL. With --watch-imds, "
        "a spot interruption notice (deadline: its time) or Auto Scaling lifecycle Terminated "
        "drains the same way, softly: afterwards the agent stays up, idle and healthy, until "
        "ECS stops the task.",
    )
    add_start_arguments(start)
    from fleetdrain.agent.wrap import DESCRIPTION as WRAP_DESCRIPTION
    from fleetdrain.agent.wrap import USAGE as WRAP_USAGE
    from fleetdrain.agent.wrap_settings import add_wrap_arguments

    wrap = sub.add_parser(
        "wrap",
        help="run another agent (CMD) as the child of the PID-1 layer: wrap [options] -- CMD",
        usage=WRAP_USAGE,
        description=WRAP_DESCRIPTION,
    )
    add_wrap_arguments(wrap)
    health = sub.add_parser(
        "health",
        help="exit 0 if the local agent is healthy (for the ECS container healthCheck)",
        description=HEALTH_DESCRIPTION,
    )
    add_health_arguments(health)
    return parser


HEALTH_DESCRIPTION = (
    "Exit 0 if the agent at ADDR is healthy, 1 otherwise. Ours (start, wrap): GET /health, 200 "
    "or 503. The Go agent's --health-check-addr (it has no /health): GET /, then /status.json, "
    "200 while it runs."
)
#: Where ``health`` looks when no --addr is given, first match wins. wrap's own variable comes
#: first: in a wrapped container BUILDKITE_AGENT_HEALTH_CHECK_ADDR is the wrapped Go agent's
#: server, which knows nothing of the drain (a holding wrapper, the deadline).
HEALTH_ADDR_ENV = ("FLEETDRAIN_HEALTH_CHECK_ADDR", "BUILDKITE_AGENT_HEALTH_CHECK_ADDR")
DEFAULT_HEALTH_ADDR = "127.0.0.1:3901"


def health_addr_default(environ: Mapping[str, str] | None = None) -> str:
    """The address ``health`` checks without --addr: see :data:`HEALTH_ADDR_ENV`."""
    env = os.environ if environ is None else environ
    for name in HEALTH_ADDR_ENV:
        value = (env.get(name) or "").strip()
        if value:
            return value
    return DEFAULT_HEALTH_ADDR


def add_health_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``health`` flags."""
    parser.add_argument(
        "--addr",
        default=health_addr_default(),
        help="the agent's --health-check-addr, ours or the Go agent's "
        "[$FLEETDRAIN_HEALTH_CHECK_ADDR, then $BUILDKITE_AGENT_HEALTH_CHECK_ADDR] "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=2.0, help="seconds for the whole check (default 2)"
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fleetdrain-agent``."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] == ["wrap"]:
        # Straight to wrap: it runs as PID 1 in front of another agent, and the full parser
        # would load start's settings (pydantic: ~11 MB and ~60 ms) for nothing.
        from fleetdrain.agent.wrap import main as wrap_main

        return wrap_main(args[1:])
    if args[:1] == ["health"]:
        # The container healthCheck runs this every few seconds: no pydantic, no httpx.
        health_parser = argparse.ArgumentParser(
            prog="fleetdrain-agent health", description=HEALTH_DESCRIPTION
        )
        add_health_arguments(health_parser)
        return _health(health_parser.parse_args(args[1:]))
    parser = _parser()
    ns = parser.parse_args(args)
    if ns.command == "health":
        return _health(ns)
    if ns.command == "wrap":
        from fleetdrain.agent.wrap import main_from_namespace

        return main_from_namespace(ns)
    if ns.command == "start":
        from fleetdrain.agent.start import main_from_namespace as start_main

        return start_main(ns)
    parser.print_help(sys.stderr)
    return 2


def _health(ns: argparse.Namespace) -> int:
    from fleetdrain.agent.health import check

    return check(ns.addr, timeout=ns.timeout)


if __name__ == "__main__":
    sys.exit(main())
