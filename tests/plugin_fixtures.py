"""Plugins made for tests: folders with a manifest, git repositories, archives, and their
publication through the real API."""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
import tarfile
import uuid
import zipfile
from pathlib import Path
from typing import Any

import httpx
import yaml

ECHO = """import argparse, json, sys
parser = argparse.ArgumentParser()
parser.add_argument("--input")
args = parser.parse_args()
data = json.load(open(args.input)) if args.input else {}
json.dump({"echo": data.get("input_data") or {}}, sys.stdout)
"""


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def make_plugin(
    folder: Path,
    plugin_id: str,
    version: str = "1.0.0",
    entry: str = "main.py",
    code: str = ECHO,
    layout: str = "nested",
    **manifest: Any,
) -> Path:
    """A plugin folder: plugin.yaml (under `plugin:`, or `flat`) and its entry point."""
    folder.mkdir(parents=True, exist_ok=True)
    fields = {
        "id": plugin_id,
        "name": plugin_id,
        "version": version,
        "type": "action",
        "runtime": {"type": "python", "entry_point": entry},
        **manifest,
    }
    document = {"plugin": fields} if layout == "nested" else fields
    (folder / "plugin.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    (folder / entry).write_text(code)
    return folder


def git(folder: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "-C", str(folder), "-c", "user.email=t@example.com", "-c", "user.name=t", *args],
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout.strip()


def git_repo(folder: Path, tag: str | None = None) -> str:
    """Make `folder` a git repository with one commit (and `tag`); the commit's id."""
    subprocess.run(["git", "init", "-q", "-b", "main", str(folder)], check=True)
    git(folder, "add", "-A")
    git(folder, "commit", "-qm", "plugin")
    if tag:
        git(folder, "tag", tag)
    return git(folder, "rev-parse", "HEAD")


def archive(folder: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(folder.rglob("*")):
            if ".git" not in path.relative_to(folder).parts:
                tar.add(path, path.relative_to(folder).as_posix(), recursive=False)
    return buffer.getvalue()


def publish(api: httpx.Client, folder: Path) -> httpx.Response:
    return api.post(
        "/api/v1/plugins", content=archive(folder), headers={"Content-Type": "application/gzip"}
    )


def published(api: httpx.Client, folder: Path) -> dict[str, Any]:
    response = publish(api, folder)
    assert response.status_code in (200, 201), response.text
    return response.json()  # type: ignore[no-any-return]


def build_wheel(folder: Path, name: str, version: str) -> Path:
    """A pure-Python wheel with one module and one console script, written by hand."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": f"VERSION = {version!r}\n\ndef main():\n    print('{name}', VERSION)\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": (
            "Wheel-Version: 1.0\nGenerator: stavily-tests\nRoot-Is-Purelib: true\n"
            "Tag: py3-none-any\n"
        ),
        f"{dist}/entry_points.txt": f"[console_scripts]\n{name} = {name}:main\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = "\n".join(record) + "\n"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path
