"""Streaming a job's output to the coordinator as gzip-compressed log chunks.

Output goes: job stdout pipe -> :func:`pump` -> :meth:`LogStreamer.write` (redact, append) ->
chunks of at most ``max_chunk_size`` bytes, cut when full or every ``interval`` seconds -> a
queue -> ``workers`` upload tasks that gzip and upload them.

Memory is bounded by back-pressure, never by dropping: every byte appended but not yet uploaded
(or finally failed) counts against ``max_buffered_bytes``, and :meth:`LogStreamer.write` waits
while that budget is spent. :func:`pump` then stops reading the pipe, the pipe fills, and the job
blocks in ``write(2)`` until uploads catch up.

A chunk whose upload finally fails (the upload callable raised; it does its own retries) is
counted in :attr:`LogStreamer.chunks_failed_count`, which the job's finish reports; the chunks
around it still go out with their own sequence numbers and offsets.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import zlib
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType

from fleetdrain.agent.buildkite.redact import Redactor

__all__ = ["DEFAULT_COMPRESSION_LEVEL", "Chunk", "LogStreamer", "pump"]

logger = logging.getLogger("fleetdrain.log")

# Level 1 measured on word-like log text: ~100 MB/s and ratio 0.45; level 6: ~58 MB/s and 0.41.
# Twice the speed for 10% more bytes on the wire is the right trade for an agent whose job
# output can outrun the compressor.
DEFAULT_COMPRESSION_LEVEL = 1

# ~1 ms of CPU at level 1 on text (0.15 ms for very compressible output): a stall the event loop
# (heartbeats, job state polls) never notices, and less than a thread hand-off would cost.
_INLINE_COMPRESS_MAX = 128 * 1024
# Bigger chunks (a server may allow MBs) are compressed in slices of this size, yielding to the
# event loop between slices so that no single step blocks it for more than about a millisecond.
_COMPRESS_SLICE = 128 * 1024

# write() redacts and appends large inputs in pieces of this size, so that back-pressure applies
# within one big write and the redactor never works on more than this at once.
_WRITE_SLICE = 256 * 1024

# How long close() waits for upload tasks to honour cancellation after its timeout.
_CANCEL_GRACE = 1.0


@dataclass(frozen=True, slots=True)
class Chunk:
    """One log chunk as uploaded: ``POST /v3/jobs/:id/chunks?sequence=&offset=&size=``."""

    sequence: int
    """1 for the first chunk of the job, contiguous after that."""
    offset: int
    """Uncompressed byte offset of this chunk's first byte in the job's (redacted) log."""
    size: int
    """Uncompressed length."""
    data: bytes = field(repr=False)
    """The gzip-compressed bytes (the request body). Kept out of repr so logs never show it."""


Upload = Callable[[Chunk], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


class LogStreamer:
    """Chunks, compresses and uploads one job's output with bounded memory.

    Use as ``async with LogStreamer(...) as s: await pump(reader, s)`` (then read
    ``s.chunks_failed_count``), or call :meth:`start` and :meth:`close` yourself; close returns
    the failed count and accepts a timeout for deadline-bound drains.

    ``upload`` sends one chunk and returns when it is accepted; it raises when the chunk has
    finally failed (it does its own retries and back-off). ``max_chunk_size`` is the job's
    ``chunks_max_size_bytes`` (uncompressed bytes per chunk); chunks are cut at that size or
    every ``interval`` seconds (``chunks_interval_seconds``), whichever comes first.
    ``max_buffered_bytes`` bounds the log bytes held at once (buffered, queued or uploading;
    counted uncompressed, which over-counts the compressed in-flight data). So that a full chunk
    always fits, chunks are never bigger than that bound (a smaller chunk than the server's
    maximum is allowed). ``workers`` uploads run concurrently, so chunks may arrive out of order,
    as from the Go agent. ``sleep`` is the clock the interval flush waits on (injectable for
    tests).

    Not for concurrent writers: writes are serialized in call order.
    """

    def __init__(
        self,
        upload: Upload,
        max_chunk_size: int,
        interval: float = 1.0,
        max_buffered_bytes: int = 8 * 1024 * 1024,
        workers: int = 3,
        redactor: Redactor | None = None,
        *,
        compression_level: int = DEFAULT_COMPRESSION_LEVEL,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        """Configure the streamer; nothing runs until :meth:`start` (or the first write)."""
        if max_chunk_size <= 0:
            raise ValueError(f"max_chunk_size must be positive, got {max_chunk_size}")
        if max_buffered_bytes <= 0:
            raise ValueError(f"max_buffered_bytes must be positive, got {max_buffered_bytes}")
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self._upload = upload
        self._chunk_size = min(max_chunk_size, max_buffered_bytes)
        self._interval = interval
        self._max_buffered = max_buffered_bytes
        self._worker_count = workers
        self._redactor = redactor
        self._level = compression_level
        self._sleep = sleep

        # The not-yet-cut log as the pieces written (views, so splitting one copies nothing);
        # each chunk is one join of them: every byte is copied once on its way to gzip.
        self._pieces: deque[bytes | memoryview] = deque()
        self._unsent = 0  # bytes in _pieces
        # Redacted bytes a write could not append yet (it was cancelled while waiting for room);
        # the next write or close appends them, so cancellation loses nothing already redacted.
        self._carry = b""
        self._buffered = 0  # uncompressed bytes in _pieces, queued or being uploaded
        self._room = asyncio.Event()
        self._close_done = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._queue: asyncio.Queue[tuple[int, int, bytes] | None] = asyncio.Queue()

        self._next_sequence = 1
        self._offset = 0
        self._uploaded = 0
        self._failed = 0
        self._final_failed: int | None = None

        self._started = False
        self._closing = False
        self._flusher: asyncio.Task[None] | None = None
        self._workers: list[asyncio.Task[None]] = []

    # -- public state ------------------------------------------------------------------------

    @property
    def bytes_written(self) -> int:
        """Log bytes (after redaction) appended so far; after close, the whole log's size."""
        return self._offset + self._unsent

    @property
    def chunks_created(self) -> int:
        """Chunks cut so far (sequences 1..chunks_created)."""
        return self._next_sequence - 1

    @property
    def chunks_uploaded(self) -> int:
        """Chunks the upload callable accepted."""
        return self._uploaded

    @property
    def chunks_failed_count(self) -> int:
        """Chunks that finally failed (after close with a timeout: also those it gave up on)."""
        return self._failed if self._final_failed is None else self._final_failed

    @property
    def buffered_bytes(self) -> int:
        """Uncompressed log bytes held now: buffered, queued or being uploaded."""
        return self._buffered

    @property
    def max_buffered_bytes(self) -> int:
        """The bound on :attr:`buffered_bytes` that :meth:`write` waits on."""
        return self._max_buffered

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._closing

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the interval flush and the upload workers (idempotent)."""
        if self._started:
            return
        self._started = True
        self._flusher = asyncio.create_task(self._flush_loop(), name="log-flush")
        self._workers = [
            asyncio.create_task(self._upload_loop(), name=f"log-upload-{i}")
            for i in range(self._worker_count)
        ]

    async def __aenter__(self) -> LogStreamer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def write(self, data: bytes) -> None:
        """Redact ``data`` and append it to the log.

        Waits while :attr:`buffered_bytes` is at the bound, so the caller (:func:`pump`) stops
        reading the job's output until uploads catch up. If cancelled while waiting, a prefix of
        ``data`` has been logged and the rest not. Raises ``RuntimeError`` after :meth:`close`.
        """
        if self._closing:
            raise RuntimeError("write to a closed LogStreamer")
        await self.start()
        async with self._write_lock:
            await self._append_carry()
            for start in range(0, len(data), _WRITE_SLICE):
                piece = data if len(data) <= _WRITE_SLICE else data[start : start + _WRITE_SLICE]
                self._carry = self._redactor.feed(piece) if self._redactor else bytes(piece)
                await self._append_carry()

    def write_nowait(self, data: bytes) -> None:
        """Redact and append ``data`` at once, never waiting for upload room.

        For the agent's own short notes ("cancelling job ...") on paths that must not stall
        behind a stuck upload, such as cancelling a job before its deadline. The bound is
        overshot by at most ``len(data)``, so never use it for job output. If a :meth:`write`
        is in progress, the note lands after what that write has redacted so far.
        """
        if self._closing:
            raise RuntimeError("write to a closed LogStreamer")
        out = self._redactor.feed(data) if self._redactor else bytes(data)
        if self._write_lock.locked():
            # The writer holding the lock appends its carry before it redacts anything else,
            # so appending there keeps the log in redactor order.
            self._carry += out
        else:
            self._take(self._carry)  # left by a cancelled write: it comes first
            self._carry = b""
            self._take(out)

    # Not asyncio.timeout() around the call: expiry must not abort close but turn into a
    # failed-chunk count, which only close itself can compute.
    async def close(self, timeout: float | None = None) -> int:
        """Flush everything (the redactor's held tail too) and wait for every upload to end.

        Returns :attr:`chunks_failed_count`. With ``timeout`` (seconds), uploads still running
        or queued when it expires are cancelled and counted as failed, and an error is logged,
        so a deadline-bound drain never waits longer than ``timeout`` (plus a short grace for
        uploads that are slow to honour cancellation). Idempotent: a second call returns the
        same count. A write blocked on back-pressure while close runs raises ``RuntimeError``
        once it wakes; what it had already redacted is flushed.
        """
        if self._final_failed is not None:
            return self._final_failed
        if self._closing:
            # A concurrent close is in progress: wait for its result rather than racing it.
            await self._close_done.wait()
            return self.chunks_failed_count
        self._closing = True
        await self.start()

        # Neither append waits for room: the carry is at most one write slice (a write
        # cancelled or blocked mid-way) and the redactor's tail is shorter than one secret, so
        # the bound is overshot by little, once; waiting here could hang on the very uploads
        # that the timeout is meant to give up on.
        self._take(self._carry)
        self._carry = b""
        if self._redactor is not None:
            self._take(self._redactor.flush())
        self._cut_all()

        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        for _ in self._workers:
            self._queue.put_nowait(None)

        _, pending = await asyncio.wait(self._workers, timeout=timeout)
        if pending:
            for task in pending:
                task.cancel()
            await asyncio.wait(pending, timeout=_CANCEL_GRACE)
            unfinished = self.chunks_created - self._uploaded - self._failed
            logger.error(
                "log upload: %d chunk(s) not uploaded within the %.1fs close timeout; "
                "counted as failed",
                unfinished,
                timeout,
            )
        # created - uploaded, not the running count: a chunk cut off by the timeout never
        # reached the except clause that counts failures.
        self._final_failed = self.chunks_created - self._uploaded
        self._close_done.set()
        self._room.set()  # wake a blocked writer so that it sees the streamer is closed
        if self._final_failed:
            logger.warning(
                "log upload: %d of %d chunk(s) failed (%d bytes of log)",
                self._final_failed,
                self.chunks_created,
                self.bytes_written,
            )
        return self._final_failed

    # -- internals ---------------------------------------------------------------------------

    async def _append_carry(self) -> None:
        while self._carry:
            room = self._max_buffered - self._buffered
            if room <= 0:
                self._room.clear()
                await self._room.wait()
                if self._closing:
                    raise RuntimeError("LogStreamer closed while a write waited for room")
                continue
            carry = self._carry
            if len(carry) <= room:
                self._carry = b""
                self._take(carry)
            else:
                self._carry = carry[room:]
                self._take(carry[:room])

    def _take(self, data: bytes) -> None:
        if not data:
            return
        self._pieces.append(data)
        self._unsent += len(data)
        self._buffered += len(data)
        while self._unsent >= self._chunk_size:
            self._cut(self._chunk_size)

    def _cut(self, n: int) -> None:
        parts: list[bytes | memoryview] = []
        need = n
        while need:
            piece = self._pieces.popleft()
            if len(piece) > need:
                view = memoryview(piece)
                parts.append(view[:need])
                self._pieces.appendleft(view[need:])
                need = 0
            else:
                parts.append(piece)
                need -= len(piece)
        raw = parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)
        self._unsent -= n
        self._queue.put_nowait((self._next_sequence, self._offset, raw))
        self._next_sequence += 1
        self._offset += n

    def _cut_all(self) -> None:
        while self._unsent:
            self._cut(min(self._unsent, self._chunk_size))

    async def _flush_loop(self) -> None:
        while True:
            await self._sleep(self._interval)
            self._cut_all()

    async def _upload_loop(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            sequence, offset, raw = item
            size = len(raw)
            try:
                chunk = Chunk(sequence, offset, size, await _gzip(raw, self._level))
                del raw, item  # only the compressed copy stays alive during the upload
                await self._upload(chunk)
            except Exception as exc:
                self._failed += 1
                # The chunk's content may hold anything the job printed: never log it.
                logger.warning(
                    "log upload: chunk %d (offset %d, size %d) failed: %s: %.200s",
                    sequence,
                    offset,
                    size,
                    type(exc).__name__,
                    exc,
                )
            else:
                self._uploaded += 1
            finally:
                self._buffered -= size
                if self._buffered < self._max_buffered:
                    self._room.set()


async def _gzip(raw: bytes, level: int) -> bytes:
    """gzip ``raw``; big inputs in slices, yielding to the event loop in between."""
    if len(raw) <= _INLINE_COMPRESS_MAX:
        return gzip.compress(raw, level, mtime=0)
    compressor = zlib.compressobj(level, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip container
    view = memoryview(raw)
    parts: list[bytes] = []
    for start in range(0, len(raw), _COMPRESS_SLICE):
        parts.append(compressor.compress(view[start : start + _COMPRESS_SLICE]))
        await asyncio.sleep(0)
    parts.append(compressor.flush())
    return b"".join(parts)


async def pump(
    reader: asyncio.StreamReader, streamer: LogStreamer, read_size: int = 64 * 1024
) -> None:
    """Copy ``reader`` (a job's stdout) into ``streamer`` until EOF.

    While ``streamer.write`` waits for upload room, nothing is read: the StreamReader's own
    buffer fills, it pauses the pipe, and the job blocks on its next write. The streamer is not
    closed here; the job runner closes it (with its deadline) once the job has ended.
    """
    while True:
        data = await reader.read(read_size)
        if not data:
            return
        await streamer.write(data)
