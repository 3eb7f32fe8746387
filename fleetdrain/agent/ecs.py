"""ECS integration for the PID-1 layer: task metadata tags and task scale-in protection.

Task scale-in protection is on exactly while the worker is busy. Besides keeping service
scale-in and deployments away from a busy agent, it is the drain controller's coordinator-free
busy flag (``GetTaskProtection``), so it has to follow the worker closely in both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fleetdrain.agent import wire
from fleetdrain.agent.minihttp import HttpClient, HttpError

log = logging.getLogger("fleetdrain.ecs")

#: The bounds ECS accepts for ``ExpiresInMinutes`` (1 minute to 48 hours).
MIN_EXPIRES_IN_MINUTES = 1
#: First retry delay after a failed protection call (doubles per failure, up to the check).
RETRY_BASE_SECONDS = 0.25
MAX_EXPIRES_IN_MINUTES = 2880


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _utc_now() -> datetime:
    return datetime.now(UTC)


# --------------------------------------------------------------------------- task metadata


class MetadataError(Exception):
    """The ECS task metadata endpoint could not be read or returned something unusable."""


@dataclass(frozen=True)
class TaskMetadata:
    """The fields of ``${ECS_CONTAINER_METADATA_URI_V4}/task`` that fleetdrain uses."""

    TaskARN: str
    Cluster: str
    AvailabilityZone: str | None = None
    LaunchType: str | None = None
    Family: str | None = None
    Revision: str | None = None

    @classmethod
    def from_json(cls, data: bytes) -> TaskMetadata:
        """Parse the endpoint's answer; :class:`fleetdrain.agent.wire.FieldError` names what is
        wrong."""
        doc = wire.json_object(data)
        return cls(
            TaskARN=wire.text(doc, "TaskARN"),
            Cluster=wire.text(doc, "Cluster"),
            AvailabilityZone=wire.optional_text(doc, "AvailabilityZone"),
            LaunchType=wire.optional_text(doc, "LaunchType"),
            Family=wire.optional_text(doc, "Family"),
            Revision=wire.optional_text(doc, "Revision"),
        )


async def ecs_task_tags(
    client: HttpClient, metadata_uri: str, *, http_timeout: float = 2.0
) -> dict[str, str]:
    """Read the task metadata v4 and return the agent tags derived from it.

    ``metadata_uri`` is the value of ``ECS_CONTAINER_METADATA_URI_V4``. Returns
    ``ecs:task-arn``, ``ecs:cluster`` (as ECS reports it: a name on EC2, an ARN on Fargate),
    and, when present, ``ecs:availability-zone``, ``ecs:launch-type``, ``ecs:task-family``,
    ``ecs:task-revision``. Raises :class:`MetadataError` with a one-line message on any failure.
    """
    url = metadata_uri.rstrip("/") + "/task"
    try:
        response = await client.get(url, timeout=http_timeout)
    except HttpError as exc:
        raise MetadataError(f"ECS task metadata {url}: {exc}") from exc
    if response.status_code != 200:
        text = _one_line(response.text[:200])
        raise MetadataError(f"ECS task metadata {url}: HTTP {response.status_code}: {text}")
    try:
        meta = TaskMetadata.from_json(response.content)
    except wire.FieldError as exc:
        raise MetadataError(f"ECS task metadata {url}: unusable response ({exc})") from exc
    tags = {"ecs:task-arn": meta.TaskARN, "ecs:cluster": meta.Cluster}
    optional = {
        "ecs:availability-zone": meta.AvailabilityZone,
        "ecs:launch-type": meta.LaunchType,
        "ecs:task-family": meta.Family,
        "ecs:task-revision": meta.Revision,
    }
    tags.update({key: value for key, value in optional.items() if value})
    return tags


# ------------------------------------------------------------------------- task protection


class ProtectionError(Exception):
    """The task protection endpoint refused or failed a request.

    ``code`` is the ECS error code (``InvalidParameterException``, ``ServerException``...) or
    the failure reason (``TASK_NOT_VALID``...) when there is one; ``status`` the HTTP status.
    """

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass(frozen=True)
class ProtectionState:
    """Task scale-in protection as the ECS agent reported it."""

    enabled: bool
    expires_at: datetime | None
    task_arn: str | None


class TaskProtection:
    """Client for the ECS agent's ``$ECS_AGENT_URI/task-protection/v1/state`` endpoint."""

    def __init__(self, client: HttpClient, agent_uri: str, *, timeout: float = 10.0):
        """``agent_uri`` is the value of ``ECS_AGENT_URI``.

        The timeout is generous because the ECS agent calls the ECS control plane
        synchronously on every request.
        """
        self._client = client
        self._url = agent_uri.rstrip("/") + "/task-protection/v1/state"
        self._timeout = timeout

    @property
    def url(self) -> str:
        """The endpoint this client talks to."""
        return self._url

    async def set(self, enabled: bool, expires_in_minutes: int | None = None) -> ProtectionState:
        """Turn protection on (for ``expires_in_minutes``, ECS's default 120 when None) or off.

        The expiry is only sent when enabling. Raises :class:`ProtectionError`.
        """
        body: dict[str, object] = {"ProtectionEnabled": enabled}
        if enabled and expires_in_minutes is not None:
            body["ExpiresInMinutes"] = expires_in_minutes
        return await self._call("PUT", body)

    async def get(self) -> ProtectionState:
        """Read the current protection state. Raises :class:`ProtectionError`."""
        return await self._call("GET", None)

    async def _call(self, method: str, body: dict[str, object] | None) -> ProtectionState:
        what = f"task protection {method}"
        try:
            response = await self._client.request(
                method, self._url, json=body, timeout=self._timeout
            )
        except HttpError as exc:
            raise ProtectionError(f"{what}: {exc}") from exc
        status = response.status_code
        # The ECS agent answers every call with exactly one of protection, failure, error.
        try:
            doc = wire.json_object(response.content)
            error = wire.optional_object(doc, "error")
            failure = wire.optional_object(doc, "failure")
            protection = wire.optional_object(doc, "protection")
            if error is not None:
                code = wire.optional_text(error, "Code") or "Error"
                message = wire.optional_text(error, "Message") or ""
                raise ProtectionError(
                    f"{what}: HTTP {status}: {code}: {_one_line(message)}", code=code, status=status
                )
            if failure is not None:
                reason = wire.optional_text(failure, "Reason") or "failure"
                detail = wire.optional_text(failure, "Detail")
                note = f" ({_one_line(detail)})" if detail else ""
                raise ProtectionError(
                    f"{what}: failure: {reason}{note}", code=reason, status=status
                )
            if status != 200 or protection is None:
                raise ProtectionError(
                    f"{what}: HTTP {status}: {_one_line(response.text[:200])}", status=status
                )
            return ProtectionState(
                enabled=wire.flag(protection, "ProtectionEnabled"),
                expires_at=wire.optional_time(protection, "ExpirationDate"),
                task_arn=wire.optional_text(protection, "TaskArn"),
            )
        except wire.FieldError as exc:
            raise ProtectionError(
                f"{what}: HTTP {status}: unusable response ({exc}): "
                f"{_one_line(response.text[:200])!r}",
                status=status,
            ) from exc


class ProtectionKeeper:
    """Keeps task scale-in protection on exactly while the worker is busy.

    Busy and unprotected (or protected but within the renewal margin of the expiry): PUT
    enabled. Idle and protected: PUT disabled. Evaluated every ``check_interval`` seconds and
    at once after :meth:`notify`. Failures are logged and retried at the next evaluation.
    """

    def __init__(
        self,
        protection: TaskProtection,
        busy: Callable[[], bool],
        *,
        expires_in_minutes: int = 60,
        check_interval: float = 10.0,
        renew_fraction: float = 1 / 3,
        clock: Callable[[], datetime] = _utc_now,
    ):
        """``renew_fraction``: renew once less than this part of the lifetime is left.

        ``clock`` returns an aware datetime; the default is the wall clock.
        """
        if not MIN_EXPIRES_IN_MINUTES <= expires_in_minutes <= MAX_EXPIRES_IN_MINUTES:
            raise ValueError(
                f"expires_in_minutes must be {MIN_EXPIRES_IN_MINUTES}..{MAX_EXPIRES_IN_MINUTES}"
            )
        if not 0 < renew_fraction < 1:
            raise ValueError("renew_fraction must be between 0 and 1")
        if check_interval <= 0:
            raise ValueError("check_interval must be positive")
        self._protection = protection
        self._busy = busy
        self._lifetime = timedelta(minutes=expires_in_minutes)
        self._expires_in_minutes = expires_in_minutes
        self._margin = self._lifetime * renew_fraction
        self._check_interval = check_interval
        self._clock = clock
        self._wake = asyncio.Event()
        # A new task starts unprotected, so there is nothing to learn with a GET at start-up.
        self.enabled = False
        self.expires_at: datetime | None = None
        self.last_error: str | None = None
        # The PUT in flight, if any. It runs shielded: cancelling run() at shutdown must not
        # cut a PUT the ECS agent may already have applied, or release() would not know the
        # state and would send it again.
        self._call: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """Re-evaluate now: call when a job starts or ends (from the event loop's thread)."""
        self._wake.set()

    async def run(self) -> None:
        """Evaluate until cancelled; never raises anything but cancellation."""
        failures = 0
        while True:
            self._wake.clear()
            try:
                await self.evaluate()
            except Exception as exc:  # run() must outlive any bug in one evaluation
                self._record_error(f"{type(exc).__name__}: {_one_line(exc)}")
            # A failed call is retried soon, with back-off: a job that runs for less than the
            # check interval must still get its protection.
            failures = failures + 1 if self.last_error is not None else 0
            wait = self._check_interval
            if failures:
                wait = min(wait, RETRY_BASE_SECONDS * 2 ** min(failures - 1, 6))
            # asyncio.timeout, not wait_for: on Python 3.11 a cancelled wait_for around
            # Event.wait() was seen never to finish (its inner Event.wait task stayed pending),
            # which hung wrap at exit; a timeout scope has no inner task to wait for.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def release(self) -> None:
        """Turn protection off if it is on (at shutdown, after :meth:`run` was cancelled).

        A PUT still in flight (run() was cancelled while it waited) is let finish first, so
        its answer, not a guess, says whether protection is on. Errors are recorded and
        logged, not raised.
        """
        if self._call is not None and not self._call.done():
            await self._call
        if self.enabled:
            await self._put(False, self._clock())

    async def evaluate(self) -> None:
        """Bring protection in line with ``busy()`` once. Records, never raises, API errors."""
        busy = self._busy()
        if busy:
            now = self._clock()
            fresh = self.expires_at is not None and self.expires_at - now > self._margin
            if self.enabled and fresh:
                return
            await self._put(True, now)
        elif self.enabled:
            await self._put(False, self._clock())

    async def _put(self, enabled: bool, now: datetime) -> None:
        self._call = asyncio.ensure_future(self._apply(enabled, now))
        await asyncio.shield(self._call)

    async def _apply(self, enabled: bool, now: datetime) -> None:
        try:
            state = await self._protection.set(
                enabled, self._expires_in_minutes if enabled else None
            )
        except ProtectionError as exc:
            self._record_error(str(exc))
            return
        was_enabled = self.enabled
        self.enabled = state.enabled
        if state.enabled:
            # Counted from before the request on our own clock, so clock skew against the
            # ECS control plane can only make us renew early, never late.
            local_expiry = now + self._lifetime
            server_expiry = state.expires_at
            self.expires_at = (
                min(local_expiry, server_expiry) if server_expiry is not None else local_expiry
            )
        else:
            self.expires_at = None
        if self.last_error is not None:
            log.info("task protection calls work again")
        self.last_error = None
        if enabled != state.enabled:
            self._record_error(
                f"task protection PUT enabled={enabled} answered enabled={state.enabled}"
            )
        elif state.enabled and was_enabled:
            log.debug("task protection renewed until %s", self.expires_at)
        elif state.enabled:
            log.info("task protection on until %s", self.expires_at)
        else:
            log.info("task protection off")

    def _record_error(self, message: str) -> None:
        # The same failure repeats at every evaluation (a standalone task gets TASK_NOT_VALID
        # forever): warn when it changes, not every time.
        if message != self.last_error:
            log.warning("%s (retrying)", message)
        else:
            log.debug("%s (retrying)", message)
        self.last_error = message
