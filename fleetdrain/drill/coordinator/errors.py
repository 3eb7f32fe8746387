"""The coordinator's refusals: one exception per HTTP status the HTTP layer answers with.

Raised by :class:`~fleetdrain.drill.coordinator.state.Coordinator` operations and by the
pipelines (:mod:`~fleetdrain.drill.coordinator.builds`) alike, so the Python API and the HTTP
API refuse the same things; :mod:`~fleetdrain.drill.coordinator.app` turns each into a JSON
``{"message": ...}`` with its ``status``.
"""

from __future__ import annotations


class CoordinatorError(Exception):
    """A request the coordinator refuses; ``status`` is the HTTP status it maps to."""

    status = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(CoordinatorError):
    """Malformed input (400)."""

    status = 400


class Unauthorized(CoordinatorError):
    """Missing, wrong or revoked token (401)."""

    status = 401


class Forbidden(CoordinatorError):
    """A valid token that does not cover this job (403)."""

    status = 403


class NotFound(CoordinatorError):
    """Unknown agent, job or organization (404)."""

    status = 404


class UnsupportedMediaType(CoordinatorError):
    """A body in the wrong content type or encoding (415)."""

    status = 415


class Unprocessable(CoordinatorError):
    """Well-formed input that the current state does not allow (422)."""

    status = 422
