"""Settings of ``fleetdrain-agent start``: flags, with the environment variables of
``buildkite-agent start`` where that option exists there, so a task definition can switch."""

from __future__ import annotations

import argparse
import os
import re
import socket
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from fleetdrain.agent.logs import DEFAULT_LOG_LEVEL
from fleetdrain.agent.reaper import parse_signal

DEFAULT_ENDPOINT = "https://agent.buildkite.com/v3"
#: The Go agent's default for --wait-for-ecs-meta-data-timeout and
#: --wait-for-ec2-meta-data-timeout (clicommand/agent_start.go).
DEFAULT_METADATA_WAIT = "10s"

#: Seconds per unit of a Go duration (time.ParseDuration); both spellings of micro.
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_PART = re.compile(r"([0-9]+\.?[0-9]*|\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration string (``10s``, ``1m30s``, ``500ms``, ``1.5h``; ``0``), as
    ``time.ParseDuration`` reads it, so a value the Go agent takes means the same here.

    Raises ``ValueError`` for anything else: a bare number other than 0 (Go wants a unit), an
    unknown unit, an empty string, or a negative duration (the Go agent's retrier panics on a
    negative wait, so it is an error here too).
    """
    value = text.strip()
    if value in ("0", "+0", "-0"):
        return 0.0
    body = value[1:] if value[:1] in ("+", "-") else value
    seconds = 0.0
    pos = 0
    while pos < len(body):
        match = _GO_PART.match(body, pos)
        if match is None:
            break
        seconds += float(match.group(1)) * _GO_UNITS[match.group(2)]
        pos = match.end()
    if not body or pos != len(body):
        hint = " (missing unit: write e.g. 10s)" if re.fullmatch(r"[0-9.]+", body) else ""
        raise ValueError(
            f"{text!r} is not a Go duration{hint}: a number with a unit (ns, us, ms, s, m, h), "
            "as 10s, 1m30s or 500ms"
        )
    if value.startswith("-") and seconds > 0:
        raise ValueError(f"{text!r} is negative: a wait cannot be")
    return seconds


class StartSettings(BaseModel):
    """Validated settings for ``start``."""

    model_config = ConfigDict(frozen=True)

    token: SecretStr
    endpoint: str = DEFAULT_ENDPOINT
    name: str = Field(default_factory=socket.gethostname)
    tags: list[str] = Field(default_factory=list)
    priority: int | None = None
    build_path: Path = Path("/var/lib/buildkite-agent/builds")
    cancel_grace_period: float = Field(default=10.0, gt=0)
    signal_grace_period: float | None = None
    cancel_signal: str = "SIGTERM"
    disconnect_after_job: bool = False
    disconnect_after_idle_timeout: float = Field(default=0.0, ge=0)
    health_check_addr: str | None = None
    stop_timeout: float = Field(default=120.0, gt=0)
    drain_margin: float = Field(default=5.0, ge=0)
    tags_from_ecs_meta_data: bool = False
    tags_from_ec2_meta_data: bool = False
    #: Seconds to keep trying the ECS task metadata (5 attempts, this / 5 apart), as the Go
    #: agent's --wait-for-ecs-meta-data-timeout; a Go duration string or seconds.
    wait_for_ecs_meta_data_timeout: float = 10.0
    #: The same for EC2 instance metadata (--wait-for-ec2-meta-data-timeout).
    wait_for_ec2_meta_data_timeout: float = 10.0
    task_protection: bool = False
    watch_imds: bool = False
    imds_poll_interval: float = Field(default=5.0, gt=0)
    #: The Go agent's level names (:mod:`fleetdrain.agent.logs`); unknown ones warn, not fail.
    log_level: str = DEFAULT_LOG_LEVEL

    @field_validator("cancel_signal")
    @classmethod
    def _known_signal(cls, value: str) -> str:
        return parse_signal(value).name

    @field_validator(
        "wait_for_ecs_meta_data_timeout", "wait_for_ec2_meta_data_timeout", mode="before"
    )
    @classmethod
    def _go_duration(cls, value: Any, info: ValidationInfo) -> Any:
        # Strings are Go durations (what the flags and variables give); numbers are seconds.
        flag = "--" + str(info.field_name).replace("_", "-")
        env = "$BUILDKITE_AGENT_" + str(info.field_name).upper()
        if isinstance(value, str):
            try:
                return parse_go_duration(value)
            except ValueError as exc:
                raise ValueError(f"{flag} [{env}]: {exc}") from None
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            raise ValueError(f"{flag} [{env}]: {value} is negative: a wait cannot be")
        return value

    @field_validator("endpoint")
    @classmethod
    def _http_endpoint(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"endpoint must be an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _grace_below_cancel_grace(self) -> StartSettings:
        # The Go agent's rule: the signal grace is always less than the cancel grace period.
        if self.signal_grace_period is not None and (
            self.signal_grace_period >= self.cancel_grace_period
        ):
            raise ValueError(
                f"signal grace period ({self.signal_grace_period}s) must be less than the "
                f"cancel grace period ({self.cancel_grace_period}s)"
            )
        return self

    @property
    def effective_signal_grace(self) -> float:
        """The signal grace period: given, or the cancel grace period minus one second."""
        if self.signal_grace_period is not None:
            return self.signal_grace_period
        return max(self.cancel_grace_period - 1.0, self.cancel_grace_period * 0.9)


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _env_bool(name: str) -> bool:
    return (os.environ.get(name) or "").strip().lower() in ("1", "true", "yes", "on")


def add_start_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``start`` flags; each defaults from its environment variable."""
    a = parser.add_argument
    a(
        "--token",
        default=_env("BUILDKITE_AGENT_TOKEN"),
        help="registration token [$BUILDKITE_AGENT_TOKEN]",
    )
    a(
        "--endpoint",
        default=_env("BUILDKITE_AGENT_ENDPOINT", DEFAULT_ENDPOINT),
        help="agent API endpoint [$BUILDKITE_AGENT_ENDPOINT] (default %(default)s)",
    )
    a(
        "--name",
        default=_env("BUILDKITE_AGENT_NAME"),
        help="agent name; %%hostname and %%n are expanded [$BUILDKITE_AGENT_NAME] "
        "(default: hostname)",
    )
    a(
        "--tags",
        action="append",
        default=None,
        help="key=value tags, comma separated, repeatable [$BUILDKITE_AGENT_TAGS]",
    )
    a(
        "--priority",
        type=int,
        default=_env("BUILDKITE_AGENT_PRIORITY"),
        help="agent priority [$BUILDKITE_AGENT_PRIORITY]",
    )
    a(
        "--build-path",
        default=_env("BUILDKITE_BUILD_PATH", "/var/lib/buildkite-agent/builds"),
        help="where jobs run [$BUILDKITE_BUILD_PATH] (default %(default)s)",
    )
    a(
        "--cancel-grace-period",
        type=float,
        default=_env("BUILDKITE_CANCEL_GRACE_PERIOD", "10"),
        help="seconds a cancelled job gets before SIGKILL [$BUILDKITE_CANCEL_GRACE_PERIOD] "
        "(default %(default)s)",
    )
    a(
        "--signal-grace-period-seconds",
        type=float,
        default=_env("BUILDKITE_SIGNAL_GRACE_PERIOD_SECONDS"),
        help="seconds between the cancel signal and SIGKILL; less than the cancel grace period "
        "[$BUILDKITE_SIGNAL_GRACE_PERIOD_SECONDS] (default: cancel grace period - 1)",
    )
    a(
        "--cancel-signal",
        default=_env("BUILDKITE_CANCEL_SIGNAL", "SIGTERM"),
        help="signal sent to a cancelled job's process group [$BUILDKITE_CANCEL_SIGNAL] "
        "(default %(default)s)",
    )
    a(
        "--disconnect-after-job",
        action="store_true",
        default=_env_bool("BUILDKITE_AGENT_DISCONNECT_AFTER_JOB"),
        help="disconnect after one job [$BUILDKITE_AGENT_DISCONNECT_AFTER_JOB]",
    )
    a(
        "--disconnect-after-idle-timeout",
        type=float,
        default=_env("BUILDKITE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT", "0"),
        help="disconnect after this many idle seconds, 0 = never "
        "[$BUILDKITE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT]",
    )
    a(
        "--health-check-addr",
        default=_env("BUILDKITE_AGENT_HEALTH_CHECK_ADDR"),
        help="host:port for /health and /status [$BUILDKITE_AGENT_HEALTH_CHECK_ADDR]",
    )
    a(
        "--stop-timeout",
        type=float,
        default=_env("FLEETDRAIN_STOP_TIMEOUT", "120"),
        help="seconds ECS allows between SIGTERM and SIGKILL: the task definition's stopTimeout "
        "[$FLEETDRAIN_STOP_TIMEOUT] (default %(default)s)",
    )
    a(
        "--drain-margin",
        type=float,
        default=_env("FLEETDRAIN_DRAIN_MARGIN", "5"),
        help="seconds kept spare before SIGKILL when cancelling at the deadline "
        "[$FLEETDRAIN_DRAIN_MARGIN] (default %(default)s)",
    )
    a(
        "--tags-from-ecs-meta-data",
        action="store_true",
        default=_env_bool("BUILDKITE_AGENT_TAGS_FROM_ECS_META_DATA"),
        help="add ecs:* tags from task metadata v4 [$BUILDKITE_AGENT_TAGS_FROM_ECS_META_DATA]",
    )
    a(
        "--tags-from-ec2-meta-data",
        action="store_true",
        default=_env_bool("BUILDKITE_AGENT_TAGS_FROM_EC2_META_DATA"),
        help="add aws:* tags from EC2 instance metadata [$BUILDKITE_AGENT_TAGS_FROM_EC2_META_DATA]",
    )
    # Go durations, as the Go agent's flags (cli.DurationFlag: an empty variable is unset).
    a(
        "--wait-for-ecs-meta-data-timeout",
        default=_env("BUILDKITE_AGENT_WAIT_FOR_ECS_META_DATA_TIMEOUT") or DEFAULT_METADATA_WAIT,
        help="how long to keep trying the ECS task metadata (5 attempts, a fifth of this apart) "
        "before registering without ecs:* tags; a Go duration "
        "[$BUILDKITE_AGENT_WAIT_FOR_ECS_META_DATA_TIMEOUT] (default %(default)s)",
    )
    a(
        "--wait-for-ec2-meta-data-timeout",
        default=_env("BUILDKITE_AGENT_WAIT_FOR_EC2_META_DATA_TIMEOUT") or DEFAULT_METADATA_WAIT,
        help="how long to keep trying EC2 instance metadata (5 attempts, a fifth of this "
        "apart) before registering without aws:* tags; a Go duration "
        "[$BUILDKITE_AGENT_WAIT_FOR_EC2_META_DATA_TIMEOUT] (default %(default)s)",
    )
    protection_default = os.environ.get("FLEETDRAIN_TASK_PROTECTION")
    a(
        "--task-protection",
        action=argparse.BooleanOptionalAction,
        default=(
            _env_bool("FLEETDRAIN_TASK_PROTECTION")
            if protection_default is not None
            else bool(os.environ.get("ECS_AGENT_URI"))
        ),
        help="ECS task scale-in protection while a job runs [$FLEETDRAIN_TASK_PROTECTION] "
        "(default: on when $ECS_AGENT_URI is set)",
    )
    # The names and variables of wrap's options: the same PID-1 host reads them.
    a(
        "--watch-imds",
        action=argparse.BooleanOptionalAction,
        default=_env_bool("FLEETDRAIN_WATCH_IMDS"),
        help="drain softly on a spot interruption notice (deadline: its time) or on Auto "
        "Scaling target-lifecycle-state Terminated (no deadline): no new jobs, the running one "
        "finishes (or is cancelled, agent_stop, at the deadline), then stay up, idle, until "
        "the task is stopped [$FLEETDRAIN_WATCH_IMDS]",
    )
    a(
        "--imds-poll-interval",
        type=float,
        default=_env("FLEETDRAIN_IMDS_POLL_INTERVAL", "5"),
        help="seconds between IMDS polls [$FLEETDRAIN_IMDS_POLL_INTERVAL] (default %(default)s)",
    )
    a(
        "--log-level",
        default=_env("BUILDKITE_AGENT_LOG_LEVEL", DEFAULT_LOG_LEVEL),
        help="log level, as the Go agent's: debug, info, notice, warn, error, fatal; an unknown "
        "one is logged as a warning and notice is used [$BUILDKITE_AGENT_LOG_LEVEL] "
        "(default %(default)s)",
    )
    a(
        "--debug",
        action="store_true",
        default=_env_bool("BUILDKITE_AGENT_DEBUG"),
        help="synonym for --log-level debug, and takes precedence over it, as the Go agent's "
        "[$BUILDKITE_AGENT_DEBUG]",
    )


def expand_name(name: str | None) -> str:
    """The agent name with ``%hostname`` and ``%n`` expanded, as the Go agent does."""
    host = socket.gethostname()
    if not name:
        return host
    return name.replace("%hostname", host).replace("%n", "1").replace("%spawn", "1")


def settings_from_args(ns: argparse.Namespace) -> StartSettings:
    """Validate parsed flags into :class:`StartSettings` (pydantic raises on bad values)."""
    tags: list[str] = []
    raw_tags = ns.tags if ns.tags is not None else [_env("BUILDKITE_AGENT_TAGS") or ""]
    for chunk in raw_tags:
        tags.extend(t.strip() for t in chunk.split(",") if t.strip())
    if not ns.token:
        raise ValueError("a registration token is required: --token or $BUILDKITE_AGENT_TOKEN")
    return StartSettings(
        token=ns.token,
        endpoint=ns.endpoint,
        name=expand_name(ns.name),
        tags=tags,
        priority=ns.priority,
        build_path=Path(ns.build_path),
        cancel_grace_period=ns.cancel_grace_period,
        signal_grace_period=ns.signal_grace_period_seconds,
        cancel_signal=ns.cancel_signal,
        disconnect_after_job=ns.disconnect_after_job,
        disconnect_after_idle_timeout=ns.disconnect_after_idle_timeout,
        health_check_addr=ns.health_check_addr,
        stop_timeout=ns.stop_timeout,
        drain_margin=ns.drain_margin,
        tags_from_ecs_meta_data=ns.tags_from_ecs_meta_data,
        tags_from_ec2_meta_data=ns.tags_from_ec2_meta_data,
        wait_for_ecs_meta_data_timeout=ns.wait_for_ecs_meta_data_timeout,
        wait_for_ec2_meta_data_timeout=ns.wait_for_ec2_meta_data_timeout,
        task_protection=ns.task_protection,
        watch_imds=ns.watch_imds,
        imds_poll_interval=ns.imds_poll_interval,
        log_level="debug" if getattr(ns, "debug", False) else ns.log_level,
    )
