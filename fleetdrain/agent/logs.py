"""Logging for the agent's commands: one line per record on stderr, and no secrets in it.

A module of its own so that ``start`` and ``wrap`` set logging up without importing the CLI
that imports them: ``cli`` -> ``start`` / ``wrap`` -> ``logs``, never back. Standard library
only: ``wrap`` loads it before its worker runs, and stays small (see
:mod:`fleetdrain.agent.minihttp`).

Log levels are the Go agent's (``--log-level`` / ``$BUILDKITE_AGENT_LOG_LEVEL``, parsed as its
``logger.LevelFromString`` does, case-insensitively), so one task definition setting serves
both. Python's logging has no ``notice`` or ``fatal``; each keeps what it keeps in the Go agent:

- ``notice`` (the Go agent's default) sits between ``debug`` and ``info`` there: everything but
  debug is shown. Ours has no notice records, so it is INFO, as ``info`` is.
- ``error``, ``panic`` and ``fatal`` show errors only: the Go agent's ``Error`` prints at every
  level (logger/log.go), and its slog logger takes ``fatal`` as an alias of ``error``. So all
  three are ERROR here (our CRITICAL records show too).
- anything else: a warning, then ``notice``, as the Go agent does ("Defaulting log level to
  NOTICE"); never an exit, which would crash-loop the task.

Secrets: :func:`redact_argv` and :func:`redact_text` take the values of ``--token``-like flags
and ``*_TOKEN``-like variables out of a command line before it is logged or shown in /status.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence

#: Timestamp, level, logger, message: awslogs keeps each line as it is.
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
#: Loggers that say something for every request at INFO: only their warnings are kept.
NOISY_LOGGERS = ("httpx", "httpcore")

#: The Go agent's default level.
DEFAULT_LOG_LEVEL = "notice"
#: The levels the Go agent documents (its LevelFromString also takes warning and panic).
GO_LOG_LEVELS = ("debug", "info", "notice", "warn", "error", "fatal")
#: Each Go level name and the Python level that keeps the same records (see the docstring).
_PYTHON_LEVELS = {
    "debug": logging.DEBUG,
    "notice": logging.INFO,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "panic": logging.ERROR,
    "fatal": logging.ERROR,
}

log = logging.getLogger("fleetdrain.agent")


def python_log_level(name: str | None) -> int | None:
    """The Python level for a Go agent level name (any case), or None for an unknown one."""
    return _PYTHON_LEVELS.get((name or "").strip().lower())


def configure_logging(level: str | None) -> None:
    """One line per record on stderr at the Go agent's ``level``; an unknown level is logged as
    a warning and ``notice`` is used."""
    number = python_log_level(level)
    logging.basicConfig(
        level=logging.INFO if number is None else number,
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    # By name only: setting a level does not import the library.
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if number is None:
        log.warning(
            "log level %r is not one of %s: using %s, as the Go agent does",
            level,
            ", ".join(GO_LOG_LEVELS),
            DEFAULT_LOG_LEVEL,
        )


# --------------------------------------------------------------------------------- secrets

#: What stands in for a secret.
REDACTED = "[REDACTED]"
#: Names whose values are secret: the Go agent's default ``--redacted-vars`` (``*_PASSWORD``,
#: ``*_SECRET``, ``*_TOKEN``, ``*_PRIVATE_KEY``, ``*_ACCESS_KEY``, ``*_SECRET_KEY``,
#: ``*_CONNECTION_STRING``, ``*_API_KEY``) and the bare words; flags (``--agent-access-token``)
#: are matched with ``-`` read as ``_``.
_SECRET_NAME = re.compile(
    r"(?:^|_)(?:TOKEN|PASSWORD|SECRET|PRIVATE_KEY|ACCESS_KEY|SECRET_KEY|CONNECTION_STRING"
    r"|API_KEY)$"
)
#: Values shorter than this are not hunted for in text: they would match too much.
MIN_SECRET_VALUE = 6
_FLAG_ARG = re.compile(r"(-{1,2})([A-Za-z0-9][\w-]*)(?:=(.*))?", re.S)
_VALUE = r"(\"[^\"]*\"|'[^']*'|[^\s\"'&;]+)"
#: ``--token VALUE`` / ``--token=VALUE`` / ``-token VALUE`` inside one argument (``sh -c``).
_FLAG_IN_TEXT = re.compile(r"(?<![\w-])(-{1,2}[A-Za-z0-9][\w-]*)(=|[ \t]+)" + _VALUE)
#: ``NAME=VALUE`` inside one argument: ``env BUILDKITE_AGENT_TOKEN=...``, ``?token=...``.
_ASSIGNMENT_IN_TEXT = re.compile(r"(?<![\w-])([A-Za-z_]\w*)=" + _VALUE)


def is_secret_name(name: str) -> bool:
    """Whether a variable or flag called ``name`` holds a secret (``BUILDKITE_AGENT_TOKEN``,
    ``token``, ``agent-access-token``, ``DB_PASSWORD``...)."""
    return bool(_SECRET_NAME.search(name.lstrip("-").replace("-", "_").upper()))


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """The values of the secret variables in ``environ`` (default: ours, which the worker
    inherits), longest first, leaving out short ones."""
    env = os.environ if environ is None else environ
    found = {v for k, v in env.items() if is_secret_name(k) and len(v) >= MIN_SECRET_VALUE}
    return sorted(found, key=len, reverse=True)


def redact_text(text: str, values: Iterable[str] = ()) -> str:
    """``text`` with the values of secret flags and assignments, and every one of ``values``,
    replaced by :data:`REDACTED`."""
    for value in values:
        text = text.replace(value, REDACTED)

    def flag(match: re.Match[str]) -> str:
        if not is_secret_name(match[1]):
            return match[0]
        return f"{match[1]}{match[2]}{REDACTED}"

    def assignment(match: re.Match[str]) -> str:
        if not is_secret_name(match[1]):
            return match[0]
        return f"{match[1]}={REDACTED}"

    return _ASSIGNMENT_IN_TEXT.sub(assignment, _FLAG_IN_TEXT.sub(flag, text))


def redact_argv(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """A command line fit for logs and /status: the argument after a secret flag (``--token
    X``), the value of ``--token=X``, secret assignments and flags inside an argument, and the
    values of the secret variables of ``environ`` (default: ours) wherever they occur."""
    values = secret_values(environ)
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        match = _FLAG_ARG.fullmatch(arg)
        if match is not None and is_secret_name(match[2]):
            if match[3] is None:
                out.append(arg)
                hide_next = True
            else:
                out.append(f"{match[1]}{match[2]}={REDACTED}")
            continue
        out.append(redact_text(arg, values))
    return out
