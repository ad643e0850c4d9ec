"""TLS on the relay's own port (RELAY_TLS__CERTFILE, RELAY_TLS__KEYFILE), and the clients that
need it: openai-node's Realtime clients connect only over wss:// (issue 15).

Each test makes a self-signed certificate for 127.0.0.1 and localhost, serves the relay with it
and trusts it in the client only: Python websockets through an SSL context, openai-node through
NODE_EXTRA_CA_CERTS. The openai-node tests need `npm ci --prefix tests/openai_node` (which also
brings Node 22, as the native-WebSocket client needs it); `scripts/bootstrap.sh test` runs it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from websockets.asyncio.client import connect

from app.config import ConfigError, load_settings
from app.main import create_app, server_config
from tests.audio_tools import spoken_pcm
from tests.helpers import (
    CLIENT_KEY,
    UPSTREAM_KEY,
    recv_until,
    relay_settings,
    run_node_driver,
    settings_for,
    tone,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(90)]

DRIVER_DIR = Path(__file__).resolve().parent / "openai_node"
SCRIPT = DRIVER_DIR / "realtime_turn.mjs"
NODE = DRIVER_DIR / "node_modules" / ".bin" / "node"  # Node 22 from the `node` npm package
DRIVER_TIMEOUT = 45.0  # seconds for one Node run (about 1 s)
INSTALL = "run `scripts/bootstrap.sh test` (or: npm ci --prefix tests/openai_node)"
AUDIO = tone(400) + bytes(24 * 2 * 200)  # 0.6 s of PCM16 24 kHz, as the Node driver sends


@dataclass
class Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key, as PEM files."""

    certfile: Path
    keyfile: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.certfile))


def make_certificate(directory: Path, name: str = "relay") -> Certificate:
    """What `openssl req -x509 -addext subjectAltName=...` makes, with `cryptography`."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "realtime-relay test")])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    files = Certificate(directory / f"{name}.crt", directory / f"{name}.key")
    files.certfile.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    files.keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return files


@pytest.fixture
def certificate(tmp_path: Path) -> Certificate:
    return make_certificate(tmp_path)


def tls_settings(upstream: Any, certificate: Certificate) -> Any:
    tls = {"certfile": str(certificate.certfile), "keyfile": str(certificate.keyfile)}
    return settings_for(upstream, tls=tls)


# -- settings


def test_tls_is_off_by_default():
    """Without RELAY_TLS__*, uvicorn gets no certificate (behind an ingress that ends TLS)."""
    settings = relay_settings("ws://127.0.0.1:9/v1/realtime")
    assert settings.tls.certfile is None and settings.tls.keyfile is None
    config = server_config(create_app(settings), settings)
    assert config.ssl_certfile is None and config.ssl_keyfile is None


def test_server_config_passes_the_certificate(certificate):
    """RELAY_TLS__CERTFILE and RELAY_TLS__KEYFILE reach uvicorn's ssl_certfile / ssl_keyfile."""
    tls = {"certfile": str(certificate.certfile), "keyfile": str(certificate.keyfile)}
    settings = relay_settings("ws://127.0.0.1:9/v1/realtime", tls=tls)
    config = server_config(create_app(settings), settings, port=0)
    assert config.ssl_certfile == str(certificate.certfile)
    assert config.ssl_keyfile == str(certificate.keyfile)


def test_tls_variables_are_read_from_the_environment(certificate, monkeypatch):
    """The two variables set the section, as the README's table says."""
    monkeypatch.setenv("OPENAI_API_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("RELAY_TLS__CERTFILE", str(certificate.certfile))
    monkeypatch.setenv("RELAY_TLS__KEYFILE", str(certificate.keyfile))
    settings = load_settings()
    assert settings.tls.certfile == str(certificate.certfile)
    assert settings.tls.keyfile == str(certificate.keyfile)


def _problem(monkeypatch: pytest.MonkeyPatch, **variables: str) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", UPSTREAM_KEY)
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    return str(caught.value)


def test_one_file_without_the_other_stops_start_up(certificate, monkeypatch):
    """A certificate without its key (or the reverse) is a start-up error naming both."""
    message = _problem(monkeypatch, RELAY_TLS__CERTFILE=str(certificate.certfile))
    assert "RELAY_TLS__CERTFILE" in message and "RELAY_TLS__KEYFILE" in message
    monkeypatch.delenv("RELAY_TLS__CERTFILE")
    message = _problem(monkeypatch, RELAY_TLS__KEYFILE=str(certificate.keyfile))
    assert "RELAY_TLS__CERTFILE" in message and "RELAY_TLS__KEYFILE" in message


def test_an_unreadable_file_stops_start_up(certificate, tmp_path, monkeypatch):
    """A missing file is named with its variable."""
    missing = str(tmp_path / "missing.key")
    message = _problem(
        monkeypatch,
        RELAY_TLS__CERTFILE=str(certificate.certfile),
        RELAY_TLS__KEYFILE=missing,
    )
    assert message.startswith("invalid configuration: RELAY_TLS__KEYFILE:"), message
    assert "missing.key" in message and "not a readable file" in message


def test_a_key_of_another_certificate_stops_start_up(certificate, tmp_path, monkeypatch):
    """A certificate and a key that are not a pair stop the relay before uvicorn tries them."""
    other = make_certificate(tmp_path, "other")
    message = _problem(
        monkeypatch,
        RELAY_TLS__CERTFILE=str(certificate.certfile),
        RELAY_TLS__KEYFILE=str(other.keyfile),
    )
    assert "RELAY_TLS__CERTFILE and RELAY_TLS__KEYFILE are not a PEM certificate" in message


def test_an_encrypted_key_stops_start_up(certificate, tmp_path, monkeypatch):
    """A passphrase-protected key is refused at once (OpenSSL would prompt on the terminal)."""
    key = serialization.load_pem_private_key(certificate.keyfile.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    message = _problem(
        monkeypatch,
        RELAY_TLS__CERTFILE=str(certificate.certfile),
        RELAY_TLS__KEYFILE=str(encrypted),
    )
    assert "unencrypted private key" in message


# -- the relay over TLS


async def test_python_websockets_turn_over_wss(relay_factory, upstream, certificate):
    """A client trusting the self-signed certificate completes a turn over wss://."""
    relay = await relay_factory(tls_settings(upstream, certificate))
    context = certificate.client_context()
    async with httpx.AsyncClient(verify=context) as client:
        assert (await client.get(f"https://127.0.0.1:{relay.port}/healthz")).status_code == 200
    url = f"wss://127.0.0.1:{relay.port}/v1/realtime?model=gpt-realtime-mini"
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with connect(url, ssl=context, additional_headers=headers) as ws:
        await recv_until(ws, "session.created")
        update = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}
        await ws.send(json.dumps({"type": "session.update", "session": update}))
        for offset in range(0, len(AUDIO), 960):
            chunk = base64.b64encode(AUDIO[offset : offset + 960]).decode()
            await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": chunk}))
        await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
        await ws.send(json.dumps({"type": "response.create"}))
        seen: list[dict[str, Any]] = []
        done = await recv_until(ws, "response.done", seen)
    assert done["response"]["status"] == "completed"
    echoed = b"".join(
        base64.b64decode(e["delta"]) for e in seen if e["type"] == "response.output_audio.delta"
    )
    assert echoed == AUDIO  # the local upstream echoes the committed audio
    assert bytes(upstream.connections[0].input_audio) == AUDIO


async def test_a_client_that_does_not_trust_the_certificate_is_refused(
    relay_factory, upstream, certificate
):
    """The certificate is really checked: a client with only the system's CAs cannot connect."""
    relay = await relay_factory(tls_settings(upstream, certificate))
    url = f"wss://127.0.0.1:{relay.port}/v1/realtime"
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(url, ssl=ssl.create_default_context(), open_timeout=5):
            pass
    assert upstream.connections == []


@pytest.mark.xfail(
    reason="uvicorn hands the TLS handshake to asyncio (60 s ssl_handshake_timeout, not exposed "
    "by uvicorn.Config); the relay's connection protocol only sees a connection after it",
    raises=TimeoutError,
)
async def test_a_connection_that_never_starts_tls_is_closed_at_the_handshake_deadline(
    relay_factory, upstream, certificate
):
    """RELAY_HANDSHAKE_TIMEOUT_SECONDS also bounds a connection that never sends a ClientHello."""
    settings = settings_for(
        upstream,
        handshake_timeout_seconds=0.5,
        tls={"certfile": str(certificate.certfile), "keyfile": str(certificate.keyfile)},
    )
    relay = await relay_factory(settings)
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.port)
    try:
        async with asyncio.timeout(3):
            assert await reader.read() == b""
    finally:
        writer.close()


# -- openai-node


def node_command(client: str, base_url: str, *speech: str) -> list[str]:
    """The driver's command line, or a failure that says what to install."""
    if not NODE.is_file() or not (DRIVER_DIR / "node_modules" / "openai").is_dir():
        pytest.fail(f"missing Node 22 and openai-node ({DRIVER_DIR / 'node_modules'}): {INSTALL}")
    return [str(NODE), str(SCRIPT), client, base_url, *speech]


async def run_turn(command: list[str], ca_file: Path | None) -> dict[str, Any]:
    """Run the driver with `ca_file` as NODE_EXTRA_CA_CERTS (and nothing that skips checks)."""
    env = {**os.environ, "RELAY_TEST_CLIENT_KEY": CLIENT_KEY}
    for name in ("NODE_EXTRA_CA_CERTS", "NODE_TLS_REJECT_UNAUTHORIZED", "OPENAI_BASE_URL"):
        env.pop(name, None)
    if ca_file is not None:
        env["NODE_EXTRA_CA_CERTS"] = str(ca_file)
    summary: dict[str, Any] = await run_node_driver(command, DRIVER_TIMEOUT, env)
    return summary


@pytest.mark.node
@pytest.mark.parametrize("client", ["websocket", "ws"])
async def test_openai_node_turn_over_wss(relay_factory, upstream, certificate, client):
    """OpenAIRealtimeWebSocket (native, Node 22) and OpenAIRealtimeWS (`ws`) complete an audio
    turn against the relay's wss:// endpoint, trusting its certificate via NODE_EXTRA_CA_CERTS."""
    relay = await relay_factory(tls_settings(upstream, certificate))
    command = node_command(client, f"https://127.0.0.1:{relay.port}/v1")
    seen = await run_turn(command, certificate.certfile)

    assert seen["error"] is None, seen
    assert seen["ok"], seen
    assert seen["node"].startswith("22."), seen["node"]
    assert seen["url"].startswith(f"wss://127.0.0.1:{relay.port}/v1/realtime?model="), seen["url"]
    assert seen["types"][0] == "session.created", seen["types"]
    assert "session.updated" in seen["types"]
    assert seen["types"][-1] == "response.done"
    assert seen["errors"] == []
    assert seen["echoed"], (seen["sentBytes"], seen["echoedBytes"])
    usage = seen["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 0
    # The relay used the server's key upstream and got exactly the client's audio.
    record = upstream.connections[0]
    assert record.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert bytes(record.input_audio) == AUDIO


@pytest.mark.node
async def test_openai_node_transcription_session(relay_factory, upstream, certificate, tmp_path):
    """`new OpenAIRealtimeWS({intent: 'transcription'})`: speech in, its words out."""
    relay = await relay_factory(tls_settings(upstream, certificate))
    speech = tmp_path / "speech.pcm"
    speech.write_bytes(spoken_pcm(tmp_path / "speech.wav", "hello world"))
    command = node_command("ws", f"https://127.0.0.1:{relay.port}/v1", str(speech))
    seen = await run_turn(command, certificate.certfile)

    assert seen["ok"], seen
    assert seen["url"] == f"wss://127.0.0.1:{relay.port}/v1/realtime?intent=transcription"
    assert "hello world" in seen["transcript"].lower()
    assert "response.created" not in seen["types"]
    assert seen["usage"]["total_tokens"] > 0
    assert upstream.connections[0].query == {"intent": "transcription"}


@pytest.mark.node
@pytest.mark.parametrize("client", ["websocket", "ws"])
async def test_openai_node_without_the_certificate_is_refused(
    relay_factory, upstream, certificate, client
):
    """Without NODE_EXTRA_CA_CERTS both clients refuse the self-signed certificate."""
    relay = await relay_factory(tls_settings(upstream, certificate))
    seen = await run_turn(node_command(client, f"https://127.0.0.1:{relay.port}/v1"), None)
    assert not seen["ok"] and seen["types"] == [], seen
    if client == "ws":  # the native WebSocket reports any failed handshake in the same words
        assert "self-signed certificate" in seen["error"], seen
    assert upstream.connections == []
