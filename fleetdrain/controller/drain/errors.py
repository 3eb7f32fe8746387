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
