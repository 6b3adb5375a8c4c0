"""The API docs pages (Swagger UI at /api/v1/docs, ReDoc at /api/v1/redoc) load every
script, style and icon from this server, so they work offline and air-gapped."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from urllib.parse import urljoin, urlsplit

import pytest

from stavily.app import DOCS_STATIC_DIR
from tests.harness import Orchestrator, fresh_database, serve

OPENAPI_URL = "/api/v1/openapi.json"
# Any absolute or protocol-relative URL in the page: all of the page's references must be
# paths on this server.
ABSOLUTE = re.compile(r"(?:https?:)?//[a-z0-9.-]+", re.IGNORECASE)
REFERENCE = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", re.IGNORECASE)
CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
}


@pytest.fixture(scope="module")
def orchestrator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    """SQLite only: the pages and their files are the same whatever the database."""
    tmp = tmp_path_factory.mktemp("docs")
    with fresh_database("sqlite", tmp) as url, serve(url, tmp) as running:
        yield running


def page(orchestrator: Orchestrator, path: str) -> tuple[str, list[str]]:
    """The HTML at `path`, fetched without a credential, and the URLs it references."""
    response = orchestrator.client().get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/html")
    html = response.text
    assert not ABSOLUTE.findall(html), ABSOLUTE.findall(html)
    for host in ("cdn.jsdelivr.net", "unpkg.com", "fonts.googleapis.com", "tiangolo.com"):
        assert host not in html
    return html, REFERENCE.findall(html)


def assert_assets(orchestrator: Orchestrator, path: str, references: list[str]) -> None:
    client = orchestrator.client()
    for reference in references:
        url = urljoin(orchestrator.url + path, reference)
        assert urlsplit(url).netloc == urlsplit(orchestrator.url).netloc, reference
        response = client.get(url)
        assert response.status_code == 200, (reference, response.status_code)
        suffix = reference[reference.rfind(".") :]
        kinds = CONTENT_TYPES[suffix]
        assert response.headers["content-type"].split(";")[0] in kinds, response.headers
        assert len(response.content) > (1000 if suffix == ".png" else 10_000), reference


def raw_get(orchestrator: Orchestrator, target: str) -> tuple[int, bytes]:
    """GET `target` exactly as written (an HTTP client would resolve `..` first)."""
    parts = urlsplit(orchestrator.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n\r\n".encode()
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def test_swagger_ui_loads_only_local_assets(orchestrator: Orchestrator) -> None:
    html, references = page(orchestrator, "/api/v1/docs")
    scripts = [r for r in references if r.endswith(".js")]
    styles = [r for r in references if r.endswith(".css")]
    assert scripts == ["/api/v1/docs/static/swagger-ui-bundle.js"]
    assert styles == ["/api/v1/docs/static/swagger-ui.css"]
    assert_assets(orchestrator, "/api/v1/docs", references)
    # still the OpenAPI document, the Authorize button's token kept across reloads, and
    # no validator badge (it would send the document's URL to validator.swagger.io)
    assert f"url: '{OPENAPI_URL}'" in html
    assert '"persistAuthorization": true' in html
    assert '"validatorUrl": null' in html
    assert "oauth2RedirectUrl" not in html


def test_redoc_loads_only_local_assets(orchestrator: Orchestrator) -> None:
    html, references = page(orchestrator, "/api/v1/redoc")
    assert [r for r in references if r.endswith(".js")] == [
        "/api/v1/docs/static/redoc.standalone.js"
    ]
    assert_assets(orchestrator, "/api/v1/redoc", references)
    assert f'spec-url="{OPENAPI_URL}"' in html


def test_openapi_document_keeps_its_bearer_schemes(orchestrator: Orchestrator) -> None:
    """What Swagger UI's Authorize button offers; the docs routes stay out of it."""
    document = orchestrator.api.get(OPENAPI_URL)
    assert document.status_code == 200, document.text
    schemes = document.json()["components"]["securitySchemes"]
    assert schemes and all(
        s["type"] == "http" and s["scheme"] == "bearer" for s in schemes.values()
    )
    paths = document.json()["paths"]
    assert not [p for p in paths if "docs" in p or "redoc" in p]


def test_assets_are_the_packaged_files(orchestrator: Orchestrator) -> None:
    client = orchestrator.client()
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        response = client.get(f"/api/v1/docs/static/{name}")
        assert response.status_code == 200
        assert response.content == (DOCS_STATIC_DIR / name).read_bytes()
        head = client.head(f"/api/v1/docs/static/{name}")
        assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/docs/static/../../etc/passwd",
        "/api/v1/docs/static/../../../../../../etc/passwd",
        "/api/v1/docs/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/api/v1/docs/static/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/api/v1/docs/static/%2fetc%2fpasswd",
        "/api/v1/docs/static//etc/passwd",
        "/api/v1/docs/static/../../../../../../proc/self/environ",
        "/api/v1/docs/static/..%5c..%5c..%5c..%5cetc%5cpasswd",
        "/api/v1/docs/static/",
        "/api/v1/docs/static/missing.js",
        "/api/v1/docs/static/swagger-ui.css/x",
    ],
)
def test_no_file_outside_the_assets(orchestrator: Orchestrator, target: str) -> None:
    status, body = raw_get(orchestrator, target)
    assert status == 404, (target, status, body[:200])
    assert b"root:" not in body and b"PATH=" not in body
    assert b'"not_found"' in body  # the API's one error shape


def test_docs_need_no_credential_and_ignore_a_bad_one(orchestrator: Orchestrator) -> None:
    for token in (None, "stv_not_a_real_token"):
        client = orchestrator.client(token)
        for path in ("/api/v1/docs", "/api/v1/redoc", "/api/v1/docs/static/swagger-ui.css"):
            assert client.get(path).status_code == 200, (token, path)


def test_no_other_docs_routes(orchestrator: Orchestrator) -> None:
    """FastAPI's own docs routes (and its OAuth2 redirect page: the document has no
    OAuth2 scheme) are not served beside ours."""
    client = orchestrator.client()
    for path in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert client.get(path).status_code == 404, path
