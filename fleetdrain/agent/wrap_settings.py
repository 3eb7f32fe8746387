"""Settings of ``fleetdrain-agent wrap``: flags, each also from a ``FLEETDRAIN_*`` variable.

Options that mean the same thing to the wrapped Go agent read its ``BUILDKITE_*`` variable too
(the cancel grace period, the log level and ``$BUILDKITE_AGENT_DEBUG``), with the Go agent's
meaning (every one of its log levels; an unknown one warns, it never stops wrap), so one task
definition setting serves both. The
health address does not: ``BUILDKITE_AGENT_HEALTH_CHECK_ADDR`` is the wrapped agent's own
server, which ours must not collide with.

Plain dataclasses, not pydantic: the wrapper stays small (see :mod:`fleetdrain.agent.minihttp`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
from dataclasses import dataclass
from typing import NoReturn

from fleetdrain.agent.busy import check_probe_url
from fleetdrain.agent.external import EXIT_CANNOT_RUN, EXIT_NOT_FOUND
from fleetdrain.agent.health import split_addr
from fleetdrain.agent.logs import DEFAULT_LOG_LEVEL
from fleetdrain.agent.reaper import parse_signal

#: The exit status for bad input (as argparse uses it).
EXIT_USAGE = EXIT_CANNOT_RUN


class WrapUsageError(Exception):
    """Bad input: one line for stderr, and the exit status to leave with."""

    def __init__(self, message: str, status: int = EXIT_USAGE):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class WrapSettings:
    """Validated settings for ``wrap``."""

    command: list[str]
    stop_timeout: float = 120.0
    cancel_grace_period: float = 10.0
    drain_margin: float = 5.0
    graceful_signal: signal.Signals = signal.SIGTERM
    force_signal: signal.Signals = signal.SIGQUIT
    busy_probe: str | None = None
    busy_interval: float = 1.0
    task_protection: bool = False
    health_check_addr: str | None = None
    watch_imds: bool = False
    imds_poll_interval: float = 5.0
    #: A Go agent level name (:mod:`fleetdrain.agent.logs`).
    log_level: str = DEFAULT_LOG_LEVEL


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports bad input in one line (``prog: message``) and exits 2."""

    def error(self, message: str) -> NoReturn:
        """Print ``prog: message`` and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def _env(*names: str, default: str | None = None) -> str | None:
    for name in names:
        value = os.environ.get(name)
        if value is not None and value.strip() != "":
            return value
    return default


def _env_bool(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value.strip() == "":
        return None
    return value.strip().lower() in ("1", "true", "yes", "on")


def add_wrap_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``wrap`` flags (defaults from the environment) and the command after ``--``."""
    a = parser.add_argument
    a(
        "--stop-timeout",
        default=_env("FLEETDRAIN_STOP_TIMEOUT", default="120"),
        help="seconds ECS allows between SIGTERM and SIGKILL: the task definition's stopTimeout "
        "[$FLEETDRAIN_STOP_TIMEOUT] (default %(default)s)",
    )
    a(
        "--cancel-grace-period",
        default=_env(
            "FLEETDRAIN_CANCEL_GRACE_PERIOD", "BUILDKITE_CANCEL_GRACE_PERIOD", default="10"
        ),
        help="seconds the worker needs after the force signal to cancel and report its job "
        "[$FLEETDRAIN_CANCEL_GRACE_PERIOD, $BUILDKITE_CANCEL_GRACE_PERIOD] (default %(default)s)",
    )
    a(
        "--drain-margin",
        default=_env("FLEETDRAIN_DRAIN_MARGIN", default="5"),
        help="seconds kept spare: the force signal goes at deadline - cancel grace - margin "
        "[$FLEETDRAIN_DRAIN_MARGIN] (default %(default)s)",
    )
    a(
        "--graceful-signal",
        default=_env("FLEETDRAIN_GRACEFUL_SIGNAL", default="SIGTERM"),
        help="sent to the worker on the first SIGTERM/SIGINT or a drain notice "
        "[$FLEETDRAIN_GRACEFUL_SIGNAL] (default %(default)s)",
    )
    a(
        "--force-signal",
        default=_env("FLEETDRAIN_FORCE_SIGNAL", default="SIGQUIT"),
        help="sent to the worker on the second signal, SIGQUIT, or at the deadline "
        "[$FLEETDRAIN_FORCE_SIGNAL] (default %(default)s)",
    )
    a(
        "--busy-probe",
        metavar="URL",
        default=_env("FLEETDRAIN_BUSY_PROBE"),
        help="busy from this URL: JSON aggregate_status busy/idle (the Go agent's "
        "/status.json), else 200 = busy; down counts as busy once it has answered. Until it "
        "first answers (not serving yet: the Go agent serves it only once registered), and "
        "without it: busy while the worker has child processes [$FLEETDRAIN_BUSY_PROBE]",
    )
    a(
        "--busy-interval",
        default=_env("FLEETDRAIN_BUSY_INTERVAL", default="1"),
        help="seconds between busy checks [$FLEETDRAIN_BUSY_INTERVAL] (default %(default)s)",
    )
    protection = _env_bool("FLEETDRAIN_TASK_PROTECTION")
    a(
        "--task-protection",
        action=argparse.BooleanOptionalAction,
        default=protection if protection is not None else bool(os.environ.get("ECS_AGENT_URI")),
        help="ECS task scale-in protection while the worker is busy "
        "[$FLEETDRAIN_TASK_PROTECTION] (default: on when $ECS_AGENT_URI is set)",
    )
    a(
        "--health-check-addr",
        default=_env("FLEETDRAIN_HEALTH_CHECK_ADDR"),
        help="host:port for our /health and /status; not the wrapped agent's address "
        "[$FLEETDRAIN_HEALTH_CHECK_ADDR]",
    )
    a(
        "--watch-imds",
        action=argparse.BooleanOptionalAction,
        default=bool(_env_bool("FLEETDRAIN_WATCH_IMDS")),
        help="drain softly on a spot interruption notice (deadline: its time) or on Auto "
        "Scaling target-lifecycle-state Terminated (no deadline), then stay up, idle, after "
        "the worker exits until the task is stopped [$FLEETDRAIN_WATCH_IMDS]",
    )
    a(
        "--imds-poll-interval",
        default=_env("FLEETDRAIN_IMDS_POLL_INTERVAL", default="5"),
        help="seconds between IMDS polls [$FLEETDRAIN_IMDS_POLL_INTERVAL] (default %(default)s)",
    )
    a(
        "--log-level",
        default=_env("FLEETDRAIN_LOG_LEVEL"),
        help="log level, as the Go agent's: debug, info, notice, warn, error, fatal; an unknown "
        "one is logged as a warning and notice is used [$FLEETDRAIN_LOG_LEVEL, then debug if "
        "$BUILDKITE_AGENT_DEBUG is true, then $BUILDKITE_AGENT_LOG_LEVEL] (default notice)",
    )
    a(
        "command",
        nargs=argparse.REMAINDER,
        metavar="-- CMD [ARGS...]",
        help="the worker to run, e.g. -- buildkite-agent start",
    )


def _seconds(name: str, text: str, *, positive: bool = True) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise WrapUsageError(f"{name}: not a number of seconds: {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise WrapUsageError(f"{name}: not a number of seconds: {text!r}")
    if value < 0 or (positive and value == 0):
        raise WrapUsageError(f"{name} must be {'above' if positive else 'at least'} 0: {text}")
    return value


def _signal(name: str, text: str) -> signal.Signals:
    try:
        return parse_signal(text)
    except ValueError:
        raise WrapUsageError(f"{name}: unknown signal {text!r}") from None


def check_command(command: list[str]) -> None:
    """Raise :class:`WrapUsageError` (127 or 2) if ``command`` certainly cannot be executed.

    Only the cheap, certain cases: exec can still fail later (the worker then reports it).
    """
    program = command[0]
    if "/" not in program:
        if shutil.which(program) is None:
            raise WrapUsageError(f"{program}: command not found", EXIT_NOT_FOUND)
        return
    if not os.path.exists(program):
        raise WrapUsageError(f"{program}: No such file or directory", EXIT_NOT_FOUND)
    if os.path.isdir(program):
        raise WrapUsageError(f"{program}: Is a directory")
    if not os.access(program, os.X_OK):
        raise WrapUsageError(f"{program}: Permission denied")


def log_level(given: str | None) -> str:
    """The level wrap logs at: ``--log-level`` / ``$FLEETDRAIN_LOG_LEVEL`` if given, else the
    Go agent's own setting (``$BUILDKITE_AGENT_DEBUG`` takes precedence over
    ``$BUILDKITE_AGENT_LOG_LEVEL`` there, as ``--debug`` does over ``--log-level``), else
    ``notice``. Never an error: an unknown level is warned about once logging is set up."""
    if given is not None and given.strip():
        return given.strip().lower()
    if _env_bool("BUILDKITE_AGENT_DEBUG"):
        return "debug"
    return (_env("BUILDKITE_AGENT_LOG_LEVEL") or DEFAULT_LOG_LEVEL).strip().lower()


def settings_from_args(ns: argparse.Namespace) -> WrapSettings:
    """Validate parsed flags; :class:`WrapUsageError` with one line for anything wrong."""
    command = list(ns.command or [])
    if command[:1] == ["--"]:
        command = command[1:]
    if not command:
        raise WrapUsageError("no command to run: wrap [options] -- CMD [ARGS...]")
    probe = ns.busy_probe or None
    if probe is not None:
        try:
            check_probe_url(probe)
        except ValueError as exc:
            raise WrapUsageError(f"--busy-probe: {exc}") from None
    addr = ns.health_check_addr or None
    if addr is not None:
        try:
            split_addr(addr)
        except ValueError as exc:
            raise WrapUsageError(f"--health-check-addr: {exc}") from None
    settings = WrapSettings(
        command=command,
        stop_timeout=_seconds("--stop-timeout", ns.stop_timeout),
        cancel_grace_period=_seconds("--cancel-grace-period", ns.cancel_grace_period),
        drain_margin=_seconds("--drain-margin", ns.drain_margin, positive=False),
        graceful_signal=_signal("--graceful-signal", ns.graceful_signal),
        force_signal=_signal("--force-signal", ns.force_signal),
        busy_probe=probe,
        busy_interval=_seconds("--busy-interval", ns.busy_interval),
        task_protection=bool(ns.task_protection),
        health_check_addr=addr,
        watch_imds=bool(ns.watch_imds),
        imds_poll_interval=_seconds("--imds-poll-interval", ns.imds_poll_interval),
        log_level=log_level(ns.log_level),
    )
    check_command(command)
    return settings
