"""fleetdrain.agent.ecs against the ECS agent stand-in over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta

import pytest

from fleetdrain.agent.ecs import (
    MetadataError,
    ProtectionError,
    ProtectionKeeper,
    TaskProtection,
    ecs_task_tags,
)
from fleetdrain.agent.minihttp import HttpClient
from fleetdrain.drill.aws.endpoints import EcsAgentStandIn

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class ManualClock:
    """Wall-clock stand-in shared by the stand-in (server thread) and the code under test."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kwargs: float) -> None:
        self.now += timedelta(**kwargs)


@pytest.fixture(scope="module")
def module_clock() -> ManualClock:
    return ManualClock()


@pytest.fixture(scope="module")
def served(module_clock: ManualClock) -> Iterator[EcsAgentStandIn]:
    # One server for the module (starting and stopping uvicorn costs ~0.2 s); reset per test.
    ecs = EcsAgentStandIn(cluster="ci-agents", clock=module_clock)
    with ecs.serve():
        yield ecs


@pytest.fixture
def clock(module_clock: ManualClock) -> ManualClock:
    module_clock.now = START
    return module_clock


@pytest.fixture
def standin(served: EcsAgentStandIn, clock: ManualClock) -> EcsAgentStandIn:
    served.reset()
    return served


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    yield HttpClient()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(cond: Callable[[], bool], limit: float = 2.0) -> float:
    """Wait until cond() holds; return how long it took."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > limit:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)
    return time.monotonic() - start


# ------------------------------------------------------------------------------- metadata


async def test_task_tags_from_metadata(standin: EcsAgentStandIn, client: HttpClient):
    task = standin.add_task(
        "0123abcd", family="bk-agent", revision="7", availability_zone="eu-west-1b"
    )
    env = standin.env_for(task.task_id)
    tags = await ecs_task_tags(client, env["ECS_CONTAINER_METADATA_URI_V4"])
    assert tags == {
        "ecs:task-arn": "arn:aws:ecs:us-east-1:123456789012:task/ci-agents/0123abcd",
        "ecs:cluster": "ci-agents",
        "ecs:availability-zone": "eu-west-1b",
        "ecs:launch-type": "EC2",
        "ecs:task-family": "bk-agent",
        "ecs:task-revision": "7",
    }


async def test_task_tags_keep_cluster_arn_and_tell_tasks_apart(clock: ManualClock, client):
    arn = "arn:aws:ecs:us-east-1:123456789012:cluster/ci"
    ecs = EcsAgentStandIn(cluster=arn, clock=clock)
    with ecs.serve():
        a, b = ecs.add_task("aaaa", launch_type="FARGATE"), ecs.add_task("bbbb")
        tags_a = await ecs_task_tags(
            client, ecs.env_for(a.task_id)["ECS_CONTAINER_METADATA_URI_V4"]
        )
        tags_b = await ecs_task_tags(
            client, ecs.env_for(b.task_id)["ECS_CONTAINER_METADATA_URI_V4"]
        )
    assert tags_a["ecs:cluster"] == arn
    assert tags_a["ecs:task-arn"].endswith("task/ci/aaaa")
    assert tags_a["ecs:launch-type"] == "FARGATE"
    assert tags_b["ecs:task-arn"].endswith("task/ci/bbbb")


async def test_task_tags_errors_are_metadata_errors(standin: EcsAgentStandIn, client):
    task = standin.add_task()
    uri = standin.env_for(task.task_id)["ECS_CONTAINER_METADATA_URI_V4"]
    standin.fail_next(1, 500, endpoint="metadata")
    with pytest.raises(MetadataError, match="HTTP 500"):
        await ecs_task_tags(client, uri)
    assert standin.base_url is not None
    with pytest.raises(MetadataError, match="HTTP 404"):
        await ecs_task_tags(client, f"{standin.base_url}/v4/no-such-container")
    started = time.monotonic()
    with pytest.raises(MetadataError, match="ConnectionRefused") as info:
        await ecs_task_tags(client, f"http://127.0.0.1:{closed_port()}/v4/x")
    assert time.monotonic() - started < 1.5
    assert "\n" not in str(info.value)


class RawServer:
    """A loopback server that answers every request with the given raw HTTP response bytes."""

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.requests: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            self.requests.append(head + await reader.readexactly(length))
            writer.write(self.response)
            await writer.drain()
            writer.close()

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def http_response(body: bytes, status: str = "200 OK", chunked: bool = False) -> bytes:
    if chunked:
        parts = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in (body[:7], body[7:]) if p)
        return (
            f"HTTP/1.1 {status}\r\nTransfer-Encoding: chunked\r\n\r\n".encode()
            + parts
            + b"0\r\n\r\n"
        )
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


async def test_task_tags_reject_metadata_without_task_arn(client):
    async with RawServer(http_response(b'{"Cluster": "c"}')) as base:
        with pytest.raises(MetadataError, match="TaskARN: Field required"):
            await ecs_task_tags(client, f"{base}/v4/x")
    async with RawServer(http_response(b'{"TaskARN": 7, "Cluster": "c"}')) as base:
        with pytest.raises(MetadataError, match="TaskARN: expected a string"):
            await ecs_task_tags(client, f"{base}/v4/x")
    async with RawServer(http_response(b"<html>")) as base:
        with pytest.raises(MetadataError, match="not JSON"):
            await ecs_task_tags(client, f"{base}/v4/x")


async def test_task_tags_from_a_chunked_answer(client):
    body = b'{"TaskARN": "arn:aws:ecs:r:1:task/c/t", "Cluster": "c", "Extra": {"x": 1}}'
    server = RawServer(http_response(body, chunked=True))
    async with server as base:
        tags = await ecs_task_tags(client, f"{base}/v4/x")
    assert tags == {"ecs:task-arn": "arn:aws:ecs:r:1:task/c/t", "ecs:cluster": "c"}
    assert server.requests[0].startswith(b"GET /v4/x/task HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"protection": {"ExpirationDate": null}}', "ProtectionEnabled: Field required"),
        (b'{"protection": {"ProtectionEnabled": "yes"}}', "ProtectionEnabled: expected a boolean"),
        (
            b'{"protection": {"ProtectionEnabled": true, "ExpirationDate": "soon"}}',
            "ExpirationDate: not an RFC 3339 time",
        ),
        (b'{"protection": []}', "protection: expected an object"),
        (b"[]", "body: expected an object"),
        (b"{}", "HTTP 200"),
    ],
)
async def test_protection_answers_that_make_no_sense_are_protection_errors(client, body, message):
    async with RawServer(http_response(body)) as base:
        with pytest.raises(ProtectionError, match=message) as info:
            await TaskProtection(client, f"{base}/api/x").get()
    assert "\n" not in str(info.value)


async def test_protection_sends_json_and_reads_a_naive_expiry_as_utc(client):
    body = b'{"protection": {"ProtectionEnabled": true, "ExpirationDate": "2026-03-01T13:00:00"}}'
    server = RawServer(http_response(body))
    async with server as base:
        state = await TaskProtection(client, f"{base}/api/x").set(True, 60)
    assert state.enabled and state.expires_at == datetime(2026, 3, 1, 13, 0, tzinfo=UTC)
    head, _, sent = server.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"PUT /api/x/task-protection/v1/state HTTP/1.1\r\n")
    assert b"Content-Type: application/json" in head
    assert json.loads(sent) == {"ProtectionEnabled": True, "ExpiresInMinutes": 60}


async def test_an_answer_that_is_not_http_is_an_error_not_a_crash(client):
    async with RawServer(b"SSH-2.0-OpenSSH_9.6\r\n") as base:
        with pytest.raises(ProtectionError, match="not an HTTP response"):
            await TaskProtection(client, f"{base}/api/x").get()


# ------------------------------------------------------------------------ task protection


async def test_protection_set_get_and_lapse(standin, client, clock: ManualClock):
    task = standin.add_task()
    tp = TaskProtection(client, standin.env_for(task.task_id)["ECS_AGENT_URI"])
    assert (await tp.get()).enabled is False

    state = await tp.set(True, 5)
    assert state.enabled is True
    assert state.task_arn == task.task_arn
    assert state.expires_at == clock.now + timedelta(minutes=5)
    assert (await tp.get()).enabled is True

    clock.advance(minutes=5)
    lapsed = await tp.get()
    assert lapsed.enabled is False and lapsed.expires_at is None

    await tp.set(True, 5)
    off = await tp.set(False, 5)
    assert off.enabled is False and off.expires_at is None
    # the expiry is only sent when enabling
    assert [(p.enabled, p.expires_in_minutes) for p in standin.puts(task.task_id)] == [
        (True, 5),
        (True, 5),
        (False, None),
    ]


async def test_protection_defaults_to_120_minutes(standin, client, clock: ManualClock):
    task = standin.add_task()
    tp = TaskProtection(client, standin.env_for(task.task_id)["ECS_AGENT_URI"])
    state = await tp.set(True)
    assert state.expires_at == clock.now + timedelta(minutes=120)


@pytest.mark.parametrize("minutes", [0, 2881])
async def test_protection_expiry_out_of_range(standin, client, minutes: int):
    task = standin.add_task()
    tp = TaskProtection(client, standin.env_for(task.task_id)["ECS_AGENT_URI"])
    with pytest.raises(ProtectionError) as info:
        await tp.set(True, minutes)
    assert info.value.code == "InvalidParameterException"
    assert info.value.status == 400
    assert standin.protection(task.task_id).enabled is False


async def test_protection_request_validation_like_ecs(standin, client):
    task = standin.add_task()
    url = standin.env_for(task.task_id)["ECS_AGENT_URI"] + "/task-protection/v1/state"
    unknown = await client.put(url, json={"ProtectionEnabled": True, "Bogus": 1})
    assert unknown.status_code == 400
    assert unknown.json() == {
        "error": {
            "Code": "InvalidParameterException",
            "Message": "UpdateTaskProtection: failed to decode request",
        }
    }
    missing = await client.put(url, json={"ExpiresInMinutes": 5})
    assert missing.status_code == 400
    assert missing.json()["error"]["Arn"] == task.task_arn
    wrong_type = await client.put(url, json={"ProtectionEnabled": "yes"})
    assert wrong_type.status_code == 400
    # Go's decoder matches field names case-insensitively
    ok = await client.put(url, json={"protectionEnabled": True, "expiresInMinutes": 3})
    assert ok.status_code == 200
    assert ok.json()["protection"]["ProtectionEnabled"] is True


async def test_protection_failure_for_standalone_task(standin, client):
    task = standin.add_task(service_name=None)
    tp = TaskProtection(client, standin.env_for(task.task_id)["ECS_AGENT_URI"])
    with pytest.raises(ProtectionError, match="TASK_NOT_VALID") as info:
        await tp.set(True, 5)
    assert info.value.code == "TASK_NOT_VALID"


async def test_protection_server_error_and_unreachable(standin, client):
    task = standin.add_task()
    tp = TaskProtection(client, standin.env_for(task.task_id)["ECS_AGENT_URI"])
    standin.fail_next(1, 503)
    with pytest.raises(ProtectionError) as info:
        await tp.set(True, 5)
    assert info.value.status == 503 and info.value.code == "ServerException"
    gone = TaskProtection(client, f"http://127.0.0.1:{closed_port()}/api/x")
    with pytest.raises(ProtectionError, match="ConnectionRefused"):
        await gone.get()


# ------------------------------------------------------------------------ the keeper loop


class Busy:
    def __init__(self) -> None:
        self.value = False

    def __call__(self) -> bool:
        return self.value


@pytest.fixture
async def keeper_setup(standin: EcsAgentStandIn, client, clock: ManualClock):
    task = standin.add_task()
    tp = TaskProtection(client, standin.env_for(task.task_id)["ECS_AGENT_URI"])
    busy = Busy()
    keeper = ProtectionKeeper(tp, busy, expires_in_minutes=3, check_interval=0.02, clock=clock)
    runner = asyncio.create_task(keeper.run())
    yield task, busy, keeper, runner
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner


async def test_keeper_follows_busy_and_renews_before_expiry(
    keeper_setup, standin: EcsAgentStandIn, clock: ManualClock
):
    task, busy, keeper, _ = keeper_setup
    await asyncio.sleep(0.1)
    assert standin.puts(task.task_id) == []  # idle from the start: nothing to do

    busy.value = True
    keeper.notify()
    await eventually(lambda: keeper.enabled)
    assert standin.protection(task.task_id).enabled
    assert [(p.enabled, p.expires_in_minutes) for p in standin.puts(task.task_id)] == [(True, 3)]

    # 2 of 3 minutes left: more than the 1/3 margin, so no renewal yet
    clock.advance(minutes=1)
    await asyncio.sleep(0.15)
    assert len(standin.puts(task.task_id)) == 1

    # 59 s left: inside the margin, renewed well before the lapse
    clock.advance(minutes=1, seconds=1)
    await eventually(lambda: keeper.expires_at == clock.now + timedelta(minutes=3))
    assert len(standin.puts(task.task_id)) == 2
    renewed = standin.protection(task.task_id)
    assert renewed.enabled and renewed.expires_at == clock.now + timedelta(minutes=3)

    # past what would have been the first expiry: still protected
    clock.advance(minutes=1)
    await asyncio.sleep(0.05)
    assert standin.protection(task.task_id).enabled

    busy.value = False
    keeper.notify()
    await eventually(lambda: not keeper.enabled, limit=0.5)
    assert not standin.protection(task.task_id).enabled
    assert keeper.expires_at is None
    assert standin.puts(task.task_id)[-1].enabled is False
    count = len(standin.puts(task.task_id))
    await asyncio.sleep(0.1)
    assert len(standin.puts(task.task_id)) == count  # idle and off: quiet


async def test_keeper_notify_acts_at_once_not_at_the_next_check(
    standin: EcsAgentStandIn, client, clock: ManualClock
):
    task = standin.add_task()
    tp = TaskProtection(client, standin.env_for(task.task_id)["ECS_AGENT_URI"])
    busy = Busy()
    keeper = ProtectionKeeper(tp, busy, check_interval=60, clock=clock)
    runner = asyncio.create_task(keeper.run())
    try:
        await asyncio.sleep(0.05)  # first evaluation done: idle, nothing to do
        busy.value = True
        keeper.notify()
        assert await eventually(lambda: keeper.enabled) < 0.5
        assert standin.protection(task.task_id).enabled
        busy.value = False
        keeper.notify()
        assert await eventually(lambda: not keeper.enabled) < 0.5
        assert not standin.protection(task.task_id).enabled
        assert [p.enabled for p in standin.puts(task.task_id)] == [True, False]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_keeper_release_turns_protection_off(
    standin: EcsAgentStandIn, client, clock: ManualClock
):
    task = standin.add_task()
    tp = TaskProtection(client, standin.env_for(task.task_id)["ECS_AGENT_URI"])
    keeper = ProtectionKeeper(tp, lambda: True, clock=clock)
    await keeper.release()
    assert standin.puts(task.task_id) == []  # nothing to release
    await keeper.evaluate()
    assert standin.protection(task.task_id).enabled
    await keeper.release()
    assert not keeper.enabled and not standin.protection(task.task_id).enabled
    standin.fail_next(1, 500)
    await keeper.evaluate()
    assert keeper.last_error is not None  # evaluate records, does not raise


class AnswerHeldBack:
    """A TaskProtection whose PUT reaches the ECS agent, but whose answer waits for ``gate``."""

    def __init__(self, inner: TaskProtection) -> None:
        self.inner = inner
        self.gate = asyncio.Event()
        self.applied = asyncio.Event()

    async def set(self, enabled: bool, expires_in_minutes: int | None = None):
        state = await self.inner.set(enabled, expires_in_minutes)
        self.applied.set()
        await self.gate.wait()
        return state


@pytest.mark.parametrize("busy_at_stop", [False, True])
async def test_keeper_cancelled_mid_put_lets_it_finish_and_does_not_repeat_it(
    standin: EcsAgentStandIn, client, clock: ManualClock, busy_at_stop: bool
):
    # The shutdown race CI caught: the job ended, the PUT turning protection off reached the
    # ECS agent, and SIGTERM cancelled run() before its answer was read. release() must take
    # that answer, not send the PUT again (nor leave protection on when the PUT was to enable).
    task = standin.add_task()
    held = AnswerHeldBack(TaskProtection(client, standin.env_for(task.task_id)["ECS_AGENT_URI"]))
    busy = Busy()
    keeper = ProtectionKeeper(held, busy, check_interval=60, clock=clock)  # type: ignore[arg-type]
    held.gate.set()
    busy.value = True
    await keeper.evaluate()
    assert keeper.enabled
    held.gate.clear()
    held.applied.clear()
    if busy_at_stop:
        clock.advance(minutes=50)  # inside the renewal margin: the PUT in flight enables
    else:
        busy.value = False
    runner = asyncio.create_task(keeper.run())
    await asyncio.wait_for(held.applied.wait(), 5)
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner
    releasing = asyncio.create_task(keeper.release())
    await asyncio.sleep(0.05)
    assert not releasing.done()  # waiting for the answer in flight
    held.gate.set()
    await asyncio.wait_for(releasing, 5)
    puts = [p.enabled for p in standin.puts(task.task_id)]
    assert puts == ([True, True, False] if busy_at_stop else [True, False]), puts
    assert not keeper.enabled and not standin.protection(task.task_id).enabled


async def test_keeper_survives_server_errors(keeper_setup, standin: EcsAgentStandIn, caplog):
    task, busy, keeper, runner = keeper_setup
    standin.fail_next(2, 500)
    busy.value = True
    keeper.notify()
    await eventually(lambda: keeper.last_error is not None)
    assert "500" in keeper.last_error
    await eventually(lambda: keeper.enabled)
    assert standin.protection(task.task_id).enabled
    assert [p.status for p in standin.puts(task.task_id)] == [500, 500, 200]
    assert keeper.enabled is True and keeper.last_error is None
    assert not runner.done()
    assert any(r.name == "fleetdrain.ecs" and "500" in r.getMessage() for r in caplog.records)


async def test_keeper_survives_unreachable_agent_and_standalone_task(
    standin: EcsAgentStandIn, client, clock: ManualClock
):
    busy = Busy()
    busy.value = True
    gone = TaskProtection(client, f"http://127.0.0.1:{closed_port()}/api/x")
    standalone_task = standin.add_task(service_name=None)
    standalone = TaskProtection(client, standin.env_for(standalone_task.task_id)["ECS_AGENT_URI"])
    keepers = [
        ProtectionKeeper(tp, busy, check_interval=0.01, clock=clock) for tp in (gone, standalone)
    ]
    runners = [asyncio.create_task(k.run()) for k in keepers]
    await asyncio.sleep(0.15)
    assert not any(r.done() for r in runners)
    assert "ConnectionRefused" in (keepers[0].last_error or "")
    assert "TASK_NOT_VALID" in (keepers[1].last_error or "")
    assert all(k.enabled is False for k in keepers)
    assert len(standin.puts(standalone_task.task_id)) > 1  # retried at each evaluation
    for r in runners:
        r.cancel()
    await asyncio.gather(*runners, return_exceptions=True)


async def test_keeper_survives_a_busy_probe_that_raises(standin: EcsAgentStandIn, client, clock):
    task = standin.add_task()
    tp = TaskProtection(client, standin.env_for(task.task_id)["ECS_AGENT_URI"])
    calls = 0

    def flaky_busy() -> bool:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError("probe broke")
        return True

    keeper = ProtectionKeeper(tp, flaky_busy, check_interval=0.01, clock=clock)
    runner = asyncio.create_task(keeper.run())
    try:
        await eventually(lambda: keeper.enabled)
        assert calls > 2 and not runner.done()
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def test_keeper_rejects_expiry_ecs_would_refuse(client):
    tp = TaskProtection(client, "http://unused")
    with pytest.raises(ValueError):
        ProtectionKeeper(tp, lambda: False, expires_in_minutes=2881)
    with pytest.raises(ValueError):
        ProtectionKeeper(tp, lambda: False, expires_in_minutes=0)
