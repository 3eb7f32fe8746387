"""Run the embedded coordinator over real HTTP (uvicorn) in a background thread."""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn

from drill.coordinator.app import build_app
from drill.coordinator.state import Coordinator


class CoordinatorServer:
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
        self.coord = coord
        self.host = host
        self._requested_port = port
        self._startup_timeout = startup_timeout
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (RuntimeError before start)."""
        if self._port is None:
            raise RuntimeError("CoordinatorServer is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        return f"http://{self.host}:{self.port}"

    @property
    def agent_endpoint(self) -> str:
        """The agent API base URL (``url + "/v3"``), what an agent's ``--endpoint`` takes."""
        return self.url + "/v3"

    @property
    def rest_endpoint(self) -> str:
        """The REST base URL for this organization (``url + "/v2/organizations/{org}"``)."""
        return f"{self.url}/v2/organizations/{self.coord.org}"

    def start(self) -> CoordinatorServer:
        """Bind, start serving in a daemon thread, and wait until connections are accepted."""
        if self._thread is not None:
            raise RuntimeError("CoordinatorServer already started")
        # Binding here, not in uvicorn, gives us the real port before the thread even runs.
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto says TCP,
        # and without it every response costs a ~40 ms delayed-ACK stall.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        self._socket = sock
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            build_app(self.coord),
            log_config=None,  # leave the process's logging configuration alone
            log_level="warning",
            access_log=False,
            lifespan="on",
            http="h11",
            loop="asyncio",
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=self._run, args=(server, sock), name="coordinator-server", daemon=True
        )
        self._thread.start()
        self._wait_ready()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Shut the server down and wait for its thread (forcing it after ``timeout``)."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(timeout)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> CoordinatorServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, server: uvicorn.Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # uvicorn reports startup failure with SystemExit
            self._error = exc

    def _wait_ready(self) -> None:
        assert self._server is not None and self._thread is not None
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._server.started:
                try:
                    with socket.create_connection((self.host, self.port), timeout=1.0):
                        return
                except OSError:
                    pass
            if not self._thread.is_alive():
                self.stop()
                raise RuntimeError(f"coordinator server failed to start: {self._error!r}")
            time.sleep(0.005)
        self.stop()
        raise RuntimeError("coordinator server did not start in time")
