"""LogStreamer: chunking, gzip, interval flush, back-pressure, failures, close timeouts, pump."""

from __future__ import annotations

import asyncio
import gzip
import logging
import random
import sys
import time

import pytest

from fleetdrain.agent.buildkite.log_streamer import Chunk, LogStreamer, pump
from fleetdrain.agent.buildkite.redact import REPLACEMENT, Redactor


class Recorder:
    """An upload callable that keeps every chunk and watches the streamer's memory."""

    def __init__(self, delay: float = 0.0) -> None:
        self.chunks: list[Chunk] = []
        self.delay = delay
        self.streamer: LogStreamer | None = None
        self.max_buffered = 0

    async def __call__(self, chunk: Chunk) -> None:
        if self.streamer is not None:
            self.max_buffered = max(self.max_buffered, self.streamer.buffered_bytes)
        if self.delay:
            await asyncio.sleep(self.delay)
        self.chunks.append(chunk)

    def log(self) -> bytes:
        """The uploaded log, checking sequence, offset and size of every chunk on the way."""
        return reassemble(self.chunks)


def reassemble(chunks: list[Chunk], expect_gaps: bool = False) -> bytes:
    ordered = sorted(chunks, key=lambda c: c.sequence)
    assert len({c.sequence for c in ordered}) == len(ordered), "a chunk was uploaded twice"
    if not expect_gaps:
        assert [c.sequence for c in ordered] == list(range(1, len(ordered) + 1))
    out = bytearray()
    for c in ordered:
        raw = gzip.decompress(c.data)
        assert c.size == len(raw) > 0
        if not expect_gaps:
            assert c.offset == len(out)
        out += raw
    return bytes(out)


def sample(n: int, seed: int = 1) -> bytes:
    """Log-like bytes in which every position is distinguishable (for prefix/gap checks)."""
    rng = random.Random(seed)
    lines = []
    total = 0
    i = 0
    while total < n:
        filler = rng.randbytes(rng.randint(0, 40)).hex()  # no runs: any gap shows
        line = f"{i:08d} step {filler}\n".encode()
        lines.append(line)
        total += len(line)
        i += 1
    return b"".join(lines)[:n]


async def test_chunks_are_contiguous_exact_and_round_trip() -> None:
    rec = Recorder()
    data = sample(1_000_003)
    rng = random.Random(2)
    async with LogStreamer(rec, max_chunk_size=10_000, max_buffered_bytes=64_000) as s:
        rec.streamer = s
        pos = 0
        while pos < len(data):
            n = rng.choice([1, 7, 100, 4096, 9_999, 10_000, 10_001, 65_536, 300_000])
            await s.write(data[pos : pos + n])
            pos += n
    assert rec.log() == data
    assert all(c.size <= 10_000 for c in rec.chunks)
    assert sum(c.size == 10_000 for c in rec.chunks) >= 100  # full chunks, not one per write
    assert s.bytes_written == len(data)
    assert s.chunks_uploaded == s.chunks_created == len(rec.chunks)
    assert s.chunks_failed_count == 0
    assert s.buffered_bytes == 0


async def test_redacts_secrets_split_across_writes() -> None:
    rec = Recorder()
    redactor = Redactor.from_env({"DEPLOY_TOKEN": "tok-0123456789", "X": "tok-0123456789"})
    async with LogStreamer(rec, max_chunk_size=5, redactor=redactor) as s:
        for piece in (b"token is tok-01", b"2345", b"6789", b"; again: tok-0123456789", b"!\n"):
            await s.write(piece)
    log = rec.log()
    assert log == b"token is " + REPLACEMENT + b"; again: " + REPLACEMENT + b"!\n"
    assert s.bytes_written == len(log)  # offsets are in redacted bytes


async def test_interval_flushes_without_close() -> None:
    rec = Recorder()
    s = LogStreamer(rec, max_chunk_size=1_000_000, interval=0.05)
    await s.start()
    await s.write(b"hello")
    await asyncio.sleep(0.3)
    assert [(c.sequence, c.offset, c.size) for c in rec.chunks] == [(1, 0, 5)]
    assert gzip.decompress(rec.chunks[0].data) == b"hello"
    await s.write(b" world")
    await asyncio.sleep(0.3)
    assert [(c.sequence, c.offset, c.size) for c in rec.chunks][1] == (2, 5, 6)
    assert await s.close() == 0
    assert len(rec.chunks) == 2  # nothing left over, no empty chunk


async def test_interval_uses_the_injected_clock() -> None:
    rec = Recorder()
    ticks: asyncio.Queue[None] = asyncio.Queue()

    async def sleep(_seconds: float) -> None:
        await ticks.get()

    s = LogStreamer(rec, max_chunk_size=1000, interval=3600, sleep=sleep)
    await s.start()
    await s.write(b"abc")
    await asyncio.sleep(0.05)
    assert rec.chunks == []
    ticks.put_nowait(None)
    for _ in range(50):
        if rec.chunks:
            break
        await asyncio.sleep(0.01)
    assert [c.size for c in rec.chunks] == [3]
    await s.close()


async def test_write_blocks_while_the_bound_is_reached() -> None:
    gate = asyncio.Event()
    bound = 64 * 1024
    max_seen = 0

    async def upload(chunk: Chunk) -> None:
        await gate.wait()
        chunks.append(chunk)

    chunks: list[Chunk] = []
    s = LogStreamer(upload, max_chunk_size=16 * 1024, max_buffered_bytes=bound)
    await s.start()
    data = sample(1_000_000)

    async def writer() -> None:
        nonlocal max_seen
        for i in range(0, len(data), 10_000):
            await s.write(data[i : i + 10_000])
            max_seen = max(max_seen, s.buffered_bytes)

    task = asyncio.create_task(writer())
    for _ in range(20):
        await asyncio.sleep(0.01)
        max_seen = max(max_seen, s.buffered_bytes)
    assert not task.done(), "write() did not wait for upload room"
    assert s.bytes_written <= bound
    assert s.buffered_bytes == bound
    gate.set()
    await asyncio.wait_for(task, 5)
    assert await s.close() == 0
    assert max_seen <= bound
    assert reassemble(chunks) == data


async def test_a_single_huge_write_is_bounded_too() -> None:
    rec = Recorder(delay=0.001)
    bound = 100_000
    s = LogStreamer(rec, max_chunk_size=30_000, max_buffered_bytes=bound)
    rec.streamer = s
    data = sample(3_000_000)
    async with s:
        await s.write(data)
    assert rec.max_buffered <= bound
    assert rec.log() == data


async def test_chunk_size_is_capped_by_the_bound() -> None:
    rec = Recorder()
    async with LogStreamer(rec, max_chunk_size=1_000_000, max_buffered_bytes=50_000) as s:
        await asyncio.wait_for(s.write(sample(400_000)), 5)  # would deadlock uncapped
    assert max(c.size for c in rec.chunks) == 50_000
    assert rec.log() == sample(400_000)


async def test_back_pressure_reaches_the_job_through_the_pipe() -> None:
    gate = asyncio.Event()
    total = 0

    async def upload(chunk: Chunk) -> None:
        nonlocal total
        await gate.wait()
        total += chunk.size

    proc = await asyncio.create_subprocess_exec(
        "head", "-c", str(8 * 1024 * 1024), "/dev/zero", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    s = LogStreamer(upload, max_chunk_size=64 * 1024, max_buffered_bytes=256 * 1024)
    await s.start()
    pumping = asyncio.create_task(pump(proc.stdout, s))
    await asyncio.sleep(0.5)
    assert proc.returncode is None, "the job finished although nothing was uploaded"
    assert s.bytes_written <= 256 * 1024
    gate.set()
    await asyncio.wait_for(pumping, 10)
    assert await proc.wait() == 0
    assert await s.close() == 0
    assert total == s.bytes_written == 8 * 1024 * 1024


async def test_failed_uploads_are_counted_and_do_not_hide_other_chunks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    uploaded: list[Chunk] = []

    async def upload(chunk: Chunk) -> None:
        if chunk.sequence in (2, 5):
            raise RuntimeError("HTTP 403 from coordinator")
        uploaded.append(chunk)

    data = b"".join(b"line %04d content-marker\n" % i for i in range(400))
    caplog.set_level(logging.WARNING, logger="fleetdrain.log")
    s = LogStreamer(upload, max_chunk_size=1000)
    for i in range(0, len(data), 333):
        await s.write(data[i : i + 333])
    for _ in range(100):  # every full chunk handled, before close
        if s.chunks_uploaded + s.chunks_failed_count == s.chunks_created:
            break
        await asyncio.sleep(0.01)
    assert s.chunks_failed_count == 2  # counted as they fail, not only at close
    assert await s.close() == 2
    assert s.chunks_failed_count == 2
    assert s.chunks_uploaded == s.chunks_created - 2 == len(uploaded)
    assert sorted(c.sequence for c in uploaded) == [
        n for n in range(1, s.chunks_created + 1) if n not in (2, 5)
    ]
    for c in uploaded:  # the surviving chunks still carry the right slice of the log
        assert gzip.decompress(c.data) == data[c.offset : c.offset + c.size]
    assert "chunk 2 (offset 1000, size 1000) failed" in caplog.text
    assert "chunk 5 " in caplog.text
    assert "content-marker" not in caplog.text


async def test_close_timeout_with_a_hanging_upload(caplog: pytest.LogCaptureFixture) -> None:
    uploaded: list[int] = []

    async def upload(chunk: Chunk) -> None:
        if chunk.sequence == 2:
            await asyncio.Event().wait()  # a connection that never answers
        uploaded.append(chunk.sequence)

    caplog.set_level(logging.WARNING, logger="fleetdrain.log")
    s = LogStreamer(upload, max_chunk_size=100, workers=2)
    await s.start()
    await s.write(b"x" * 450)
    started = time.monotonic()
    failed = await s.close(timeout=0.2)
    elapsed = time.monotonic() - started
    assert failed == 1
    assert 0.15 < elapsed < 1.0
    assert sorted(uploaded) == [1, 3, 4, 5]
    assert s.chunks_failed_count == 1
    assert "not uploaded within the 0.2s close timeout" in caplog.text
    assert await s.close() == 1  # idempotent


async def test_close_timeout_counts_queued_chunks_too() -> None:
    async def upload(chunk: Chunk) -> None:
        await asyncio.Event().wait()

    s = LogStreamer(upload, max_chunk_size=10, workers=3)
    await s.start()
    await s.write(b"y" * 95)  # 10 chunks: 3 hang in workers, 7 wait in the queue
    assert await asyncio.wait_for(s.close(timeout=0.1), 3) == 10
    assert s.chunks_uploaded == 0


async def test_close_flushes_the_redactor_tail_and_rejects_writes() -> None:
    rec = Recorder()
    s = LogStreamer(rec, max_chunk_size=100, redactor=Redactor([b"abcdefghij"]))
    await s.write(b"ends with abcdefghi")  # could still become the secret: held back
    await asyncio.sleep(0.01)
    assert s.bytes_written == len(b"ends with ")
    assert await s.close() == 0
    assert rec.log() == b"ends with abcdefghi"
    with pytest.raises(RuntimeError):
        await s.write(b"late")


async def test_a_cancelled_write_loses_nothing_it_had_redacted() -> None:
    gate = asyncio.Event()
    chunks: list[Chunk] = []

    async def upload(chunk: Chunk) -> None:
        await gate.wait()
        chunks.append(chunk)

    data = sample(2_000_000)
    s = LogStreamer(
        upload, max_chunk_size=8192, max_buffered_bytes=32768, redactor=Redactor([b"QQQQQQQQ"])
    )
    task = asyncio.create_task(s.write(data))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gate.set()
    assert await s.close() == 0
    log = reassemble(chunks)
    # Whatever the redactor consumed reaches the log: a prefix of the input, with no hole.
    assert len(log) > 32768
    assert log == data[: len(log)]


async def test_write_nowait_never_waits_and_keeps_log_order() -> None:
    gate = asyncio.Event()
    chunks: list[Chunk] = []

    async def upload(chunk: Chunk) -> None:
        await gate.wait()
        chunks.append(chunk)

    data = sample(500_000)
    s = LogStreamer(
        upload, max_chunk_size=4096, max_buffered_bytes=16384, redactor=Redactor([b"SECRET-XYZ"])
    )
    writer = asyncio.create_task(s.write(data))
    await asyncio.sleep(0.05)
    assert not writer.done()  # stuck behind the stalled uploads
    s.write_nowait(b"<cancelling: SECRET-XYZ>")  # synchronous: cannot stall
    # Queued behind the blocked write's bytes, not by dumping those past the bound.
    assert s.buffered_bytes <= s.max_buffered_bytes
    gate.set()
    await asyncio.wait_for(writer, 5)
    s.write_nowait(b"<done>")
    assert await s.close() == 0
    log = reassemble(chunks)
    note = b"<cancelling: " + REPLACEMENT + b">"
    at = log.index(note)
    assert log[:at] + log[at + len(note) :] == data + b"<done>"


async def test_big_chunks_are_compressed_without_stalling_the_loop() -> None:
    rec = Recorder()
    lags: list[float] = []
    stop = False

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop:
            before = loop.time()
            await asyncio.sleep(0)
            lags.append(loop.time() - before)

    data = sample(16 * 1024 * 1024)
    tick = asyncio.create_task(ticker())
    async with LogStreamer(rec, max_chunk_size=8 * 1024 * 1024, max_buffered_bytes=1 << 26) as s:
        for i in range(0, len(data), 1024 * 1024):
            await s.write(data[i : i + 1024 * 1024])
    stop = True
    await tick
    assert rec.log() == data
    # Inline gzip of an 8 MB chunk takes ~80 ms here; in slices no step comes near that.
    assert max(lags) < 0.04, max(lags)


@pytest.mark.parametrize("secrets", [[], ["s3cr3t-value-1", "another-secret-99"]])
async def test_throughput_64mb_through_pump_from_a_real_job(secrets: list[str]) -> None:
    size = 64 * 1024 * 1024
    total = 0
    sequences: list[int] = []

    async def upload(chunk: Chunk) -> None:
        nonlocal total
        total += chunk.size
        sequences.append(chunk.sequence)

    proc = await asyncio.create_subprocess_exec(
        "head", "-c", str(size), "/dev/zero", stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    redactor = Redactor(secrets) if secrets else None
    async with LogStreamer(upload, max_chunk_size=100 * 1024, redactor=redactor) as s:
        await pump(proc.stdout, s)
    assert await proc.wait() == 0
    assert total == s.bytes_written == size
    assert sorted(sequences) == list(range(1, s.chunks_created + 1))
    assert s.chunks_failed_count == 0


async def test_pump_redacts_a_real_jobs_output() -> None:
    script = "import sys, os; print('pw=' + os.environ['DB_PASSWORD'], flush=True)"
    env = {"DB_PASSWORD": "p4ssw0rd-xyz"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, env=env, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    rec = Recorder()
    async with LogStreamer(rec, max_chunk_size=4, redactor=Redactor.from_env(env)) as s:
        await pump(proc.stdout, s, read_size=3)
    await proc.wait()
    assert rec.log() == b"pw=" + REPLACEMENT + b"\n"
