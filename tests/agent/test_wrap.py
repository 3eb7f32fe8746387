"""``wrap`` as PID 1 (``unshare --pid --fork --mount-proc``) in front of a bash worker.

The worker (tests/agent/wrap_support.py) traps signals and logs each with its wall time, runs "jobs"
as children, leaves orphans, exits as told. Signals come from outside the namespace, as ECS
sends them.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fleetdrain.drill.aws.endpoints import EcsAgentStandIn
from fleetdrain.drill.serve import ServeInThread
from tests.agent.wrap_support import (
    WrapFactory,
    process_state,
    wait_until,
    wrap_command,
    wraps,
    zombies_under,
)

pytestmark = [pytest.mark.slow, pytest.mark.pid1]


@pytest.fixture
def wrap(tmp_path: Path) -> Iterator[WrapFactory]:
    """``wrap(*options, env=..., pid1=...)``: wrap in front of the bash worker, cleaned up after."""
    yield from wraps(tmp_path)


# -- exit status and stdio ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tell", "status"),
    [("exit 0", 0), ("exit 7", 7), ("die TERM", 128 + signal.SIGTERM)],
    ids=["exit-0", "exit-7", "killed-by-TERM"],
)
def test_exit_status_is_the_workers_within_half_a_second(wrap, tell, status):
    w = wrap()
    w.tell(tell)
    code = w.wait(5)
    assert code == status, w.output()
    lag = w.exited_at - w.event_time("exiting")
    assert lag < 0.5, f"wrap exited {lag:.3f}s after its worker"


def test_exit_after_reaping_what_the_worker_left_running(wrap):
    w = wrap()
    # One orphan ignores SIGTERM: wrap must SIGKILL it and still exit within half a second.
    w.tell("leave 30")
    w.wait_event("left orphans")
    w.tell("exit 5")
    assert w.wait(5) == 5, w.output()
    assert w.exited_at - w.event_time("exiting") < 0.5
    assert "SIGKILL" in w.output()


def test_stdio_passes_straight_through(tmp_path: Path):
    """stdin, stdout and stderr are the worker's own: nothing added, nothing held back."""
    script = 'read -r line; echo "read: $line"; echo "to stderr" >&2; exit 4'
    proc = subprocess.run(
        wrap_command("--", "sh", "-c", script),
        input=b"hello from stdin\n",
        capture_output=True,
        timeout=20,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert proc.returncode == 4
    assert proc.stdout == b"read: hello from stdin\n"  # our logs go to stderr, never stdout
    assert b"\nto stderr\n" in b"\n" + proc.stderr


def test_worker_output_reaches_the_log_unchanged_as_pid1(wrap):
    w = wrap()
    w.tell("exit 0")
    w.wait(5)
    lines = w.output().splitlines()
    assert "worker stderr line" in lines
    assert any(line.startswith("worker: started at ") for line in lines)


def test_orphans_are_reaped(wrap):
    w = wrap()
    for _ in range(2):
        w.tell("orphans 5")
        w.wait_event("orphans left")
    time.sleep(0.6)  # the orphans (sleep 0.2) have exited and been re-parented to wrap by now
    assert zombies_under(w.pid) == []
    status = w.status()
    assert status["pid1"] is True
    assert status["orphans_reaped"] >= 5, status


# -- signals -------------------------------------------------------------------------------------


def test_hup_usr1_usr2_winch_are_forwarded_unchanged(wrap):
    w = wrap()
    for sig in ("HUP", "USR1", "USR2", "WINCH"):
        w.send(getattr(signal, f"SIG{sig}"))
        w.wait_event(f"got {sig}")
    assert not w.has_event("got TERM")
    assert w.proc.alive()
    assert w.status()["state"] in ("idle", "busy")
    w.send(signal.SIGTERM)
    assert w.wait(5) == 0


@pytest.mark.parametrize("first", ["SIGTERM", "SIGINT"])
def test_first_signal_sends_the_graceful_signal_at_once_and_the_job_finishes(wrap, first):
    w = wrap()
    w.tell("job 1.0")
    w.wait_event("job started")
    sent = w.send(getattr(signal, first))
    got = w.wait_event("got TERM")
    assert got - sent < 0.5, f"graceful signal took {got - sent:.3f}s"
    status = w.status()
    assert status["state"] == "draining"
    assert 100 < status["deadline_in_seconds"] <= 120
    assert w.wait(5) == 0, w.output()
    assert w.event_time("job done") < w.event_time("drained")
    assert not w.has_event("got QUIT")


@pytest.mark.parametrize("signals", [["SIGTERM", "SIGTERM"], ["SIGQUIT"]], ids=["2x-term", "quit"])
def test_second_signal_or_sigquit_sends_the_force_signal(wrap, signals):
    w = wrap()
    w.tell("job 30")
    w.wait_event("job started")
    for name in signals:
        sent = w.send(getattr(signal, name))
        time.sleep(0.1)
    got = w.wait_event("got QUIT")
    assert got - sent < 0.5
    assert w.wait(5) == 3, w.output()  # the worker's own status on QUIT


def test_graceful_and_force_signals_are_configurable(wrap):
    w = wrap("--graceful-signal", "USR1", "--force-signal", "SIGUSR2", env={"ON_TERM": "ignore"})
    w.tell("job 30")
    w.wait_event("job started")
    w.send(signal.SIGTERM)
    w.wait_event("got USR1")
    w.send(signal.SIGTERM)
    w.wait_event("got USR2")
    assert not w.has_event("got TERM") and not w.has_event("got QUIT")
    w.send(signal.SIGTERM)
    assert w.wait(5) == 1


def test_third_signal_kills_the_worker_and_exits(wrap):
    w = wrap(env={"ON_TERM": "ignore", "ON_QUIT": "ignore"})
    w.tell("job 60")
    w.wait_event("job started")
    w.send(signal.SIGTERM)
    w.wait_event("got TERM")
    w.send(signal.SIGTERM)
    w.wait_event("got QUIT")
    time.sleep(0.2)
    assert w.proc.alive(), "two signals must not end wrap while the worker runs"
    sent = w.send(signal.SIGTERM)
    assert w.wait(5) == 1
    assert w.exited_at - sent < 0.5


def test_third_signal_kills_the_workers_process_group_and_below_when_not_pid1(wrap):
    """Not PID 1, nobody kills the namespace for us: wrap must kill the worker's processes."""
    w = wrap(env={"ON_TERM": "ignore", "ON_QUIT": "ignore"}, pid1=False)
    w.tell("job 60")
    w.wait_event("job started")
    w.tell("stubborn 60")  # ignores SIGTERM
    w.wait_event("stubborn child")
    worker = w.worker_pid()
    below = _descendants(worker)
    assert len(below) >= 3  # the job, a child that ignores TERM, one in its own session
    for _ in range(3):
        w.send(signal.SIGTERM)
        time.sleep(0.1)
    assert w.wait(5) == 1
    for pid in [worker, *below]:
        wait_until(lambda pid=pid: process_state(pid) in (None, "Z"), 2, w.output)


@pytest.mark.parametrize("job", [True, False], ids=["busy", "idle-but-running"])
def test_deadline_forces_the_worker_then_kills_it_before_sigkill(wrap, job):
    """A worker that still runs at the force point gets the force signal, busy or not (its busy
    source may be wrong, and an idle worker loses nothing by it)."""
    stop_timeout, grace, margin = 3.0, 1.0, 0.5
    w = wrap(
        "--stop-timeout",
        str(stop_timeout),
        "--cancel-grace-period",
        str(grace),
        "--drain-margin",
        str(margin),
        env={"ON_TERM": "ignore", "ON_QUIT": "ignore"},
    )
    if job:
        w.tell("job 60")
        w.wait_event("job started")
    sent = w.send(signal.SIGTERM)
    forced = w.wait_event("got QUIT", stop_timeout + 2) - sent
    assert stop_timeout - grace - margin - 0.2 < forced < stop_timeout - grace, forced
    assert w.wait(stop_timeout + 2) == 1
    took = w.exited_at - sent
    assert stop_timeout - 0.5 - 0.3 < took < stop_timeout, f"exited {took:.2f}s after SIGTERM"
    out = w.output()
    assert "s until SIGKILL" in out  # each step says how long is left
    assert "left before SIGKILL" in out
    assert "killing it and exiting" in out


# -- health, status, busy ----------------------------------------------------------------------


def test_health_and_status(wrap):
    w = wrap("--busy-interval", "0.1")
    code, body = w.get("/health")
    assert code == 200 and body == {"ok": True}
    status = w.status()
    assert status["state"] == "idle" and status["busy"] is False
    assert status["worker_pid"] == 2  # wrap is 1 in its namespace
    assert status["deadline_in_seconds"] is None
    # The job runs until it has been seen (a loaded machine may take more than a short job's
    # length to sample it): order is judged, the bounds only catch a hang.
    w.tell("job 60")
    wait_until(lambda: w.status()["busy"] is True, 30, w.output)
    assert w.status()["busy_from"]["source"] == "children"
    w.send(signal.SIGTERM)
    wait_until(lambda: w.status()["state"] == "draining", 30, w.output)
    w.tell("endjob")
    assert w.wait(30) == 0


def test_busy_from_children_drives_task_protection(wrap):
    ecs = EcsAgentStandIn()
    ecs.add_task("task-1")
    with ecs.serve():
        w = wrap("--busy-interval", "0.1", env=ecs.env_for("task-1"))
        time.sleep(0.3)
        assert not ecs.protection("task-1").enabled
        w.tell("job 60")  # ended once protection has been seen on: order, not a window
        w.wait_event("job started")
        wait_until(lambda: ecs.protection("task-1").enabled, 30, w.output)
        # The stand-in turns it on before wrap has read the answer: wait for wrap's view too.
        wait_until(lambda: w.status()["task_protection"]["enabled"] is True, 30, w.output)
        w.tell("endjob")
        w.wait_event("job done", 30)
        wait_until(lambda: not ecs.protection("task-1").enabled, 30, w.output)
        w.send(signal.SIGTERM)
        assert w.wait(5) == 0
    enables = [p.enabled for p in ecs.puts("task-1") if p.status == 200]
    assert enables == [True, False], enables


def test_busy_probe_json_status_code_and_down(wrap):
    answer: dict[str, tuple[int, bytes]] = {"now": (200, b'{"aggregate_status": "idle"}')}

    async def status_json(_request: Request) -> Response:
        code, body = answer["now"]
        return Response(body, status_code=code, media_type="application/json")

    with ServeInThread(Starlette(routes=[Route("/status.json", status_json)])) as server:
        w = wrap("--busy-probe", f"{server.url}/status.json", "--busy-interval", "0.1")

        def busy_after(code: int, body: bytes) -> bool:
            answer["now"] = (code, body)
            time.sleep(0.35)
            return bool(w.status()["busy"])

        assert busy_after(200, b'{"aggregate_status": "busy", "workers": []}') is True
        assert busy_after(200, b'{"aggregate_status": "idle"}') is False
        assert busy_after(200, b"OK") is True  # a plain URL: 200 is busy
        assert busy_after(404, b"nothing running") is False  # ... and anything else idle
        assert busy_after(503, b"") is True  # a probe that fails counts as busy
        assert w.status()["busy_from"]["last"] == "down"
        assert "counted as busy" in w.output()
        w.send(signal.SIGTERM)
        assert w.wait(5) == 0


def test_a_busy_probe_that_never_answers_leaves_busy_to_the_children_and_never_crashes_wrap(wrap):
    """Not serving yet (nothing listens): busy is the worker's children until it answers."""
    w = wrap("--busy-probe", "http://127.0.0.1:9/status.json", "--busy-interval", "0.1")
    # Both at once: /status can show the probe's "not serving" while the busy it leads to
    # (from the worker's children) is still being read, and busy still the one before it.
    wait_until(
        lambda: (s := w.status())["busy_from"]["last"] == "not serving" and s["busy"] is False,
        30,
        w.output,
    )
    assert "is not serving yet" in w.output() and "counted as busy" not in w.output()
    # The job runs until wrap has been seen calling it busy (it failed once beside 2 busy
    # loops with a 1 s job), then ends: busy follows it both ways.
    w.tell("job 60")
    wait_until(lambda: w.status()["busy"] is True, 30, w.output)
    assert w.status()["busy_from"]["before_serving"]["processes"] >= 1
    w.tell("endjob")
    w.wait_event("job done", 30)
    wait_until(lambda: w.status()["busy"] is False, 30, w.output)
    assert w.proc.alive()
    w.send(signal.SIGTERM)
    assert w.wait(5) == 0


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status", "message"),
    [
        ([], 2, "no command to run"),
        (["--"], 2, "no command to run"),
        (["--graceful-signal", "SIGNOPE", "--", "true"], 2, "unknown signal 'SIGNOPE'"),
        (["--force-signal", "99", "--", "true"], 2, "unknown signal '99'"),
        (["--", "no-such-command-here"], 127, "command not found"),
        (["--", "/no/such/file"], 127, "No such file or directory"),
        (["--", "/etc/passwd"], 2, "Permission denied"),
        (["--busy-probe", "ftp://x/", "--", "true"], 2, "--busy-probe"),
        (["--stop-timeout", "soon", "--", "true"], 2, "--stop-timeout"),
        (["--no-such-option", "--", "true"], 2, "unrecognized arguments"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_or_127(args, status, message):
    proc = subprocess.run(wrap_command(*args), capture_output=True, timeout=20, text=True)
    assert proc.returncode == status, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fleetdrain-agent wrap: ") and message in lines[0], lines[0]


def test_a_command_that_cannot_be_executed_exits_2(tmp_path: Path):
    garbage = tmp_path / "not-a-program"
    garbage.write_bytes(b"\x00\x01\x02 not an executable format")
    garbage.chmod(0o755)
    proc = subprocess.run(wrap_command("--", str(garbage)), capture_output=True, timeout=20)
    assert proc.returncode == 2
    assert b"cannot run" in proc.stderr


def test_fleetdrain_env_sets_the_options(wrap):
    """Each option from its FLEETDRAIN_* variable; the cancel grace from BUILDKITE_* too."""
    w = wrap(
        env={
            "FLEETDRAIN_STOP_TIMEOUT": "3",
            "BUILDKITE_CANCEL_GRACE_PERIOD": "1",
            "FLEETDRAIN_DRAIN_MARGIN": "0.5",
            "FLEETDRAIN_GRACEFUL_SIGNAL": "SIGUSR1",
            "ON_QUIT": "exit",
        }
    )
    w.tell("job 30")
    w.wait_event("job started")
    sent = w.send(signal.SIGTERM)
    w.wait_event("got USR1")
    forced = w.wait_event("got QUIT", 4) - sent
    assert 1.2 < forced < 2.0, forced
    assert w.wait(5) == 3


def _descendants(pid: int) -> list[int]:
    out = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        for child in Path(f"/proc/{pid}/task/{tid}/children").read_text().split():
            out += [int(child), *_descendants(int(child))]
    return out
