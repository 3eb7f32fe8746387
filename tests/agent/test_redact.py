"""Redactor: streaming redaction of secrets split across any writes."""

from __future__ import annotations

import itertools
import random
import time

import pytest

from fleetdrain.agent.buildkite.redact import REPLACEMENT, Redactor, is_secret_name

R = REPLACEMENT.decode()


def reference(text: bytes, secrets: list[bytes]) -> bytes:
    """Whole-text redaction written the slow, obvious way (independent of the Redactor's)."""
    occurrences = sorted(
        (i, i + len(s)) for i in range(len(text)) for s in secrets if s and text.startswith(s, i)
    )
    out = bytearray()
    pos = 0
    end = -1
    for s, e in occurrences:
        if s < end:  # overlaps the current redaction: extend it
            end = max(end, e)
            continue
        if end >= 0:
            out += REPLACEMENT
            pos = end
        out += text[pos:s]
        end = e
    if end >= 0:
        out += REPLACEMENT
        pos = end
    out += text[pos:]
    return bytes(out)


def stream(redactor: Redactor, pieces: list[bytes]) -> bytes:
    longest = max((len(s) for s in redactor._secrets), default=1)
    out = b""
    for piece in pieces:
        out += redactor.feed(piece)
        assert redactor.held_bytes <= longest - 1
    return out + redactor.flush()


def split(text: bytes, points: tuple[int, ...]) -> list[bytes]:
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


CASES: list[tuple[bytes, list[bytes]]] = [
    (b"user=admin pass=hunter22 done", [b"hunter22"]),
    (b"hunter22hunter22", [b"hunter22"]),  # adjacent: two markers
    (b"abcdefghi", [b"abcdef", b"defghi"]),  # overlapping: one marker, nothing leaks
    (b"xxabcdefghijyy", [b"abcdef", b"abcdefghij"]),  # one secret is a prefix of another
    (b"xxabcdefZZ", [b"abcdef", b"abcdefghij"]),  # the longer one only starts here
    (b"xxcdefghyy", [b"abcdefgh", b"cdefgh"]),  # a suffix of another, alone
    (b"aaaaaaaaaaaab", [b"aaaaaa"]),  # overlapping with itself
    (b"123456 and 654321 then 123456654321!", [b"123456", b"654321", b"5665"]),
    (b"no secret in here at all", [b"s3cr3t!"]),
    (b"s3cr3", [b"s3cr3t!"]),  # an unfinished secret at the very end is not one
    (b"ab\nAKIA0123456789\r\nBEGIN KEY\nline2\nEND", [b"AKIA0123456789", b"BEGIN KEY\nline2"]),
]


@pytest.mark.parametrize(("text", "secrets"), CASES)
def test_every_split_point_gives_the_whole_text_answer(text: bytes, secrets: list[bytes]) -> None:
    expected = reference(text, secrets)
    assert Redactor(secrets).redact(text) == expected
    r = Redactor(secrets)
    for i in range(len(text) + 1):
        assert stream(r, split(text, (i,))) == expected, i
    for i, j in itertools.combinations_with_replacement(range(len(text) + 1), 2):
        assert stream(r, split(text, (i, j))) == expected, (i, j)
    assert stream(r, [text[k : k + 1] for k in range(len(text))]) == expected


def test_known_answers() -> None:
    r = Redactor([b"abcdef", b"defghi", b"hunter22"])
    assert r.redact(b"abcdefghi") == REPLACEMENT
    assert r.redact(b"hunter22hunter22") == REPLACEMENT * 2
    assert r.redact(b"[hunter22] x abcdef") == f"[{R}] x {R}".encode()
    assert r.redact(b"abcde fghi") == b"abcde fghi"


def test_random_streams_against_reference() -> None:
    rng = random.Random(7)
    alphabet = b"ab"  # tiny alphabet: secrets occur, overlap and nest all the time
    for _ in range(300):
        secrets = [
            bytes(rng.choice(alphabet) for _ in range(rng.randint(2, 7)))
            for _ in range(rng.randint(1, 4))
        ]
        text = bytes(rng.choice(alphabet + b"c") for _ in range(rng.randint(0, 80)))
        pieces: list[bytes] = []
        rest = text
        while rest:
            n = rng.randint(1, 9)
            pieces.append(rest[:n])
            rest = rest[n:]
        assert stream(Redactor(secrets), pieces) == reference(text, secrets), (secrets, text)


def test_endless_secret_run_is_not_held_back() -> None:
    r = Redactor([b"aaaaaa"])
    out = b""
    for _ in range(10_000):
        out += r.feed(b"a" * 10)
        assert r.held_bytes <= 5
    out += r.flush()
    assert out == REPLACEMENT


def test_flush_resets_for_a_new_stream() -> None:
    r = Redactor([b"secret"])
    assert r.feed(b"my secr") == b"my "  # "secr" could be the start of "secret"
    assert r.flush() == b"secr"
    assert r.feed(b"et") == b"et"  # a new stream: "et" alone cannot grow into "secret"
    assert r.flush() == b""
    assert stream(r, [b"sec", b"ret!"]) == REPLACEMENT + b"!"


def test_no_secrets_is_a_pass_through_without_copies() -> None:
    r = Redactor([])
    data = b"x" * 100_000
    assert r.feed(data) is data
    assert r.flush() == b""
    assert r.held_bytes == 0
    assert Redactor.from_env({"HOME": "/root"}).feed(data) is data


def test_from_env_names_and_min_length() -> None:
    env = {
        "GITHUB_TOKEN": "ghp_abcdef123456",
        "db_password": "correct horse",
        "PASSWORD": "bare-name-secret",
        "AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG",
        "SSH_PRIVATE_KEY": "-----BEGIN KEY-----\nMIIE\n-----END KEY-----\n",
        "APP_SECRET_KEY": "djangokey123",
        "DB_CONNECTION_STRING": "postgres://u:p@h/db",
        "API_SECRET": "12345",  # shorter than min_length 6
        "SHORT_TOKEN": "1",
        "PASSWORD_FILE": "/run/secrets/pw",  # a path, not a secret
        "MY_TOKENS": "not-a-secret-name",
        "HOME": "/home/builder",
    }
    r = Redactor.from_env(env)
    assert r.names == (
        "APP_SECRET_KEY",
        "AWS_SECRET_ACCESS_KEY",
        "DB_CONNECTION_STRING",
        "GITHUB_TOKEN",
        "PASSWORD",
        "SSH_PRIVATE_KEY",
        "db_password",
    )
    text = "\n".join(f"{k}={v}" for k, v in env.items()).encode()
    out = r.redact(text).decode()
    for name in r.names:
        assert env[name] not in out
        assert f"{name}={R}" in out
    for name in ("API_SECRET", "SHORT_TOKEN", "PASSWORD_FILE", "MY_TOKENS", "HOME"):
        assert f"{name}={env[name]}" in out
    assert Redactor.from_env(env, min_length=5).secret_count == r.secret_count + 1
    assert Redactor.from_env(env, min_length=1).secret_count == r.secret_count + 2


def test_is_secret_name() -> None:
    for name in ("TOKEN", "token", "X_TOKEN", "BUILDKITE_AGENT_ACCESS_TOKEN", "a_Secret"):
        assert is_secret_name(name), name
    for name in ("TOKENS", "XTOKEN", "TOKEN_PATH", "SECRETS_DIR", "PATH"):
        assert not is_secret_name(name), name


def test_undecodable_env_bytes_are_redacted_as_the_job_prints_them() -> None:
    value = b"\xff\xferaw-secret".decode("utf-8", "surrogateescape")
    r = Redactor.from_env({"X_TOKEN": value})
    assert r.redact(b"<\xff\xferaw-secret>") == b"<" + REPLACEMENT + b">"


def test_large_output_is_fast() -> None:
    # A per-byte Python loop, or one per (byte, secret), would take minutes here.
    rng = random.Random(3)
    secrets = [f"s3cr3t-{rng.getrandbits(128):032x}" for _ in range(20)] + ["hunter22"]
    r = Redactor(secrets)
    line = b"compiling module foo/bar/baz.py ... ok hunter2 s3cr3t- 0123456789abcdef\n"
    data = line * (16 * 1024 * 1024 // len(line))
    planted = data[:1000] + b"hunter22" + data[1000:]
    start = time.perf_counter()
    out = b"".join(r.feed(planted[i : i + 65536]) for i in range(0, len(planted), 65536))
    out += r.flush()
    elapsed = time.perf_counter() - start
    assert out == data[:1000] + REPLACEMENT + data[1000:]
    assert elapsed < 3.0, f"{len(data) / elapsed / 1e6:.0f} MB/s"


def test_output_that_cannot_start_a_secret_is_not_held_back() -> None:
    # A job that prints a line and then sleeps must show that line now, not at its next write.
    r = Redactor([b"s3cr3t-value-of-some-length"])
    assert r.feed(b"started\n") == b"started\n"
    assert r.held_bytes == 0
    assert r.feed(b"token: s3cr") == b"token: "
    assert r.held_bytes == 4
    assert r.feed(b"3t-value-of-some-length done") == REPLACEMENT + b" done"
