"""Retry with exponential back-off, honouring ``Retry-After``: shared by every HTTP client."""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

T = TypeVar("T")


class RetryableError(Exception):
    """A failure worth trying again (network error, 429, 5xx)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """How long and how often to retry one call.

    ``max_attempts`` and ``max_elapsed`` both bound the retries (``None``: unbounded); the
    delay grows from ``base`` by ``factor`` up to ``max_delay``, with full jitter so that a
    fleet of agents does not retry in lock-step after a coordinator blip.
    """

    max_attempts: int | None = 5
    max_elapsed: float | None = None
    base: float = 0.25
    factor: float = 2.0
    max_delay: float = 10.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        ceiling = min(self.max_delay, self.base * self.factor ** (attempt - 1))
        return ceiling / 2 + rng.uniform(0, ceiling / 2)


NO_RETRY = RetryPolicy(max_attempts=1)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max((when - (now or datetime.now(UTC))).total_seconds(), 0.0)


async def retrying(
    call: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    *,
    describe: str = "request",
    on_retry: Callable[[str, int, float], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    give_up_at: Callable[[], float | None] | None = None,
) -> T:
    """Run ``call`` until it succeeds, raises a non-retryable error, or the policy gives up.

    ``give_up_at`` is asked before every wait: a time on ``clock`` after which no retry is
    started. It is a callable, not a number, because a drain deadline can appear (SIGTERM)
    while a long retry loop is already waiting out a coordinator outage. A wait that would end
    past it is cut short so that one last attempt starts right at it: a server that comes back
    just before the give-up time still gets the call (a job's finish), instead of the loop
    giving up a whole back-off early.
    The last :class:`RetryableError` is re-raised when the policy is exhausted.
    """
    rng = rng or random.Random()
    started = clock()
    attempt = 0
    while True:
        attempt += 1
        try:
            return await call()
        except RetryableError as exc:
            if policy.max_attempts is not None and attempt >= policy.max_attempts:
                raise
            wait = policy.delay(attempt, exc.retry_after, rng)
            if policy.max_elapsed is not None and clock() + wait - started > policy.max_elapsed:
                raise
            limit = give_up_at() if give_up_at is not None else None
            if limit is not None and clock() + wait > limit:
                wait = limit - clock()
                if wait <= 0:
                    raise
            if on_retry is not None:
                on_retry(f"{describe}: {exc}", attempt, wait)
            await sleep(wait)
