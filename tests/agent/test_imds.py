"""fleetdrain.agent.imds against the IMDSv2 stand-in over real loopback HTTP."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from fleetdrain.agent.imds import ImdsClient, ImdsError, ImdsWatcher, Notice, SpotAction
from fleetdrain.agent.minihttp import HttpClient
from fleetdrain.drill.aws.endpoints import ImdsStandIn

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class ManualClock:
    """One time line, as aware datetimes (stand-in) and as monotonic seconds (client)."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.now.timestamp()

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture(scope="module")
def module_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
def served(module_clock: ManualClock) -> Iterator[ImdsStandIn]:
    # One server for the module (starting and stopping uvicorn costs ~0.2 s); reset per test.
    standin = ImdsStandIn(
        "i-0abc",
        clock=module_clock,
        life_cycle="spot",
        instance_type="c7g.xlarge",
        availability_zone="eu-west-1c",
        ami_id="ami-0123",
    )
    with standin.serve():
        yield standin


@pytest.fixture
def clock(module_clock: ManualClock) -> ManualClock:
    module_clock.now = START
    return module_clock


@pytest.fixture
def imds(served: ImdsStandIn, clock: ManualClock) -> ImdsStandIn:
    served.reset()
    return served


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    yield HttpClient()


def make_client(client: HttpClient, imds: ImdsStandIn, clock: ManualClock, **kw) -> ImdsClient:
    assert imds.base_url is not None
    return ImdsClient(client, imds.base_url, clock=clock.monotonic, **kw)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(cond: Callable[[], bool], limit: float = 2.0) -> None:
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > limit:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


# ----------------------------------------------------------------------------- the client


async def test_ec2_tags(imds: ImdsStandIn, client, clock: ManualClock):
    tags = await make_client(client, imds, clock).ec2_tags()
    assert tags == {
        "aws:instance-id": "i-0abc",
        "aws:instance-life-cycle": "spot",
        "aws:availability-zone": "eu-west-1c",
        "aws:instance-type": "c7g.xlarge",
        "aws:ami-id": "ami-0123",
    }
    assert imds.token_puts() == 1  # one token for all five reads


async def test_get_without_token_is_401(imds: ImdsStandIn, client):
    plain = await client.get(f"{imds.base_url}/latest/meta-data/instance-id")
    assert plain.status_code == 401
    bogus = await client.get(
        f"{imds.base_url}/latest/meta-data/instance-id",
        headers={"X-aws-ec2-metadata-token": "forged"},
    )
    assert bogus.status_code == 401
    no_ttl = await client.put(f"{imds.base_url}/latest/api/token")
    assert no_ttl.status_code == 400


async def test_token_is_cached_then_refreshed_before_expiry(imds: ImdsStandIn, client, clock):
    ec2 = make_client(client, imds, clock, token_ttl=300)
    assert await ec2.get("meta-data/instance-id") == "i-0abc"
    assert await ec2.get("meta-data/instance-type") == "c7g.xlarge"
    assert imds.token_puts() == 1
    clock.advance(seconds=200)  # 100 s left: still used
    await ec2.get("meta-data/instance-id")
    assert imds.token_puts() == 1
    clock.advance(seconds=50)  # 50 s left: inside the refresh margin, never sent stale
    await ec2.get("meta-data/instance-id")
    assert imds.token_puts() == 2
    assert [r.status for r in imds.requests].count(401) == 0


async def test_token_rejected_by_imds_is_replaced_once(imds: ImdsStandIn, client, clock):
    # The client's own clock stands still while IMDS's moves on: IMDS expires the token.
    frozen = 1000.0
    ec2 = ImdsClient(client, imds.base_url or "", token_ttl=60, clock=lambda: frozen)
    await ec2.get("meta-data/instance-id")
    clock.advance(seconds=61)
    assert await ec2.get("meta-data/instance-id") == "i-0abc"
    assert imds.token_puts() == 2
    assert [r.status for r in imds.requests if r.method == "GET"] == [200, 401, 200]


async def test_spot_action_and_lifecycle_state(imds: ImdsStandIn, client, clock):
    ec2 = make_client(client, imds, clock)
    assert await ec2.spot_instance_action() is None  # 404: no notice
    assert await ec2.target_lifecycle_state() == "InService"
    when = datetime(2026, 3, 1, 12, 2, tzinfo=UTC)
    imds.set_spot_action(when, "stop")
    imds.set_target_lifecycle_state("Terminated")
    assert await ec2.spot_instance_action() == SpotAction(action="stop", time=when)
    action = await ec2.spot_instance_action()
    assert action is not None and action.time.tzinfo is not None
    assert await ec2.target_lifecycle_state() == "Terminated"
    imds.set_target_lifecycle_state(None)  # not in an Auto Scaling group
    assert await ec2.target_lifecycle_state() is None


async def test_errors_are_imds_errors(imds: ImdsStandIn, client, clock):
    ec2 = make_client(client, imds, clock)
    imds.fail_next(1, 500)
    with pytest.raises(ImdsError, match="token"):
        await ec2.token()
    await ec2.token()
    imds.fail_next(1, 503)
    with pytest.raises(ImdsError, match="HTTP 503"):
        await ec2.spot_instance_action()


async def test_unreachable_imds_fails_fast(client):
    ec2 = ImdsClient(client, f"http://127.0.0.1:{closed_port()}")
    started = time.monotonic()
    with pytest.raises(ImdsError, match="unreachable"):
        await ec2.ec2_tags()
    assert time.monotonic() - started < 1.5


async def test_silent_imds_times_out_fast(client):
    # A listener that never answers: what a container sees when the hop limit drops replies.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        port = listener.getsockname()[1]
        ec2 = ImdsClient(client, f"http://127.0.0.1:{port}", timeout=0.3)
        started = time.monotonic()
        with pytest.raises(ImdsError, match="Timeout"):
            await ec2.token()
        assert time.monotonic() - started < 1.0


async def test_instances_served_by_prefix(imds: ImdsStandIn, client, clock):
    imds.add_instance("i-0def", life_cycle="on-demand")
    other = ImdsClient(client, imds.base_url_for("i-0def"), clock=clock.monotonic)
    tags = await other.ec2_tags()
    assert tags["aws:instance-id"] == "i-0def"
    assert tags["aws:instance-life-cycle"] == "on-demand"
    # a token is bound to its instance
    token = await other.token()
    cross = await client.get(
        f"{imds.base_url}/latest/meta-data/instance-id",
        headers={"X-aws-ec2-metadata-token": token},
    )
    assert cross.status_code == 401


# ---------------------------------------------------------------------------- the watcher


async def test_watcher_spot_notice_delivered_once(imds: ImdsStandIn, client, clock):
    notices: list[Notice] = []
    watcher = ImdsWatcher(make_client(client, imds, clock), interval=0.01)
    runner = asyncio.create_task(watcher.run(notices.append))
    await asyncio.sleep(0.08)
    assert notices == []
    when = datetime(2026, 3, 1, 12, 2, tzinfo=UTC)
    imds.set_spot_action(when)
    await eventually(lambda: len(notices) == 1)
    await asyncio.sleep(0.1)  # several more polls see the same notice
    assert notices == [Notice(kind="spot", deadline=when, detail="terminate")]
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


async def test_watcher_lifecycle_terminated_with_async_callback(imds, client, clock):
    seen: list[Notice] = []

    async def on_notice(notice: Notice) -> None:
        await asyncio.sleep(0)
        seen.append(notice)

    watcher = ImdsWatcher(make_client(client, imds, clock), interval=0.01)
    runner = asyncio.create_task(watcher.run(on_notice))
    await asyncio.sleep(0.05)
    assert seen == []  # InService is no notice
    imds.set_target_lifecycle_state("Terminated")
    await eventually(lambda: len(seen) == 1)
    await asyncio.sleep(0.08)
    assert seen == [Notice(kind="lifecycle-terminated", deadline=None, detail="Terminated")]
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


async def test_watcher_keeps_polling_through_errors(imds: ImdsStandIn, client, clock, caplog):
    notices: list[Notice] = []

    def failing_handler(notice: Notice) -> None:
        notices.append(notice)
        raise RuntimeError("handler bug")

    watcher = ImdsWatcher(make_client(client, imds, clock), interval=0.01)
    imds.fail_next(6, 500)
    runner = asyncio.create_task(watcher.run(failing_handler))
    await eventually(lambda: any(r.status == 500 for r in imds.requests))
    when = datetime(2026, 3, 1, 12, 2, tzinfo=UTC)
    imds.set_spot_action(when)
    imds.set_target_lifecycle_state("Terminated")
    await eventually(lambda: len(notices) == 2)
    await asyncio.sleep(0.05)
    assert {n.kind for n in notices} == {"spot", "lifecycle-terminated"}
    assert len(notices) == 2  # a failing handler does not mean redelivery
    assert not runner.done()
    assert any(
        r.name == "fleetdrain.imds" and "poll failed" in r.getMessage() for r in caplog.records
    )
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)


async def test_watcher_survives_unexpected_exceptions(imds: ImdsStandIn, client, clock):
    class Glitchy(ImdsClient):
        calls = 0

        async def spot_instance_action(self) -> SpotAction | None:
            Glitchy.calls += 1
            if Glitchy.calls == 1:
                raise RuntimeError("not an ImdsError")
            return await super().spot_instance_action()

    assert imds.base_url is not None
    watcher = ImdsWatcher(Glitchy(client, imds.base_url, clock=clock.monotonic))
    imds.set_spot_action(START + timedelta(minutes=2))
    assert await watcher.poll_once(lambda n: None) == []
    assert [n.kind for n in await watcher.poll_once(lambda n: None)] == ["spot"]


async def test_watcher_new_spot_time_is_a_new_notice(imds: ImdsStandIn, client, clock):
    watcher = ImdsWatcher(make_client(client, imds, clock))
    first = datetime(2026, 3, 1, 12, 2, tzinfo=UTC)
    imds.set_spot_action(first)
    assert len(await watcher.poll_once(lambda n: None)) == 1
    assert await watcher.poll_once(lambda n: None) == []
    imds.set_spot_action(first + timedelta(seconds=30))
    delivered = await watcher.poll_once(lambda n: None)
    assert [n.deadline for n in delivered] == [first + timedelta(seconds=30)]
