"""The agent API client's TLS: made on the first https request, and always verifying.

A real TLS server on loopback with a certificate made for the test; the client trusts it only
through ``$SSL_CERT_FILE`` (as httpx does), and refuses it otherwise.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from fleetdrain.agent.buildkite.api import new_http_client, tls_context

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import NameOID  # noqa: E402

pytestmark = pytest.mark.slow


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleetdrain test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
async def servers(tmp_path: Path) -> AsyncIterator[tuple[str, str, Path]]:
    """(https base URL, http base URL, the https server's certificate)."""
    cert, key = _self_signed(tmp_path)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    secure = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=tls)
    plain = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = secure.sockets[0].getsockname()[1]
    plain_port = plain.sockets[0].getsockname()[1]
    yield f"https://127.0.0.1:{port}", f"http://127.0.0.1:{plain_port}", cert
    for server in (secure, plain):
        server.close()
        await server.wait_closed()


async def test_https_verifies_against_ssl_cert_file(servers, monkeypatch):
    https, http, cert = servers
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(proxy, raising=False)
    async with new_http_client(timeout=5.0, connect=5.0) as client:
        assert (await client.get(f"{http}/v3/ping")).text == "ok"
        assert (await client.get(f"{https}/v3/ping")).text == "ok"


async def test_https_to_an_untrusted_certificate_is_refused(servers, monkeypatch):
    https, http, _cert = servers
    # Trust only the OS CA store (or certifi): the test's certificate is in neither.
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    async with new_http_client(timeout=5.0, connect=5.0) as client:
        assert (await client.get(f"{http}/v3/ping")).text == "ok"
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(f"{https}/v3/ping")


def test_tls_context_verifies_hostnames_and_certificates(monkeypatch):
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    ctx = tls_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
