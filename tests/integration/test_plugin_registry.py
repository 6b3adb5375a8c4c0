"""The plugin registry over real HTTP, on each database: publishing from git and from
archives (reproducible, immutable, signed, scanned), versions and their states, what
agents fetch, and every bad input refused with nothing half-written."""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stavily.plugins.signing import Keyring, canonical, verify
from tests.harness import Orchestrator, SimAgent, api_token, fresh_database, serve
from tests.plugin_fixtures import (
    archive,
    git_repo,
    make_plugin,
    publish,
    published,
    unique,
)


@pytest.fixture(scope="module")
def orch(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp = tmp_path_factory.mktemp(f"registry-{backend}")
    with (
        fresh_database(backend, tmp) as url,
        serve(
            url,
            tmp / "data",
            unregistered_plugins="refuse",
            plugin_source_roots=[tmp],
            plugin_max_file_bytes=64 * 1024,
        ) as running,
    ):
        yield running


def _problems(response: httpx.Response, status: int = 422) -> list[dict[str, str]]:
    assert response.status_code == status, response.text
    return response.json()["error"]["details"]  # type: ignore[no-any-return]


def _versions(orch: Orchestrator, plugin_id: str) -> httpx.Response:
    return orch.api.get(f"/api/v1/plugins/{plugin_id}")


# -- publishing ------------------------------------------------------------------------------


def test_a_git_tag_branch_or_commit_publishes_the_same_artifact_as_its_folder(
    orch: Orchestrator, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = Path(orch.settings.plugin_source_roots[0])
    plugin_id = unique("git")
    repo = make_plugin(root / plugin_id, plugin_id, layout="flat")
    commit = git_repo(repo, tag="v1.0.0")
    first = orch.api.post("/api/v1/plugins", json={"source": str(repo), "ref": "v1.0.0"})
    assert first.status_code == 201, first.text
    version = first.json()
    assert version["created"] is True
    assert version["source"] == {
        "kind": "git",
        "repository_url": str(repo),
        "ref": "v1.0.0",
        "ref_kind": "tag",
        "commit": commit,
    }
    # The same content from a branch, a commit, and as an archive: one sha256, no-ops.
    for body in ({"source": str(repo), "ref": "main"}, {"source": str(repo), "ref": commit}):
        again = orch.api.post("/api/v1/plugins", json=body)
        assert again.status_code == 200, again.text
        assert (again.json()["sha256"], again.json()["created"]) == (version["sha256"], False)
    assert publish(orch.api, repo).json()["sha256"] == version["sha256"]
    listed = _versions(orch, plugin_id).json()
    assert listed["latest"] == "1.0.0"
    assert listed["versions"] == [{"version": "1.0.0", "status": "active"}]


def test_the_same_version_with_other_content_is_a_conflict(
    orch: Orchestrator, tmp_path: Path
) -> None:
    plugin_id = unique("conflict")
    folder = make_plugin(tmp_path / "p", plugin_id)
    sha = published(orch.api, folder)["sha256"]
    (folder / "extra.txt").write_text("changed")
    refused = publish(orch.api, folder)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["details"]["published_sha256"] == sha
    assert "publish a new version" in refused.json()["error"]["message"]
    version = orch.api.get(f"/api/v1/plugins/{plugin_id}/versions/1.0.0").json()
    assert version["sha256"] == sha  # unchanged


def test_the_same_version_published_at_once_is_one_version(
    orch: Orchestrator, tmp_path: Path
) -> None:
    """Concurrent publishes of the same content: one creates the version, the others
    answer with it (never a 500, whether or not the first has committed yet)."""
    plugin_id = unique("raced")
    folder = make_plugin(tmp_path / "p", plugin_id)
    clients = [orch.client(orch.token) for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda client: publish(client, folder), clients))
    assert sorted(a.status_code for a in answers) == [200, 200, 200, 201], [a.text for a in answers]
    assert len({a.json()["sha256"] for a in answers}) == 1
    listed = _versions(orch, plugin_id).json()["versions"]
    assert [v["version"] for v in listed] == ["1.0.0"]


def test_each_version_is_signed_with_a_published_key(orch: Orchestrator, tmp_path: Path) -> None:
    plugin_id = unique("signed")
    version = published(orch.api, make_plugin(tmp_path / "p", plugin_id))
    keys = {k["key_id"]: k for k in orch.api.get("/api/v1/plugins/keys").json()["keys"]}
    key = keys[version["key_id"]]
    assert key["signing"] is True and key["algorithm"] == "ed25519"
    signed = version["signed"]
    assert set(signed) == {"id", "version", "sha256", "size", "created"}
    assert (signed["id"], signed["sha256"]) == (plugin_id, version["sha256"])
    public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key["public_key"]))
    public.verify(base64.b64decode(version["signature"]), canonical(signed))  # raises if not
    # and no signing key in the database or the API: only in the key folder, mode 0600
    folder = orch.settings.plugin_keys_path
    private = list(folder.glob("*.key"))
    assert private and all(os.stat(p).st_mode & 0o077 == 0 for p in private)


def test_deprecate_yank_and_restore(orch: Orchestrator, tmp_path: Path) -> None:
    plugin_id = unique("states")
    for version in ("1.0.0", "1.1.0"):
        published(orch.api, make_plugin(tmp_path / version, plugin_id, version=version))
    base = f"/api/v1/plugins/{plugin_id}/versions"
    yanked = orch.api.post(f"{base}/1.1.0/yank", json={"reason": "broken"})
    assert yanked.status_code == 200, yanked.text
    assert (yanked.json()["status"], yanked.json()["status_reason"]) == ("yanked", "broken")
    assert _versions(orch, plugin_id).json()["latest"] == "1.0.0"
    assert orch.api.post(f"{base}/1.0.0/deprecate").json()["status"] == "deprecated"
    assert _versions(orch, plugin_id).json()["latest"] is None
    assert orch.api.post(f"{base}/1.1.0/restore").json()["status"] == "active"
    assert _versions(orch, plugin_id).json()["latest"] == "1.1.0"
    assert orch.api.post(f"{base}/9.9.9/yank").status_code == 404
    viewer = api_token(orch, "viewer")
    refused = orch.client(viewer).post(f"{base}/1.0.0/yank")
    assert refused.status_code == 403, refused.text


# -- bad input: each refused with every problem, nothing written -------------------------------


@pytest.mark.parametrize(
    ("manifest", "paths"),
    [
        (
            {"version": "1.0", "type": "sensor", "runtime": {"type": "cobol", "entry_point": ""}},
            {"version", "type", "runtime.type", "runtime.entry_point"},
        ),
        (
            {"configuration": {"level": {"type": "float"}}, "limits": {"memory": "lots"}},
            {"configuration.level.type", "limits.memory"},
        ),
        (
            {"permissions": {"network": "yes", "capabilities": "all"}},
            {"permissions.network", "permissions.capabilities"},
        ),
    ],
)
def test_a_malformed_manifest_is_refused_with_every_problem(
    orch: Orchestrator, tmp_path: Path, manifest: dict[str, Any], paths: set[str]
) -> None:
    plugin_id = unique("bad")
    folder = make_plugin(tmp_path / "p", plugin_id, **manifest)
    problems = _problems(publish(orch.api, folder))
    assert {p["path"] for p in problems} == paths
    assert _versions(orch, plugin_id).status_code == 404


def test_the_scan_refuses_links_big_files_and_denied_permissions(
    orch: Orchestrator, tmp_path: Path
) -> None:
    plugin_id = unique("scan")
    folder = make_plugin(
        Path(orch.settings.plugin_source_roots[0]) / plugin_id,
        plugin_id,
        permissions={
            "filesystem": {"write": ["/etc/cron.d", "/tmp/out"]},
            "capabilities": ["CAP_SYS_ADMIN"],
        },
    )
    (folder / "passwd").symlink_to("/etc/passwd")
    (folder / "big.bin").write_bytes(b"\0" * (65 * 1024))
    problems = _problems(orch.api.post("/api/v1/plugins", json={"source": str(folder)}))
    messages = {p["path"]: p["message"] for p in problems}
    assert "outside the plugin's folder" in messages["passwd"]
    assert "a file has at most 65536" in messages["big.bin"]
    assert "under '/etc'" in messages["permissions.filesystem.write[0]"]
    assert "CAP_SYS_ADMIN" in messages["permissions.capabilities[0]"]
    assert len(messages) == 4  # /tmp/out is allowed
    assert _versions(orch, plugin_id).status_code == 404


def test_archives_that_escape_or_are_corrupt_are_refused(
    orch: Orchestrator, tmp_path: Path
) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("../evil.py", "/abs.py"):
            data = b"x"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    problems = _problems(
        orch.api.post(
            "/api/v1/plugins",
            content=buffer.getvalue(),
            headers={"Content-Type": "application/gzip"},
        )
    )
    assert {p["path"] for p in problems} == {"../evil.py", "/abs.py", "link"}
    assert not (tmp_path.parent / "evil.py").exists()
    whole = archive(make_plugin(tmp_path / "p", unique("cut")))
    for body in (b"not an archive", whole[: len(whole) // 2]):
        problems = _problems(
            orch.api.post(
                "/api/v1/plugins", content=body, headers={"Content-Type": "application/gzip"}
            )
        )
        assert problems[0]["path"] == "(archive)"
    empty = orch.api.post(
        "/api/v1/plugins", content=b"", headers={"Content-Type": "application/gzip"}
    )
    assert _problems(empty)[0]["path"] == "(body)"
    assert (
        orch.api.post(
            "/api/v1/plugins", content=b"x", headers={"Content-Type": "text/plain"}
        ).status_code
        == 415
    )


def test_sources_that_do_not_exist_or_are_not_allowed(orch: Orchestrator, tmp_path: Path) -> None:
    root = Path(orch.settings.plugin_source_roots[0])
    plugin_id = unique("src")
    repo = make_plugin(root / plugin_id, plugin_id)
    git_repo(repo)
    cases = [
        ({"source": str(repo), "ref": "no-such-tag"}, "cannot fetch 'no-such-tag'"),
        ({"source": str(repo), "ref": "0" * 40}, "cannot check out"),
        ({"source": str(root / "missing")}, "does not exist"),
        ({"source": str(tmp_path)}, "no plugin source root holds it"),
        ({"source": "ftp://example.com/x.git"}, "not a git URL"),
        ({"source": str(repo), "ref": "../../etc"}, "not a branch, tag or commit"),
        ({"source": str(repo), "sub_directory": "../x"}, "inside the repository"),
        ({"source": "http://127.0.0.1:9/none.git"}, "cannot fetch"),
    ]
    for body, message in cases:
        problems = _problems(orch.api.post("/api/v1/plugins", json=body))
        assert message in problems[0]["message"], (body, problems)
    assert orch.api.post("/api/v1/plugins", json={"source": 3}).status_code == 422
    assert _versions(orch, plugin_id).status_code == 404


def test_a_sub_directory_that_links_out_of_the_repository_is_refused(
    orch: Orchestrator,
) -> None:
    root = Path(orch.settings.plugin_source_roots[0])
    plugin_id = unique("linked")
    outside = make_plugin(root / f"{plugin_id}-outside", plugin_id)  # not in the repository
    repo = root / f"{plugin_id}-repo"
    repo.mkdir()
    (repo / "README").write_text("a repository whose plugin folder is a link\n")
    (repo / "plugin").symlink_to(outside)
    git_repo(repo, tag="v1.0.0")
    body = {"source": str(repo), "ref": "v1.0.0", "sub_directory": "plugin"}
    problems = _problems(orch.api.post("/api/v1/plugins", json=body))
    assert problems == [
        {"path": "sub_directory", "message": "'plugin' leads out of the repository (a link)"}
    ]
    assert _versions(orch, plugin_id).status_code == 404


def test_the_protocol_is_read_from_the_manifest_or_the_folder(
    orch: Orchestrator, tmp_path: Path
) -> None:
    cases = {
        "input": 'import sys\nif "--input" in sys.argv: pass\n',
        "stdin": "import sys\nfor line in sys.stdin: pass\n",
        "flags": "import argparse\np = argparse.ArgumentParser()\np.add_argument('--x')\n",
    }
    for protocol, code in cases.items():
        plugin_id = unique(protocol)
        version = published(orch.api, make_plugin(tmp_path / plugin_id, plugin_id, code=code))
        assert version["protocol"] == protocol
    silent = make_plugin(tmp_path / "silent", unique("silent"), code="print('{}')\n")
    problems = _problems(publish(orch.api, silent))
    assert problems[0]["path"] == "protocol"
    declared = make_plugin(
        tmp_path / "declared", unique("declared"), code="print('{}')\n", protocol="flags"
    )
    assert published(orch.api, declared)["protocol"] == "flags"


# -- what agents fetch -------------------------------------------------------------------------


def test_agents_fetch_the_signed_manifest_and_the_artifact_with_etag_and_range(
    orch: Orchestrator, tmp_path: Path
) -> None:
    plugin_id = unique("fetch")
    folder = make_plugin(tmp_path / "p", plugin_id)
    (folder / "data.bin").write_bytes(os.urandom(50_000))
    version = published(orch.api, folder)
    agent = SimAgent(orch)
    base = f"/agents/v1/{agent.id}/plugins/{plugin_id}/1.0.0"
    signed = agent.client.get(base).json()
    assert signed["manifest"] == version["signed"]
    assert signed["signature"] == version["signature"]
    whole = agent.client.get(f"{base}/artifact")
    assert whole.status_code == 200
    assert whole.headers["etag"] == f'"{version["sha256"]}"'
    assert hashlib.sha256(whole.content).hexdigest() == version["sha256"]
    assert len(whole.content) == version["size"]
    again = agent.client.get(f"{base}/artifact", headers={"If-None-Match": whole.headers["etag"]})
    assert (again.status_code, again.content) == (304, b"")
    part = agent.client.get(f"{base}/artifact", headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == whole.content[100:200]
    assert part.headers["content-range"] == f"bytes 100-199/{version['size']}"
    tail = agent.client.get(f"{base}/artifact", headers={"Range": "bytes=-10"})
    assert tail.content == whole.content[-10:]
    past = agent.client.get(f"{base}/artifact", headers={"Range": f"bytes={version['size']}-"})
    assert past.status_code == 416 and past.json()["error"]["code"] == "range_not_satisfiable"
    other = SimAgent(orch)
    assert other.client.get(base).status_code == 403  # another agent's path
    assert agent.client.get(f"/agents/v1/{agent.id}/plugins/{plugin_id}/9.0.0").status_code == 404
    assert agent.client.get(f"/agents/v1/{agent.id}/plugins/Bad_Id/1.0.0").status_code == 422
    keys = agent.client.get(f"/agents/v1/{agent.id}/plugins/keys").json()["keys"]
    assert version["key_id"] in {k["key_id"] for k in keys}


def test_the_database_store_serves_the_same_artifact(backend: str, tmp_path: Path) -> None:
    with (
        fresh_database(backend, tmp_path) as url,
        serve(url, tmp_path / "data", plugin_store="database") as orch,
    ):
        folder = make_plugin(tmp_path / "p", "stored")
        (folder / "data.bin").write_bytes(os.urandom(700_000))  # three rows of 256 KiB
        version = published(orch.api, folder)
        assert not (tmp_path / "data" / "plugins").exists()
        agent = SimAgent(orch)
        base = f"/agents/v1/{agent.id}/plugins/stored/1.0.0/artifact"
        whole = agent.client.get(base).content
        assert hashlib.sha256(whole).hexdigest() == version["sha256"]
        span = (256 * 1024 - 5, 512 * 1024 + 5)  # across rows
        part = agent.client.get(base, headers={"Range": f"bytes={span[0]}-{span[1]}"})
        assert part.content == whole[span[0] : span[1] + 1]


def test_a_rotated_key_signs_new_versions_and_old_signatures_still_verify(
    orch: Orchestrator, tmp_path: Path
) -> None:
    old = published(orch.api, make_plugin(tmp_path / "a", unique("rot")))
    new_key = Keyring(orch.settings.plugin_keys_path).rotate()  # what `plugin rotate-key` does
    new = published(orch.api, make_plugin(tmp_path / "b", unique("rot")))
    assert (new["key_id"], old["key_id"] != new_key) == (new_key, True)
    keys = {k["key_id"]: k for k in orch.api.get("/api/v1/plugins/keys").json()["keys"]}
    assert keys[new_key]["signing"] and not keys[old["key_id"]]["signing"]
    for version in (old, new):
        assert verify(
            keys[version["key_id"]]["public_key"], version["signed"], version["signature"]
        )
