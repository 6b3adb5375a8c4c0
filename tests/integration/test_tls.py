"""Transport (issue 20): `stavily serve --tls-cert --tls-key` serves HTTPS; the reference
agent verifies the server's certificate (a private CA with --ca-cert) and refuses plain
HTTP off this machine; security headers on every answer; CORS off unless configured.

The HTTPS server is a real `stavily serve` process on SQLite only: TLS is the same
whatever the database. The plain-HTTP checks run on every backend."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stavily.agent.runner import TransportRefused, check_url, resolve_credentials, tls_verify
from stavily.cli.main import _check_tls
from stavily.security.credentials import StartRefused
from tests.e2e.support import (
    ADMIN_TOKEN,
    CLI,
    HEARTBEAT_INTERVAL,
    POLL_WAIT,
    Processes,
    base_env,
    wait_until,
    workflow,
    write_plugin,
)
from tests.harness import Orchestrator, free_port

ORIGIN = "https://console.example"
GREET = """
json.dump({"hello": config.get("who")}, sys.stdout)
"""
SECURITY = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


@dataclass
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey, password: bytes | None = None) -> bytes:
    encryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if issuer is None:  # the CA
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
        builder = builder.add_extension(usage, True)
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A throwaway CA and a certificate it signed for 127.0.0.1 and localhost."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key, server_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _certificate("Stavily test CA", ca_key, None, ca_key)
    server = _certificate("localhost", server_key, ca, ca_key)
    paths = Pki(
        folder / "ca.pem", folder / "server.pem", folder / "server.key", folder / "other.key"
    )
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(_key_pem(server_key))
    paths.other_key.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    return paths


@dataclass
class TlsServer:
    url: str
    ca: ssl.SSLContext
    api: httpx.Client
    processes: Processes


@pytest.fixture(scope="module")
def tls(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    """`stavily serve --tls-cert --tls-key` with one CORS origin allowed."""
    tmp = tmp_path_factory.mktemp("tls")
    processes = Processes(tmp / "logs")
    port = free_port()
    env = {
        **base_env(),
        "STAVILY_DATA_DIR": str(tmp / "data"),
        "STAVILY_BOOTSTRAP_TOKEN": ADMIN_TOKEN,
        "STAVILY_UNREGISTERED_PLUGINS": "allow",
        "STAVILY_CORS_ORIGINS": json.dumps([ORIGIN]),
    }
    args = [*CLI, "serve", "--port", str(port), "--tls-cert", str(pki.cert)]
    server = processes.start("serve", [*args, "--tls-key", str(pki.key)], env)
    url = f"https://127.0.0.1:{port}"
    ca = ssl.create_default_context(cafile=pki.ca)
    api = httpx.Client(
        base_url=url, verify=ca, timeout=15, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    )

    def healthy() -> bool:
        assert server.running, processes.report()
        try:
            return api.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(healthy, 30, "the TLS server to answer")
        yield TlsServer(url, ca, api, processes)
    finally:
        api.close()
        processes.close()


def _run(processes: list[subprocess.Popen[str]]) -> list[tuple[int, list[str]]]:
    """Exit status and standard error lines of each process, run side by side."""
    errors = [p.communicate(timeout=60)[1] for p in processes]
    return [(p.returncode, e.strip().splitlines()) for p, e in zip(processes, errors, strict=True)]


def _start(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*CLI, *args],
        env={**base_env(), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


# -- serving HTTPS -------------------------------------------------------------------------


def test_https_verifies_with_the_ca_only(tls: TlsServer) -> None:
    answer = tls.api.get("/healthz")
    assert answer.status_code == 200 and answer.url.scheme == "https"
    assert answer.headers["strict-transport-security"] == "max-age=31536000"
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls.url}/healthz", timeout=5)  # the public CAs: not ours
    with pytest.raises(httpx.HTTPError):
        httpx.get(tls.url.replace("https:", "http:") + "/healthz", timeout=5)


def test_security_headers_on_every_answer(tls: TlsServer) -> None:
    anonymous = httpx.Client(base_url=tls.url, verify=tls.ca, timeout=15)
    answers = {
        "ok": tls.api.get("/api/v1/agents"),
        "health": anonymous.get("/healthz"),
        "missing": tls.api.get(f"/api/v1/workflows/nope-{uuid.uuid4().hex[:8]}"),
        "unauthenticated": anonymous.get("/api/v1/agents"),
        "agent": anonymous.post("/agents/v1/nobody/heartbeat", json={"status": "online"}),
        "hook": anonymous.post("/hooks/nope", json={}),
    }
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {
        "ok": 200,
        "health": 200,
        "missing": 404,
        "unauthenticated": 401,
        "agent": 401,
        "hook": 404,
    }
    for name, answer in answers.items():
        headers = answer.headers
        assert {k: headers.get(k) for k in SECURITY} == SECURITY, name
        assert headers["cache-control"] == "no-store", name
        assert headers["content-security-policy"].startswith("default-src 'none';"), name
        assert "frame-ancestors 'none'" in headers["content-security-policy"], name
        assert headers["strict-transport-security"] == "max-age=31536000", name
        assert answer.json()  # the headers did not spoil the body
    page = anonymous.get("/api/v1/docs")
    policy = page.headers["content-security-policy"]
    assert page.status_code == 200 and "script-src 'self' 'unsafe-inline'" in policy
    assert "connect-src 'self'" in policy and page.headers["x-frame-options"] == "DENY"
    script = anonymous.get("/api/v1/docs/static/swagger-ui-bundle.js")
    assert script.status_code == 200 and "no-store" not in script.headers.get("cache-control", "")
    assert script.headers["x-content-type-options"] == "nosniff"
    anonymous.close()


def test_cors_only_for_the_configured_origin(tls: TlsServer) -> None:
    anonymous = httpx.Client(base_url=tls.url, verify=tls.ca, timeout=15)
    ask = {
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization",
    }
    allowed = anonymous.options("/api/v1/agents", headers={"Origin": ORIGIN, **ask})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert "access-control-allow-credentials" not in allowed.headers  # no cookies cross
    listed = tls.api.get("/api/v1/agents", headers={"Origin": ORIGIN})
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == ORIGIN

    other = "https://elsewhere.example"
    refused = anonymous.options("/api/v1/agents", headers={"Origin": other, **ask})
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    assert refused.json()["error"]["code"] == "bad_request"
    assert refused.headers["x-content-type-options"] == "nosniff"
    listed = tls.api.get("/api/v1/agents", headers={"Origin": other})
    assert listed.status_code == 200 and "access-control-allow-origin" not in listed.headers
    # the agent API is never for browsers
    beat = anonymous.options("/agents/v1/a/heartbeat", headers={"Origin": ORIGIN, **ask})
    assert "access-control-allow-origin" not in beat.headers
    anonymous.close()


def test_plain_http_has_the_headers_without_hsts_and_no_cors(orchestrator: Orchestrator) -> None:
    admin = orchestrator.api  # the first client the orchestrator makes
    client = orchestrator.client()
    ask = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    answers = [
        admin.get("/api/v1/agents", headers={"Origin": ORIGIN}),
        client.get("/api/v1/agents"),
        client.options("/api/v1/agents", headers=ask),
    ]
    assert [a.status_code for a in answers[:2]] == [200, 401]
    assert answers[2].status_code >= 400
    for answer in answers:
        assert {k: answer.headers.get(k) for k in SECURITY} == SECURITY
        assert "strict-transport-security" not in answer.headers
        assert not [k for k in answer.headers if k.startswith("access-control-")]
    # Behind a TLS proxy that uvicorn trusts (loopback by default), HTTPS is what it says.
    proxied = client.get("/healthz", headers={"X-Forwarded-Proto": "https"})
    assert proxied.headers["strict-transport-security"] == "max-age=31536000"


# -- the reference agent -------------------------------------------------------------------


def test_an_agent_with_the_ca_enrolls_and_runs_over_https(
    tls: TlsServer, pki: Pki, tmp_path: Path
) -> None:
    created = tls.api.post("/api/v1/enrollment-tokens", json={"name": "tls"})
    assert created.status_code == 201, created.text
    token = created.json()["token"]
    name = f"tls-{uuid.uuid4().hex[:8]}"
    plugins = tmp_path / "plugins"
    write_plugin(plugins, "greet", GREET)
    options = ["--url", tls.url, "--enroll", token, "--name", name, "--plugins-dir", str(plugins)]
    # Without the CA, enrolling fails at once, and says why.
    untrusted = _start(
        ["agent", "run", *options, "--credentials-file", str(tmp_path / "untrusted.json")]
    )
    agent = tls.processes.start(
        "agent",
        [
            *CLI,
            "agent",
            "run",
            *options,
            "--ca-cert",
            str(pki.ca),
            "--heartbeat-interval",
            HEARTBEAT_INTERVAL,
            "--poll-wait",
            POLL_WAIT,
        ],
        base_env(),
    )
    try:
        [(status, lines)] = _run([untrusted])
        assert status == 1
        assert lines[-1].startswith(f"error: cannot enroll at {tls.url}: its certificate")
        assert "--ca-cert" in lines[-1]

        credentials = tmp_path / "agent-credentials.json"
        wait_until(credentials.exists, 20, "the agent to enroll over HTTPS")
        definition = workflow("tls-greeting", name, [{"name": "greet", "plugin": "greet"}])
        applied = tls.api.post(
            "/api/v1/workflows",
            content=yaml.safe_dump(definition),
            headers={"Content-Type": "application/yaml"},
        )
        assert applied.status_code == 201, applied.text
        started = tls.api.post("/api/v1/workflows/tls-greeting/runs", json={"inputs": {}})
        assert started.status_code == 201, started.text

        def finished() -> dict | None:
            execution = tls.api.get(f"/api/v1/executions/{started.json()['id']}").json()
            return execution if execution["status"] != "running" else None

        done = wait_until(finished, 20, "the execution over HTTPS")
        assert done["status"] == "succeeded", tls.processes.report()
        assert done["steps"][0]["result"] == {"hello": None}
    finally:
        if untrusted.poll() is None:
            untrusted.kill()
            untrusted.communicate()
        tls.processes.stop(agent)


def test_the_agent_refuses_plain_http_off_this_machine(tmp_path: Path) -> None:
    credentials = tmp_path / "agent.json"
    enroll = ["agent", "run", "--url", "http://192.0.2.10:8700", "--enroll", "stve_x"]
    [(status, lines)] = _run([_start([*enroll, "--credentials-file", str(credentials)])])
    assert status == 2
    assert lines == [
        "error: refusing plain HTTP to 192.0.2.10: the agent's credential would cross the "
        "network in clear; use https:// (or --allow-insecure-http)"
    ]
    assert list(tmp_path.iterdir()) == []  # refused before anything, the enrollment too

    def resolve(url: str, allow: bool = False) -> str:
        found = resolve_credentials(
            url=url,
            agent_id="a",
            token="t",
            enroll=None,
            name=None,
            labels={},
            path=credentials,
            allow_insecure_http=allow,
        )
        return asyncio.run(found).url

    with pytest.raises(TransportRefused, match="refusing plain HTTP to example.com"):
        resolve("http://example.com:8700")
    assert resolve("http://example.com:8700", allow=True) == "http://example.com:8700"
    for url in ("http://127.0.0.1:8700", "http://127.8.9.1", "http://[::1]:1", "http://localhost"):
        check_url(url)
    check_url("https://example.com")
    with pytest.raises(TransportRefused, match="is not an https:// URL"):
        check_url("example.com:8700")
    with pytest.raises(TransportRefused, match="cannot read the CA file"):
        tls_verify(tmp_path / "missing.pem")
    (tmp_path / "empty.pem").write_text("nothing\n")
    with pytest.raises(TransportRefused, match="holds no PEM certificate"):
        tls_verify(tmp_path / "empty.pem")


# -- bad certificates and keys ---------------------------------------------------------------


def test_serve_refuses_bad_tls_files_in_one_line(pki: Pki, tmp_path: Path) -> None:
    env = {"STAVILY_DATA_DIR": str(tmp_path / "data"), "STAVILY_TLS_KEY": str(pki.other_key)}
    args = ["serve", "--port", str(free_port()), "--tls-cert", str(pki.cert)]
    assert _run([_start(args, env)]) == [
        (2, [f"error: the TLS key {pki.other_key} is not the key of the certificate {pki.cert}"])
    ]
    assert not (tmp_path / "data").exists()  # refused before anything started

    # The same check, each other refusal (`serve` prints any of them as above).
    missing = tmp_path / "missing.pem"

    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1()), b"secret"))
    refusals = {
        "missing": (missing, pki.key, f"cannot read the TLS certificate {missing}: No such"),
        "missing key": (pki.cert, missing, f"cannot read the TLS key {missing}: No such"),
        "not PEM": (pki.key, pki.key, "is not a PEM certificate"),
        "no key": (pki.cert, pki.cert, "is not a PEM private key"),
        "encrypted": (pki.cert, encrypted, "is encrypted: give it unencrypted"),
        "cert only": (pki.cert, None, "--tls-cert and --tls-key .* go together"),
        "key only": (None, pki.key, "--tls-cert and --tls-key .* go together"),
    }
    for cert, key, message in refusals.values():
        with pytest.raises(StartRefused, match=message):
            _check_tls(cert, key)
    _check_tls(pki.cert, pki.key)
    _check_tls(None, None)
