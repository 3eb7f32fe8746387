"""Just enough HTTP/1.1 for the local endpoints the PID-1 layer talks to, on asyncio streams.

The ECS agent's task-protection and metadata endpoints, IMDS and a wrapped worker's busy probe
are all one small request to a nearby server. ``wrap`` sits in front of another agent as PID 1
and keeps its own memory small: httpx and its dependencies would cost it more than everything
else it loads (~10 MB). So these calls use this module, one request per connection
(``Connection: close``), no pooling, no redirects, no proxies (the servers are link-local or
loopback, which proxies must not see anyway). The Buildkite API client (``start``) keeps httpx.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

#: The most of a body we read: these endpoints answer a few KB at most.
MAX_BODY = 1 << 20
_MAX_HEADER_LINES = 200
USER_AGENT = "fleetdrain-agent"


class HttpError(Exception):
    """No usable HTTP answer: unreachable, timed out, cut off, or not HTTP at all.

    The message is one line and starts with the kind of failure (``ConnectionRefusedError``,
    ``TimeoutError``...), as log lines and /status show it. :attr:`connected` tells a server
    that is not there (nothing accepted the connection: refused, unreachable, a connect that
    timed out) from one that accepted it and then gave no usable answer.
    """

    def __init__(self, message: str, *, connected: bool = True) -> None:
        super().__init__(message)
        self.connected = connected


@dataclass(frozen=True)
class Response:
    """An HTTP answer: its status, headers (lower-case names) and body (at most max_body)."""

    status_code: int
    content: bytes
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The body as text (UTF-8, undecodable bytes replaced)."""
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        """The body parsed as JSON (``ValueError`` if it is not)."""
        return jsonlib.loads(self.content)


class HttpClient:
    """Sends one request per connection; ``timeout`` bounds each whole request."""

    def __init__(self, *, timeout: float = 10.0, max_body: int = MAX_BODY) -> None:
        """``timeout`` (seconds) is the default for every request."""
        self.timeout = timeout
        self.max_body = max_body
        self._tls: ssl.SSLContext | None = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        json: Any = None,
        content: bytes | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send ``method url`` (a ``json`` body is serialised); raise :class:`HttpError` when
        no HTTP answer arrives within the timeout. Any status is an answer, not an error."""
        body = content
        extra = dict(headers or {})
        if json is not None:
            body = jsonlib.dumps(json).encode()
            extra.setdefault("Content-Type", "application/json")
        limit = self.timeout if timeout is None else timeout
        progress = _Progress()
        try:
            async with asyncio.timeout(limit):
                return await self._exchange(method, url, extra, body, progress)
        except TimeoutError:
            raise HttpError(
                f"TimeoutError: no answer within {limit:g}s", connected=progress.connected
            ) from None
        except (OSError, asyncio.IncompleteReadError, ValueError, UnicodeError) as exc:
            detail = _one_line(exc) or "connection closed"
            raise HttpError(
                f"{type(exc).__name__}: {detail}", connected=progress.connected
            ) from exc

    async def get(self, url: str, **kwargs: Any) -> Response:
        """``request("GET", url, ...)``."""
        return await self.request("GET", url, **kwargs)

    async def put(self, url: str, **kwargs: Any) -> Response:
        """``request("PUT", url, ...)``."""
        return await self.request("PUT", url, **kwargs)

    async def _exchange(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes | None,
        progress: _Progress,
    ) -> Response:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        secure = parts.scheme == "https"
        port = parts.port or (443 if secure else 80)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        lines = [
            f"{method} {target} HTTP/1.1",
            f"Host: {parts.netloc.rpartition('@')[2]}",
            f"User-Agent: {USER_AGENT}",
            "Accept: application/json, */*",
            "Connection: close",
        ]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body or b'')}")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        reader, writer = await asyncio.open_connection(
            parts.hostname, port, ssl=self._tls_context() if secure else None
        )
        progress.connected = True
        try:
            writer.write(head + (body or b""))
            await writer.drain()
            status = _status_code(await reader.readline())
            response_headers = await _headers(reader)
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                content = b""
            elif "chunked" in response_headers.get("transfer-encoding", "").lower():
                content = await _read_chunked(reader, self.max_body)
            elif "content-length" in response_headers:
                length = int(response_headers["content-length"])
                content = await reader.readexactly(min(length, self.max_body))
            else:
                content = await reader.read(self.max_body)
            return Response(status, content, response_headers)
        finally:
            # Not awaiting wait_closed(): a request cancelled at exit (a deadline, a shutdown)
            # must not wait on a peer; the loop finishes closing the socket by itself.
            writer.close()

    def _tls_context(self) -> ssl.SSLContext:
        # Made on first use: a plain-http client (the usual case here) never loads a CA store.
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls


@dataclass
class _Progress:
    """How far one request got (for :attr:`HttpError.connected`)."""

    connected: bool = False


def _status_code(line: bytes) -> int:
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {line[:60]!r}")
    return int(parts[1])


async def _headers(reader: asyncio.StreamReader) -> dict[str, str]:
    found: dict[str, str] = {}
    for _ in range(_MAX_HEADER_LINES):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return found
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise ValueError(f"malformed header line: {line[:60]!r}")
        found[name.strip().lower()] = value.strip()
    raise ValueError("too many header lines")


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> bytes:
    body = bytearray()
    while len(body) < max_body:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk
    return bytes(body[:max_body])


def _one_line(text: object) -> str:
    return " ".join(str(text).split())
