"""``start``'s metadata tags are retried as the Go agent retries them (agent/tags.go).

Up to 5 attempts, ``--wait-for-ecs-meta-data-timeout`` (or ``-ec2-``) / 5 apart, then an
error and registration without those tags. Real loopback HTTP: a scripted metadata server that
hangs, fails or answers each request in turn and counts them; the IMDS stand-in for EC2.
Times are bounded generously (the machine is busy); the request counts are what is checked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import pytest

from fleetdrain.agent import cli
from fleetdrain.agent.minihttp import HttpClient
from fleetdrain.agent.settings import StartSettings, parse_go_duration, settings_from_args
from fleetdrain.agent.start import METADATA_ATTEMPTS, gather_tags
from fleetdrain.drill.aws.endpoints import ImdsStandIn
from tests.agent.test_ecs import closed_port, http_response

TASK_ARN = "arn:aws:ecs:us-east-1:123456789012:task/ci-agents/0123abcd"
METADATA = http_response(
    b'{"TaskARN": "%s", "Cluster": "ci-agents", "Family": "bk-agent", "Revision": "7"}'
    % TASK_ARN.encode()
)
HANG = None  # a scripted step: read the request, never answer


class ScriptedServer:
    """A loopback server that gives request n the n-th step of ``script`` (raw response bytes,
    or :data:`HANG`), and the last step to every request after that; counts requests."""

    def __init__(self, *script: bytes | None) -> None:
        self.script = script
        self.requests: list[bytes] = []
        self._release = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._writers.append(writer)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            step = self.script[min(len(self.requests), len(self.script) - 1)]
            self.requests.append(head)
            if step is HANG:
                await self._release.wait()
            else:
                writer.write(step)
                await writer.drain()
            writer.close()

        self._server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v4/0123abcd-1"

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._release.set()
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


def ecs_settings(wait: str | float, tags: list[str] | None = None) -> StartSettings:
    """A string ``wait`` is a Go duration, as the flag gives it; a number is seconds."""
    return StartSettings.model_validate(
        {
            "token": "t",
            "tags": ["queue=default"] if tags is None else tags,
            "tags_from_ecs_meta_data": True,
            "wait_for_ecs_meta_data_timeout": wait,
        }
    )


def messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


async def until(cond: Callable[[], bool], limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------ ECS metadata


@pytest.mark.slow  # real waits between the attempts
async def test_ecs_tags_arrive_after_a_hang_and_a_failure(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="fleetdrain")
    server = ScriptedServer(HANG, http_response(b"busy", "500 Internal Server Error"), METADATA)
    async with server as uri:
        monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", uri)
        tags = await gather_tags(ecs_settings("1s"), HttpClient())
    assert len(server.requests) == 3
    assert all(r.startswith(b"GET /v4/0123abcd-1/task HTTP/1.1\r\n") for r in server.requests)
    assert tags == [
        "queue=default",
        f"ecs:task-arn={TASK_ARN}",
        "ecs:cluster=ci-agents",
        "ecs:task-family=bk-agent",
        "ecs:task-revision=7",
    ]
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 2, warnings
    assert "TimeoutError" in warnings[0] and "(attempt 1/5;" in warnings[0], warnings
    assert "HTTP 500" in warnings[1] and "(attempt 2/5;" in warnings[1], warnings
    assert "ECS task metadata: read at attempt 3/5" in messages(caplog, logging.INFO)
    assert messages(caplog, logging.ERROR) == []


async def test_ecs_tags_on_the_first_attempt_log_nothing_about_retries(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="fleetdrain")
    server = ScriptedServer(METADATA)
    async with server as uri:
        monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", uri)
        tags = await gather_tags(ecs_settings(10.0, tags=[]), HttpClient())
    assert len(server.requests) == 1
    assert f"ecs:task-arn={TASK_ARN}" in tags
    assert not [m for m in messages(caplog, logging.INFO) if "attempt" in m]
    assert messages(caplog, logging.WARNING) == messages(caplog, logging.ERROR) == []


@pytest.mark.slow  # real waits between the attempts
async def test_a_metadata_endpoint_that_never_answers_is_given_up_after_five_attempts(
    monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="fleetdrain")
    wait = 0.5
    server = ScriptedServer(HANG)
    async with server as uri:
        monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", uri)
        started = time.monotonic()
        tags = await gather_tags(ecs_settings(f"{wait}s"), HttpClient())
        took = time.monotonic() - started
    assert len(server.requests) == METADATA_ATTEMPTS == 5
    assert tags == ["queue=default"]
    assert took < wait * 4 + 5, f"took {took:.1f}s"
    warnings = messages(caplog, logging.WARNING)
    assert [f"(attempt {n}/5;" in w for n, w in enumerate(warnings, 1)] == [True] * 4, warnings
    [error] = messages(caplog, logging.ERROR)
    assert "(attempt 5/5)" in error
    assert "registering without ecs:* tags: the drain controller cannot find this agent's task" in (
        error
    )


@pytest.mark.slow  # real waits between the attempts
async def test_an_unreachable_endpoint_is_tried_five_times_a_fifth_of_the_wait_apart(
    monkeypatch, caplog
):
    """Refused at once, so the waits are all the time there is: 4 of wait / 5 at least."""
    caplog.set_level(logging.INFO, logger="fleetdrain")
    wait = 0.5
    monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", f"http://127.0.0.1:{closed_port()}/v4/x")
    started = time.monotonic()
    tags = await gather_tags(ecs_settings(f"{wait * 1000:.0f}ms"), HttpClient())
    took = time.monotonic() - started
    assert tags == ["queue=default"]
    assert wait * 4 / 5 <= took < wait * 4 + 5, f"took {took:.1f}s"
    warnings = messages(caplog, logging.WARNING)
    assert len(warnings) == 4 and all("ConnectionRefused" in w for w in warnings), warnings
    assert len(messages(caplog, logging.ERROR)) == 1


@pytest.mark.parametrize("step", ["request", "wait"])
async def test_gather_tags_is_cancelled_at_once_mid_request_or_mid_wait(monkeypatch, caplog, step):
    """SIGTERM during start-up cancels gather_tags (_unless_stopped_early): neither a hanging
    request nor the wait between attempts may hold it up."""
    caplog.set_level(logging.INFO, logger="fleetdrain")
    # A long wait: the pause between attempts is 12 s, a request may take its full 2 s.
    server = ScriptedServer(HANG if step == "request" else http_response(b"no", "503 No"))
    async with server as uri:
        monkeypatch.setenv("ECS_CONTAINER_METADATA_URI_V4", uri)
        task = asyncio.create_task(gather_tags(ecs_settings("1m"), HttpClient()))
        if step == "request":
            await until(lambda: len(server.requests) == 1)
        else:
            await until(lambda: bool(messages(caplog, logging.WARNING)))
        cancelled = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        took = time.monotonic() - cancelled
        assert len(server.requests) == 1
    assert took < 1.5, f"took {took:.1f}s"  # the wait it skipped is 12 s


# ------------------------------------------------------------------------------ EC2 metadata


@pytest.mark.slow  # real waits between the attempts
async def test_ec2_tags_arrive_after_failed_attempts(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="fleetdrain")
    imds = ImdsStandIn("i-0abc", life_cycle="spot")
    imds.fail_next(2, 500)  # the first two attempts' token PUTs
    with imds.serve():
        monkeypatch.setenv("FLEETDRAIN_IMDS_ENDPOINT", imds.base_url_for("i-0abc"))
        settings = StartSettings.model_validate(
            {
                "token": "t",
                "tags": ["queue=default"],
                "tags_from_ec2_meta_data": True,
                "wait_for_ec2_meta_data_timeout": 1.0,
            }
        )
        tags = await gather_tags(settings, HttpClient())
    puts = [r.status for r in imds.requests if r.method == "PUT"]
    assert puts == [500, 500, 200]
    assert "aws:instance-id=i-0abc" in tags and "aws:instance-life-cycle=spot" in tags
    assert tags[0] == "queue=default"
    assert "EC2 instance metadata: read at attempt 3/5" in messages(caplog, logging.INFO)
    assert len(messages(caplog, logging.WARNING)) == 2
    assert messages(caplog, logging.ERROR) == []


async def test_ec2_metadata_that_cannot_be_read_is_given_up(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="fleetdrain")
    monkeypatch.setenv("FLEETDRAIN_IMDS_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    settings = StartSettings.model_validate(
        {"token": "t", "tags_from_ec2_meta_data": True, "wait_for_ec2_meta_data_timeout": "250ms"}
    )
    assert await gather_tags(settings, HttpClient()) == []
    assert len(messages(caplog, logging.WARNING)) == 4
    [error] = messages(caplog, logging.ERROR)
    assert "(attempt 5/5): registering without aws:* tags" in error


# ---------------------------------------------------------------------------------- settings

ENV = {
    "ecs": "BUILDKITE_AGENT_WAIT_FOR_ECS_META_DATA_TIMEOUT",
    "ec2": "BUILDKITE_AGENT_WAIT_FOR_EC2_META_DATA_TIMEOUT",
}


def start_settings(*args: str) -> StartSettings:
    # The parser reads the environment when it is built, as cli.main builds it.
    return settings_from_args(cli._parser().parse_args(["start", "--token", "t", *args]))


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV.values():
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_metadata_waits_default_to_ten_seconds(clean_env):
    settings = start_settings()
    assert settings.wait_for_ecs_meta_data_timeout == 10.0
    assert settings.wait_for_ec2_meta_data_timeout == 10.0
    clean_env.setenv(ENV["ecs"], "")  # an empty variable is unset, as for the Go agent's flags
    assert start_settings().wait_for_ecs_meta_data_timeout == 10.0


def test_metadata_waits_from_flags_and_variables_as_go_durations(clean_env):
    settings = start_settings(
        "--wait-for-ecs-meta-data-timeout",
        "1m30s",
        "--wait-for-ec2-meta-data-timeout",
        "500ms",
    )
    assert settings.wait_for_ecs_meta_data_timeout == 90.0
    assert settings.wait_for_ec2_meta_data_timeout == 0.5
    clean_env.setenv(ENV["ecs"], "2s")
    clean_env.setenv(ENV["ec2"], "1h")
    from_env = start_settings()
    assert from_env.wait_for_ecs_meta_data_timeout == 2.0
    assert from_env.wait_for_ec2_meta_data_timeout == 3600.0
    # The flag wins over the variable.
    flag_wins = start_settings("--wait-for-ecs-meta-data-timeout", "0")
    assert flag_wins.wait_for_ecs_meta_data_timeout == 0


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("10s", 10.0), ("0", 0.0), ("1.5m", 90.0), ("2h45m", 9900.0), (".5s", 0.5), ("300us", 3e-4)],
)
def test_go_durations(text, seconds):
    assert parse_go_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("args", "env", "expect"),
    [
        (["--wait-for-ecs-meta-data-timeout", "10"], {}, "'10' is not a Go duration (missing unit"),
        (["--wait-for-ec2-meta-data-timeout", "ten"], {}, "'ten' is not a Go duration"),
        (["--wait-for-ecs-meta-data-timeout=-1s"], {}, "'-1s' is negative"),
        ([], {"ecs": "5 s"}, "'5 s' is not a Go duration"),
        ([], {"ec2": "1d"}, "'1d' is not a Go duration"),
    ],
)
def test_a_bad_metadata_wait_is_one_clear_line_and_exit_2(clean_env, capsys, args, env, expect):
    for key, value in env.items():
        clean_env.setenv(ENV[key], value)
    assert cli.main(["start", "--token", "t", *args]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("fleetdrain-agent start: wait_for_"), err
    assert expect in err[0], err
    which = "ecs" if "ecs" in " ".join([*args, *env]) else "ec2"
    assert f"--wait-for-{which}-meta-data-timeout [${ENV[which]}]" in err[0], err


def test_the_metadata_waits_are_in_the_help(clean_env, capsys):
    with pytest.raises(SystemExit):
        cli.main(["start", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for which in ("ecs", "ec2"):
        assert f"--wait-for-{which}-meta-data-timeout" in text
        assert f"[${ENV[which]}] (default 10s)" in text
