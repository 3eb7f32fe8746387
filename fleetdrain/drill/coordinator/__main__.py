"""``python -m fleetdrain.drill.coordinator``: run the embedded coordinator standalone until
Ctrl-C."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from types import FrameType

from fleetdrain.drill.coordinator.rate_limit import (
    DEFAULT_REST_RATE_LIMIT,
    DEFAULT_REST_RATE_WINDOW,
)
from fleetdrain.drill.coordinator.records import RetryRule
from fleetdrain.drill.coordinator.server import CoordinatorServer
from fleetdrain.drill.coordinator.state import Coordinator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line of the standalone coordinator."""
    p = argparse.ArgumentParser(
        prog="python -m fleetdrain.drill.coordinator",
        description="Serve the embedded Buildkite-compatible coordinator on loopback.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--registration-token", default="reg-token")
    p.add_argument("--api-token", default="api-token")
    p.add_argument("--org", default="fleetdrain")
    p.add_argument("--ping-interval", type=float, default=1.0)
    p.add_argument("--heartbeat-interval", type=float, default=5.0)
    p.add_argument("--job-status-interval", type=float, default=1.0)
    p.add_argument("--lost-agent-timeout", type=float, default=180.0)
    p.add_argument(
        "--integer-intervals",
        action="store_true",
        help="send every interval as whole seconds, rounded up (the Go agent takes no fractions)",
    )
    p.add_argument(
        "--rest-rate-limit",
        type=int,
        default=DEFAULT_REST_RATE_LIMIT,
        metavar="N",
        help="REST requests a window for the organization, as Buildkite limits them (default "
        f"{DEFAULT_REST_RATE_LIMIT}); beyond it 429 with RateLimit-* headers; 0: no limit",
    )
    p.add_argument(
        "--rest-rate-window",
        type=float,
        default=DEFAULT_REST_RATE_WINDOW,
        metavar="SECONDS",
        help=f"the REST rate limit's window (default {DEFAULT_REST_RATE_WINDOW:g} s)",
    )
    p.add_argument(
        "--job",
        action="append",
        default=[],
        metavar="CMD",
        help="enqueue a job running CMD (repeatable); retried on -1 and agent_stop, twice each",
    )
    p.add_argument("--queue", default=None, help="target jobs at agents with queue=QUEUE")
    return p.parse_args(argv)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Run until interrupted; print the endpoints, tokens and, at the end, each step's outcome."""
    args = parse_args(argv)
    # Explicit handlers: a process started in the background inherits SIGINT ignored, and
    # SIGTERM (what service managers send) should stop it just as cleanly.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    coord = Coordinator(
        registration_token=args.registration_token,
        api_token=args.api_token,
        org=args.org,
        ping_interval=args.ping_interval,
        heartbeat_interval=args.heartbeat_interval,
        job_status_interval=args.job_status_interval,
        lost_agent_timeout=args.lost_agent_timeout,
        integer_intervals=args.integer_intervals,
        rest_rate_limit=args.rest_rate_limit or None,
        rest_rate_window=args.rest_rate_window,
    )
    rules = [f"queue={args.queue}"] if args.queue else None
    for n, command in enumerate(args.job, start=1):
        coord.add_job(
            command,
            key=f"job-{n}",
            agent_query_rules=rules,
            retry=[RetryRule(exit_status="-1", limit=2), RetryRule(signal_reason="agent_stop")],
        )
    server = CoordinatorServer(coord, host=args.host, port=args.port)
    try:
        server.start()
        print(f"coordinator:        {server.url}")
        print(f"agent endpoint:     {server.agent_endpoint}")
        print(f"registration token: {coord.registration_token}")
        print(f"REST endpoint:      {server.rest_endpoint}")
        print(f"API token:          {coord.api_token}")
        print(f"jobs queued:        {len(args.job)}  (Ctrl-C to stop)", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    for key, step in coord.builds().items():
        print(f"{key}: {step.outcome} ({len(step.attempts)} attempt(s))")
    rate = coord.rest_rate.stats()
    print(
        f"REST requests: {rate.requests}, 429s: {rate.limited}, "
        f"the most in one window: {rate.window_peak}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
