"""Errors the drain core tells apart, and how AWS errors map onto them."""

from __future__ import annotations

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

#: Error codes that mean "later": throttling and server-side trouble.
RETRYABLE_CODES: frozenset[str] = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceededException",
        "SlowDown",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InternalFailure",
        "InternalError",
        "InternalServerError",
        "ServerException",
        "TransactionConflictException",
    }
)

#: Exceptions that are transport trouble, not an answer.
TRANSPORT_ERRORS = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
)


class Retryable(Exception):
    """A step failed for a reason that goes away (throttling, 5xx, a write race): retry it."""


class LifecycleGone(Exception):
    """The lifecycle action no longer exists (completed, timed out, or never was)."""


class CoordinatorUnavailable(Exception):
    """The coordinator could not be reached or refused us (after its own retries)."""


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def is_retryable(exc: BaseException) -> bool:
    """Throttling, 5xx and transport errors (what the adaptive retries gave up on)."""
    if isinstance(exc, TRANSPORT_ERRORS):
        return True
    if isinstance(exc, ClientError):
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        return error_code(exc) in RETRYABLE_CODES or status >= 500
    return False


def reraise_retryable(exc: BaseException, what: str) -> None:
    """Raise :class:`Retryable` from ``exc`` if it is retryable; otherwise return."""
    if is_retryable(exc):
        raise Retryable(f"{what}: {exc}") from exc
