"""Serve an ASGI app over real HTTP on loopback, with uvicorn in a daemon thread.

One runner for every local server of the drill and the tests: the embedded coordinator, the ECS
agent and IMDS stand-ins.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType
from typing import Literal

import uvicorn
from starlette.types import ASGIApp


class ServeInThread:
    """``app`` served on ``host:port`` (port 0: a free one) by uvicorn in a daemon thread.

    Use as a context manager or call :meth:`start` / :meth:`stop`. :meth:`start` returns only
    once the server accepts connections; :attr:`url` is known from then on.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        startup_timeout: float = 10.0,
        lifespan: Literal["on", "off"] = "off",
        name: str = "uvicorn",
    ) -> None:
        self.app = app
        self.host = host
        self._requested_port = port
        self._startup_timeout = startup_timeout
        self._lifespan: Literal["on", "off"] = lifespan
        self._name = name
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._error: BaseException | None = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        """The bound port (RuntimeError before start)."""
        if self._port is None:
            raise RuntimeError(f"{self._name} is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServeInThread:
        """Bind, start serving in a daemon thread, and wait until connections are accepted."""
        if self._thread is not None:
            raise RuntimeError(f"{self._name} already started")
        # Binding here, not in uvicorn, gives us the real port before the thread even runs.
        # IPPROTO_TCP explicitly: asyncio only sets TCP_NODELAY on sockets whose proto says TCP,
        # and without it every response costs a ~40 ms delayed-ACK stall.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self._requested_port))
        self._socket = sock
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_config=None,  # leave the process's logging configuration alone
            log_level="warning",
            access_log=False,
            lifespan=self._lifespan,
            http="h11",
            ws="none",
            loop="asyncio",
            timeout_graceful_shutdown=1,
        )
        server = uvicorn.Server(config)
        self._server = server
        self._thread = threading.Thread(
            target=self._run, args=(server, sock), name=f"{self._name}-{self._port}", daemon=True
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

    def __enter__(self) -> ServeInThread:
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
                raise RuntimeError(f"{self._name} failed to start: {self._error!r}")
            time.sleep(0.005)
        self.stop()
        raise RuntimeError(f"{self._name} did not start in {self._startup_timeout}s")
