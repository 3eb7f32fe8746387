"""Nothing outlives the drill, or a test's fixtures, whichever way they end.

Real processes throughout: ``fleetdrain drill`` in a subprocess that ends normally, or is
stopped with SIGINT or SIGTERM in the middle, or is SIGKILLed at a random point; a pytest
whose test fails (or that is SIGKILLed) with an agent and its job running. Each run gets a
marker of its own in the environment (:data:`MARK`), which every process below it inherits;
after a short grace no process may still carry it. The first tests show that the check sees
a leak when the containment is left out.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetdrain.drill.report.model import DrillReport
from fleetdrain.drill.world.processes import (
    AgentProcess,
    describe,
    marked_processes,
    pid_namespaces_available,
    spawn_agent,
    sweep,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
#: The test's own marker: set in the environment of the process under test, inherited by
#: everything it starts (the drill's own marker is a different one).
MARK = "FLEETDRAIN_TEST_MARK"
#: How long the processes of a run may take to go once it has ended. Short: without the
#: containment a SIGKILLed drill's scenario would go on for many seconds more, then end (and
#: clean up) on its own; with it everything is gone within a fraction of a second.
GRACE = 3.0
#: The scenario to interrupt: its build outlasts stopTimeout, so ~15 s of it are left to cut
#: short once its agents are up.
LONG = "deadline"


@pytest.fixture
def mark() -> Iterator[str]:
    value = uuid.uuid4().hex
    yield value
    sweep(value, MARK)  # a failed test must not leave its leak behind either


def left(mark: str) -> list[str]:
    """The processes still carrying ``mark``."""
    return [describe(pid) for pid in marked_processes(mark, MARK)]


def left_after_grace(mark: str, grace: float = GRACE) -> list[str]:
    """What still carries ``mark`` once ``grace`` seconds have passed ([] as soon as none)."""
    until = time.monotonic() + grace
    while True:
        found = left(mark)
        if not found or time.monotonic() > until:
            return found
        time.sleep(0.1)


def wait_for(
    mark: str, needle: str, proc: subprocess.Popen[bytes], timeout: float, count: int = 1
) -> None:
    """Wait until ``count`` processes carrying ``mark`` have ``needle`` in their command line."""
    until = time.monotonic() + timeout
    while time.monotonic() < until:
        if sum(needle in line for line in left(mark)) >= count:
            return
        assert proc.poll() is None, f"exited {proc.returncode} before {needle!r} ran"
        time.sleep(0.05)
    raise AssertionError(f"no {needle!r} after {timeout}s: {left(mark)}")


def start_drill(tmp_path: Path, mark: str, scenario: str = LONG) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env[MARK] = mark
    argv = [sys.executable, "-m", "fleetdrain.cli", "drill", "--scenario", scenario]
    argv += ["--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "r.json")]
    with open(tmp_path / "out.log", "wb") as out, open(tmp_path / "err.log", "wb") as err:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=err)


def require_pid1() -> None:
    ok, why = pid_namespaces_available()
    if not ok:
        pytest.skip(f"the drill's agents run as PID 1 here only as root: {why}")


# ------------------------------------------------------------------ the check can fail


LEAKER = """
import subprocess, sys, time
from fleetdrain.drill.world.processes import contained, spawn_agent
from pathlib import Path

def start():
    # An agent stand-in without a PID namespace, whose job escapes into a session of its own.
    job = "setsid sleep 300 & sleep 301 & wait"
    if sys.argv[1] == "bare":
        subprocess.Popen(["sh", "-c", job], start_new_session=True)
    else:
        spawn_agent([], log_path=Path(sys.argv[2]), pid1=False, command=["sh", "-c", job])
    print("started", flush=True)
    time.sleep(300)

if sys.argv[1] == "contained":
    with contained():
        start()
else:
    start()
"""


@pytest.mark.parametrize("how", ["bare", "pdeathsig only", "contained"])
def test_a_sigkilled_parent_leaks_only_without_the_containment(
    how: str, mark: str, tmp_path: Path
) -> None:
    # bare: nothing holds the children; "pdeathsig only": the direct child dies with its
    # parent, the job's processes (no PID namespace) do not; contained: the guard sweeps them.
    script = tmp_path / "leaker.py"
    script.write_text(LEAKER)
    mode = "spawn" if how == "pdeathsig only" else how
    proc = subprocess.Popen(
        [sys.executable, str(script), mode, str(tmp_path / "agent.log")],
        env={**os.environ, MARK: mark, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stdout.readline() == b"started\n"
    wait_for(mark, "sleep 301", proc, 10)
    proc.kill()
    proc.wait(10)
    found = left_after_grace(mark)
    if how == "contained":
        assert found == []
    else:
        assert any("sleep 300" in f for f in found), found
        assert not any(str(script) in f for f in found)  # the parent itself is gone


def test_a_process_started_from_a_short_lived_thread_outlives_the_thread(
    mark: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # PR_SET_PDEATHSIG fires when the parent *thread* exits: spawn_agent starts the process
    # from a thread that lives as long as this process does.
    monkeypatch.setenv(MARK, mark)
    started: list[AgentProcess] = []
    thread = threading.Thread(
        target=lambda: started.append(
            spawn_agent([], log_path=tmp_path / "a.log", pid1=False, command=["sleep", "30"])
        )
    )
    thread.start()
    thread.join()
    (proc,) = started
    try:
        time.sleep(0.5)
        assert proc.alive()
    finally:
        proc.kill()
        proc.wait(5)


# ------------------------------------------------------------------ the drill


@pytest.mark.pid1
def test_a_drill_that_ends_leaves_nothing_running(mark: str, tmp_path: Path) -> None:
    require_pid1()
    proc = start_drill(tmp_path, mark, "stop-task")
    assert proc.wait(120) == 0, (tmp_path / "err.log").read_text()
    assert DrillReport.read_json(tmp_path / "r.json").scenarios[0].lost == 0
    assert left_after_grace(mark) == []


@pytest.mark.pid1
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_drill_stopped_by_a_signal_stops_every_scenario_and_exits_128_plus_n(
    sig: signal.Signals, mark: str, tmp_path: Path
) -> None:
    require_pid1()
    proc = start_drill(tmp_path, mark)
    # Mid-run: the agents are up (their job may be running), then a little more.
    wait_for(mark, "fleetdrain.agent.cli start", proc, 60)
    delay = random.uniform(0.0, 2.0)
    time.sleep(delay)
    stopped_at = time.monotonic()
    proc.send_signal(sig)
    code = proc.wait(30)
    took = time.monotonic() - stopped_at
    err = (tmp_path / "err.log").read_text()
    assert code == 128 + sig, err
    (line,) = [x for x in err.splitlines() if x.startswith("fleetdrain drill: interrupted")]
    assert f"interrupted by {sig.name}: stopped 1 scenario(s) ({LONG})" in line
    assert line.endswith("nothing left running")
    assert "Traceback" not in err
    assert left_after_grace(mark) == [], f"{sig.name} {delay:.2f}s after the agents were up"
    assert took < 15


@pytest.mark.pid1
@pytest.mark.parametrize("when", ["starting", "agents up"])
def test_a_drill_sigkilled_at_a_random_point_leaves_nothing_running(
    when: str, mark: str, tmp_path: Path
) -> None:
    require_pid1()
    proc = start_drill(tmp_path, mark)
    if when == "starting":  # the scenario process forked (same command line): moto, the deploy
        wait_for(mark, "fleetdrain.cli drill", proc, 60, count=2)
        delay = random.uniform(0.0, 1.5)
    else:
        wait_for(mark, "fleetdrain.agent.cli start", proc, 60)
        delay = random.uniform(0.0, 3.0)
    time.sleep(delay)
    proc.kill()
    proc.wait(10)
    assert left_after_grace(mark) == [], f"SIGKILLed {delay:.2f}s in ({when})"


# ------------------------------------------------------------------ the test suite's fixtures


FAILING_TEST = """
import time

def test_fails_with_its_agent_busy(make_fleet):
    fleet = make_fleet()
    job = fleet.coord.add_job("sleep 300 & sleep 301; wait")
    fleet.agent(pid1={pid1})
    fleet.wait_job_state(job.id, ("running",), 30)
    print("JOB RUNNING", flush=True)
    time.sleep(1.0)  # long enough to be seen running from outside
    if {hang}:
        time.sleep(300)
    raise AssertionError("fails on purpose, its agent and job running")
"""


@pytest.mark.parametrize("pid1", [True, False], ids=["pid1", "no-namespace"])
@pytest.mark.parametrize("end", ["the test fails", "pytest is SIGKILLed"])
def test_a_fixtures_agents_and_jobs_go_however_the_test_ends(
    pid1: bool, end: str, mark: str, tmp_path: Path
) -> None:
    if pid1:
        require_pid1()
    hang = end == "pytest is SIGKILLed"
    test_file = tmp_path / "test_inner.py"
    test_file.write_text(FAILING_TEST.format(pid1=pid1, hang=hang))
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    argv = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider"]
    argv += ["-p", "tests.conftest", "-c", str(tmp_path / "pytest.ini"), str(test_file)]
    with open(tmp_path / "out.log", "wb") as out:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env={**os.environ, MARK: mark}, stdout=out, stderr=subprocess.STDOUT
        )
    wait_for(mark, "sleep 301", proc, 60)
    if hang:
        proc.kill()
        proc.wait(10)
    else:
        assert proc.wait(60) == 1, (tmp_path / "out.log").read_text()
        assert "fails on purpose" in (tmp_path / "out.log").read_text()
    assert left_after_grace(mark) == [], (tmp_path / "out.log").read_text()


# ------------------------------------------------------------------ a scenario process that fails


SCENARIO_FAILS = """
import json, os, signal, sys
from pathlib import Path
import fleetdrain.drill.aws.world as world
from fleetdrain.drill.runner import run_local_drill

def fail(*_args, **_kwargs):
    if sys.argv[1] == "raise":  # what a wheel without template.yaml did
        raise FileNotFoundError(2, "No such file or directory", "/site-packages/template.yaml")
    print("about to vanish", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

world.load_template = fail
report = run_local_drill(["stop-task"], workdir=Path(sys.argv[2]))
print(json.dumps(report.scenarios[0].notes))
"""


@pytest.mark.parametrize(
    ("how", "note"),
    [
        (
            "raise",
            "the scenario failed: FileNotFoundError: [Errno 2] No such file or directory: "
            "'/site-packages/template.yaml' (traceback in ",
        ),
        ("vanish", "no report from the scenario (SIGKILL); scenario.log ends: about to vanish"),
    ],
)
def test_a_scenario_process_that_fails_has_its_cause_in_the_report(
    how: str, note: str, mark: str, tmp_path: Path
) -> None:
    script = tmp_path / "fails.py"
    script.write_text(SCENARIO_FAILS)
    result = subprocess.run(
        [sys.executable, str(script), how, str(tmp_path / "work")],
        env={**os.environ, MARK: mark, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    (got,) = json.loads(result.stdout.splitlines()[-1])
    assert got.startswith(note), got
    assert left_after_grace(mark) == []
