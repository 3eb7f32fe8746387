"""``wrap`` and ``health`` speak the official Go agent's settings exactly (issue 10).

- every log level the Go agent takes (logger/level.go: debug, notice, info, warn, error, fatal,
  and its aliases warning and panic), by flag and by ``$BUILDKITE_AGENT_LOG_LEVEL``; an unknown
  one warns and falls back to notice, as the Go agent does, instead of exiting;
- ``health`` against a server that serves only what the Go agent's --health-check-addr serves
  (``/``, ``/status.json``; agent/agent_pool.go), not ``/health``;
- no ``--token`` or ``*_TOKEN`` value in /status or in wrap's logs;
- a busy probe that never comes up (the Go agent opens its port only once it has registered)
  does not hold task protection on: until it first answers, the worker's children decide.

Real processes and real loopback HTTP throughout: a stand-in for the Go agent's health server,
``wrap`` as a process (as PID 1 where the harness gives it), /status read over HTTP, logs read
from stderr.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from fleetdrain.agent import cli
from fleetdrain.agent.health import check
from fleetdrain.agent.logs import python_log_level, redact_argv
from fleetdrain.drill.aws.endpoints import EcsAgentStandIn
from tests.agent.wrap_support import WrapFactory, free_addr, wait_until, wrap_command, wraps

REPO = Path(__file__).resolve().parents[2]
#: What the Go agent's "/" says (agent/agent_pool.go, healthHandler).
GO_OK = b"OK: Buildkite agent is running"


# ------------------------------------------------------------------ the Go agent's server


class GoAgentStandIn:
    """The Go agent's health check server, as ``buildkite-agent start --health-check-addr``
    serves it: ``/`` 200 ``OK: Buildkite agent is running``; ``/status.json`` 200 JSON with
    ``health`` and ``aggregate_status``; anything else (``/health`` too) Go's ``404 page not
    found``. ``root_status`` / ``serve_root`` / ``health`` bend it for the unhealthy cases."""

    def __init__(self, addr: str = "127.0.0.1:0") -> None:
        self.aggregate_status = "idle"
        self.root_status = 200
        self.serve_root = True
        self.health = "ok"
        #: None: /health is 404, as the Go agent has it; a status: answer it, as ours does.
        self.health_route: int | None = None
        self.paths: list[str] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stand_in.paths.append(self.path)
                if self.path == "/health" and stand_in.health_route is not None:
                    ok = stand_in.health_route == 200
                    self._send(
                        stand_in.health_route,
                        "application/json",
                        b'{"ok": %s}\n' % (b"true" if ok else b"false"),
                    )
                elif self.path == "/" and stand_in.serve_root:
                    self._send(stand_in.root_status, "text/plain; charset=utf-8", GO_OK)
                elif self.path == "/status.json":
                    body = {
                        "health": stand_in.health,
                        "aggregate_status": stand_in.aggregate_status,
                        "workers": [
                            {"status": stand_in.aggregate_status, "id": "a1", "spawn_index": 1}
                        ],
                    }
                    self._send(200, "application/json", json.dumps(body).encode() + b"\n")
                else:
                    self._send(404, "text/plain; charset=utf-8", b"404 page not found\n")

            def _send(self, status: int, kind: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        host, _, port = addr.rpartition(":")
        self.server = ThreadingHTTPServer((host, int(port)), Handler)
        self.server.daemon_threads = True
        self.addr = f"127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> GoAgentStandIn:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop listening: connections are refused from now on."""
        if self._thread.is_alive():
            self.server.shutdown()
        self.server.server_close()


def _clean_env(**extra: str) -> dict[str, str]:
    """Our environment without any agent setting that would change what a test sees."""
    drop = ("FLEETDRAIN_", "BUILDKITE_", "ECS_AGENT_URI", "ECS_CONTAINER_METADATA_URI")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.update(extra)
    return env


# --------------------------------------------------------------------------- log levels

#: What each Go level shows of wrap's records. notice is INFO (in the Go agent it sits between
#: debug and info: everything but debug shows); error, panic and fatal keep errors (the Go
#: agent's Error prints at every level, and its slog logger takes fatal as error).
SHOWN = {
    "debug": {"DEBUG", "INFO", "WARNING", "ERROR"},
    "info": {"INFO", "WARNING", "ERROR"},
    "notice": {"INFO", "WARNING", "ERROR"},
    "NOTICE": {"INFO", "WARNING", "ERROR"},
    "warn": {"WARNING", "ERROR"},
    "warning": {"WARNING", "ERROR"},
    "error": {"ERROR"},
    "panic": {"ERROR"},
    "fatal": {"ERROR"},
    # Unknown: a warning, then notice, as the Go agent does; never exit 2.
    "verbose": {"INFO", "WARNING", "ERROR"},
}
_RECORD = re.compile(r"^\S+ \S+ (DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+fleetdrain\.", re.M)


def _start_wraps_to_their_deadline(
    tmp: Path, cases: dict[str, tuple[list[str], dict[str, str]]]
) -> dict[str, tuple[int, str]]:
    """Run one wrap per case (options, environment), all at once, each in front of a worker that
    ignores SIGTERM and SIGQUIT, and stop each with one SIGTERM: on its way to the deadline
    wrap logs at every level (state changes: DEBUG; the graceful signal: INFO; the forced
    stop: WARNING; the SIGKILL: ERROR). Returns each case's exit status and stderr."""
    # The worker's word that its trap is set: "worker-2-ready", which its command line (that
    # wrap logs as it starts it) does not hold, so the wait below cannot take wrap's own line
    # for it and SIGTERM the worker before its trap is set.
    worker = "trap '' TERM QUIT; echo worker-$((1+1))-ready >&2; exec sleep 30"
    running = {}
    for number, (name, (options, env)) in enumerate(cases.items()):
        log = tmp / f"wrap-{number}.log"
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                # Whole seconds between the steps: up to 11 wraps run at once here, on a
                # loaded machine, and each step must log before the next one comes.
                wrap_command(
                    "--stop-timeout",
                    "3",
                    "--cancel-grace-period",
                    "1",
                    "--drain-margin",
                    "0.5",
                    *options,
                    "--",
                    "sh",
                    "-c",
                    worker,
                ),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=_clean_env(**env),
                cwd=REPO,
                start_new_session=True,
            )
        running[name] = (proc, log)
    results = {}
    try:
        for proc, log in running.values():
            wait_until(lambda log=log: b"worker-2-ready" in log.read_bytes(), 30, log.read_text)
            proc.send_signal(signal.SIGTERM)
        for name, (proc, log) in running.items():
            results[name] = (proc.wait(20), log.read_text())
    finally:
        for proc, _ in running.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    return results


def _assert_levels(name: str, code: int, err: str, shown: set[str]) -> None:
    assert code == 1, f"{name}: wrap must run (the deadline ends it with 1), got {code}:\n{err}"
    assert set(_RECORD.findall(err)) == shown, f"{name}: {sorted(set(_RECORD.findall(err)))}\n{err}"


@pytest.mark.slow
def test_wrap_log_level_flag_takes_every_go_level(tmp_path: Path):
    cases = {level: (["--log-level", level], {}) for level in SHOWN}
    for level, (code, err) in _start_wraps_to_their_deadline(tmp_path, cases).items():
        _assert_levels(f"--log-level {level}", code, err, SHOWN[level])
        unknown = "is not one of debug, info, notice, warn, error, fatal: using notice" in err
        assert unknown is (level == "verbose"), err


@pytest.mark.slow
def test_wrap_reads_buildkite_agent_log_level_and_debug_as_the_go_agent_does(tmp_path: Path):
    cases: dict[str, tuple[list[str], dict[str, str]]] = {
        f"BUILDKITE_AGENT_LOG_LEVEL={level}": ([], {"BUILDKITE_AGENT_LOG_LEVEL": level})
        for level in SHOWN
    }
    expected = {name: SHOWN[name.partition("=")[2]] for name in cases}
    more: dict[str, tuple[list[str], dict[str, str], set[str]]] = {
        # The Go agent's default, with nothing set.
        "nothing set": ([], {}, SHOWN["notice"]),
        # --debug / $BUILDKITE_AGENT_DEBUG takes precedence over the level, as in the Go agent.
        "BUILDKITE_AGENT_DEBUG": (
            [],
            {"BUILDKITE_AGENT_DEBUG": "true", "BUILDKITE_AGENT_LOG_LEVEL": "error"},
            SHOWN["debug"],
        ),
        # wrap's own setting beats the wrapped agent's.
        "FLEETDRAIN_LOG_LEVEL": (
            [],
            {"FLEETDRAIN_LOG_LEVEL": "error", "BUILDKITE_AGENT_LOG_LEVEL": "debug"},
            SHOWN["error"],
        ),
        "--log-level over BUILDKITE_AGENT_DEBUG": (
            ["--log-level", "warn"],
            {"BUILDKITE_AGENT_DEBUG": "true"},
            SHOWN["warn"],
        ),
    }
    for name, (options, env, shown) in more.items():
        cases[name] = (options, env)
        expected[name] = shown
    for name, (code, err) in _start_wraps_to_their_deadline(tmp_path, cases).items():
        _assert_levels(name, code, err, expected[name])


def test_python_levels_keep_what_the_go_levels_keep():
    assert {n: python_log_level(n) for n in ("debug", "notice", "info", "warn", "fatal")} == {
        "debug": 10,
        "notice": 20,
        "info": 20,
        "warn": 30,
        "fatal": 40,
    }
    assert python_log_level(" WARNING ") == 30 and python_log_level("Panic") == 40
    assert python_log_level("verbose") is None and python_log_level(None) is None


@pytest.mark.parametrize("level", [*SHOWN, "trace"])
def test_start_takes_every_go_level_and_debug(level: str, monkeypatch):
    """start's --log-level is the Go agent's too: no argparse choices, nothing rejected (the
    unknown ones warn once logging is set up)."""
    from fleetdrain.agent.settings import settings_from_args

    for name in ("BUILDKITE_AGENT_LOG_LEVEL", "BUILDKITE_AGENT_DEBUG"):
        monkeypatch.delenv(name, raising=False)

    def settings(*args: str):
        return settings_from_args(cli._parser().parse_args(["start", "--token", "t", *args]))

    assert settings().log_level == "notice"
    assert settings("--log-level", level).log_level == level
    assert settings("--log-level", level, "--debug").log_level == "debug"
    monkeypatch.setenv("BUILDKITE_AGENT_LOG_LEVEL", level)
    assert settings().log_level == level
    monkeypatch.setenv("BUILDKITE_AGENT_DEBUG", "true")
    assert settings().log_level == "debug"


# ------------------------------------------------------------------------------- health


def _health(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """``fleetdrain-agent health`` as the container healthCheck runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "fleetdrain.agent.cli", "health", *args],
        env=_clean_env(**(env or {})),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return done.returncode, done.stderr


@pytest.mark.slow
def test_health_with_only_the_go_agents_address_asks_what_the_go_agent_serves():
    """Only $BUILDKITE_AGENT_HEALTH_CHECK_ADDR set, and the Go agent behind it (no wrap, or
    wrap without its own address): healthy, where asking /health alone said 404."""
    with GoAgentStandIn() as go:
        code, err = _health(env={"BUILDKITE_AGENT_HEALTH_CHECK_ADDR": go.addr})
        assert (code, err) == (0, "")
        assert go.paths == ["/health", "/"]
        go.root_status = 500
        code, err = _health(env={"BUILDKITE_AGENT_HEALTH_CHECK_ADDR": go.addr})
        assert code == 1 and err.count("\n") == 1 and f"{go.addr}/: HTTP 500" in err, err
    # Not listening (the Go agent is still registering, or gone): unhealthy, one line.
    code, err = _health("--addr", go.addr)
    assert code == 1 and "ConnectionRefused" in err and err.count("\n") == 1, err


def test_health_falls_back_to_status_json_and_reads_its_health():
    with GoAgentStandIn() as go:
        go.serve_root = False
        assert check(go.addr) == 0
        assert go.paths == ["/health", "/", "/status.json"]
        go.health = "sick"
        assert check(go.addr) == 1


def test_health_takes_our_servers_503_as_the_verdict(capsys):
    """Ours answers /health (200 or 503): a 503 is not second-guessed by asking /."""
    with GoAgentStandIn() as server:
        server.health_route = 503  # /health answered, as ours does, with / still 200
        assert check(server.addr) == 1
        assert server.paths == ["/health"]
        assert "HTTP 503" in capsys.readouterr().err
        server.health_route = 200
        assert check(server.addr) == 0
        assert server.paths == ["/health", "/health"]


def test_health_timeout_bounds_the_whole_check():
    """However many paths it asks, the check ends within --timeout (ECS kills it at its own)."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        started = time.monotonic()
        assert check(f"127.0.0.1:{listener.getsockname()[1]}", timeout=0.5) == 1
        assert time.monotonic() - started < 1.5


# -------------------------------------------------------------------------------- secrets

SECRETS = {
    "flag": "sekret-flag-value-1",
    "equals": "sekret-equals-value-2",
    "env": "sekret-from-env-value-3",
    "assignment": "sekret-assignment-4",
    "inline": "sekret-inline-5",
}


@pytest.fixture
def wrap(tmp_path: Path) -> Iterator[WrapFactory]:
    """``wrap(*options, env=..., worker_args=...)``: wrap in front of the bash worker."""
    yield from wraps(tmp_path)


@pytest.mark.slow
@pytest.mark.pid1
def test_status_and_logs_never_show_a_token(wrap):
    w = wrap(
        "--log-level",
        "debug",
        env={"BUILDKITE_AGENT_TOKEN": SECRETS["env"]},
        worker_args=(
            "start",
            "--token",
            SECRETS["flag"],
            f"--agent-access-token={SECRETS['equals']}",
            f"--name=agent-{SECRETS['env']}",
            f"BUILDKITE_AGENT_TOKEN={SECRETS['assignment']}",
            f"buildkite-agent start --token {SECRETS['inline']} --tags queue=a",
        ),
    )
    status = w.status()
    command = status["command"]
    assert command[2:5] == ["start", "--token", "[REDACTED]"], command
    assert command[5:] == [
        "--agent-access-token=[REDACTED]",
        "--name=agent-[REDACTED]",
        "BUILDKITE_AGENT_TOKEN=[REDACTED]",
        "buildkite-agent start --token [REDACTED] --tags queue=a",
    ]
    shown = json.dumps(status)
    w.tell("exit 0")
    assert w.wait(5) == 0
    logs = w.output()
    assert "started the worker" in logs and "[REDACTED]" in logs
    for name, secret in SECRETS.items():
        assert secret not in shown, f"{name} in /status: {shown}"
        assert secret not in logs, f"{name} in the logs:\n{logs}"


def test_redaction_leaves_everything_else_alone():
    argv = ["buildkite-agent", "start", "--tags", "queue=ci,os=linux", "--name", "a-%spawn", "-v"]
    assert redact_argv(argv, {}) == argv
    assert redact_argv(["x", "--token"], {}) == ["x", "--token"]
    assert redact_argv(["x", "-token", "abc", "--password=", "p"], {"MY_SECRET": "short"}) == [
        "x",
        "-token",
        "[REDACTED]",
        "--password=[REDACTED]",
        "p",
    ]


# ---------------------------------------------------------------- a probe not serving yet


@pytest.mark.slow
@pytest.mark.pid1
def test_a_probe_that_never_comes_up_does_not_keep_protection_on(wrap):
    """The Go agent opens --health-check-addr only after it has registered (30 tries, 10 s
    apart): until its probe first answers, busy is the worker's children, so protection is
    off while nothing runs, on while a job (a child) runs. Once the probe has served, it
    decides, and a probe that then goes down counts as busy."""
    ecs = EcsAgentStandIn()
    ecs.add_task("task-1")
    go_addr = free_addr()
    with ecs.serve():
        w = wrap(
            "--busy-probe",
            f"http://{go_addr}/status.json",
            "--busy-interval",
            "0.1",
            "--task-protection",
            env=ecs.env_for("task-1"),
        )

        def protected() -> bool:
            return bool(ecs.protection("task-1").enabled)

        wait_until(lambda: w.status()["busy_from"]["last"] == "not serving", 30, w.output)
        time.sleep(1.0)  # ten polls of a probe that refuses
        status = w.status()
        assert status["busy"] is False and not protected(), status
        assert not [p for p in ecs.puts("task-1") if p.enabled], ecs.puts("task-1")
        assert status["busy_from"]["serving"] is False
        # A job runs while the probe is still down: the worker's child counts (it runs until
        # protection has been seen on, then ends).
        w.tell("job 60")
        w.wait_event("job started")
        wait_until(protected, 30, w.output)
        w.tell("endjob")
        w.wait_event("job done", 30)
        wait_until(lambda: not protected(), 30, w.output)
        # The Go agent has registered: its /status.json decides from now on.
        with GoAgentStandIn(go_addr) as go:
            go.aggregate_status = "busy"
            wait_until(protected, 3, w.output)
            assert w.status()["busy_from"]["serving"] is True
            go.aggregate_status = "idle"
            wait_until(lambda: not protected(), 3, w.output)
        # Served once, now refusing: a job may hide behind it, so busy.
        wait_until(protected, 3, w.output)
        assert w.status()["busy_from"]["last"] == "down"
        assert "not serving yet" in w.output() and "counted as busy" in w.output()
        w.send(signal.SIGTERM)
        assert w.wait(5) == 0, w.output()


# ----------------------------------------------------------------- the documented task


#: Variables ``buildkite-agent start`` (v3) reads that a task definition here may use
#: (clicommand/agent_start.go, clicommand/global.go, clicommand/cancel_signal.go).
GO_AGENT_START_ENV = {
    "BUILDKITE_AGENT_TOKEN",
    "BUILDKITE_AGENT_ENDPOINT",
    "BUILDKITE_AGENT_NAME",
    "BUILDKITE_AGENT_PRIORITY",
    "BUILDKITE_AGENT_TAGS",
    "BUILDKITE_AGENT_QUEUE",
    "BUILDKITE_AGENT_TAGS_FROM_ECS_META_DATA",
    "BUILDKITE_AGENT_TAGS_FROM_EC2_META_DATA",
    "BUILDKITE_AGENT_TAGS_FROM_HOST",
    "BUILDKITE_BUILD_PATH",
    "BUILDKITE_HOOKS_PATH",
    "BUILDKITE_PLUGINS_PATH",
    "BUILDKITE_AGENT_HEALTH_CHECK_ADDR",
    "BUILDKITE_AGENT_LOG_LEVEL",
    "BUILDKITE_AGENT_DEBUG",
    "BUILDKITE_CANCEL_GRACE_PERIOD",
    "BUILDKITE_SIGNAL_GRACE_PERIOD_SECONDS",
    "BUILDKITE_CANCEL_SIGNAL",
    "BUILDKITE_AGENT_DISCONNECT_AFTER_JOB",
    "BUILDKITE_AGENT_DISCONNECT_AFTER_IDLE_TIMEOUT",
}


@pytest.mark.slow
def test_the_documented_task_definition_sets_only_variables_someone_reads():
    """docs/start-or-wrap.md's task definition: every BUILDKITE_* variable is one the Go agent
    reads, every FLEETDRAIN_* one wrap reads, and stopTimeout is wrap's stop timeout."""
    text = (REPO / "docs" / "start-or-wrap.md").read_text()
    found = re.search(r"### A task definition.*?```json\n(.*?)```", text, re.S)
    assert found, "no task definition in docs/start-or-wrap.md"
    (container,) = json.loads(found[1])["containerDefinitions"]
    env = {e["name"]: e["value"] for e in container["environment"]}
    names = set(env) | {s["name"] for s in container["secrets"]}
    go = {n for n in names if n.startswith("BUILDKITE_")}
    assert go <= GO_AGENT_START_ENV, go - GO_AGENT_START_ENV
    assert "BUILDKITE_AGENT_TOKEN" in go and "BUILDKITE_AGENT_TOKEN" not in env  # a secret
    wrap_help = " ".join(
        subprocess.run(
            wrap_command("--help"), capture_output=True, text=True, timeout=30, cwd=REPO
        ).stdout.split()
    )
    ours = names - go
    assert ours and all(n.startswith("FLEETDRAIN_") and f"${n}" in wrap_help for n in ours), ours
    assert float(env["FLEETDRAIN_STOP_TIMEOUT"]) == container["stopTimeout"]
    assert int(env["BUILDKITE_SIGNAL_GRACE_PERIOD_SECONDS"]) < int(
        env["BUILDKITE_CANCEL_GRACE_PERIOD"]
    )
    assert "entryPoint" not in container and "command" not in container
    assert container["linuxParameters"]["initProcessEnabled"] is False
    assert container["healthCheck"]["command"] == ["CMD", "fleetdrain-agent", "health"]
