"""Installing a plugin from the orchestrator's registry: the signed manifest checked against
trusted keys, the artifact fetched into a cache and verified, then unpacked into place
atomically, so that a folder the agent runs from is always a whole, verified version.

Where things live, under the agent's plugins folder:

- `.registry/<plugin_id>/<version>/`: an installed version, with `.stavily-install.json`
  (its sha256) written inside before the folder is renamed into place;
- `.cache/<sha256>.tar.gz`: the artifact, kept to be re-verified, never trusted as is.

Trust. By default the agent trusts the signing keys the orchestrator lists
(`/plugins/keys`, fetched on the first install and kept for the agent's run; asked again
only for a key id it does not know, as after a rotation): trust on first use. The
signature then proves that the artifact is the one the registry published, whatever
storage, cache or proxy it went through, but not that the registry itself is honest:
whoever controls the server (or, over plain HTTP, the network) can serve its own key
with its own plugin. Pinning keys (`--plugin-key`, STAVILY_AGENT_PLUGIN_KEYS) closes that
door, at a price: each agent must be given the new public key before the registry signs
with a rotated one, or it refuses every version signed since.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import structlog
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stavily.errors import InvalidInput
from stavily.plugins import package, signing

log = structlog.get_logger("stavily.agent")

MARKER = ".stavily-install.json"
CHUNK = 1024 * 1024
# Past anything a registry's default limits let through (100 MB artifacts, 50 MB files,
# 10 000 files), and short of what would fill a disk: a decompression bomb stops here.
LIMITS = package.Limits(max_file_bytes=256 * 1024**2, max_total_bytes=1024**3, max_files=100_000)
_PLUGIN_ID = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_VERSION = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class InstallFailed(Exception):
    """Nothing was installed; the step fails with `message` and `error_type`."""

    error_type = "plugin_install_failed"
    prefix = "plugin install failed: "

    @property
    def message(self) -> str:
        return self.prefix + str(self)


class PluginRefused(InstallFailed):
    """What was served is not what was signed, or not signed by a trusted key."""

    error_type = "plugin_refused"
    prefix = "plugin refused: "


class PluginFetchFailed(InstallFailed):
    """The server could not be asked, or said no: trying again later may work."""

    error_type = "plugin_fetch_failed"
    prefix = "plugin fetch failed: "


@dataclass(frozen=True)
class PluginRef:
    """One registry version, as an instruction names it."""

    plugin_id: str
    version: str
    sha256: str

    def __str__(self) -> str:
        return f"{self.plugin_id} {self.version}"


@dataclass(frozen=True)
class Installed:
    path: Path
    logs: list[str]
    duration: float


def registry_ref(instruction: dict[str, Any]) -> PluginRef | None:
    """The registry version an instruction asks for (its plugin_configuration carries
    `sha256` and `plugin_version` or `version`), or None for a hand-installed plugin. PluginRefused
    when a value could not name a folder safely."""
    configuration = instruction.get("plugin_configuration")
    if not isinstance(configuration, dict):
        return None
    # `plugin_version` in a step's instruction, `version` in an install's (the official
    # agents ignore it there: they would take `plugin_version` for a branch to clone)
    sha256 = configuration.get("sha256")
    version = configuration.get("plugin_version") or configuration.get("version")
    if sha256 is None or version is None:
        return None
    plugin_id = instruction.get("plugin_id")
    if not isinstance(plugin_id, str) or not _PLUGIN_ID.match(plugin_id):
        raise PluginRefused(f"invalid plugin id {str(plugin_id)!r}")
    if not isinstance(version, str) or not _VERSION.match(version):
        raise PluginRefused(f"invalid plugin_version {str(version)!r}")
    if not isinstance(sha256, str) or not _SHA256.match(sha256):
        raise PluginRefused(f"invalid sha256 {str(sha256)!r}")
    return PluginRef(plugin_id, version, sha256)


def plugin_key_list(options: Iterable[str] | None, variable: str | None) -> tuple[str, ...]:
    """The trusted keys: each `--plugin-key` and STAVILY_AGENT_PLUGIN_KEYS's entries (both
    comma- or space-separated), in order, without repeats."""
    keys: list[str] = []
    for value in [*(options or ()), variable or ""]:
        for key in value.replace(",", " ").split():
            if key not in keys:
                keys.append(key)
    return tuple(keys)


def pinned_keys(keys: Iterable[str]) -> dict[str, str]:
    """Trusted public keys (base64 of the raw 32 bytes) by key id, the registry's naming;
    ValueError for one that is not an Ed25519 public key."""
    pinned = {}
    for key in keys:
        try:
            public = Ed25519PublicKey.from_public_bytes(base64.b64decode(key, validate=True))
        except (ValueError, binascii.Error):
            raise ValueError(
                f"plugin key {key[:12]!r}... is not an Ed25519 public key (base64 of 32 bytes)"
            ) from None
        pinned[signing.key_id_of(public)] = key
    return pinned


def installed(folder: Path, sha256: str) -> bool:
    """Whether `folder` holds a whole install of that artifact (its marker says so)."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("sha256") == sha256


def _installed_versions(root: Path) -> dict[tuple[str, str], str]:
    """What earlier runs installed under `root`, read from the markers (at start)."""
    found: dict[tuple[str, str], str] = {}
    for marker in root.glob(f"*/*/{MARKER}"):
        try:
            sha256 = json.loads(marker.read_text(encoding="utf-8")).get("sha256")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(sha256, str) and _SHA256.match(sha256):
            found[(marker.parent.parent.name, marker.parent.name)] = sha256
    return found


def _digest(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def unpack(archive: Path, target: Path, ref: PluginRef) -> None:
    """Extract into a scratch folder beside `target`, mark it, rename it into place: a
    crash leaves a hidden scratch folder, never a half-installed version. Blocking."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{ref.version}.", dir=target.parent))
    try:
        package.extract(archive, scratch, LIMITS)
        marker = {"plugin_id": ref.plugin_id, "version": ref.version, "sha256": ref.sha256}
        (scratch / MARKER).write_text(json.dumps(marker), encoding="utf-8")
        _move_into_place(scratch, target, ref.sha256)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _move_into_place(scratch: Path, target: Path, sha256: str) -> None:
    # A folder cannot be renamed onto a non-empty one: a stale install goes aside first.
    aside = target.with_name(f".{target.name}.old-{secrets.token_hex(4)}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, aside)
    try:
        os.rename(scratch, target)
    except OSError:
        # Another agent sharing this plugins folder installed it meanwhile.
        if not installed(target, sha256):
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)


class PluginInstaller:
    """Installs registry versions for one agent, one at a time per (plugin, version): two
    slots that need the same version wait for one install instead of racing two."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base: str,
        plugins_dir: Path,
        pinned: dict[str, str],
    ) -> None:
        self.client = client
        self.base = base
        self.root = plugins_dir / ".registry"
        self.cache = plugins_dir / ".cache"
        self.pinned = pinned
        self._server_keys: dict[str, str] | None = None
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # (plugin id, version) -> sha256 of what is installed: the heartbeat says it
        self.have = _installed_versions(self.root)

    def folder(self, ref: PluginRef) -> Path:
        return self.root / ref.plugin_id / ref.version

    def cached(self, ref: PluginRef) -> Path:
        return self.cache / f"{ref.sha256}.tar.gz"

    async def install(self, ref: PluginRef) -> Installed:
        """The version's folder, installed now unless a whole install of it is there."""
        started = time.monotonic()
        logs: list[str] = []
        target = self.folder(ref)
        async with self._locks.setdefault((ref.plugin_id, ref.version), asyncio.Lock()):
            if await asyncio.to_thread(installed, target, ref.sha256):
                logs.append(f"plugin {ref} is installed at {target}")
            else:
                try:
                    await self._install(ref, target, logs)
                except PluginRefused:
                    # What the cache holds of it is suspect: the next install fetches anew.
                    await asyncio.to_thread(self.cached(ref).unlink, missing_ok=True)
                    raise
                except OSError as exc:  # a full disk, a folder it may not write
                    raise InstallFailed(
                        f"cannot install plugin {ref} into {target}: {exc}"
                    ) from None
        return Installed(target, logs, time.monotonic() - started)

    async def _install(self, ref: PluginRef, target: Path, logs: list[str]) -> None:
        size, key_id = await self._signed_size(ref)
        logs.append(f"manifest of plugin {ref} verified: signed by key {key_id}")
        archive = await self._artifact(ref, size, logs)
        try:
            await asyncio.to_thread(unpack, archive, target, ref)
        except InvalidInput as exc:
            findings = "; ".join(f"{f['path']}: {f['message']}" for f in exc.details or [])
            raise PluginRefused(f"unsafe archive: {findings or exc.message}") from None
        logs.append(f"plugin {ref} installed at {target}")
        self.have[(ref.plugin_id, ref.version)] = ref.sha256
        log.info("plugin installed", plugin_id=ref.plugin_id, version=ref.version, path=str(target))

    # -- the signed manifest ---------------------------------------------------------------

    async def _signed_size(self, ref: PluginRef) -> tuple[int, str]:
        """The artifact's size from the version's signed manifest, once its signature and
        its id, version and sha256 are checked; and the key that signed it."""
        answer = await self._get_json(f"{self.base}/plugins/{ref.plugin_id}/{ref.version}")
        manifest, signature = answer.get("manifest"), answer.get("signature")
        key_id = answer.get("key_id")
        if not (
            isinstance(manifest, dict) and isinstance(signature, str) and isinstance(key_id, str)
        ):
            raise PluginRefused("the server's manifest has no signature")
        if answer.get("algorithm", signing.ALGORITHM) != signing.ALGORITHM:
            raise PluginRefused(f"unknown signature algorithm {answer.get('algorithm')!r}")
        public = await self._public_key(key_id)
        if public is None:
            raise PluginRefused(f"signed by key {key_id}, which this agent does not trust")
        if not signing.verify(public, manifest, signature):
            raise PluginRefused(f"the manifest's signature does not verify with key {key_id}")
        for name, wanted in (
            ("id", ref.plugin_id),
            ("version", ref.version),
            ("sha256", ref.sha256),
        ):
            if manifest.get(name) != wanted:
                raise PluginRefused(
                    f"the signed manifest's {name} is {manifest.get(name)!r}, "
                    f"the instruction's {wanted!r}"
                )
        size = manifest.get("size")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise PluginRefused(f"the signed manifest's size {size!r} is not a byte count")
        return size, key_id

    async def _public_key(self, key_id: str) -> str | None:
        """The trusted key named `key_id`: a pinned one when keys are pinned, else the
        server's. A key the server lists later (a rotation) is found by asking again."""
        if self.pinned:
            return self.pinned.get(key_id)
        if self._server_keys is None or key_id not in self._server_keys:
            answer = await self._get_json(f"{self.base}/plugins/keys")
            keys = answer.get("keys")
            self._server_keys = {
                k["key_id"]: k["public_key"]
                for k in (keys if isinstance(keys, list) else [])
                if isinstance(k, dict)
                and k.get("algorithm", signing.ALGORITHM) == signing.ALGORITHM
                and isinstance(k.get("key_id"), str)
                and isinstance(k.get("public_key"), str)
            }
        return self._server_keys.get(key_id)

    async def _get_json(self, path: str) -> dict[str, Any]:
        try:
            response = await self.client.get(path, timeout=30)
        except httpx.HTTPError as exc:
            raise PluginFetchFailed(f"GET {path}: {str(exc) or type(exc).__name__}") from None
        if response.status_code != 200:
            raise PluginFetchFailed(f"GET {path}: HTTP {response.status_code} {_said(response)}")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise PluginFetchFailed(f"GET {path}: the answer is not a JSON object")
        return answer

    # -- the artifact ----------------------------------------------------------------------

    async def _artifact(self, ref: PluginRef, size: int, logs: list[str]) -> Path:
        """The verified artifact in the cache: the cached file when the server says it is
        current (304), re-hashed all the same; else downloaded anew."""
        cached = self.cached(ref)
        path = f"{self.base}/plugins/{ref.plugin_id}/{ref.version}/artifact"
        headers = {"Accept": "application/gzip"}
        if await asyncio.to_thread(cached.is_file):
            headers["If-None-Match"] = f'"{ref.sha256}"'
        try:
            async with self.client.stream("GET", path, headers=headers, timeout=60) as response:
                if response.status_code == 304 and "If-None-Match" in headers:
                    logs.append(f"cached artifact {cached.name} is current")
                    await self._verify(cached, ref, size)
                    return cached
                if response.status_code != 200:
                    await response.aread()
                    raise PluginFetchFailed(
                        f"GET {path}: HTTP {response.status_code} {_said(response)}"
                    )
                part = await self._download(response, ref, size)
        except httpx.HTTPError as exc:
            raise PluginFetchFailed(f"GET {path}: {str(exc) or type(exc).__name__}") from None
        try:
            await self._verify(part, ref, size)
        except PluginRefused:
            await asyncio.to_thread(part.unlink, missing_ok=True)
            raise
        await asyncio.to_thread(os.replace, part, cached)
        logs.append(f"artifact downloaded: {size} bytes, sha256 {ref.sha256}")
        log.info("plugin artifact downloaded", plugin_id=ref.plugin_id, version=ref.version)
        return cached

    async def _download(self, response: httpx.Response, ref: PluginRef, size: int) -> Path:
        """The body streamed into a new file in the cache folder, never all in memory,
        and never more bytes than the signed size."""
        await asyncio.to_thread(self.cache.mkdir, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{ref.sha256}.", suffix=".part", dir=self.cache)
        part = Path(name)
        received = 0
        try:
            with os.fdopen(fd, "wb") as handle:
                async for chunk in response.aiter_bytes(CHUNK):
                    received += len(chunk)
                    if received > size:
                        raise PluginRefused(
                            f"the artifact is larger than the signed manifest's {size} bytes"
                        )
                    await asyncio.to_thread(handle.write, chunk)
        except BaseException:
            await asyncio.to_thread(part.unlink, missing_ok=True)
            raise
        return part

    @staticmethod
    async def _verify(path: Path, ref: PluginRef, size: int) -> None:
        """PluginRefused unless the file's sha256 and size are the signed ones."""
        digest, length = await asyncio.to_thread(_digest, path)
        if digest != ref.sha256:
            raise PluginRefused(
                f"the artifact's sha256 is {digest}, the signed manifest's {ref.sha256}"
            )
        if length != size:
            raise PluginRefused(f"the artifact has {length} bytes, the signed manifest {size}")


def _said(response: httpx.Response) -> str:
    """The server's error message, for the step's error."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]
