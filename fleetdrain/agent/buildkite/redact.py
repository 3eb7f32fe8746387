"""Redaction of secrets from a job's output stream.

The secrets are the values of the job's environment variables whose names say they are secret
(:data:`SECRET_NAME_SUFFIXES`). :class:`Redactor` replaces every occurrence of any of them in a
byte stream with ``[REDACTED]``, however the stream is split into writes.

Semantics (identical for any split of the stream into :meth:`Redactor.feed` calls):

* every byte that is part of an occurrence of a secret is replaced, including occurrences that
  overlap each other (``abcdef`` and ``defghi`` in ``abcdefghi``); a leftmost-longest
  ``re.sub`` would leave ``ghi`` of the second one in the output;
* occurrences that overlap are merged and replaced by one ``[REDACTED]``; occurrences that only
  touch (``secret1secret2``) each get their own, exactly as a plain substitution would.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = [
    "DEFAULT_MIN_LENGTH",
    "REPLACEMENT",
    "SECRET_NAME_SUFFIXES",
    "Redactor",
    "is_secret_name",
]

REPLACEMENT = b"[REDACTED]"

DEFAULT_MIN_LENGTH = 6

# The Go agent's default `redacted-vars` are the globs `*_PASSWORD`, `*_SECRET`, ... There `*`
# may match nothing but the underscore must be there, so a variable called just `TOKEN` would
# leak. Nobody names a variable `PASSWORD` or `TOKEN` for anything but a secret, so the bare
# names count too.
SECRET_NAME_SUFFIXES: tuple[str, ...] = (
    "PASSWORD",
    "SECRET",
    "TOKEN",
    "PRIVATE_KEY",
    "ACCESS_KEY",
    "SECRET_KEY",
    "CONNECTION_STRING",
)


def is_secret_name(name: str, suffixes: Iterable[str] = SECRET_NAME_SUFFIXES) -> bool:
    """Whether an environment variable called ``name`` holds a secret.

    True when ``name``, compared case-insensitively, is one of ``suffixes`` (``TOKEN``) or ends
    with ``_`` and one of them (``GITHUB_TOKEN``, ``db_password``). ``MY_TOKENS`` or
    ``PASSWORD_FILE`` are not secrets: the latter holds a path, not the password.
    """
    upper = name.upper()
    return any(upper == s or upper.endswith("_" + s) for s in (x.upper() for x in suffixes))


class Redactor:
    """Replaces secrets in a stream of bytes, one :meth:`feed` at a time.

    :meth:`feed` returns what is safe to emit at once and holds back at most
    ``longest secret - 1`` bytes that could be the start of a secret continued by the next write;
    :meth:`flush` returns the rest at the end of the stream (and makes the redactor ready for a
    new stream). Cost per feed is one ``bytes.find`` pass per secret over the new data plus the
    held-back bytes (C speed), and Python work only per occurrence. Without secrets ``feed``
    returns its argument itself: no copy, no hold-back.
    """

    def __init__(
        self,
        secrets: Iterable[str | bytes] = (),
        *,
        replacement: bytes = REPLACEMENT,
        names: Iterable[str] = (),
    ) -> None:
        """Redact each of ``secrets`` (str is encoded as UTF-8; empty values are ignored).

        ``names`` are the variables the secrets came from, kept only so that the agent can log
        what it redacts (never the values).
        """
        unique: set[bytes] = set()
        for secret in secrets:
            # surrogateescape: os.environ keeps undecodable bytes as lone surrogates, and this
            # turns them back into the bytes the job will actually print.
            raw = secret.encode("utf-8", "surrogateescape") if isinstance(secret, str) else secret
            if raw:
                unique.add(bytes(raw))
        self._secrets: tuple[bytes, ...] = tuple(sorted(unique, key=len, reverse=True))
        self._replacement = bytes(replacement)
        self._hold = max((len(s) for s in self._secrets), default=1) - 1
        self.names: tuple[str, ...] = tuple(names)
        # Stream state: bytes kept for matching, and how many of them (a prefix) were already
        # emitted as part of a redaction that may still grow.
        self._tail = b""
        self._covered = 0

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str],
        min_length: int = DEFAULT_MIN_LENGTH,
        *,
        suffixes: Iterable[str] = SECRET_NAME_SUFFIXES,
        replacement: bytes = REPLACEMENT,
    ) -> Redactor:
        """A redactor for the values of ``env``'s secret variables (see :func:`is_secret_name`).

        Values shorter than ``min_length`` characters are not redacted: replacing every "1" or
        "true" in a log would make it unreadable and hide nothing worth hiding.
        """
        suffixes = tuple(suffixes)
        names: list[str] = []
        values: list[str] = []
        for name, value in env.items():
            if is_secret_name(name, suffixes) and len(value) >= min_length:
                names.append(name)
                values.append(value)
        return cls(values, replacement=replacement, names=sorted(names))

    @property
    def secret_count(self) -> int:
        """How many distinct secret values this redactor replaces."""
        return len(self._secrets)

    @property
    def held_bytes(self) -> int:
        """Bytes fed but not yet returned (at most ``longest secret - 1``)."""
        return len(self._tail) - self._covered

    def feed(self, data: bytes) -> bytes:
        """Redact the next piece of the stream; return the part that is final now."""
        if not self._secrets:
            return data
        return self._process(self._tail + data if self._tail else bytes(data), final=False)

    def flush(self) -> bytes:
        """End of stream: return everything still held back, redacted."""
        if not self._secrets:
            return b""
        out = self._process(self._tail, final=True)
        self._tail = b""
        self._covered = 0
        return out

    def redact(self, data: bytes) -> bytes:
        """Redact one complete piece of text (not part of a stream; stream state is untouched)."""
        if not self._secrets:
            return data
        tail, covered = self._tail, self._covered
        self._tail, self._covered = b"", 0
        try:
            return self._process(bytes(data), final=True)
        finally:
            self._tail, self._covered = tail, covered

    def _intervals(self, buf: bytes) -> list[tuple[int, int]]:
        """Every occurrence of every secret in ``buf``, overlapping ones merged, in order."""
        found: list[tuple[int, int]] = []
        find = buf.find
        for secret in self._secrets:
            n = len(secret)
            i = find(secret)
            while i != -1:
                found.append((i, i + n))
                i = find(secret, i + 1)
        if len(found) <= 1:
            return found
        found.sort()
        merged = [found[0]]
        for s, e in found[1:]:
            last_s, last_e = merged[-1]
            if s < last_e:
                if e > last_e:
                    merged[-1] = (last_s, e)
            else:
                merged.append((s, e))
        return merged

    def _partial(self, buf: bytes) -> int:
        """Length of the longest end of ``buf`` that could still grow into a secret.

        Only that much is held back, not a fixed ``longest secret - 1``: output that cannot
        be the start of a secret ("started" before a long pause) is shown at once.
        """
        n = len(buf)
        best = 0
        for secret in self._secrets:
            first = secret[:1]
            start = max(0, n - len(secret) + 1)
            p = buf.find(first, start)
            while p != -1 and n - p > best:
                if secret.startswith(buf[p:]):
                    best = n - p
                    break
                p = buf.find(first, p + 1)
        return best

    def _process(self, buf: bytes, *, final: bool) -> bytes:
        # Bytes before `limit` are final: an occurrence that needs data not yet seen starts at
        # `len(buf) - hold` or later. A redaction may start before `limit` and still grow past
        # it; it is emitted at once (so nothing unbounded is held) and `_covered` remembers
        # that its bytes are out, so a later overlapping occurrence extends it silently.
        limit = len(buf) if final else len(buf) - self._partial(buf)
        pos = self._covered
        out: list[bytes] = []
        for s, e in self._intervals(buf):
            if e <= pos:
                continue
            if s < pos:
                pos = e
                continue
            if s >= limit:
                break
            if s > pos:
                out.append(buf[pos:s])
            out.append(self._replacement)
            pos = e
        if pos < limit:
            out.append(buf[pos:limit])
            pos = limit
        keep = max(limit, 0)
        self._tail = buf[keep:]
        self._covered = pos - keep
        return b"".join(out)
