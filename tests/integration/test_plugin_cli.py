"""`stavily plugin ...` in-process against a real orchestrator on loopback, on each
database: publishing real folders (uploaded) and real git repositories (fetched by the
server, at a tag), reading, status changes, keys, and following a rollout."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import Result

from stavily.api import plugins as plugin_api
from stavily.cli.plugins import is_git_url, split_ref
from tests.harness import Invoke, Orchestrator, SimAgent, fresh_database, serve

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
HAS_ROLLOUTS = any("rollouts" in getattr(r, "path", "") for r in plugin_api.private.routes)


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this module's git repositories live: the server may publish from here."""
    return tmp_path_factory.mktemp("plugin-sources")


@pytest.fixture(scope="module")
def backend() -> str:
    """SQLite only: what is under test is the CLI (its words, exit codes, packing); the
    routes it calls run on both databases in test_plugin_registry and test_plugin_workflows."""
    return "sqlite"


@pytest.fixture(scope="module")
def orchestrator(
    backend: str, sources: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Orchestrator]:
    """The module's orchestrator (the `cli` fixture's), allowed to publish from `sources`."""
    tmp = tmp_path_factory.mktemp(f"plugin-orch-{backend}")
    with (
        fresh_database(backend, tmp) as url,
        serve(url, tmp, plugin_source_roots=[sources]) as running,
    ):
        yield running


def _id() -> str:
    return f"p-{uuid.uuid4().hex[:8]}"


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _problems(result: Result) -> list[str]:
    """The detail lines (`path: message`) printed under an error."""
    return [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]


def make_plugin(
    folder: Path, plugin_id: str, version: str = "1.0.0", body: str = "print('hello')\n"
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {
        "id": plugin_id,
        "name": plugin_id,
        "description": "a CLI test plugin",
        "version": version,
        "type": "action",
        "protocol": "input",
        "runtime": {"type": "python", "entry_point": "main.py"},
    }
    (folder / "plugin.yaml").write_text(yaml.safe_dump({"plugin": manifest}))
    (folder / "main.py").write_text(body)
    return folder


def git(repo: Path, *args: str) -> str:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(repo),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_AUTHOR_NAME": "test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }
    done = subprocess.run(
        ["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


# --- git URLs and their refs (no server) ----------------------------------------------------


@pytest.mark.parametrize(
    ("given", "url", "ref"),
    [
        ("git@github.com:org/repo.git@v1.2.0", "git@github.com:org/repo.git", "v1.2.0"),
        ("git@github.com:org/repo.git", "git@github.com:org/repo.git", None),
        ("https://x/y.git", "https://x/y.git", None),
        ("https://x/y.git@main", "https://x/y.git", "main"),
        ("https://user@host/y.git", "https://user@host/y.git", None),
        ("https://user@host/y.git@feature/a", "https://user@host/y.git", "feature/a"),
        ("ssh://git@host:22/org/repo@abc1234", "ssh://git@host:22/org/repo", "abc1234"),
        ("git://host/repo", "git://host/repo", None),
        ("file:///srv/plugins/echo@v1", "file:///srv/plugins/echo", "v1"),
        ("https://host", "https://host", None),
    ],
)
def test_git_url_and_ref(given: str, url: str, ref: str | None) -> None:
    assert is_git_url(given)
    assert split_ref(given) == (url, ref)


@pytest.mark.parametrize("path", ["./plugins/echo", "/srv/echo", "echo", "dir@v1/echo"])
def test_paths_are_not_git_urls(path: str) -> None:
    assert not is_git_url(path)


# --- publishing -----------------------------------------------------------------------------


def test_publish_a_folder_then_the_same_then_other_content(cli: Invoke, tmp_path: Path) -> None:
    plugin_id = _id()
    folder = make_plugin(tmp_path / "echo", plugin_id)

    first = cli("plugin", "publish", str(folder))
    assert first.exit_code == 0, first.output
    line = first.stdout.splitlines()[0]
    assert line.startswith(f"published {plugin_id} 1.0.0 (sha256 ") and line.endswith(")")
    sha256 = line.removeprefix(f"published {plugin_id} 1.0.0 (sha256 ").removesuffix(")")
    assert len(sha256) == 64

    # caches and version control are not part of a plugin: still the same content
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "main.cpython-312.pyc").write_bytes(b"\0compiled")
    (folder / ".git").mkdir()
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    again = cli("plugin", "publish", str(folder))
    assert again.exit_code == 0, again.output
    assert again.stdout.strip() == f"{plugin_id} 1.0.0 is already published with this content"
    scripted = _json(cli("plugin", "publish", str(folder), "-o", "json"))
    assert (scripted["created"], scripted["sha256"]) == (False, sha256)

    (folder / "main.py").write_text("print('changed')\n")
    changed = cli("plugin", "publish", str(folder))
    assert changed.exit_code == 4, changed.output
    assert changed.stderr.startswith(
        f"error: version 1.0.0 of '{plugin_id}' is published already with other content"
    )
    assert f"published_sha256: {sha256}" in _problems(changed)
    assert any(p.startswith("sha256: ") and sha256 not in p for p in _problems(changed))

    # a new version of it is published
    make_plugin(folder, plugin_id, "1.1.0", "print('changed')\n")
    newer = _json(cli("plugin", "publish", str(folder), "-o", "json"))
    assert (newer["created"], newer["version"], newer["source"]) == (
        True,
        "1.1.0",
        {"kind": "archive"},
    )


def test_publish_a_sub_directory(cli: Invoke, tmp_path: Path) -> None:
    plugin_id = _id()
    make_plugin(tmp_path / "repo" / "plugins" / "echo", plugin_id)
    published = cli("plugin", "publish", str(tmp_path / "repo"), "--sub-directory", "plugins/echo")
    assert published.exit_code == 0, published.output
    assert published.stdout.startswith(f"published {plugin_id} 1.0.0 (sha256 ")
    outside = cli("plugin", "publish", str(tmp_path / "repo"), "--sub-directory", "../x")
    assert outside.exit_code == 2 and "must be a folder inside" in outside.stderr
    missing = cli("plugin", "publish", str(tmp_path / "repo"), "--sub-directory", "nope")
    assert missing.exit_code == 2 and "'nope' is not a folder" in missing.stderr


def test_publish_a_git_url_at_a_tag(cli: Invoke, sources: Path) -> None:
    plugin_id = _id()
    repo = sources / plugin_id
    make_plugin(repo / "plugin", plugin_id, "1.0.0")
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "1.0.0")
    git(repo, "tag", "v1.0.0")
    tagged = git(repo, "rev-parse", "HEAD")
    make_plugin(repo / "plugin", plugin_id, "2.0.0", "print('two')\n")
    git(repo, "commit", "-q", "-am", "2.0.0")

    url = repo.as_uri()
    published = cli("plugin", "publish", f"{url}@v1.0.0", "--sub-directory", "plugin")
    assert published.exit_code == 0, published.output
    lines = published.stdout.splitlines()
    assert lines[0].startswith(f"published {plugin_id} 1.0.0 (sha256 ")
    assert lines[1].startswith(f"from {url} @ v1.0.0 (commit {tagged[:12]}), folder plugin;")

    shown = _json(cli("plugin", "show", plugin_id, "--version", "1.0.0", "-o", "json"))
    assert shown["source"] == {
        "kind": "git",
        "repository_url": url,
        "ref": "v1.0.0",
        "ref_kind": "tag",
        "commit": tagged,
        "sub_directory": "plugin",
    }
    # no ref: the default branch, whose plugin.yaml says 2.0.0
    latest = _json(cli("plugin", "publish", url, "--sub-directory", "plugin", "-o", "json"))
    assert (latest["version"], latest["source"]["ref"]) == ("2.0.0", None)

    unknown = cli("plugin", "publish", f"{url}@v9.9.9", "--sub-directory", "plugin")
    assert unknown.exit_code == 2, unknown.output
    assert unknown.stderr.startswith("error: the plugin's source was refused")
    assert any(p.startswith("source: cannot fetch 'v9.9.9'") for p in _problems(unknown))


def test_an_invalid_plugin_lists_every_problem(cli: Invoke, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "plugin.yaml").write_text(
        yaml.safe_dump(
            {"id": "Bad_Id", "version": "one", "type": "robot", "runtime": {"type": "python"}}
        )
    )
    refused = cli("plugin", "publish", str(folder))
    assert refused.exit_code == 2, refused.output
    assert refused.stderr.startswith("error: invalid plugin manifest\n")
    paths = {p.split(":")[0] for p in _problems(refused)}
    assert {"id", "version", "type", "runtime.entry_point"} <= paths
    assert "version: 'one' is not a semantic version such as '1.2.0'" in _problems(refused)

    scripted = cli("plugin", "publish", str(folder), "-o", "json")
    assert scripted.exit_code == 2
    details = json.loads(scripted.stderr)["error"]["details"]
    assert {d["path"] for d in details} >= {"id", "version", "type", "runtime.entry_point"}

    # what the server's scan finds, each with its path
    linked = make_plugin(tmp_path / "linked", _id())
    (linked / "data").mkdir()
    (linked / "data" / "passwd").symlink_to("/etc/passwd")
    (linked / "helper.py").symlink_to("main.py")
    scanned = cli("plugin", "publish", str(linked))
    assert scanned.exit_code == 2, scanned.output
    assert scanned.stderr.startswith("error: the plugin archive was refused\n")
    assert _problems(scanned) == [
        "data/passwd: a link to '/etc/passwd': plugins hold regular files only",
        "helper.py: a link to 'main.py': plugins hold regular files only",
    ]

    no_manifest = tmp_path / "empty"
    no_manifest.mkdir()
    (no_manifest / "main.py").write_text("print(1)\n")
    none = cli("plugin", "publish", str(no_manifest))
    assert none.exit_code == 2
    assert "plugin.yaml: the plugin's folder has no plugin.yaml" in _problems(none)


def test_a_missing_path_sends_nothing(cli: Invoke, tmp_path: Path) -> None:
    # an unreachable server: had anything been sent, the error would say so
    nowhere = {"STAVILY_URL": "http://127.0.0.1:9"}
    missing = cli("plugin", "publish", str(tmp_path / "nope"), env=nowhere)
    assert missing.exit_code == 2, missing.output
    assert missing.stderr.startswith(f"error: no such folder: {tmp_path / 'nope'}\n")
    a_file = tmp_path / "plugin.yaml"
    a_file.write_text("id: x\n")
    not_folder = cli("plugin", "publish", str(a_file), env=nowhere)
    assert not_folder.exit_code == 2 and "is not a folder" in not_folder.stderr
    bare = cli("plugin", "publish", "git@github.com:org/repo.git@", env=nowhere)
    assert bare.exit_code == 2 and "names no branch, tag or commit" in bare.stderr


def test_a_server_path_outside_the_roots_is_refused(cli: Invoke, tmp_path: Path) -> None:
    folder = make_plugin(tmp_path / "echo", _id())
    refused = cli("plugin", "publish", folder.as_uri())
    assert refused.exit_code == 2, refused.output
    assert any(
        p.startswith("source: ") and "no plugin source root holds it" in p
        for p in _problems(refused)
    )


# --- reading and status -------------------------------------------------------------------


def test_list_show_deprecate_yank_restore(cli: Invoke, tmp_path: Path) -> None:
    plugin_id = _id()
    folder = tmp_path / "echo"
    for version in ("1.0.0", "1.1.0", "1.2.0"):
        make_plugin(folder, plugin_id, version, f"print('{version}')\n")
        assert cli("plugin", "publish", str(folder)).exit_code == 0

    listed = cli("plugin", "list")
    assert listed.exit_code == 0, listed.output
    row = next(line for line in listed.stdout.splitlines() if line.startswith(plugin_id))
    assert row.split()[:3] == [plugin_id, "action", "1.2.0"]
    assert "1.0.0, 1.1.0, 1.2.0" in row
    as_json = _json(cli("plugin", "list", "-o", "json"))
    mine = next(p for p in as_json["plugins"] if p["id"] == plugin_id)
    assert [v["version"] for v in mine["versions"]] == ["1.0.0", "1.1.0", "1.2.0"]

    deprecated = cli("plugin", "deprecate", plugin_id, "1.1.0", "--reason", "use 1.2")
    assert deprecated.exit_code == 0, deprecated.output
    assert deprecated.stdout.strip() == f"{plugin_id} 1.1.0: deprecated (use 1.2)"
    yanked = _json(cli("plugin", "yank", plugin_id, "1.2.0", "-o", "json"))
    assert (yanked["status"], yanked["status_reason"]) == ("yanked", None)

    listed = cli("plugin", "list")
    row = next(line for line in listed.stdout.splitlines() if line.startswith(plugin_id))
    assert row.split()[2] == "1.0.0"  # the latest active one
    assert "1.1.0 (deprecated), 1.2.0 (yanked)" in row

    shown = cli("plugin", "show", plugin_id)
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0] == f"{plugin_id}  action"
    statuses = [line.split() for line in lines if line.startswith("1.")]
    assert statuses == [["1.0.0", "active"], ["1.1.0", "deprecated"], ["1.2.0", "yanked"]]
    assert "version 1.0.0" in lines  # the latest active one's details
    facts = {line.split()[0]: line.split(None, 1)[1].strip() for line in lines if line[:1] == "s"}
    assert len(facts["sha256"]) == 64 and facts["source"] == "uploaded folder"
    assert any(line.split()[:2] == ["protocol", "input"] for line in lines)
    key_id = _json(cli("plugin", "keys", "-o", "json"))["keys"][0]["key_id"]
    assert any(line.split() == ["signed", "with", "key", key_id] for line in lines)

    one = cli("plugin", "show", plugin_id, "--version", "1.1.0")
    assert one.exit_code == 0, one.output
    assert "version 1.1.0" in one.stdout.splitlines()
    assert any(line.split() == ["reason", "use", "1.2"] for line in one.stdout.splitlines())
    as_json = _json(cli("plugin", "show", plugin_id, "-o", "json"))
    assert (as_json["id"], as_json["latest"]) == (plugin_id, "1.0.0")

    restored = cli("plugin", "restore", plugin_id, "1.2.0")
    assert restored.stdout.strip() == f"{plugin_id} 1.2.0: active"
    assert _json(cli("plugin", "show", plugin_id, "-o", "json"))["latest"] == "1.2.0"

    missing = cli("plugin", "show", f"{plugin_id}-nope")
    assert missing.exit_code == 3 and f"no plugin '{plugin_id}-nope'" in missing.stderr
    for action in ("deprecate", "yank", "restore"):
        gone = cli("plugin", action, plugin_id, "9.9.9")
        assert gone.exit_code == 3, (action, gone.output)
        assert f"no version 9.9.9 of plugin '{plugin_id}'" in gone.stderr
    no_version = cli("plugin", "show", plugin_id, "--version", "9.9.9", "-o", "json")
    assert no_version.exit_code == 3
    assert json.loads(no_version.stderr)["error"]["code"] == "not_found"


def test_keys(cli: Invoke) -> None:
    keys = _json(cli("plugin", "keys", "-o", "json"))["keys"]
    assert keys and [k["signing"] for k in keys].count(True) == 1
    shown = cli("plugin", "keys")
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["key", "id", "algorithm", "signing", "created", "public", "key"]
    signing = next(k for k in keys if k["signing"])
    row = next(line for line in lines if line.startswith(signing["key_id"]))
    assert row.split()[1:3] == ["ed25519", "yes"] and signing["public_key"] in row


def test_the_cli_needs_a_token(cli: Invoke) -> None:
    denied = cli("plugin", "list", env={"STAVILY_TOKEN": "stv_wrong"})
    assert denied.exit_code == 5, denied.output


# --- rollouts -------------------------------------------------------------------------------

needs_rollouts = pytest.mark.skipif(not HAS_ROLLOUTS, reason="the rollout API is not there yet")


@needs_rollouts
@pytest.mark.parametrize("terminal", [False, True], ids=["lines", "progress-bar"])
def test_a_rollout_to_agents_that_never_poll_times_out(
    cli: Invoke, orchestrator: Orchestrator, tmp_path: Path, terminal: bool
) -> None:
    plugin_id = _id()
    zone = uuid.uuid4().hex[:8]
    assert cli("plugin", "publish", str(make_plugin(tmp_path / "p", plugin_id))).exit_code == 0
    names = [f"{zone}-a", f"{zone}-b"]
    for name in names:
        orchestrator.create_agent(name, labels={"zone": zone})
    orchestrator.create_agent(f"{zone}-other", labels={"zone": "elsewhere"})

    env = {"TTY_COMPATIBLE": "1", "FORCE_COLOR": "1"} if terminal else {}
    args = ["plugin", "rollout", plugin_id, "--version", "1.0.0", "--selector", f"zone={zone}"]
    waited = cli(*args, "--timeout", "2", "--interval", "0.2", env=env)
    assert waited.exit_code == 1, waited.output
    out = [ANSI.sub("", line).rstrip() for line in waited.stdout.splitlines()]
    assert out[0].startswith("rollout ") and out[0].endswith(
        f": {plugin_id} 1.0.0 to 2 agents matching zone={zone}"
    )
    assert "0 installed, 0 failed, 2 pending of 2" in out[-1]
    assert waited.stderr.startswith("error: rollout ")
    assert "not done after 2s: 0 installed, 0 failed, 2 pending of 2" in waited.stderr
    assert sorted(_problems(waited)) == [f"{name}: pending" for name in names]

    scripted = cli(*args, "--timeout", "0.3", "--interval", "0.1", "-o", "json")
    assert scripted.exit_code == 1
    last = json.loads(scripted.stdout)
    assert (last["total"], last["pending"], last["done"]) == (2, 2, False)
    assert sorted(a["name"] for a in last["agents"]) == names
    assert json.loads(scripted.stderr)["error"]["code"] == "timeout"


@needs_rollouts
def test_a_rollout_of_what_is_not_there(cli: Invoke) -> None:
    missing = cli("plugin", "rollout", f"{_id()}-nope", "--version", "1.0.0", "--timeout", "1")
    assert missing.exit_code in (2, 3), missing.output
    bad = cli("plugin", "rollout", "echo", "--version", "1.0.0", "--selector", "nokey")
    assert bad.exit_code == 2 and "--selector 'nokey' is not key=value" in bad.stderr


@needs_rollouts
def test_a_rollout_no_agent_matches_fails(cli: Invoke, tmp_path: Path) -> None:
    plugin_id = _id()
    assert cli("plugin", "publish", str(make_plugin(tmp_path / "p", plugin_id))).exit_code == 0
    zone = uuid.uuid4().hex[:8]
    args = ["plugin", "rollout", plugin_id, "--version", "1.0.0", "--selector", f"zone={zone}"]
    nobody = cli(*args, "--timeout", "1")
    assert nobody.exit_code == 1, nobody.output
    assert f"to 0 agents matching zone={zone}" in nobody.stdout
    assert nobody.stderr.startswith(
        f"error: no active agent matching zone={zone}: nothing to install\n"
    )
    named = cli("plugin", "rollout", plugin_id, "--version", "1.0.0", "--agent", f"{zone}-x")
    assert named.exit_code == 1, named.output
    assert f"no active agent named {zone}-x: nothing to install" in named.stderr


@needs_rollouts
def test_a_rollout_lists_the_agents_that_failed(
    cli: Invoke, orchestrator: Orchestrator, tmp_path: Path
) -> None:
    """Agents simulated in a thread take their install: one installs it, one fails."""
    plugin_id = _id()
    zone = uuid.uuid4().hex[:8]
    assert cli("plugin", "publish", str(make_plugin(tmp_path / "p", plugin_id))).exit_code == 0
    good = SimAgent(orchestrator, f"{zone}-good", labels={"zone": zone, "tier": "a"})
    bad = SimAgent(orchestrator, f"{zone}-bad", labels={"zone": zone, "tier": "b"})
    SimAgent(orchestrator, f"{zone}-c", labels={"zone": zone, "tier": "c"})  # not selected
    stop = threading.Event()

    def answer() -> None:
        pending = {good: "completed", bad: "failed"}
        while pending and not stop.is_set():
            for agent, status in list(pending.items()):
                instruction = agent.poll()
                if instruction is None:
                    continue
                assert instruction["instruction_type"] == "plugin_install"
                agent.report(instruction, status, error="sha256 mismatch\non the artifact")
                del pending[agent]
            stop.wait(0.05)

    worker = threading.Thread(target=answer, daemon=True)
    worker.start()
    try:
        args = ["--selector", f"zone={zone}", "--selector", "tier=a", "--selector", "tier=b"]
        followed = cli(
            "plugin",
            "rollout",
            plugin_id,
            "--version",
            "1.0.0",
            *args,
            "--interval",
            "0.1",
            "--timeout",
            "20",
        )
    finally:
        stop.set()
        worker.join(timeout=10)
    assert followed.exit_code == 1, followed.output
    out = followed.stdout.splitlines()
    assert out[0].endswith(f"to 2 agents matching zone={zone}, tier=a|b")
    changes = sorted(line.split("  ")[:2] for line in out[1:-1])
    assert changes == [[f"{zone}-bad", "failed"], [f"{zone}-good", "installed"]]
    failed_line = next(line for line in out if line.startswith(f"{zone}-bad"))
    assert failed_line.endswith("error: sha256 mismatch on the artifact")
    assert out[-1].endswith(": 1 installed, 1 failed, 0 pending of 2")
    assert followed.stderr.startswith(f"error: {plugin_id} 1.0.0 failed to install on 1 of 2")
    assert _problems(followed)[0].startswith(f"{zone}-bad: sha256 mismatch")


def test_rotate_key_makes_a_new_signer_and_retires_the_old_ones(
    cli: Invoke, tmp_path: Path
) -> None:
    folder = tmp_path / "keys"
    first = cli("plugin", "rotate-key", "--keys-dir", str(folder))
    assert first.exit_code == 0, first.output
    second = cli("plugin", "rotate-key", "--keys-dir", str(folder), "--retire")
    assert second.exit_code == 0, second.output
    assert "new signing key" in second.output
    assert len(list(folder.glob("*.pub"))) == 3  # the first start's, then two rotations
    assert len(list(folder.glob("*.key"))) == 1  # only the newest signs
