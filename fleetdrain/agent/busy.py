"""Is a wrapped worker busy? Asked of a probe URL, or read from its child processes.

Both sources serve ``wrap``: busy drives ECS task scale-in protection (and through it the drain
controller's view of a task with no coordinator agent), so a source that cannot tell says
*busy*: an unprotected job can be lost, a protected idle task only waits a little longer. The
one exception is a probe that is not serving yet (:class:`ProbeBusy`): it cannot tell, but
neither can it hold protection on forever, so the worker's child processes decide until it
first answers.

The probe asks over :mod:`fleetdrain.agent.minihttp` (a few lines of HTTP/1.1 on asyncio streams):
the wrapper sits in front of another agent as PID 1 and keeps its own memory small.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlsplit

from fleetdrain.agent.logs import REDACTED, redact_text
from fleetdrain.agent.minihttp import MAX_BODY as MINIHTTP_MAX_BODY
from fleetdrain.agent.minihttp import HttpClient, HttpError

log = logging.getLogger("fleetdrain.busy")

#: The most of a probe's body we read: a status page, not a download.
MAX_BODY = MINIHTTP_MAX_BODY


class BusySource(Protocol):
    """Something that says whether the worker is busy."""

    #: For logs and /status: ``children of pid N`` or the probe URL.
    description: str

    async def poll(self) -> bool:
        """Busy now? Never raises: a source that cannot tell answers True."""
        ...

    def status(self) -> dict[str, Any]:
        """What /status shows of this source."""
        ...


# ------------------------------------------------------------------------- process tree


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (empty when it is gone)."""
    found: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return found
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as fh:
                found.extend(int(p) for p in fh.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # the thread ended between listdir and open
            # A kernel without CONFIG_PROC_CHILDREN: fall back to every process's parent.
            return _children_by_scan(pid)
        except (ProcessLookupError, ValueError):
            continue
    return found


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat_fields(int(entry))
        if stat is not None and stat[1] == str(pid):
            found.append(int(entry))
    return found


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` after the command name: [state, ppid, pgrp, ...], or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: split after its last ')'.
    return text.rpartition(")")[2].split()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first), as far as /proc shows them now."""
    out: list[int] = []
    queue = [pid]
    seen = {pid}
    while queue:
        for child in children(queue.pop(0)):
            if child not in seen:
                seen.add(child)
                out.append(child)
                queue.append(child)
    return out


def is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited and waits to be reaped (gone counts as a zombie too)."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


class ChildrenBusy:
    """Busy while the worker has a child process that is alive (not a zombie).

    The Go agent runs each job as a child (its bootstrap), and so does the GitHub Actions
    runner; an idle worker of that kind has none. A worker that keeps helpers running all the
    time needs a probe instead.
    """

    def __init__(self, pid: Callable[[], int | None]):
        """``pid`` returns the worker's pid, or None when it is not running."""
        self._pid = pid
        self.description = "the worker's child processes"
        self.processes = 0

    def busy_now(self) -> bool:
        """Read /proc now."""
        pid = self._pid()
        if pid is None:
            self.processes = 0
            return False
        alive = [p for p in descendants(pid) if not is_zombie(p)]
        self.processes = len(alive)
        return bool(alive)

    async def poll(self) -> bool:
        """Busy now? (Reading /proc does not block.)"""
        return self.busy_now()

    def status(self) -> dict[str, Any]:
        """How many processes the worker runs below itself."""
        return {"source": "children", "processes": self.processes}


# --------------------------------------------------------------------------------- probe


class ProbeError(Exception):
    """The probe could not be asked, or gave no usable answer.

    ``connected`` is False when nothing accepted the connection (the worker is not serving the
    probe at all), True when something did and then failed to answer usably."""

    def __init__(self, message: str, *, connected: bool = True) -> None:
        super().__init__(message)
        self.connected = connected


def check_probe_url(url: str) -> str:
    """The URL if a probe can use it; ValueError with the reason otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"busy probe must be an http(s) URL with a host, got {url!r}")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise ValueError(f"busy probe {url!r}: {exc}") from None
    return url


def display_url(url: str) -> str:
    """``url`` fit for logs and /status: a password in it, and secret query values
    (``?token=...``), replaced by ``[REDACTED]``."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rpartition("@")[2]
        url = parts._replace(netloc=f"{parts.username or ''}:{REDACTED}@{host}").geturl()
    return redact_text(url)


async def http_get(url: str, *, timeout: float, max_body: int = MAX_BODY) -> tuple[int, bytes]:
    """GET ``url`` (HTTP/1.1, one request per connection): (status, body).

    Raises :class:`ProbeError` for anything that is not an HTTP answer within ``timeout``.
    """
    try:
        response = await HttpClient(max_body=max_body).get(url, timeout=timeout)
    except HttpError as exc:
        raise ProbeError(str(exc), connected=exc.connected) from exc
    return response.status_code, response.content


#: Seconds a probe may go unserved before a warning says so: the Go agent serves its
#: --health-check-addr only once it has registered, and it retries registration 30 times,
#: 10 s apart (core/client.go), so 5 minutes and a half is more than any healthy start-up.
NOT_SERVING_WARNING_AFTER = 330.0


class ProbeBusy:
    """Busy as a probe URL says.

    - a JSON object with ``aggregate_status`` (the Go agent's ``/status.json`` since v3.72):
      ``busy`` is busy, ``idle`` is idle, anything else counts as busy (logged once);
    - otherwise the status code: 200 is busy, any other answer below 500 is idle;
    - **not serving yet**: until the probe has answered once, a connection that nothing
      accepts (refused, unreachable) says nothing about work. The Go agent opens its
      --health-check-addr only after it has registered (up to 30 tries, 10 s apart), before
      it can take a job; a probe that never comes up (a wrong URL, a server that failed to
      bind) would otherwise hold task protection on forever. So busy then comes from
      ``before_serving`` (wrap passes the worker's child processes: the Go agent runs each
      job as a child, so a job that runs while its probe is down still counts), or is idle
      without one. After :data:`NOT_SERVING_WARNING_AFTER` seconds of that, a warning;
    - **down**: once the probe has answered, or when something accepted the connection and
      then failed (no answer in time, a 5xx, garbage), the probe counts as busy (logged):
      a job may be running behind a server that stopped answering.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float = 2.0,
        before_serving: BusySource | None = None,
        not_serving_warning_after: float = NOT_SERVING_WARNING_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.url = check_probe_url(url)
        self.shown_url = display_url(url)
        self.description = self.shown_url
        self.timeout = timeout
        self.before_serving = before_serving
        self.not_serving_warning_after = not_serving_warning_after
        self._clock = clock
        self.last: str | None = None
        self.error: str | None = None
        self.answered = False
        self._noted: set[str] = set()
        self._not_serving_since: float | None = None
        self._warned_not_serving = False

    async def poll(self) -> bool:
        """Ask the probe once."""
        try:
            status, body = await http_get(self.url, timeout=self.timeout)
            if status >= 500:
                raise ProbeError(f"HTTP {status}")
        except ProbeError as exc:
            if not self.answered and not exc.connected:
                return await self._not_serving(str(exc))
            self._down(str(exc))
            return True
        if not self.answered:
            if self.error is not None:
                log.info("busy probe %s answers: it decides busy from now on", self.shown_url)
            self.description = self.shown_url
        elif self.error is not None:
            log.info("busy probe %s answers again", self.shown_url)
        self.error = None
        self.answered = True
        aggregate = _aggregate_status(body)
        if aggregate is not None:
            busy = aggregate != "idle"
            if aggregate not in ("busy", "idle"):
                self._note(f"aggregate_status {aggregate!r} is neither busy nor idle: busy")
            self.last = aggregate
        else:
            busy = status == 200
            self.last = f"HTTP {status}"
        return busy

    async def _not_serving(self, why: str) -> bool:
        now = self._clock()
        if self._not_serving_since is None:
            self._not_serving_since = now
        fallback = self.before_serving
        source = fallback.description if fallback is not None else "nothing: idle"
        if why != self.error:
            log.info(
                "busy probe %s is not serving yet (%s): busy from %s until it answers",
                self.shown_url,
                why,
                source,
            )
        elif (
            not self._warned_not_serving
            and now - self._not_serving_since >= self.not_serving_warning_after
        ):
            self._warned_not_serving = True
            log.warning(
                "busy probe %s has not answered for %.0fs (%s): is the worker serving it "
                "(the Go agent: --health-check-addr, $BUILDKITE_AGENT_HEALTH_CHECK_ADDR)? "
                "busy from %s meanwhile",
                self.shown_url,
                now - self._not_serving_since,
                why,
                source,
            )
        self.error = why
        self.last = "not serving"
        self.description = f"{self.shown_url} not serving yet: {source}"
        return await fallback.poll() if fallback is not None else False

    def _down(self, why: str) -> None:
        if why != self.error:
            log.warning("busy probe %s is down (%s): counted as busy", self.shown_url, why)
        self.error = why
        self.last = "down"
        self.description = self.shown_url

    def _note(self, message: str) -> None:
        if message not in self._noted:
            self._noted.add(message)
            log.warning("busy probe %s: %s", self.shown_url, message)

    def status(self) -> dict[str, Any]:
        """The probe's last answer, and whether it has served yet."""
        out: dict[str, Any] = {
            "source": "probe",
            "url": self.shown_url,
            "last": self.last,
            "error": self.error,
            "serving": self.answered,
        }
        if not self.answered and self.before_serving is not None:
            out["before_serving"] = self.before_serving.status()
        return out


def _aggregate_status(body: bytes) -> str | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    if isinstance(parsed, dict) and isinstance(parsed.get("aggregate_status"), str):
        return str(parsed["aggregate_status"]).strip().lower()
    return None
