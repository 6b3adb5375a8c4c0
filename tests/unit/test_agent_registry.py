"""The agent's registry installs, the parts that need no server: which instructions name a
registry version, which keys are trusted, and unpacking into place."""

from __future__ import annotations

import base64
import io
import tarfile
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stavily.agent.registry import (
    MARKER,
    PluginRef,
    PluginRefused,
    installed,
    pinned_keys,
    plugin_key_list,
    registry_ref,
    unpack,
)
from stavily.errors import InvalidInput
from stavily.plugins.signing import key_id_of

SHA = "ab" * 32


def instruction(**configuration: Any) -> dict[str, Any]:
    return {"id": "ins_1", "plugin_id": "hello", "plugin_configuration": configuration}


def public_key() -> tuple[str, str]:
    public = Ed25519PrivateKey.generate().public_key()
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode(), key_id_of(public)


def tar_gz(entries: list[tarfile.TarInfo], data: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for entry in entries:
            content = data.get(entry.name)
            if content is not None:
                entry.size = len(content)
            tar.addfile(entry, io.BytesIO(content) if content is not None else None)
    return buffer.getvalue()


def test_only_an_instruction_with_sha256_and_version_names_a_registry_version() -> None:
    assert registry_ref(instruction(sha256=SHA, plugin_version="1.0.0")) == PluginRef(
        "hello", "1.0.0", SHA
    )
    assert registry_ref(instruction(plugin_version="1.0.0")) is None
    assert registry_ref(instruction(sha256=SHA)) is None
    assert registry_ref({"id": "ins_1", "plugin_id": "hello"}) is None


@pytest.mark.parametrize(
    ("plugin_id", "configuration", "reason"),
    [
        ("../etc", {"sha256": SHA, "plugin_version": "1.0.0"}, "invalid plugin id"),
        ("hello", {"sha256": SHA, "plugin_version": "../../x"}, "invalid plugin_version"),
        ("hello", {"sha256": SHA, "plugin_version": 1}, "invalid plugin_version"),
        ("hello", {"sha256": "AB" * 32, "plugin_version": "1.0.0"}, "invalid sha256"),
        ("hello", {"sha256": SHA[:-1], "plugin_version": "1.0.0"}, "invalid sha256"),
    ],
)
def test_values_that_could_not_name_a_folder_safely_are_refused(
    plugin_id: str, configuration: dict[str, Any], reason: str
) -> None:
    with pytest.raises(PluginRefused, match=reason):
        registry_ref({"id": "ins_1", "plugin_id": plugin_id, "plugin_configuration": configuration})


def test_trusted_keys_come_from_options_and_the_environment_by_their_registry_id() -> None:
    (first, first_id), (second, second_id) = public_key(), public_key()
    assert plugin_key_list([first], f" {second},{first} ") == (first, second)
    assert plugin_key_list(None, None) == ()
    assert pinned_keys([first, second]) == {first_id: first, second_id: second}
    with pytest.raises(ValueError, match="not an Ed25519 public key"):
        pinned_keys(["bm90IGEga2V5"])
    with pytest.raises(ValueError, match="not an Ed25519 public key"):
        pinned_keys(["not base64!"])


def test_an_install_replaces_a_stale_one_and_carries_its_marker(tmp_path: Path) -> None:
    ref = PluginRef("hello", "1.0.0", SHA)
    target = tmp_path / ".registry" / "hello" / "1.0.0"
    target.mkdir(parents=True)
    (target / "left-over.py").write_text("")
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(
        tar_gz(
            [tarfile.TarInfo("plugin.yaml"), tarfile.TarInfo("main.py")],
            {"plugin.yaml": b"plugin: {}\n", "main.py": b"print()\n"},
        )
    )
    assert not installed(target, SHA)
    unpack(archive, target, ref)
    assert installed(target, SHA) and not installed(target, "cd" * 32)
    assert sorted(p.name for p in target.iterdir()) == sorted([MARKER, "main.py", "plugin.yaml"])
    assert [p.name for p in target.parent.iterdir()] == ["1.0.0"], "scratch folders were left"


def test_an_unsafe_archive_installs_nothing(tmp_path: Path) -> None:
    link = tarfile.TarInfo("main.py")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    archive = tmp_path / "a.tar.gz"
    archive.write_bytes(tar_gz([tarfile.TarInfo("plugin.yaml"), link], {"plugin.yaml": b"x"}))
    target = tmp_path / ".registry" / "hello" / "1.0.0"
    with pytest.raises(InvalidInput):
        unpack(archive, target, PluginRef("hello", "1.0.0", SHA))
    assert not target.exists()
    assert list(target.parent.iterdir()) == [], "scratch folders were left"
