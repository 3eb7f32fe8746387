"""Shared fixtures: a running coordinator on loopback, and real agent processes.

Nothing a test starts outlives the session: every agent dies with this process
(PR_SET_PDEATHSIG, see :mod:`fleetdrain.drill.world.processes`), a fixture kills its agents
(with their jobs) however the test ends, and :func:`_contained_session` marks every process
started during the session and kills what still carries the mark at its end, or, through its
guard process, if pytest itself is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from fleetdrain.drill.coordinator import Coordinator, CoordinatorServer
from fleetdrain.drill.world.processes import (
    AgentProcess,
    contained,
    pid_namespaces_available,
    spawn_agent,
)

_names = itertools.count(1)
#: How long a fixture waits for an agent to connect or a job to change state: a bound for a
#: loaded machine (a passing test waits only as long as the agent takes), not a deadline.
WAIT = 30.0


@pytest.fixture(scope="session", autouse=True)
def _contained_session() -> Iterator[None]:
    """The session's containment: its marker in the environment of every process a test
    starts; whatever still carries it at the end (or when pytest dies) is killed."""
    with contained():
        yield


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_pid1() -> None:
    """Skip (with the reason) where this machine cannot make PID namespaces."""
    ok, why = pid_namespaces_available()
    if not ok:
        pytest.skip(f"PID-1 test needs a PID namespace: {why}")


class Fleet:
    """A coordinator plus the agent processes a test started; everything is cleaned up."""

    def __init__(self, coord: Coordinator, server: CoordinatorServer, tmp: Path) -> None:
        self.coord = coord
        self.server = server
        self.tmp = tmp
        self.agents: list[AgentProcess] = []

    def agent(
        self,
        *extra: str,
        name: str | None = None,
        pid1: bool = True,
        env: dict[str, str] | None = None,
        health: bool = False,
    ) -> tuple[AgentProcess, str, str | None]:
        """Start an agent; returns (process, its name, its health address or None)."""
        if pid1:
            require_pid1()
        name = name or f"agent-{next(_names)}"
        addr = f"127.0.0.1:{free_port()}" if health else None
        args = [
            "start",
            "--token",
            self.coord.registration_token,
            "--endpoint",
            self.server.agent_endpoint,
            "--name",
            name,
            "--build-path",
            str(self.tmp / "builds"),
            "--log-level",
            "debug",
            *(["--health-check-addr", addr] if addr else []),
            *extra,
        ]
        proc = spawn_agent(args, log_path=self.tmp / f"{name}.log", env=env, pid1=pid1)
        self.agents.append(proc)
        return proc, name, addr

    def agent_id(self, name: str, timeout: float = WAIT) -> str:
        """The coordinator's id for the agent called ``name`` once it has connected.

        "Has connected", not "is connected": an agent with a short job (``--disconnect-after-job``)
        can connect, run it and disconnect between two polls.
        """
        assert self.coord.wait_for(
            lambda c: (
                (a := c.agent_named(name)) is not None
                and bool(c.events_of("connect", agent_id=a.id))
            ),
            timeout,
        ), f"{name} did not connect:\n{self._logs()}"
        agent = self.coord.agent_named(name)
        assert agent is not None
        return agent.id

    def wait_job_state(self, job_id: str, states: tuple[str, ...], timeout: float = WAIT) -> None:
        """Wait until the job is in one of ``states``."""
        assert self.coord.wait_for(lambda c: c.job(job_id).state in states, timeout), (
            f"job {job_id} stuck in {self.coord.job(job_id).state}, wanted {states}\n{self._logs()}"
        )

    def _logs(self) -> str:
        return "\n".join(f"--- {a.log_path.name}\n{a.output()[-4000:]}" for a in self.agents)

    def close(self) -> None:
        """Kill every agent the test started, with its job (however the test ended)."""
        for proc in self.agents:
            with contextlib.suppress(Exception):  # cleanup must go on
                proc.kill()
        for proc in self.agents:
            with contextlib.suppress(Exception):
                proc.wait(5)


@pytest.fixture
def make_fleet(tmp_path: Path) -> Iterator:
    """Factory: ``make_fleet(**coordinator_kwargs)`` -> running :class:`Fleet`."""
    made: list[Fleet] = []

    def make(**kwargs: object) -> Fleet:
        defaults: dict[str, object] = {
            "ping_interval": 0.2,
            "heartbeat_interval": 0.5,
            "job_status_interval": 0.2,
            "lost_agent_timeout": 10.0,
            "chunks_interval_seconds": 0.2,
            "request_headers": {"X-Fleetdrain-Test": "1"},
        }
        defaults.update(kwargs)
        coord = Coordinator(**defaults)  # type: ignore[arg-type]
        server = CoordinatorServer(coord)
        server.__enter__()
        fleet = Fleet(coord, server, tmp_path)
        made.append(fleet)
        return fleet

    yield make
    for fleet in made:  # every fleet's agents first: a server that fails to stop leaves none
        fleet.close()
    for fleet in made:
        fleet.server.stop()


#: Credentials moto accepts; nothing real can be reached with them.
FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SECURITY_TOKEN": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake AWS credentials, and none of the variables that would point a test at a real
    endpoint, table or token (a test that needs one sets it itself)."""
    for key, value in FAKE_AWS_ENV.items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_ENDPOINT_URL", "FLEETDRAIN_TABLE", "FLEETDRAIN_API_TOKEN"):
        monkeypatch.delenv(key, raising=False)
