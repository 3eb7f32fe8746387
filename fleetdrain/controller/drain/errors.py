"""Errors the drain core tells apart (pure: what AWS errors mean is the adapters' business, in
:mod:`~fleetdrain.controller.drain.aws_errors`)."""

from __future__ import annotations


class Retryable(Exception):
    """A step failed for a reason that goes away (throttling, 5xx, a write race): retry it."""


class Conflict(Exception):
    """Someone else wrote the drain record since we read it (or it already exists)."""


class LifecycleGone(Exception):
    """The lifecycle action no longer exists (completed, timed out, or never was)."""


class CoordinatorUnavailable(Exception):
    """The coordinator could not be reached or refused us (after its own retries)."""


class RateLimited(CoordinatorUnavailable):
    """The organization's REST rate limit is spent for now: nothing may be sent for
    ``retry_in`` seconds. Not an outage: the drain waits for the window (a tick at its reset)
    rather than falling back to ECS, unless a deadline cannot wait."""

    def __init__(self, message: str, retry_in: float) -> None:
        super().__init__(message)
        self.retry_in = max(0.0, retry_in)
