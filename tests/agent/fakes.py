"""In-process stand-ins for the PID-1 layer's side effects, shared by the agent's tests."""

from __future__ import annotations

import asyncio

from fleetdrain.agent.reaper import Reaper


class NoReaper(Reaper):
    """Reaps nothing: waitpid(-1) in the test process would take other tests' children."""

    def install(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        pass

    def uninstall(self) -> None:
        pass

    def reap(self) -> None:
        pass

    def has_children(self) -> bool:
        return False
