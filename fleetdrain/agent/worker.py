"""What the PID-1 layer asks of a worker, whatever runs inside it."""

from __future__ import annotations

from typing import Any, Protocol


class Worker(Protocol):
    """A worker driven by :class:`fleetdrain.agent.pid1.Supervisor`.

    The supervisor knows nothing of Buildkite: it asks only whether the worker is busy and tells
    it to stop gracefully (with the deadline it has) or by force.
    """

    async def run(self) -> int:
        """Run until done; the process exit status."""
        ...

    def busy(self) -> bool:
        """Whether work is in progress that a stop would interrupt."""
        ...

    def stop_gracefully(self, deadline: float | None) -> None:
        """Take no new work, finish what runs, exit. ``deadline`` is a monotonic time or None."""
        ...

    def stop_forcefully(self, reason: str) -> None:
        """Cancel running work now (and report it, with ``reason``), then exit."""
        ...

    def kill(self) -> None:
        """Last resort, synchronous: SIGKILL everything the worker runs."""
        ...

    def status(self) -> dict[str, Any]:
        """What /status shows of the worker."""
        ...
