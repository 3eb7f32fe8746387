"""A worker that is not a Buildkite agent, for ``wrap``: a shell queue consumer, and its queue.

What ``wrap`` must serve besides the Go agent (issue 6): a worker that never talks to the
coordinator, that the drain controller cannot see except through ECS task scale-in
protection, and whose busy state ``wrap`` can only read from its child processes.

The queue is a directory (:class:`WorkQueue`): a unit of work is a file holding its length in
seconds; a worker claims one by renaming it into ``claimed/`` (rename is atomic: two workers
never get the same unit), writes its name into the claim, does the work in a child process,
and that child writes ``done/<unit>`` only once the work has completed. A unit that was
claimed and has no ``done`` file when the scenario ends was killed half-way: lost.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

#: The worker (bash: ``read -t`` waits without a child process, so an idle worker has none).
#: SIGTERM: finish the unit in hand, take no more, exit 0. SIGQUIT (wrap's force signal):
#: abandon the unit (its child is killed), exit 3. Logs go to stdout, as a container's do.
WORKER_SCRIPT = r"""#!/bin/bash
set -u
name=${DRILL_TASK_NAME:-worker}
stopping=0
child=
trap 'stopping=1; echo "$name: SIGTERM: finishing the unit in hand, taking no more"' TERM
trap 'echo "$name: SIGQUIT: abandoning the unit in hand"
      if [ -n "$child" ]; then kill -KILL "$child" 2>/dev/null; fi
      exit 3' QUIT
# Idle waits read from a FIFO nobody writes to: a timeout with no child process, because
# `sleep` would be one (so would mktemp or mkfifo), and a child is what makes it busy.
exec 3<>"$IDLE_FIFO"
echo "$name: consuming $QUEUE_DIR"
while [ "$stopping" = 0 ]; do
    unit=
    for f in "$QUEUE_DIR"/*; do
        [ -e "$f" ] || break
        u=${f##*/}
        if mv "$f" "$CLAIMED_DIR/$u" 2>/dev/null; then unit=$u; break; fi
    done
    if [ -z "$unit" ]; then
        read -r -t "$IDLE_POLL" -u 3 _ || true
        continue
    fi
    read -r seconds < "$CLAIMED_DIR/$unit"
    echo "$name" >> "$CLAIMED_DIR/$unit"
    echo "$name: unit $unit: ${seconds}s of work"
    ( sleep "$seconds" && echo "$name" > "$DONE_DIR/$unit" ) &
    child=$!
    # `wait` returns early when a trapped signal arrives: wait until the child is really gone.
    wait "$child"
    while kill -0 "$child" 2>/dev/null; do wait "$child"; done
    child=
    echo "$name: unit $unit done"
done
echo "$name: drained: exiting"
exit 0
"""


@dataclass(frozen=True)
class Unit:
    """One unit of work and what became of it."""

    name: str
    claimed_by: str | None
    done_by: str | None

    @property
    def lost(self) -> bool:
        """Claimed and not completed: the worker doing it was killed under it."""
        return self.claimed_by is not None and self.done_by is None


class WorkQueue:
    """The queue directory: submit units, see who claimed and completed them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.queue = root / "queue"
        self.claimed = root / "claimed"
        self.done = root / "done"
        for d in (self.queue, self.claimed, self.done):
            d.mkdir(parents=True, exist_ok=True)
        self.idle_fifo = root / "idle.fifo"
        if not self.idle_fifo.exists():
            os.mkfifo(self.idle_fifo)
        self.script = root / "queue-worker.sh"
        self.script.write_text(WORKER_SCRIPT)
        self.script.chmod(0o755)
        self.submitted: list[str] = []

    def environment(self, idle_poll: float) -> tuple[tuple[str, str], ...]:
        """What a worker's container needs to find the queue (``idle_poll``: wall seconds)."""
        return (
            ("QUEUE_DIR", str(self.queue)),
            ("CLAIMED_DIR", str(self.claimed)),
            ("DONE_DIR", str(self.done)),
            ("IDLE_POLL", f"{idle_poll:.3f}"),
            ("IDLE_FIFO", str(self.idle_fifo)),
        )

    def submit(self, name: str, wall_seconds: float) -> None:
        """Put a unit of ``wall_seconds`` of work on the queue (written whole, then renamed in:
        a worker never sees half a file)."""
        tmp = self.root / f".{name}"
        tmp.write_text(f"{wall_seconds:.3f}\n")
        tmp.rename(self.queue / name)
        self.submitted.append(name)

    def unit(self, name: str) -> Unit:
        """What became of the unit so far."""
        return Unit(name, _line(self.claimed / name, 1), _line(self.done / name, 0))

    def units(self) -> list[Unit]:
        """Every submitted unit, in order."""
        return [self.unit(n) for n in self.submitted]


def _line(path: Path, index: int) -> str | None:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return None
    return lines[index].strip() if len(lines) > index and lines[index].strip() else None


class UnitWatch:
    """Puts the units on the timeline as workers claim and complete them (polls the queue)."""

    def __init__(self, queue: WorkQueue, record: Callable[..., None]) -> None:
        """``record(kind, subject, what, detail, at)``: the fleet timeline's ``record``."""
        self.queue = queue
        self.record = record
        self._seen: dict[str, Unit] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="unit-watch", daemon=True)

    def __enter__(self) -> UnitWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.poll()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.poll()

    def poll(self) -> None:
        """Record what changed since the last look."""
        for unit in self.queue.units():
            before = self._seen.get(unit.name, Unit(unit.name, None, None))
            if unit.claimed_by and not before.claimed_by:
                at = _written_at(self.queue.claimed / unit.name)
                self.record("job", unit.name, f"running on {unit.claimed_by}", {}, at)
            if unit.done_by and not before.done_by:
                at = _written_at(self.queue.done / unit.name)
                self.record("job", unit.name, f"completed on {unit.done_by}", {}, at)
            self._seen[unit.name] = unit


def _written_at(path: Path) -> float | None:
    """When the worker wrote the file, as a ``time.monotonic()`` stamp (the timeline's clock),
    not when this watch happened to look."""
    try:
        mtime = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return time.monotonic() - max(0.0, time.time() - mtime)
