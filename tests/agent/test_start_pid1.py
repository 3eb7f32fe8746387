"""The real agent process as PID 1 of its own PID namespace, against the coordinator on loopback.

Each test drives a drain the way ECS does (signals from outside the namespace) and checks what
the server saw: the job's result and log, the agent's heartbeats, its disconnect.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest

from fleetdrain.drill.coordinator import Fault, RetryRule

pytestmark = [pytest.mark.slow, pytest.mark.pid1]

LINES = 15
# A job that prints a numbered line every 0.1 s: about 1.5 s in all.
COUNTING_JOB = f'for i in $(seq 1 {LINES}); do echo "line $i"; sleep 0.1; done; echo all-done'
# A job that traps TERM (so the cancel signal is seen), runs until told otherwise.
TRAPPING_JOB = "trap 'echo \"job got TERM\"; exit 143' TERM; echo started; sleep 60 & wait"
RETRY = [RetryRule(exit_status="-1", limit=2), RetryRule(signal_reason="agent_stop", limit=2)]


def _exit_within(proc, seconds: float) -> tuple[int, float]:
    started = time.monotonic()
    code = proc.wait(timeout=seconds + 5)
    return code, time.monotonic() - started


def _disconnected(fleet, agent_id: str) -> float:
    events = fleet.coord.events_of("disconnect", agent_id=agent_id)
    assert events, "the agent never disconnected"
    return events[-1].time


def test_sigterm_mid_job_finishes_the_job_then_exits(make_fleet):
    fleet = make_fleet()
    proc, name, _ = fleet.agent()
    agent_id = fleet.agent_id(name)
    job = fleet.coord.add_job(COUNTING_JOB, retry=RETRY)
    fleet.wait_job_state(job.id, ("running",))
    time.sleep(0.3)
    proc.send(signal.SIGTERM)
    code = proc.wait(timeout=20)
    exited_at = time.monotonic()

    assert code == 0, proc.output()
    done = fleet.coord.job(job.id)
    assert done.state == "finished"
    assert done.exit_status == "0"
    assert done.signal_reason is None
    assert done.log_complete
    log = done.log.decode()
    assert all(f"line {i}\n" in log for i in range(1, LINES + 1)), log
    assert "all-done" in log
    assert done.chunks_failed_count == 0
    assert not done.retried and not done.lost
    # Disconnect and exit follow the job's end within a second.
    finished = fleet.coord.events_of("finish", job_id=job.id)[-1].time
    assert _disconnected(fleet, agent_id) - finished < 1.0
    assert exited_at - finished < 1.0 + 0.2  # poll granularity of this test
    # Heartbeats never stopped while it drained (interval 0.5 s).
    assert fleet.coord.heartbeat_gaps(agent_id) < 0.5 * 1.5 + 0.1
    assert not fleet.coord.agent(agent_id).request_headers_missing


@pytest.mark.parametrize("first", ["SIGTERM", "SIGINT"])
def test_idle_sigterm_exits_at_once(make_fleet, first):
    fleet = make_fleet()
    proc, name, _ = fleet.agent()
    agent_id = fleet.agent_id(name)
    time.sleep(0.3)
    proc.send(getattr(signal, first))
    code, took = _exit_within(proc, 5)
    assert code == 0, proc.output()
    # "Well under a second" (bench/agent_drain.py measures ~0.1 s), with room for a loaded
    # shared machine: this is a behaviour check, the benchmark gives the figure.
    assert took < 0.8, f"idle agent took {took:.2f}s to exit"
    assert fleet.coord.agent(agent_id).connection_state == "disconnected"


@pytest.mark.parametrize(
    "signals",
    [["SIGQUIT"], ["SIGTERM", "SIGTERM"], ["SIGINT", "SIGINT"]],
    ids=["sigquit", "2x-sigterm", "2x-sigint"],
)
def test_forced_stop_cancels_and_reports_agent_stop(make_fleet, signals):
    fleet = make_fleet()
    proc, name, _ = fleet.agent("--cancel-grace-period", "3")
    agent_id = fleet.agent_id(name)
    job = fleet.coord.add_job(TRAPPING_JOB, retry=RETRY)
    fleet.wait_job_state(job.id, ("running",))
    assert fleet.coord.wait_for(lambda c: b"started" in c.job(job.id).log, 5)
    sent = time.monotonic()
    for name_ in signals:
        proc.send(getattr(signal, name_))
        time.sleep(0.1)
    code = proc.wait(timeout=15)
    took = time.monotonic() - sent

    assert code == 0, proc.output()
    done = fleet.coord.job(job.id)
    assert done.signal_reason == "agent_stop"
    assert done.exit_status == "143"  # the job's trap answered the cancel signal
    assert "job got TERM" in done.log.decode()
    assert "cancelling job (agent_stop" in done.log.decode()
    assert done.retried, "the retry rule should re-run an agent_stop job"
    # Cancelled and reported within the cancel grace period (3 s).
    assert took < 3.0, f"forced stop took {took:.2f}s"
    assert fleet.coord.agent(agent_id).connection_state == "disconnected"


def test_forced_stop_kills_a_job_that_ignores_the_cancel_signal(make_fleet):
    fleet = make_fleet()
    proc, name, _ = fleet.agent("--cancel-grace-period", "2", "--signal-grace-period-seconds", "1")
    fleet.agent_id(name)
    job = fleet.coord.add_job("trap '' TERM; echo started; sleep 60", retry=RETRY)
    fleet.wait_job_state(job.id, ("running",))
    assert fleet.coord.wait_for(lambda c: b"started" in c.job(job.id).log, 5)
    proc.send(signal.SIGQUIT)
    code, took = _exit_within(proc, 10)
    assert code == 0
    done = fleet.coord.job(job.id)
    assert done.signal_reason == "agent_stop"
    assert done.signal == "SIGKILL" and done.exit_status == "137"
    assert took < 2.0, f"SIGKILL after the 1 s signal grace should end it; took {took:.2f}s"


def test_third_signal_exits_immediately(make_fleet):
    fleet = make_fleet()
    # A long signal grace: without the third signal the agent would wait 20 s for the job.
    proc, name, _ = fleet.agent(
        "--cancel-grace-period", "30", "--signal-grace-period-seconds", "20"
    )
    fleet.agent_id(name)
    job = fleet.coord.add_job("trap '' TERM; echo started; sleep 60")
    fleet.wait_job_state(job.id, ("running",))
    assert fleet.coord.wait_for(lambda c: b"started" in c.job(job.id).log, 5)
    proc.send(signal.SIGTERM)
    time.sleep(0.2)
    proc.send(signal.SIGTERM)
    time.sleep(0.3)
    assert proc.alive(), "two signals must not end the agent while its job is cancelling"
    proc.send(signal.SIGTERM)
    code, took = _exit_within(proc, 5)
    assert took < 0.5, f"third signal took {took:.2f}s"
    assert code == 1


def _zombie_children(pid: int) -> list[int]:
    zombies = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as fh:
            for child in fh.read().split():
                try:
                    with open(f"/proc/{child}/stat") as stat:
                        if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                            zombies.append(int(child))
                except FileNotFoundError:
                    pass
    return zombies


def test_orphans_are_reaped(make_fleet):
    fleet = make_fleet()
    proc, name, addr = fleet.agent(health=True)
    fleet.agent_id(name)
    # Each ( ... & ) leaves an orphan that the kernel re-parents to PID 1: the agent.
    job = fleet.coord.add_job(
        "for i in 1 2 3 4 5; do (sleep 0.1 &); done; echo spawned; sleep 2; echo end"
    )
    fleet.wait_job_state(job.id, ("running",))
    assert fleet.coord.wait_for(lambda c: b"spawned" in c.job(job.id).log, 5)
    time.sleep(0.8)  # the orphans have exited by now
    assert _zombie_children(proc.pid) == []
    with urllib.request.urlopen(f"http://{addr}/status", timeout=2) as response:
        status = json.load(response)
    assert status["pid1"] is True
    assert status["orphans_reaped"] >= 5, status
    fleet.wait_job_state(job.id, ("finished",))
    proc.send(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_deadline_cancels_and_the_retry_runs_elsewhere(make_fleet):
    fleet = make_fleet()
    stop_timeout, grace, margin = 6.0, 2.0, 1.0
    proc_a, name_a, _ = fleet.agent(
        "--stop-timeout",
        str(stop_timeout),
        "--cancel-grace-period",
        str(grace),
        "--drain-margin",
        str(margin),
    )
    fleet.agent_id(name_a)
    job = fleet.coord.add_job(
        f'echo "on $BUILDKITE_AGENT_NAME"; '
        f'if [ "$BUILDKITE_AGENT_NAME" = "{name_a}" ]; then sleep 60; fi; echo passed',
        retry=RETRY,
        key="long-build",
    )
    fleet.wait_job_state(job.id, ("running",))
    sigterm_at = time.monotonic()
    proc_a.send(signal.SIGTERM)
    # A second agent comes up elsewhere, as the service would place it.
    _, name_b, _ = fleet.agent()
    fleet.agent_id(name_b)
    code = proc_a.wait(timeout=stop_timeout + 5)
    exited_after = time.monotonic() - sigterm_at

    assert code == 0, proc_a.output()
    assert exited_after < stop_timeout, f"agent outlived its stop-timeout: {exited_after:.1f}s"
    first = fleet.coord.job(job.id)
    assert first.signal_reason == "agent_stop"
    assert first.retried
    finish = fleet.coord.events_of("finish", job_id=job.id)[-1].time
    # Cancelled at deadline - grace - margin (3 s after SIGTERM), reported before the deadline.
    force_at = stop_timeout - grace - margin
    assert force_at - 0.3 < finish - sigterm_at < stop_timeout - margin, finish - sigterm_at
    assert fleet.coord.wait_for(lambda c: c.step("long-build").outcome == "passed", 15), (
        fleet.coord.step("long-build")
    )
    step = fleet.coord.step("long-build")
    assert step.attempts[-1].agent_id == fleet.coord.agent_named(name_b).id
    assert b"passed" in step.attempts[-1].log
    assert step.lost_attempts == 0


def test_heartbeats_continue_through_a_drain_longer_than_the_lost_agent_timeout(make_fleet):
    """Regression for buildkite-agent 3.116.0 (and 3.11.1): heartbeats stopped on SIGTERM."""
    fleet = make_fleet(heartbeat_interval=0.4, lost_agent_timeout=1.5)
    proc, name, _ = fleet.agent()
    agent_id = fleet.agent_id(name)
    job = fleet.coord.add_job("echo begin; sleep 4; echo end", retry=RETRY)
    fleet.wait_job_state(job.id, ("running",))
    proc.send(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0, proc.output()
    done = fleet.coord.job(job.id)
    assert done.exit_status == "0" and not done.lost, done
    assert b"end" in done.log
    assert fleet.coord.agent(agent_id).connection_state == "disconnected"
    assert fleet.coord.heartbeat_gaps(agent_id) < 0.4 * 1.5 + 0.1


def test_faults_during_a_drain_lose_nothing(make_fleet):
    fleet = make_fleet(heartbeat_interval=0.5, lost_agent_timeout=5.0)
    proc, name, _ = fleet.agent()
    agent_id = fleet.agent_id(name)
    job = fleet.coord.add_job(COUNTING_JOB, retry=RETRY)
    fleet.wait_job_state(job.id, ("running",))
    for endpoint in ("heartbeat", "chunks", "finish", "job_state"):
        fleet.coord.faults.add(Fault(endpoint=endpoint, kind="status", status=503, count=3))
    fleet.coord.faults.add(
        Fault(endpoint="chunks", kind="status", status=429, retry_after=0.2, count=2)
    )
    fleet.coord.faults.add(Fault(endpoint="chunks", kind="drop", count=1))
    fleet.coord.faults.add(Fault(endpoint="heartbeat", kind="latency", seconds=0.3, count=2))
    fleet.coord.faults.add(Fault(endpoint="finish", kind="latency", seconds=0.5, count=1))
    proc.send(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.output()
    done = fleet.coord.job(job.id)
    assert done.exit_status == "0"
    assert done.chunks_failed_count == 0
    assert done.log_complete
    assert all(f"line {i}\n".encode() in done.log for i in range(1, LINES + 1))
    fired = {e.detail.get("endpoint") for e in fleet.coord.events_of("fault")}
    assert {"heartbeat", "chunks", "finish"} <= fired, fired
    assert fleet.coord.agent(agent_id).connection_state == "disconnected"
    assert fleet.coord.agent(agent_id).lost_at is None


# ------------------------------------------------------------- a coordinator outage at SIGTERM

# stop-timeout 7, cancel grace 2, margin 1: the job is cancelled 4 s after SIGTERM; chunk
# uploads must be over 2 s before the deadline (5 s), the finish 1 s before it (6 s), the
# disconnect 0.7 s before it; the PID-1 layer's last resort (kill, exit 1) would come at 6.5 s.
OUTAGE_STOP_TIMEOUT, OUTAGE_GRACE, OUTAGE_MARGIN = 7.0, 2.0, 1.0
FINISH_BY = OUTAGE_STOP_TIMEOUT - 1.0
# A job that prints all the time and answers the cancel signal.
TICKING_JOB = (
    "trap 'echo \"job got TERM\"; exit 143' TERM; echo started; "
    "while :; do echo tick; sleep 0.2; done"
)


def _outage_agent(fleet):
    proc, name, _ = fleet.agent(
        "--stop-timeout",
        str(OUTAGE_STOP_TIMEOUT),
        "--cancel-grace-period",
        str(OUTAGE_GRACE),
        "--drain-margin",
        str(OUTAGE_MARGIN),
    )
    agent_id = fleet.agent_id(name)
    job = fleet.coord.add_job(TICKING_JOB, retry=RETRY)
    fleet.wait_job_state(job.id, ("running",))
    assert fleet.coord.wait_for(lambda c: b"started" in c.job(job.id).log, 5)
    return proc, agent_id, job


def _outage(fleet, until: float | None, *, agent_id: str) -> None:
    """Every call the drain needs fails, in every way, until ``until`` (None: for good)."""
    add = fleet.coord.faults.add
    # First match wins: a few slow answers first, then refusals and cut connections.
    add(Fault(endpoint="chunks", kind="latency", seconds=0.4, count=2, agent_id=agent_id))
    add(Fault(endpoint="chunks", kind="drop", count=2, until=until, agent_id=agent_id))
    add(Fault(endpoint="finish", kind="drop", count=2, until=until, agent_id=agent_id))
    for endpoint in ("chunks", "finish", "heartbeat", "job_state", "disconnect"):
        add(Fault(endpoint=endpoint, kind="status", status=503, until=until, agent_id=agent_id))


@pytest.mark.parametrize(
    ("recovers_after", "chunks_lost"),
    [(2.5, False), (FINISH_BY - 0.6, True)],
    ids=["before-the-cancel", "after-the-chunks-gave-up"],
)
def test_an_outage_at_sigterm_that_ends_in_time_still_gets_the_finish(
    make_fleet, recovers_after, chunks_lost
):
    fleet = make_fleet(lost_agent_timeout=30.0)
    proc, agent_id, job = _outage_agent(fleet)
    sigterm_at = time.monotonic()
    _outage(fleet, sigterm_at + recovers_after, agent_id=agent_id)
    proc.send(signal.SIGTERM)
    code = proc.wait(timeout=OUTAGE_STOP_TIMEOUT + 5)
    exited_after = time.monotonic() - sigterm_at

    # On its own terms (the last resort exits 1) and before the deadline.
    assert code == 0, proc.output()
    assert exited_after < OUTAGE_STOP_TIMEOUT - 0.5, exited_after
    done = fleet.coord.job(job.id)
    assert done.state == "finished", (done.state, proc.output()[-3000:])
    assert done.signal_reason == "agent_stop" and done.exit_status == "143"
    assert done.retried
    finished = fleet.coord.events_of("finish", job_id=job.id)[-1].time - sigterm_at
    assert recovers_after <= finished < FINISH_BY, finished
    if chunks_lost:
        # The chunks gave up 2 s before the deadline to leave the finish its time; the
        # finish says how many were lost: never silently.
        assert done.chunks_failed_count >= 1
    else:
        assert done.chunks_failed_count == 0
        assert done.log_complete
        assert b"job got TERM" in done.log
    assert fleet.coord.agent(agent_id).connection_state == "disconnected"


def test_an_outage_at_sigterm_that_lasts_never_keeps_the_agent_past_its_deadline(make_fleet):
    fleet = make_fleet(lost_agent_timeout=30.0)
    proc, agent_id, job = _outage_agent(fleet)
    sigterm_at = time.monotonic()
    _outage(fleet, None, agent_id=agent_id)
    proc.send(signal.SIGTERM)
    code = proc.wait(timeout=OUTAGE_STOP_TIMEOUT + 5)
    exited_after = time.monotonic() - sigterm_at

    # It gave up on the finish and the disconnect in time and exited by itself, before the
    # last resort (which exits 1) and long before ECS's SIGKILL.
    assert code == 0, proc.output()
    assert exited_after < OUTAGE_STOP_TIMEOUT - 0.5, exited_after
    tried = [e.time - sigterm_at for e in fleet.coord.events_of("fault", agent_id=agent_id)]
    finishes = [
        e.time - sigterm_at
        for e in fleet.coord.events_of("fault", agent_id=agent_id)
        if e.detail.get("endpoint") == "finish"
    ]
    assert finishes, "the finish was never tried"
    # Retried until shortly before the deadline, and not after it.
    assert FINISH_BY - 1.5 < finishes[-1] < FINISH_BY, finishes
    assert max(tried) < OUTAGE_STOP_TIMEOUT - 0.5
    assert fleet.coord.job(job.id).state != "finished"
    log = proc.output()
    assert "finish could not be reported" in log


def test_sighup_is_ignored_and_the_job_runs_on(make_fleet):
    fleet = make_fleet()
    proc, name, addr = fleet.agent(health=True)
    agent_id = fleet.agent_id(name)
    job = fleet.coord.add_job(COUNTING_JOB, retry=RETRY)
    fleet.wait_job_state(job.id, ("running",))
    proc.send(signal.SIGHUP)
    time.sleep(0.3)
    assert proc.alive(), "SIGHUP must not end the agent (as PID 1 it has no default action)"
    fleet.wait_job_state(job.id, ("finished",))
    done = fleet.coord.job(job.id)
    assert (done.exit_status, done.signal_reason) == ("0", None)
    assert b"all-done" in done.log

    def status() -> dict[str, object]:
        with urllib.request.urlopen(f"http://{addr}/status", timeout=10) as response:
            return dict(json.load(response))

    # The coordinator has the finish before the agent has its answer: idle comes just after.
    deadline = time.monotonic() + 30
    while (seen := status())["state"] != "idle" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert seen["signals"] == ["SIGHUP"] and seen["state"] == "idle", seen
    assert fleet.coord.agent(agent_id).connection_state == "connected"
    proc.send(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_third_signal_leaves_no_job_process_behind_when_not_pid1(make_fleet):
    """As PID 1 the kernel ends the namespace with the agent; as a plain process (a sidecar
    init, a test) the agent itself must SIGKILL the job's group before it exits."""
    fleet = make_fleet()
    proc, name, _ = fleet.agent(
        "--cancel-grace-period", "30", "--signal-grace-period-seconds", "20", pid1=False
    )
    fleet.agent_id(name)
    job = fleet.coord.add_job("trap '' TERM; (trap '' TERM; sleep 60) & echo \"pids $$ $!\"; wait")
    fleet.wait_job_state(job.id, ("running",))
    assert fleet.coord.wait_for(lambda c: b"pids " in c.job(job.id).log, 5)
    line = next(
        x for x in fleet.coord.job(job.id).log.decode().splitlines() if x.startswith("pids")
    )
    pids = [int(p) for p in line.split()[1:]]
    assert not any(_gone(p) for p in pids)
    for _ in range(3):
        proc.send(signal.SIGTERM)
        time.sleep(0.2)
    code, _took = _exit_within(proc, 5)
    assert code == 1
    deadline = time.monotonic() + 2
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert all(_gone(p) for p in pids), "the job's processes outlived the agent"


def test_a_deadline_shorter_than_the_signal_grace_cuts_the_grace_not_the_report(make_fleet):
    """stop-timeout 4 s but a 9 s signal grace: waiting the whole grace for a job that ignores
    the cancel signal would run into the last resort and leave the job unreported."""
    fleet = make_fleet()
    stop_timeout = 4.0
    proc, name, _ = fleet.agent(
        "--stop-timeout", str(stop_timeout), "--cancel-grace-period", "10", "--drain-margin", "1"
    )
    fleet.agent_id(name)
    job = fleet.coord.add_job("trap '' TERM; echo started; sleep 60", retry=RETRY)
    fleet.wait_job_state(job.id, ("running",))
    assert fleet.coord.wait_for(lambda c: b"started" in c.job(job.id).log, 5)
    sigterm_at = time.monotonic()
    proc.send(signal.SIGTERM)
    code = proc.wait(timeout=stop_timeout + 5)
    exited_after = time.monotonic() - sigterm_at

    assert code == 0, proc.output()
    assert exited_after < stop_timeout - 0.5, exited_after
    done = fleet.coord.job(job.id)
    assert (done.signal_reason, done.signal, done.exit_status) == ("agent_stop", "SIGKILL", "137")
    assert done.retried
    assert "signal grace cut" in proc.output()


def test_a_finish_retrying_since_before_sigterm_gives_up_before_the_deadline(make_fleet):
    """The job ended during an outage, so its finish was already in the hour-long retry loop
    (no deadline yet) when SIGTERM came: the deadline that appears must bound that loop too."""
    fleet = make_fleet(lost_agent_timeout=30.0)
    proc, name, _ = fleet.agent("--stop-timeout", "4", "--cancel-grace-period", "2")
    agent_id = fleet.agent_id(name)
    _outage(fleet, None, agent_id=agent_id)
    job = fleet.coord.add_job("echo quick")
    assert fleet.coord.wait_for(
        lambda c: any(
            e.detail.get("endpoint") == "finish" for e in c.events_of("fault", agent_id=agent_id)
        ),
        10,
    ), proc.output()
    time.sleep(1.0)  # well into the retry loop, with back-off growing towards 5 s
    sigterm_at = time.monotonic()
    proc.send(signal.SIGTERM)
    code = proc.wait(timeout=10)
    exited_after = time.monotonic() - sigterm_at
    assert code == 0, proc.output()
    assert exited_after < 4.0 - 0.5, exited_after
    assert fleet.coord.job(job.id).state != "finished"
    assert "finish could not be reported" in proc.output()


def test_a_job_that_ended_by_itself_is_not_reported_cancelled_by_a_later_stop(make_fleet):
    """The job exited 0, its log was still going out (chunks refused) when the forced stop
    came: it passed, so it must be reported as it ended, not as agent_stop (which retry rules
    would run again)."""
    fleet = make_fleet(lost_agent_timeout=30.0)
    proc, name, _ = fleet.agent("--stop-timeout", "6", "--cancel-grace-period", "2")
    agent_id = fleet.agent_id(name)
    refusing = fleet.coord.faults.add(
        Fault(endpoint="chunks", kind="status", status=503, agent_id=agent_id)
    )
    job = fleet.coord.add_job("echo passed", retry=RETRY)
    assert fleet.coord.wait_for(lambda c: refusing.fired >= 2, 10), proc.output()
    proc.send(signal.SIGQUIT)  # forced stop while the job's log is still retrying
    time.sleep(0.5)
    fleet.coord.faults.remove(refusing)
    assert proc.wait(timeout=10) == 0, proc.output()
    done = fleet.coord.job(job.id)
    assert (done.state, done.exit_status, done.signal_reason) == ("finished", "0", None), done
    assert not done.retried
    assert b"passed" in done.log and done.chunks_failed_count == 0
    assert "never retrieved" not in proc.output()


def test_a_forced_remote_stop_during_a_drain_is_reported_agent_stop_and_retried(make_fleet):
    """The drain controller's force (REST stop, force) reaches a draining agent as a server
    cancel: it must come out agent_stop so the retry rule runs the job elsewhere."""
    fleet = make_fleet()
    proc_a, name_a, _ = fleet.agent()
    agent_a = fleet.agent_id(name_a)
    job = fleet.coord.add_job(
        f'if [ "$BUILDKITE_AGENT_NAME" = "{name_a}" ]; then sleep 60; fi; echo passed',
        retry=RETRY,
        key="forced",
    )
    fleet.wait_job_state(job.id, ("running",))
    proc_a.send(signal.SIGTERM)  # DRAINING: the agent drains, the job runs on
    time.sleep(0.5)
    assert fleet.coord.job(job.id).state == "running"
    _, name_b, _ = fleet.agent()
    fleet.agent_id(name_b)
    fleet.coord.stop_agent(agent_a, force=True)

    assert proc_a.wait(timeout=15) == 0, proc_a.output()
    first = fleet.coord.job(job.id)
    assert first.state == "canceled"
    assert first.signal_reason == "agent_stop", first
    assert fleet.coord.wait_for(lambda c: c.step("forced").outcome == "passed", 15), (
        fleet.coord.step("forced")
    )
    assert fleet.coord.step("forced").attempts[-1].agent_id == fleet.coord.agent_named(name_b).id


def test_a_server_cancel_of_a_job_on_a_working_agent_stays_cancel(make_fleet):
    fleet = make_fleet()
    proc, name, _ = fleet.agent()
    fleet.agent_id(name)
    job = fleet.coord.add_job("sleep 60", retry=RETRY, key="user-cancel")
    fleet.wait_job_state(job.id, ("running",))
    fleet.coord.cancel_job(job.id)
    fleet.wait_job_state(job.id, ("canceled",), timeout=15)
    assert fleet.coord.job(job.id).signal_reason == "cancel"
    assert not fleet.coord.job(job.id).retried
    proc.send(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0


def test_a_finish_stuck_on_a_silent_server_since_before_sigterm_is_cut_at_the_deadline(make_fleet):
    """The finish went out before there was a deadline and the server sits on it (30 s): when
    SIGTERM brings a deadline, that attempt must end by it too, not at its own 30 s timeout."""
    fleet = make_fleet(lost_agent_timeout=60.0)
    proc, name, _ = fleet.agent("--stop-timeout", "4", "--cancel-grace-period", "2")
    agent_id = fleet.agent_id(name)
    stuck = fleet.coord.faults.add(
        Fault(endpoint="finish", kind="latency", seconds=30, count=1, agent_id=agent_id)
    )
    fleet.coord.add_job("echo quick")
    assert fleet.coord.wait_for(lambda c: stuck.fired == 1, 10), proc.output()
    time.sleep(0.5)
    sigterm_at = time.monotonic()
    proc.send(signal.SIGTERM)
    code = proc.wait(timeout=10)
    exited_after = time.monotonic() - sigterm_at
    # On its own terms (the last resort, 0.5 s before the deadline, exits 1).
    assert code == 0, proc.output()
    assert exited_after < 4.0 - 0.5, exited_after
    assert "no answer before the deadline" in proc.output()
