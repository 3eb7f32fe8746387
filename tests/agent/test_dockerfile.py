"""The images start the agent as PID 1: exec-form ENTRYPOINT, no shell in front of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


@pytest.mark.parametrize(
    ("dockerfile", "command"),
    [("infra/agent.Dockerfile", ["fleetdrain-agent", "start"]), ("infra/wrap.Dockerfile", None)],
)
def test_entrypoint_is_exec_form_and_runs_the_agent_itself(dockerfile: str, command):
    steps = _instructions(ROOT / dockerfile)
    entrypoints = [args for keyword, args in steps if keyword == "ENTRYPOINT"]
    assert len(entrypoints) == 1, entrypoints
    # Exec form is a JSON array; anything else is run by /bin/sh -c, which becomes PID 1 and
    # never forwards SIGTERM.
    argv = json.loads(entrypoints[0])
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv)
    assert argv[0] == "fleetdrain-agent"
    if command is not None:
        assert argv == command
    else:
        # wrap, then its options, then the worker after "--": wrap is PID 1, not a shell.
        assert argv[1] == "wrap" and "--" in argv
    healthchecks = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert healthchecks and '["fleetdrain-agent", "health"' in healthchecks[0]
