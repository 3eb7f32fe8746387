"""The PID-1 host that ``start`` and ``wrap`` share, and what each command gives it.

In-process, with a stand-in worker: a notice drains softly and the host then holds, healthy,
until a stop signal; ``start`` reads ``--watch-imds`` / ``--imds-poll-interval`` under wrap's
names and variables; the host and logging set-up stay free of httpx, pydantic and Buildkite.
The real processes are in ``test_start_imds.py`` and ``test_wrap_imds.py``.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fleetdrain.agent import cli
from fleetdrain.agent.host import Host, HostError, HostSettings
from fleetdrain.agent.imds import Notice
from tests.agent.fakes import NoReaper

REPO = Path(__file__).resolve().parents[2]


class _Worker:
    """Idle until told to stop; remembers how."""

    def __init__(self) -> None:
        self.done = asyncio.Event()
        self.deadline: float | str | None = "never asked"
        self.forced: str | None = None

    async def run(self) -> int:
        await self.done.wait()
        return 0

    def busy(self) -> bool:
        return False

    def stop_gracefully(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.done.set()

    def stop_forcefully(self, reason: str) -> None:
        self.forced = reason
        self.done.set()

    def kill(self) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"state": "stopped" if self.done.is_set() else "idle"}


async def _until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not true within {timeout}s")


@pytest.mark.parametrize("kind", ["spot", "lifecycle-terminated"])
async def test_a_notice_drains_softly_then_the_host_holds_healthy_until_a_stop_signal(kind):
    if kind == "spot":
        notice = Notice(
            kind="spot", deadline=datetime.now(UTC) + timedelta(minutes=2), detail="terminate"
        )
    else:
        notice = Notice(kind="lifecycle-terminated", deadline=None, detail="Terminated")
    worker = _Worker()
    host = Host(worker, NoReaper(), HostSettings(), health=lambda: not worker.done.is_set())
    running = asyncio.ensure_future(host.run())
    await asyncio.sleep(0.05)  # the supervisor is running the worker
    assert host.healthy() and not host.supervisor.holding
    host.on_notice(notice)
    if notice.deadline is None:
        assert worker.deadline is None
    else:
        assert isinstance(worker.deadline, float)  # monotonic, about two minutes from now
        left = host.supervisor.time_left()
        assert left is not None and 100 < left <= 120, left
    await _until(lambda: host.supervisor.holding)
    # The worker's own health says no (it is gone); the host's says yes: the task must stay.
    assert host.healthy() is True
    status = host.status()
    assert status["state"] == "idle" and status["holding"] is True, status
    assert status["soft_drain"] is True and status["healthy"] is True, status
    assert not running.done()
    host.supervisor.on_signal(signal.SIGTERM)
    assert await asyncio.wait_for(running, 2) == 0
    assert worker.forced is None


async def test_a_stop_signal_drain_does_not_hold():
    worker = _Worker()
    host = Host(worker, NoReaper(), HostSettings(stop_timeout=30), health=lambda: True)
    running = asyncio.ensure_future(host.run())
    await asyncio.sleep(0.05)
    host.supervisor.on_signal(signal.SIGTERM)
    assert await asyncio.wait_for(running, 2) == 0
    assert not host.supervisor.soft_drain and not host.supervisor.holding


async def test_a_health_address_in_use_is_one_host_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        addr = f"127.0.0.1:{taken.getsockname()[1]}"
        worker = _Worker()
        host = Host(worker, NoReaper(), HostSettings(health_check_addr=addr), health=lambda: True)
        with pytest.raises(HostError, match=f"--health-check-addr {addr}: "):
            await host.run()
    assert worker.deadline == "never asked", "nothing may start when the server cannot"


# -- start's options: wrap's names and variables ---------------------------------------------


def _start_settings(*args: str):
    from fleetdrain.agent.settings import settings_from_args

    return settings_from_args(cli._parser().parse_args(["start", "--token", "t", *args]))


def test_start_watch_imds_flags_env_and_defaults(monkeypatch):
    for name in ("FLEETDRAIN_WATCH_IMDS", "FLEETDRAIN_IMDS_POLL_INTERVAL"):
        monkeypatch.delenv(name, raising=False)
    off = _start_settings()
    assert (off.watch_imds, off.imds_poll_interval) == (False, 5.0)
    on = _start_settings("--watch-imds", "--imds-poll-interval", "0.5")
    assert (on.watch_imds, on.imds_poll_interval) == (True, 0.5)
    monkeypatch.setenv("FLEETDRAIN_WATCH_IMDS", "true")
    monkeypatch.setenv("FLEETDRAIN_IMDS_POLL_INTERVAL", "2")
    from_env = _start_settings()
    assert (from_env.watch_imds, from_env.imds_poll_interval) == (True, 2.0)
    assert _start_settings("--no-watch-imds").watch_imds is False

    host = HostSettings.of(from_env)
    assert (host.watch_imds, host.imds_poll_interval) == (True, 2.0)


def test_start_and_wrap_share_the_imds_option_names_and_variables():
    helps = {}
    for command in ("start", "wrap"):
        done = subprocess.run(
            [sys.executable, "-m", "fleetdrain.agent.cli", command, "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
        helps[command] = " ".join(done.stdout.split())
    for text in helps.values():
        for name in (
            "--watch-imds",
            "--no-watch-imds",
            "[$FLEETDRAIN_WATCH_IMDS]",
            "--imds-poll-interval",
            "[$FLEETDRAIN_IMDS_POLL_INTERVAL]",
        ):
            assert name in text, (name, text)
    assert "stays up, idle" in helps["start"]


def test_start_rejects_a_poll_interval_that_is_not_positive(capsys):
    assert cli.main(["start", "--token", "t", "--imds-poll-interval", "0"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("fleetdrain-agent start: imds_poll_interval"), err


# -- imports ---------------------------------------------------------------------------------


def test_the_host_wrap_and_logging_load_no_http_client_validation_or_buildkite():
    """The PID-1 host is Buildkite-free and small; wrap reaches logging without the CLI."""
    code = (
        "import sys\n"
        "import fleetdrain.agent.host, fleetdrain.agent.logs, fleetdrain.agent.wrap\n"
        "heavy = {'httpx', 'httpcore', 'pydantic', 'pydantic_core', 'fleetdrain.agent.buildkite',"
        " 'fleetdrain.agent.cli', 'fleetdrain.agent.settings', 'fleetdrain.agent.start'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]", done.stdout
