"""``wrap --watch-imds`` as PID 1 against the IMDS stand-in (IMDSv2, tokens required).

A spot notice drains with the notice's time as the deadline; lifecycle ``Terminated`` drains
softly, with no deadline, and once the worker has exited wrap stays up, idle and healthy, until
ECS stops the task.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from fleetdrain.drill.aws.endpoints import EcsAgentStandIn, ImdsStandIn
from tests.agent.wrap_support import WrapFactory, wait_until, wraps

pytestmark = [pytest.mark.slow, pytest.mark.pid1]


@pytest.fixture
def wrap(tmp_path: Path) -> Iterator[WrapFactory]:
    """``wrap(*options, env=..., pid1=...)``: wrap in front of the bash worker, cleaned up after."""
    yield from wraps(tmp_path)


POLL = "0.1"


def _imds_env(imds: ImdsStandIn) -> dict[str, str]:
    return {"FLEETDRAIN_IMDS_ENDPOINT": imds.base_url_for(imds.instance().instance_id)}


def test_spot_notice_drains_with_the_notices_deadline(wrap):
    imds = ImdsStandIn(life_cycle="spot")
    grace, margin = 1.0, 0.5
    with imds.serve():
        w = wrap(
            "--watch-imds",
            "--imds-poll-interval",
            POLL,
            "--cancel-grace-period",
            str(grace),
            "--drain-margin",
            str(margin),
            env={**_imds_env(imds), "ON_TERM": "ignore", "ON_QUIT": "exit"},
        )
        w.tell("job 60")
        w.wait_event("job started")
        # IMDS gives whole seconds: the deadline is exactly this.
        deadline = (datetime.now(UTC) + timedelta(seconds=4)).replace(microsecond=0)
        published = time.time()
        imds.set_spot_action(deadline)
        got_term = w.wait_event("got TERM", 3)
        assert got_term - published < 1.0, "a spot notice must start the drain within a poll"
        forced = w.wait_event("got QUIT", 6)
        force_at = deadline.timestamp() - grace - margin
        assert force_at - 0.3 < forced < force_at + 0.7, forced - force_at
        assert "spot interruption (terminate" in w.output()
        # The worker cancelled and exited (3); a soft drain: wrap stays up, idle and healthy.
        w.wait_event("exiting")
        wait_until(lambda: w.status()["holding"], 3, w.output)
        assert w.get("/health")[0] == 200
        w.send(signal.SIGTERM)
        assert w.wait(5) == 3, w.output()


def test_lifecycle_terminated_drains_softly_then_holds_until_stopped(wrap):
    imds = ImdsStandIn()
    ecs = EcsAgentStandIn()
    ecs.add_task("task-1")
    with imds.serve(), ecs.serve():
        w = wrap(
            "--watch-imds",
            "--imds-poll-interval",
            POLL,
            "--busy-interval",
            "0.1",
            "--stop-timeout",
            "2",  # a clock would force at once (2 - 10 - 5 < 0): none may run in a soft drain
            env={**_imds_env(imds), **ecs.env_for("task-1")},
        )
        w.tell("job 1.0")
        w.wait_event("job started")
        wait_until(lambda: ecs.protection("task-1").enabled, 3, w.output)
        imds.set_target_lifecycle_state("Terminated")
        w.wait_event("got TERM", 3)
        status = w.status()
        assert status["state"] == "draining" and status["soft_drain"] is True
        assert status["deadline_in_seconds"] is None
        w.wait_event("job done", 3)
        w.wait_event("exiting")
        assert not w.has_event("got QUIT")
        # The worker is gone; wrap holds the task: idle, healthy, unprotected.
        wait_until(lambda: w.status()["holding"], 3, w.output)
        time.sleep(0.5)
        assert w.proc.alive()
        status = w.status()
        assert status["state"] == "idle" and status["busy"] is False
        assert status["worker_exit"]["status"] == 0
        assert w.get("/health") == (200, {"ok": True})
        wait_until(lambda: not ecs.protection("task-1").enabled, 3, w.output)
        w.send(signal.SIGHUP)  # nothing to forward it to: logged, no harm
        time.sleep(0.1)
        assert w.proc.alive()
        sent = w.send(signal.SIGTERM)
        assert w.wait(5) == 0, w.output()
        assert w.exited_at - sent < 0.5
    assert "staying up, idle" in w.output()


def test_a_stop_signal_after_a_soft_drain_ends_the_hold_and_starts_the_clock(wrap):
    imds = ImdsStandIn()
    with imds.serve():
        w = wrap("--watch-imds", "--imds-poll-interval", POLL, env=_imds_env(imds))
        w.tell("job 1.0")
        w.wait_event("job started")
        imds.set_target_lifecycle_state("Terminated")
        w.wait_event("got TERM", 3)
        w.send(signal.SIGTERM)  # ECS stops the task while the job still runs
        wait_until(lambda: w.status()["deadline_in_seconds"] is not None, 2, w.output)
        assert w.wait(5) == 0, w.output()
        # One graceful signal only: a second SIGTERM means "force" to the Go agent.
        assert [e for e, _ in w.events()].count("got TERM") == 1
        assert not w.has_event("got QUIT")


def test_wrap_with_every_option_loads_no_http_or_validation_library(tmp_path: Path):
    """wrap's memory budget (30 MB) holds because ECS, IMDS and the busy probe go through
    fleetdrain/agent/minihttp.py and fleetdrain/agent/wire.py: httpx and pydantic (~17 MB) must
    never be imported, not even lazily once the worker runs."""
    import subprocess
    import sys

    imds = ImdsStandIn(life_cycle="spot")
    ecs = EcsAgentStandIn()
    ecs.add_task("task-1")
    with imds.serve(), ecs.serve():
        env = {**os.environ, **ecs.env_for("task-1"), **_imds_env(imds)}
        probe = env["ECS_CONTAINER_METADATA_URI_V4"] + "/task"  # 200, not JSON status: busy
        done = subprocess.run(
            [
                sys.executable,
                "-X",
                "importtime",
                "-m",
                "fleetdrain.agent.cli",
                "wrap",
                "--task-protection",
                "--watch-imds",
                "--imds-poll-interval",
                POLL,
                "--busy-probe",
                probe,
                "--busy-interval",
                "0.1",
                "--health-check-addr",
                "127.0.0.1:0",
                "--",
                "sleep",
                "1.5",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=Path(__file__).resolve().parents[2],
        )
        assert done.returncode == 0, done.stderr[-3000:]
        # Every feature really ran: protection went on (busy probe), IMDS was asked.
        assert any(p.enabled for p in ecs.puts("task-1")), done.stderr[-3000:]
        assert imds.token_puts() >= 1
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in done.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "fleetdrain" in imported  # importtime output was read
    heavy = imported & {"httpx", "httpcore", "anyio", "pydantic", "pydantic_core", "certifi"}
    assert not heavy, f"wrap imported {sorted(heavy)}"


def test_sigterm_after_a_spot_notice_keeps_the_notices_earlier_deadline(wrap):
    """The controller answers a spot warning by stopping the task: ECS's SIGTERM then brings a
    stop-timeout clock that ends long after the instance is gone. The earlier deadline wins."""
    imds = ImdsStandIn(life_cycle="spot")
    grace, margin = 1.0, 0.5
    with imds.serve():
        w = wrap(
            "--watch-imds",
            "--imds-poll-interval",
            POLL,
            "--stop-timeout",
            "60",
            "--cancel-grace-period",
            str(grace),
            "--drain-margin",
            str(margin),
            env={**_imds_env(imds), "ON_TERM": "ignore", "ON_QUIT": "exit"},
        )
        w.tell("job 60")
        w.wait_event("job started")
        deadline = (datetime.now(UTC) + timedelta(seconds=5)).replace(microsecond=0)
        imds.set_spot_action(deadline)
        w.wait_event("got TERM", 3)
        w.send(signal.SIGTERM)
        wait_until(lambda: "SIGTERM" in w.status()["signals"], 2, w.output)
        left = w.status()["deadline_in_seconds"]
        assert left is not None and left < 5.0, left
        forced = w.wait_event("got QUIT", 8)
        force_at = deadline.timestamp() - grace - margin
        assert force_at - 0.3 < forced < force_at + 0.7, forced - force_at
        # A stop signal came: no hold after the soft drain, wrap exits with the worker.
        assert w.wait(5) == 3, w.output()
    assert [e for e, _ in w.events()].count("got TERM") == 1
