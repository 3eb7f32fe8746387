"""Logging for the agent's commands: one line per record on stderr.

A module of its own so that ``start`` and ``wrap`` set logging up without importing the CLI
that imports them: ``cli`` -> ``start`` / ``wrap`` -> ``logs``, never back. Standard library
only: ``wrap`` loads it before its worker runs, and stays small (see
:mod:`fleetdrain.agent.minihttp`).
"""

from __future__ import annotations

import logging
import sys

#: Timestamp, level, logger, message: awslogs keeps each line as it is.
LOG_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
#: Loggers that say something for every request at INFO: only their warnings are kept.
NOISY_LOGGERS = ("httpx", "httpcore")


def configure_logging(level: str) -> None:
    """One line per record on stderr at ``level`` (debug, info, warning, error; else info)."""
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    # By name only: setting a level does not import the library.
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
