"""``fleetdrain drill``: end to end (real agents, the embedded coordinator, its JSON and HTML
reports), and the command's own logic (exit status, bad input) with the drill injected."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fleetdrain.cli import main
from fleetdrain.drill.report.model import DrillReport, ScenarioReport
from fleetdrain.drill.world.processes import pid_namespaces_available

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.pid1
def test_drill_reports_no_lost_builds(tmp_path: Path) -> None:
    ok, why = pid_namespaces_available()
    if not ok:
        pytest.skip(f"the drill's agents run as PID 1: {why}")
    report_path, html_path = tmp_path / "report.json", tmp_path / "drill.html"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fleetdrain.cli",
            "drill",
            "--scenario",
            "stop-task",
            "--json",
            str(report_path),
            "--html",
            str(html_path),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=600,  # the pace is calibrated: a busy machine runs it slower
        cwd=ROOT,
    )
    if result.returncode == 3:  # inconclusive: this machine was too slow to tell
        pytest.skip("the drill was inconclusive: " + result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout + result.stderr
    report = DrillReport.read_json(report_path)
    assert report.mode == "local" and report.ok and report.pid_namespaces
    assert [s.name for s in report.scenarios] == ["stop-task"]
    stop = report.scenarios[0]
    assert stop.kind == "after" and stop.ok
    assert stop.passed >= 1 and stop.lost == 0
    assert stop.jobs_run >= stop.passed
    assert stop.longest_drain_seconds is not None and stop.longest_drain_seconds < 30
    assert stop.max_heartbeat_gap_intervals is not None
    assert stop.max_heartbeat_gap_intervals < 2.0
    # The pace it chose is said, first thing, and kept in the report.
    assert result.stdout.splitlines()[0].startswith("fleetdrain drill: stop-task")
    assert "pace: " in result.stdout and report.pace.startswith("pace: ")
    # The terminal output piped to a log: the table, plain lines, no cursor tricks.
    assert "fleetdrain drill" in result.stdout and "stop-task" in result.stdout
    assert "\x1b[" not in result.stdout
    assert max(len(line) for line in result.stdout.splitlines()) <= 120
    html = html_path.read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "stop-task" in html and "<script" not in html


# ------------------------------------------------------------------ the command's logic


def scenario(
    name: str, kind: str = "after", *, lost: int = 0, ok: bool = True, outcome: str | None = None
) -> ScenarioReport:
    return ScenarioReport(
        name=name,
        description=f"{name} scenario",
        kind=kind,  # type: ignore[arg-type]
        jobs_run=1,
        lost=lost,
        ok=ok,
        outcome=outcome,  # type: ignore[arg-type]
        cause="machine too slow (load 5.0 on 2 cores)" if outcome == "inconclusive" else None,
        retry_time_scale=3.0 if outcome == "inconclusive" else None,
    )


class FakeDrill:
    """Stands in for run_local_drill: records its call, returns a prepared report."""

    def __init__(self, *scenarios: ScenarioReport) -> None:
        self.report = DrillReport(started_at="2026-11-30T08:00:00+00:00", scenarios=list(scenarios))
        self.calls: list[tuple[object, dict[str, object]]] = []

    def __call__(self, names: object, **kwargs: object) -> DrillReport:
        self.calls.append((names, kwargs))
        progress = kwargs["progress"]
        assert callable(progress)
        progress("stop-task: running")
        return self.report


def test_options_reach_the_drill_and_a_clean_report_exits_0(tmp_path: Path, capsys) -> None:
    fake = FakeDrill(scenario("stop-task"))
    argv = ["drill", "--scenario", "stop-task", "--time-scale", "0.25", "--workdir", str(tmp_path)]
    assert main(argv, run_local=fake) == 0
    ((names, kwargs),) = fake.calls
    assert names == ["stop-task"]
    assert kwargs["time_scale"] == 0.25 and kwargs["workdir"] == tmp_path
    assert kwargs["concurrency"] is None
    out = capsys.readouterr().out
    assert "stop-task: running" in out  # the piped progress line
    assert out.rstrip().endswith("OK")


@pytest.mark.parametrize(
    ("argv", "time_scale", "concurrency"),
    [
        ([], None, None),  # calibrated
        (["--time-scale", "auto"], None, None),
        (["--time-scale", "AUTO", "--concurrency", "2"], None, 2),
        (["--time-scale", "3"], 3.0, None),
    ],
)
def test_the_pace_is_calibrated_unless_given(argv, time_scale, concurrency) -> None:
    fake = FakeDrill(scenario("stop-task"))
    assert main(["drill", *argv], run_local=fake) == 0
    ((_names, kwargs),) = fake.calls
    assert kwargs["time_scale"] == time_scale and kwargs["concurrency"] == concurrency


@pytest.mark.parametrize(
    ("scenarios", "code"),
    [
        ((scenario("stop-task", lost=1, ok=False),), 1),  # an "after" scenario lost a job
        ((scenario("stop-task"), scenario("shell-pid1", "before", ok=False)), 1),  # no loss seen
        ((scenario("stop-task"), scenario("shell-pid1", "before", lost=1)), 0),  # loss shown
        # Out of time or too slow: inconclusive, 3: never 0 (a pass), never 1 (a loss)...
        ((scenario("stop-task"), scenario("spot", ok=False, outcome="inconclusive")), 3),
        # ...unless something else failed.
        (
            (
                scenario("spot", ok=False, outcome="inconclusive"),
                scenario("stop-task", lost=1, ok=False),
            ),
            1,
        ),
    ],
)
def test_exit_status_follows_the_report(scenarios, code: int, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r.json"
    assert main(["drill", "--json", str(out)], run_local=FakeDrill(*scenarios)) == code
    written = DrillReport.read_json(out)
    assert written.ok is (code == 0) and written.exit_status == code
    if code == 3:
        text = capsys.readouterr().out
        assert "inconclusive: machine too slow (load 5.0 on 2 cores)" in text
        assert "retry with fleetdrain drill --scenario spot --time-scale 3" in text
        assert text.rstrip().endswith("INCONCLUSIVE")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["drill", "--time-scale", "0"], "must be a number > 0"),
        (["drill", "--time-scale", "fast"], "not a number"),
        (["drill", "--scenario", "nope"], "invalid choice"),
        (["drill", "--concurrency", "0"], "must be at least 1"),
        (["drill", "--concurrency", "two"], "not a whole number"),
    ],
)
def test_bad_options_are_refused_by_the_parser(argv, message: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv, run_local=FakeDrill())
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_unwritable_report_path_is_refused_before_the_drill_runs(tmp_path: Path, capsys) -> None:
    fake = FakeDrill(scenario("stop-task"))
    assert main(["drill", "--html", str(tmp_path / "missing" / "x.html")], run_local=fake) == 2
    assert fake.calls == []
    err = capsys.readouterr().err.strip()
    assert err.startswith("fleetdrain: error: --html") and "does not exist" in err
    assert "\n" not in err


def test_help_names_every_scenario_and_the_aws_options() -> None:
    from fleetdrain.drill.runner import SCENARIOS

    result = subprocess.run(
        [sys.executable, "-m", "fleetdrain.cli", "drill", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
    )
    assert result.returncode == 0
    for name in SCENARIOS:
        assert name in result.stdout
    for flag in ("--aws", "--cluster", "--pipeline", "--kill", "--token-secret-arn", "--html"):
        assert flag in result.stdout
