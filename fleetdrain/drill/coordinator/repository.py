"""The repository a drill's jobs build: a local bare git repository with one commit.

A Buildkite job carries ``BUILDKITE_REPO``, ``BUILDKITE_COMMIT`` and ``BUILDKITE_BRANCH``, and
the Go agent's bootstrap checks that commit out before it runs the command (``git clone``, ``git
fetch origin <commit>``, ``git checkout -f <commit>``); without them every job fails with
``Missing repository``. The embedded coordinator therefore hands out a real repository: a bare
one in a temporary directory, reachable as a ``file://`` URL, with one commit on ``main``.

It is made on the first job that needs it, once per machine and user, and shared by every
process after that: the commit is made with fixed names and dates, so the repository is the
same every time (and its SHA the same on every machine). fleetdrain's own agent never checks
anything out; the repository is there for the Go agent (and anything else that runs the real
bootstrap).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: The branch the one commit is on (and the pipeline's default branch).
BRANCH = "main"
#: ``BUILDKITE_PIPELINE_PROVIDER`` for a plain git repository (Buildkite's id for it).
PROVIDER = "git"

_README = b"""\
# fleetdrain drill

The repository every job of fleetdrain's embedded coordinator builds: one commit, so that a
Buildkite bootstrap has something to check out. The commands of the jobs are the drill's own.
"""
_IDENTITY = {
    "GIT_AUTHOR_NAME": "fleetdrain drill",
    "GIT_AUTHOR_EMAIL": "drill@fleetdrain.invalid",
    "GIT_AUTHOR_DATE": "2026-01-01T00:00:00+00:00",
    "GIT_COMMITTER_NAME": "fleetdrain drill",
    "GIT_COMMITTER_EMAIL": "drill@fleetdrain.invalid",
    "GIT_COMMITTER_DATE": "2026-01-01T00:00:00+00:00",
}
#: Variables that would point git at another repository than the one it is told to use.
_GIT_LOCATION_ENV = ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE", "GIT_OBJECT_DIRECTORY")


@dataclass(frozen=True)
class Repository:
    """Where a job's source is: what goes into ``BUILDKITE_REPO`` / ``_COMMIT`` / ``_BRANCH``
    / ``_PIPELINE_PROVIDER``."""

    url: str
    commit: str
    branch: str = BRANCH
    provider: str = PROVIDER


def _git_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _GIT_LOCATION_ENV}
    # Nobody's git configuration (signing, hooks, templates, default branch) takes part.
    env.update({"GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull, **_IDENTITY})
    return env


def _git(*args: str, cwd: Path, data: bytes | None = None) -> str:
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env=_git_env(),
        input=data,
        capture_output=True,
        check=True,
        timeout=30,
    )
    return result.stdout.decode().strip()


def create_repository(path: Path, branch: str = BRANCH) -> Repository:
    """A bare repository at ``path`` (created) with one commit on ``branch``."""
    path.mkdir(parents=True, exist_ok=True)
    _git("init", "--quiet", "--bare", ".", cwd=path)
    _git("symbolic-ref", "HEAD", f"refs/heads/{branch}", cwd=path)
    blob = _git("hash-object", "-w", "--stdin", cwd=path, data=_README)
    tree = _git("mktree", cwd=path, data=f"100644 blob {blob}\tREADME.md\n".encode())
    commit = _git(
        "-c", "commit.gpgSign=false", "commit-tree", tree, "-m", "drill: one commit", cwd=path
    )
    _git("update-ref", f"refs/heads/{branch}", commit, cwd=path)
    return Repository(url=path.resolve().as_uri(), commit=commit, branch=branch)


_lock = threading.Lock()
_shared: Repository | None = None
_unavailable = False


def _shared_path() -> Path:
    return Path(tempfile.gettempdir()) / f"fleetdrain-drill-repo-{os.getuid()}" / "drill.git"


def _reuse(path: Path) -> Repository | None:
    """The repository at ``path`` if it is one this user made (and nobody else can change)."""
    try:
        info = path.parent.stat()
        if info.st_uid != os.getuid() or info.st_mode & 0o022:
            log.warning("not using %s: not this user's own directory", path.parent)
            return None
        commit = _git("rev-parse", "--verify", f"refs/heads/{BRANCH}^{{commit}}", cwd=path)
    except (OSError, subprocess.SubprocessError):
        return None
    return Repository(url=path.resolve().as_uri(), commit=commit)


def drill_repository() -> Repository | None:
    """The repository every job names, made on first use; None (logged once) where git cannot.

    Its content never changes (fixed names and dates: the same commit everywhere), so it is
    made once per machine and user, in the temp directory, and every process (the drill's
    scenario processes, which end with ``os._exit``, each test session) reuses it rather than
    leaving a copy behind: it is never removed (one directory of a few KiB).
    """
    global _shared, _unavailable
    with _lock:
        if _shared is not None or _unavailable:
            return _shared
        path = _shared_path()
        _shared = _reuse(path)
        if _shared is not None:
            return _shared
        try:
            # Made aside, then renamed into place: a process racing us either wins (and we
            # use its copy) or loses, never sees half a repository.
            scratch = Path(tempfile.mkdtemp(prefix=f"{path.parent.name}-", dir=path.parent.parent))
            try:
                create_repository(scratch / path.name)
                scratch.chmod(0o755)  # any user's agent may clone it; only we may change it
                with contextlib.suppress(OSError):
                    os.rename(scratch, path.parent)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
            _shared = _reuse(path)
            if _shared is None:
                raise OSError(f"{path} is not usable")
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            log.warning(
                "no git repository for the jobs (%s %s): a Buildkite bootstrap will refuse "
                "them (Missing repository); fleetdrain's agent does not need one",
                exc,
                detail.decode(errors="replace").strip(),
            )
            _unavailable = True
        return _shared
