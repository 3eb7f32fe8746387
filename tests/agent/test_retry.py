"""Back-off, Retry-After and the deadline cut-off of the shared retry loop (fake clock)."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from fleetdrain.agent.retry import RetryableError, RetryPolicy, parse_retry_after, retrying


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.waits: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        self.now += seconds


def failing(times: int, retry_after: float | None = None):
    calls = {"n": 0}

    async def call() -> str:
        calls["n"] += 1
        if calls["n"] <= times:
            raise RetryableError("503", retry_after=retry_after)
        return "ok"

    return call, calls


async def test_backs_off_then_succeeds():
    t = FakeTime()
    call, calls = failing(3)
    policy = RetryPolicy(max_attempts=5, base=1.0, factor=2.0, max_delay=10.0)
    result = await retrying(call, policy, sleep=t.sleep, clock=t.clock, rng=random.Random(1))
    assert result == "ok" and calls["n"] == 4
    # Full jitter within [ceiling/2, ceiling] of 1, 2, 4 seconds.
    for wait, ceiling in zip(t.waits, (1.0, 2.0, 4.0), strict=True):
        assert ceiling / 2 <= wait <= ceiling


async def test_retry_after_is_honoured():
    t = FakeTime()
    call, _ = failing(2, retry_after=7.0)
    await retrying(call, RetryPolicy(max_attempts=5), sleep=t.sleep, clock=t.clock)
    assert t.waits == [7.0, 7.0]


async def test_gives_up_after_max_attempts():
    t = FakeTime()
    call, calls = failing(10)
    with pytest.raises(RetryableError):
        await retrying(call, RetryPolicy(max_attempts=3), sleep=t.sleep, clock=t.clock)
    assert calls["n"] == 3


async def test_a_deadline_that_appears_mid_loop_cuts_it_short():
    t = FakeTime()
    call, calls = failing(10_000)
    deadline: dict[str, float | None] = {"at": None}

    async def sleep(seconds: float) -> None:
        await t.sleep(seconds)
        if t.now > 20 and deadline["at"] is None:
            deadline["at"] = t.now + 5  # SIGTERM: five seconds left for this call

    policy = RetryPolicy(max_attempts=None, max_elapsed=3600, base=1.0, max_delay=2.0)
    with pytest.raises(RetryableError):
        await retrying(call, policy, sleep=sleep, clock=t.clock, give_up_at=lambda: deadline["at"])
    assert deadline["at"] is not None
    assert t.now <= deadline["at"]
    assert calls["n"] < 40


async def test_the_last_wait_is_cut_to_the_give_up_time_for_one_final_attempt():
    # Back-off of 2..4 s would jump past the give-up time (10 s); the server is back at 9.5 s.
    t = FakeTime()
    calls: list[float] = []

    async def call() -> str:
        calls.append(t.now)
        if t.now < 9.5:
            raise RetryableError("503")
        return "ok"

    policy = RetryPolicy(max_attempts=None, base=4.0, factor=1.0, max_delay=4.0)
    result = await retrying(
        call, policy, sleep=t.sleep, clock=t.clock, rng=random.Random(3), give_up_at=lambda: 10.0
    )
    assert result == "ok"
    assert calls[-1] == 10.0  # the final attempt, right at the give-up time
    assert all(w > 0 for w in t.waits)


async def test_nothing_is_started_after_the_give_up_time():
    t = FakeTime()
    call, calls = failing(10_000)
    policy = RetryPolicy(max_attempts=None, base=0.3, factor=1.0, max_delay=0.3)
    with pytest.raises(RetryableError):
        await retrying(call, policy, sleep=t.sleep, clock=t.clock, give_up_at=lambda: 2.0)
    assert t.now == pytest.approx(2.0)
    # attempts at 0, then every 0.15..0.3 s, the last one exactly at 2.0; none after it
    assert 7 <= calls["n"] <= 15


def test_parse_retry_after():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    http_date = (now + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(http_date, now=now) == 30.0
