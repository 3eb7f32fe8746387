"""``start --watch-imds``: the real agent as PID 1, against the coordinator and the IMDS stand-in.

An IMDS notice (a spot interruption, or Auto Scaling lifecycle ``Terminated``) drains the
built-in worker softly, as it drains a wrapped one: no new job, the running one finishes (or,
when the spot notice's time comes first, is cancelled and reported ``agent_stop``), the agent
disconnects, and then stays up, idle and healthy without heartbeats, until ECS stops the task.
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from fleetdrain.drill.aws.endpoints import ImdsStandIn
from fleetdrain.drill.coordinator import RetryRule
from tests.agent.wrap_support import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.pid1]

POLL = "0.1"
LINES = 15
# About 1.5 s: a job that finishes well inside a drain.
COUNTING_JOB = f'for i in $(seq 1 {LINES}); do echo "line $i"; sleep 0.1; done; echo all-done'
# Runs until cancelled, and says when the cancel signal reached it.
TRAPPING_JOB = "trap 'echo \"job got TERM\"; exit 143' TERM; echo started; sleep 60 & wait"
RETRY = [RetryRule(signal_reason="agent_stop", limit=2)]
#: Longer than two heartbeat intervals (0.5 s, the fleet's default): heartbeat health alone
#: would have turned unhealthy by then.
HOLD_LONGER_THAN_HEARTBEAT_HEALTH = 1.5


def _imds_env(imds: ImdsStandIn) -> dict[str, str]:
    return {"FLEETDRAIN_IMDS_ENDPOINT": imds.base_url_for(imds.instance().instance_id)}


def _get(addr: str, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=3) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


def _status(addr: str) -> dict[str, Any]:
    code, body = _get(addr, "/status")
    assert code == 200, body
    return dict(body)


def _watching_agent(fleet, imds: ImdsStandIn, *extra: str):
    proc, name, addr = fleet.agent(
        "--watch-imds", "--imds-poll-interval", POLL, *extra, env=_imds_env(imds), health=True
    )
    assert addr is not None
    return proc, fleet.agent_id(name), addr


def _spot_in(seconds: float) -> datetime:
    # IMDS gives whole seconds: the deadline is exactly this.
    return (datetime.now(UTC) + timedelta(seconds=seconds)).replace(microsecond=0)


def _assert_holds_then_exits_on_sigterm(fleet, proc, agent_id: str, addr: str) -> None:
    """Disconnected, up, idle and healthy past heartbeat health, taking no job; SIGTERM ends it."""
    assert fleet.coord.wait_for(
        lambda c: c.agent(agent_id).connection_state == "disconnected", 5
    ), proc.output()[-3000:]
    wait_until(lambda: _status(addr)["holding"] is True, 3, proc.output)
    late = fleet.coord.add_job("echo late")
    time.sleep(HOLD_LONGER_THAN_HEARTBEAT_HEALTH)
    assert proc.alive(), proc.output()[-3000:]
    status = _status(addr)
    assert status["holding"] is True and status["soft_drain"] is True, status
    assert status["state"] == "idle" and status["aggregate_status"] == "idle", status
    assert _get(addr, "/health") == (200, {"ok": True})
    assert fleet.coord.job(late.id).state == "scheduled", "a drained agent took a job"
    assert fleet.coord.agent(agent_id).connection_state == "disconnected"
    sent = time.monotonic()
    proc.send(signal.SIGTERM)
    assert proc.wait(timeout=5) == 0, proc.output()[-3000:]
    assert time.monotonic() - sent < 1.0
    assert "staying up, idle" in proc.output()


@pytest.mark.parametrize("notice", ["spot", "lifecycle"])
def test_a_notice_mid_job_lets_the_job_finish_then_stays_up_idle(make_fleet, notice):
    fleet = make_fleet()
    imds = ImdsStandIn(life_cycle="spot")
    with imds.serve():
        proc, agent_id, addr = _watching_agent(fleet, imds)
        job = fleet.coord.add_job(COUNTING_JOB, retry=RETRY)
        fleet.wait_job_state(job.id, ("running",))
        if notice == "spot":
            imds.set_spot_action(_spot_in(60))
        else:
            imds.set_target_lifecycle_state("Terminated")
        wait_until(lambda: _status(addr)["state"] == "draining", 2, proc.output)
        status = _status(addr)
        kind = "spot" if notice == "spot" else "lifecycle-terminated"
        assert status["soft_drain"] is True and status["drain_reason"] == kind, status
        assert [n.split(":")[0] for n in status["imds_notices"]] == [kind], status
        left = status["deadline_in_seconds"]
        if notice == "spot":
            assert left is not None and 50 < left <= 60, left
        else:
            assert left is None, "lifecycle Terminated brings no deadline"
        # Queued during the drain: the agent must not take it after its job.
        other = fleet.coord.add_job("echo other")
        fleet.wait_job_state(job.id, ("finished",))

        done = fleet.coord.job(job.id)
        assert (done.exit_status, done.signal_reason) == ("0", None), done
        assert done.log_complete and b"all-done" in done.log
        assert not done.retried
        _assert_holds_then_exits_on_sigterm(fleet, proc, agent_id, addr)
        assert fleet.coord.job(other.id).state == "scheduled"


def test_a_spot_deadline_before_the_job_ends_cancels_it_as_agent_stop_then_stays_up(make_fleet):
    fleet = make_fleet()
    imds = ImdsStandIn(life_cycle="spot")
    grace, margin = 2.0, 1.0
    with imds.serve():
        proc, agent_id, addr = _watching_agent(
            fleet, imds, "--cancel-grace-period", str(grace), "--drain-margin", str(margin)
        )
        job = fleet.coord.add_job(TRAPPING_JOB, retry=RETRY)
        fleet.wait_job_state(job.id, ("running",))
        assert fleet.coord.wait_for(lambda c: b"started" in c.job(job.id).log, 5)
        deadline = _spot_in(6)
        # The deadline on this process's monotonic clock, the coordinator's event clock.
        deadline_at = time.monotonic() + (deadline.timestamp() - time.time())
        imds.set_spot_action(deadline)
        wait_until(lambda: _status(addr)["state"] == "draining", 2, proc.output)
        left = _status(addr)["deadline_in_seconds"]
        assert left is not None and left < 6.5, left
        fleet.wait_job_state(job.id, ("finished",), timeout=10)

        done = fleet.coord.job(job.id)
        assert done.signal_reason == "agent_stop", done
        assert done.exit_status == "143"  # the job's trap answered the cancel signal
        assert b"job got TERM" in done.log
        assert done.retried, "the retry rule should re-run an agent_stop job"
        finished = fleet.coord.events_of("finish", job_id=job.id)[-1].time
        # Cancelled at deadline - grace - margin, reported before the deadline.
        force_at = deadline_at - grace - margin
        assert force_at - 0.3 < finished < deadline_at - margin, finished - force_at
        assert "spot interruption (terminate" in proc.output()
        # Past the notice's time the agent is still up: the deadline's last resort (kill and
        # exit) must not outlive the worker.
        time.sleep(max(0.0, deadline_at + 0.3 - time.monotonic()))
        assert proc.alive(), proc.output()[-3000:]
        _assert_holds_then_exits_on_sigterm(fleet, proc, agent_id, addr)


def test_a_notice_while_idle_disconnects_at_once_and_stays_up_idle(make_fleet):
    fleet = make_fleet()
    imds = ImdsStandIn(life_cycle="spot")
    with imds.serve():
        proc, agent_id, addr = _watching_agent(fleet, imds)
        time.sleep(0.3)
        assert _status(addr)["state"] == "idle"
        published = time.monotonic()
        imds.set_spot_action(_spot_in(60))
        assert fleet.coord.wait_for(
            lambda c: bool(c.events_of("disconnect", agent_id=agent_id)), 3
        ), proc.output()[-3000:]
        disconnected = fleet.coord.events_of("disconnect", agent_id=agent_id)[-1].time
        assert disconnected - published < 1.0, "an idle agent drains within a poll or two"
        assert not [
            e for e in fleet.coord.events_of("accept", agent_id=agent_id) if e.time > published
        ]
        _assert_holds_then_exits_on_sigterm(fleet, proc, agent_id, addr)
