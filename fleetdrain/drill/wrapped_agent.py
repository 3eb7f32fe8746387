"""Which Buildkite agent the local drill runs behind ``wrap``, and how it is started.

The wrapped scenarios (``wrapped-stop-task``, ``wrapped-scale-in``, ``wrapped-spot``) put an
agent behind ``fleetdrain-agent wrap --task-protection --watch-imds --``, as a team that adopts
fleetdrain does with the agent it already runs. That agent is, in order:

1. ``--buildkite-agent PATH`` (``fleetdrain drill``): that binary; it must be an executable file
   (or a name found on ``PATH``), else :class:`AgentChoiceError` (exit status 2). ``none``
   forces the stand-in even when one is installed;
2. ``buildkite-agent`` found on ``PATH``;
3. the stand-in: ``fleetdrain-agent start`` with the Go agent's part (no task protection and no
   stop timeout of its own: wrap does both).

:func:`choose` makes the choice, with the version the binary gives (``--version``, bounded by
:data:`VERSION_TIMEOUT`; unknown when it fails); the drill prints it at the start and keeps it in
its report (:class:`~fleetdrain.drill.report.model.WrappedAgent`). Only the wrapped scenarios
change with it: every other scenario runs fleetdrain's agent as ever.

How the Go agent is started (:func:`wrapped_command`): ``<binary> start``, every setting in its
environment, each one a variable the Go agent reads (names from its source, cited at
:data:`GO_AGENT_ENV`), with the value type it parses:

- token, endpoint (the embedded coordinator's ``/v3`` base, as ``https://agent.buildkite.com/v3``
  is Buildkite's), name and build path (the scenario's work directory) come from the task
  runtime, as ECS and the task's secrets give them
  (:meth:`~fleetdrain.drill.world.task_runtime.TaskRuntime.task_environment`);
- ``BUILDKITE_AGENT_TAGS`` names the task's ARN and instance explicitly (``ecs:task-arn=``, the
  tag the controller finds agents by, and ``aws:instance-id=``, which jobs target), filled in
  per task by the runtime (``{task:arn}``, ``{task:instance-id}``). On ECS the Go agent's
  ``--tags-from-ecs-meta-data`` gives the same ``ecs:task-arn`` tag from the task metadata
  endpoint; the drill's stand-in of that endpoint serves what fleetdrain's agent reads and is
  not held to the Go library's types, and tags the Go agent failed to fetch are an error in
  its log, not an exit (``agent/tags.go``): a fleet whose agents the controller cannot find
  would drain wrong without a word. So the drill states the tags; the task definition in
  docs/start-or-wrap.md keeps ``BUILDKITE_AGENT_TAGS_FROM_ECS_META_DATA``;
- ``BUILDKITE_CANCEL_GRACE_PERIOD`` is an int there (a ``cli.IntFlag``: ``1.5`` does not
  parse): whole seconds, rounded up (its job's SIGKILL comes that less 1 after the cancel
  signal, inside wrap's grace); wrap's own grace, the drill's exact one, goes in
  ``FLEETDRAIN_CANCEL_GRACE_PERIOD``, which wrap reads first;
- ``BUILDKITE_AGENT_HEALTH_CHECK_ADDR`` (set by the scenario for either agent): its status
  server on a port of the task's own.

The coordinator of a fleet that runs the Go agent sends its intervals as whole seconds
(``integer_intervals``: the Go agent cannot decode ``0.3`` into an int and exits); the
scenario turns that on before any agent registers (:meth:`Run.wrapped_definition
<fleetdrain.drill.scenarios.Run.wrapped_definition>`).
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from collections.abc import Callable

from fleetdrain.drill.report.model import WrappedAgent

#: The Go agent's program name (what is looked up on ``PATH``).
GO_AGENT = "buildkite-agent"
#: ``--buildkite-agent none``: the stand-in, even when the Go agent is installed.
NONE = "none"
#: Wall seconds ``buildkite-agent --version`` may take.
VERSION_TIMEOUT = 10.0
#: :data:`fleetdrain.drill.world.task_runtime.AGENT_PROGRAM` (not imported: the CLI chooses the
#: agent before the drill's heavy imports, moto's among them).
AGENT_PROGRAM = "fleetdrain-agent"

#: Our agent in the Go agent's place behind wrap. The Go agent has no stop timeout of its own
#: (wrap's deadline drives it, with SIGQUIT) and does no task protection (wrap's job): so
#: neither does its stand-in. It tags itself from ECS and IMDS as infra/ configures it.
GO_AGENT_STAND_IN = (
    AGENT_PROGRAM,
    "start",
    "--tags-from-ecs-meta-data",
    "--tags-from-ec2-meta-data",
    "--no-task-protection",
    "--stop-timeout",
    "86400",
)

#: Every variable the drill gives the Go agent (with the runtime's), and where in its source
#: (github.com/buildkite/agent, v3) ``buildkite-agent start`` reads it:
GO_AGENT_ENV: dict[str, str] = {
    "BUILDKITE_AGENT_TOKEN": "clicommand/global.go (AgentRegisterTokenFlag, --token)",
    "BUILDKITE_AGENT_ENDPOINT": "clicommand/global.go (EndpointFlag, --endpoint, .../v3)",
    "BUILDKITE_AGENT_NAME": "clicommand/agent_start.go (--name)",
    "BUILDKITE_AGENT_TAGS": "clicommand/agent_start.go (--tags, comma separated)",
    "BUILDKITE_BUILD_PATH": "clicommand/agent_start.go (--build-path, required)",
    "BUILDKITE_AGENT_HEALTH_CHECK_ADDR": "clicommand/agent_start.go (--health-check-addr)",
    "BUILDKITE_CANCEL_GRACE_PERIOD": "clicommand/cancel_signal.go (--cancel-grace-period, int)",
}
#: The task's tags: its ARN (the controller finds agents by ``ecs:task-arn``) and instance (jobs
#: target ``aws:instance-id``), filled in per task by the runtime.
GO_AGENT_TAGS = "queue=default,ecs:task-arn={task:arn},aws:instance-id={task:instance-id}"

_VERSION = re.compile(r"\bversion\s+v?(\d[\w.+~-]*)")


class AgentChoiceError(ValueError):
    """``--buildkite-agent`` names nothing that can run (one line, for exit status 2)."""


def stand_in(why: str) -> WrappedAgent:
    """fleetdrain's agent in the Go agent's place (``why``: how it came to that)."""
    return WrappedAgent(program="fleetdrain-agent start", why=why)


#: The stand-in when nobody chose (``run_local_drill``'s default).
DEFAULT = "no buildkite-agent asked for; fleetdrain drill looks on PATH"


def choose(
    option: str | None,
    *,
    which: Callable[[str], str | None] = shutil.which,
    version: Callable[[str], tuple[str | None, str | None]] | None = None,
) -> WrappedAgent:
    """The agent ``fleetdrain drill [--buildkite-agent OPTION]`` runs behind wrap.

    ``option``: None (look on ``PATH``), ``none`` (the stand-in), or the binary: a path, or a
    name looked up on ``PATH``. Raises :class:`AgentChoiceError` when it is not an executable
    file. ``version(path)`` -> (version or None, why not): :func:`agent_version` by default."""
    version = version or agent_version
    if option is None:
        found = which(GO_AGENT)
        if found is None:
            return stand_in("none on PATH; --buildkite-agent PATH to use one")
        path, why = os.path.abspath(found), "found on PATH"
    elif option.strip().lower() == NONE:
        return stand_in(f"--buildkite-agent {NONE}")
    else:
        path, why = _executable(option, which), "--buildkite-agent"
    found_version, error = version(path)
    return WrappedAgent(
        program="buildkite-agent", path=path, version=found_version, why=why, version_error=error
    )


def _executable(option: str, which: Callable[[str], str | None]) -> str:
    """``option`` as the absolute path of an executable file (AgentChoiceError if it is not)."""
    text = option.strip()
    if not text:
        raise AgentChoiceError("--buildkite-agent: empty (a path, a name on PATH, or 'none')")
    if os.sep not in text:
        found = which(text)
        if found is None:
            raise AgentChoiceError(
                f"--buildkite-agent {text}: no such program on PATH (give its path, or 'none' "
                "for fleetdrain's stand-in)"
            )
        text = found
    path = os.path.abspath(os.path.expanduser(text))
    if not os.path.exists(path):
        raise AgentChoiceError(f"--buildkite-agent {option}: {path} does not exist")
    if not os.path.isfile(path):
        raise AgentChoiceError(f"--buildkite-agent {option}: {path} is not a file")
    if not os.access(path, os.X_OK):
        raise AgentChoiceError(f"--buildkite-agent {option}: {path} is not executable")
    return path


def agent_version(path: str, timeout: float = VERSION_TIMEOUT) -> tuple[str | None, str | None]:
    """What ``path --version`` says (``buildkite-agent version 3.135.0, build 1``: ``3.135.0``),
    or (None, why) when it fails, takes longer than ``timeout``, or says no version."""
    try:
        out = subprocess.run(
            [path, "--version"],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return None, f"--version took more than {timeout:g}s"
    except OSError as exc:
        return None, f"--version could not run: {exc.strerror or exc}"
    text = f"{out.stdout}\n{out.stderr}".strip()
    match = _VERSION.search(text)
    if out.returncode != 0:
        return None, f"--version exited {out.returncode}: {_first_line(text)}"
    if match is None:
        return None, f"--version said no version: {_first_line(text)}"
    return match.group(1).rstrip(".,"), None


def _first_line(text: str) -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), "nothing")
    return line[:120]


def wrapped_command(
    agent: WrappedAgent, cancel_grace: float
) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """The container ``command`` behind wrap's entry point, and what it adds to the container's
    ``environment`` (after wrap's own: a later value wins), for ``agent`` with the drill's cancel
    grace period (wall seconds). The stand-in: :data:`GO_AGENT_STAND_IN`, nothing added."""
    if not agent.go:
        return GO_AGENT_STAND_IN, ()
    assert agent.path is not None
    environment = (
        ("FLEETDRAIN_CANCEL_GRACE_PERIOD", f"{cancel_grace:.3f}"),
        ("BUILDKITE_CANCEL_GRACE_PERIOD", str(go_cancel_grace(cancel_grace))),
        ("BUILDKITE_AGENT_TAGS", GO_AGENT_TAGS),
    )
    return (agent.path, "start"), environment


def go_cancel_grace(seconds: float) -> int:
    """The Go agent's ``--cancel-grace-period`` for a grace of ``seconds``: whole seconds (its
    flag is an int), rounded up, at least 1 (its signal grace period, by default the cancel
    grace less 1, must not be negative)."""
    return max(1, math.ceil(seconds - 1e-9))
