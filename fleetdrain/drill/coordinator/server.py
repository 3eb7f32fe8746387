"""Run the embedded coordinator over real HTTP (uvicorn) in a background thread."""

from __future__ import annotations

from fleetdrain.drill.coordinator.app import build_app
from fleetdrain.drill.coordinator.state import Coordinator
from fleetdrain.drill.serve import ServeInThread


class CoordinatorServer(ServeInThread):
    """``coord`` served on ``host:port`` (port 0: a free one) by uvicorn in a daemon thread.

    Use as a context manager or call :meth:`start` / :meth:`stop`. ``url`` is known once
    started; :meth:`start` returns only when the server accepts connections.
    """

    def __init__(
        self,
        coord: Coordinator,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
    ) -> None:
        # lifespan on: the app's background lost-agent check starts and stops with it.
        super().__init__(
            build_app(coord),
            host=host,
            port=port,
            startup_timeout=startup_timeout,
            lifespan="on",
            name="coordinator",
        )
        self.coord = coord

    @property
    def agent_endpoint(self) -> str:
        """The agent API base URL (``url + "/v3"``), what an agent's ``--endpoint`` takes."""
        return self.url + "/v3"

    @property
    def rest_endpoint(self) -> str:
        """The REST base URL for this organization (``url + "/v2/organizations/{org}"``)."""
        return f"{self.url}/v2/organizations/{self.coord.org}"

    def start(self) -> CoordinatorServer:
        """Bind, start serving, and wait until connections are accepted."""
        super().start()
        return self

    def __enter__(self) -> CoordinatorServer:
        return self.start()
