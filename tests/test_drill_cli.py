"""``fleetdrain drill`` end to end: real agents, the embedded coordinator, its JSON report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from drill.processes import pid_namespaces_available

pytestmark = pytest.mark.pid1


def test_drill_reports_no_lost_builds(tmp_path):
    ok, why = pid_namespaces_available()
    if not ok:
        pytest.skip(f"the drill's agents run as PID 1: {why}")
    report = tmp_path / "report.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "drill.cli",
            "drill",
            "--json",
            str(report),
            "--workdir",
            str(tmp_path / "work"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["name"]: row for row in json.loads(report.read_text())}
    assert set(rows) == {"stop-task", "deadline"}
    stop, deadline = rows["stop-task"], rows["deadline"]
    assert (stop["passed"], stop["retried"], stop["lost"]) == (1, 0, 0)
    assert stop["exit_after_job_seconds"] < 1.0
    assert stop["max_heartbeat_gap"] < 1.5 * stop["heartbeat_interval"]
    # The long build was cancelled before the 8 s stopTimeout, reported, retried, and passed.
    assert (deadline["passed"], deadline["retried"], deadline["lost"]) == (1, 1, 0)
    assert deadline["drain_seconds"] < 8.0
    assert all(code == 0 for code in stop["agent_exit_codes"] + deadline["agent_exit_codes"])
    assert "fleetdrain drill" in result.stdout
