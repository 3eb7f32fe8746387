"""What botocore's errors mean to the drain: the AWS adapters' shared mapping onto
:mod:`~fleetdrain.controller.drain.errors` (the core never sees a botocore exception class)."""

from __future__ import annotations

from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)

from fleetdrain.controller.drain.errors import Retryable

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


def error_code(exc: ClientError) -> str:
    """The AWS error code of ``exc`` (``""`` if it has none)."""
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
