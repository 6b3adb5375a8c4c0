"""The plugin registry: publishing immutable signed versions, reading them, and resolving
a workflow step's plugin to the version it runs (pinned when the workflow is applied)."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from stavily import audit
from stavily.config import Settings
from stavily.errors import Conflict, InvalidInput, NotFound
from stavily.plugins import manifest as manifests
from stavily.plugins import package, sources
from stavily.plugins.blobs import BlobStore, DatabaseStore, FolderStore
from stavily.plugins.signing import Keyring
from stavily.plugins.versions import ordered
from stavily.store.db import Database
from stavily.store.models import plugin_versions, plugins
from stavily.timeutil import isoformat, utcnow

log = structlog.get_logger("stavily.plugins")

STATUSES = ("active", "deprecated", "yanked")
KEYS_FRESH_SECONDS = 5.0


def policy_findings(manifest: manifests.Manifest, settings: Settings) -> list[dict[str, str]]:
    """The manifest's permissions this server's policy refuses."""
    found: list[dict[str, str]] = []
    permissions = manifest.permissions
    if permissions.network and not settings.plugin_allow_network:
        found.append({"path": "permissions.network", "message": "network access is refused"})
    for index, path in enumerate(permissions.filesystem.write):
        clean = "/" + path.strip("/") if path.startswith("/") else path
        for denied in settings.plugin_denied_write_paths:
            if clean == denied or (denied != "/" and clean.startswith(denied.rstrip("/") + "/")):
                found.append(
                    {
                        "path": f"permissions.filesystem.write[{index}]",
                        "message": f"writing to '{path}' is refused (under '{denied}')",
                    }
                )
                break
    refused = {
        "capabilities": {c.upper() for c in settings.plugin_denied_capabilities},
        "system_calls": set(settings.plugin_denied_system_calls),
    }
    for key, denied_set in refused.items():
        for index, value in enumerate(getattr(permissions, key)):
            wanted = value.upper() if key == "capabilities" else value
            if wanted in denied_set:
                found.append(
                    {"path": f"permissions.{key}[{index}]", "message": f"'{value}' is refused"}
                )
    return found


async def version_row(
    conn: AsyncConnection, organization_id: str, plugin_id: Any, version: Any
) -> Any:
    """A version's row, or None."""
    found = await conn.execute(
        sa.select(plugin_versions).where(
            plugin_versions.c.organization_id == organization_id,
            plugin_versions.c.plugin_id == plugin_id,
            plugin_versions.c.version == version,
        )
    )
    return found.first()


def version_view(row: Any) -> dict[str, Any]:
    return {
        "plugin_id": row.plugin_id,
        "version": row.version,
        "sha256": row.sha256,
        "size": int(row.size),
        "status": row.status,
        "status_reason": row.status_reason,
        "protocol": row.protocol,
        "socket": bool(row.socket),
        "source": row.source,
        "signed": row.signed,
        "signature": row.signature,
        "key_id": row.key_id,
        "created_at": isoformat(row.created_at),
        "published_by": row.published_by,
        "manifest": row.manifest,
    }


def _sub_folder_problem(root: Path, sub_directory: str) -> str | None:
    """Why `sub_directory` of `root` is not a plugin folder to package: missing, or (by a
    link in the repository) somewhere else than inside it."""
    folder = (root / sub_directory).resolve()
    if not folder.is_dir():
        return f"'{sub_directory}' is not a folder"
    if root.resolve() not in folder.parents:
        return f"'{sub_directory}' leads out of the repository (a link)"
    return None


class Registry:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.keys = Keyring(settings.plugin_keys_path)
        self.blobs: BlobStore = (
            DatabaseStore(db)
            if settings.plugin_store == "database"
            else FolderStore(settings.plugin_store_path)
        )
        self.limits = package.Limits(
            max_file_bytes=settings.plugin_max_file_bytes,
            max_total_bytes=settings.plugin_max_archive_bytes,
            max_files=settings.plugin_max_files,
        )
        self.work = settings.data_dir / "tmp"
        self._keys: tuple[float, list[Any]] | None = None  # (read at, keys)

    async def public_keys(self, fresh: bool = False) -> list[Any]:
        """The public keys, read from the key folder at most every few seconds unless
        `fresh` (agents ask for them as they install; a rotation shows within that time)."""
        now = time.monotonic()
        if fresh or self._keys is None or now - self._keys[0] > KEYS_FRESH_SECONDS:
            self._keys = (now, await asyncio.to_thread(self.keys.public_keys))
        return self._keys[1]

    async def start(self) -> None:
        await asyncio.to_thread(self.keys.ensure)
        await asyncio.to_thread(self.work.mkdir, parents=True, exist_ok=True)

    @asynccontextmanager
    async def _scratch(self) -> AsyncIterator[Path]:
        """A folder of this publish's own, removed afterwards (off the event loop: an
        unpacked plugin may hold thousands of files)."""

        def make() -> Path:
            self.work.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix="publish-", dir=self.work))

        folder = await asyncio.to_thread(make)
        try:
            yield folder
        finally:
            await asyncio.to_thread(shutil.rmtree, folder, ignore_errors=True)

    # -- publishing ---------------------------------------------------------------------

    async def publish_source(
        self,
        organization_id: str,
        actor: str,
        source: str,
        ref: str | None,
        sub_directory: str | None,
    ) -> tuple[dict[str, Any], bool]:
        """From a git URL at `ref`, or a server folder inside the source roots."""
        sources.check_ref(ref)
        if sub_directory and (sub_directory.startswith("/") or ".." in Path(sub_directory).parts):
            raise InvalidInput(
                "the plugin's source was refused",
                [{"path": "sub_directory", "message": "must be a folder inside the repository"}],
            )
        local = await asyncio.to_thread(
            sources.local_folder, source, self.settings.plugin_source_roots
        )
        async with self._scratch() as scratch:
            info: dict[str, Any]
            if local is not None and not await asyncio.to_thread((local / ".git").exists):
                if ref:
                    raise InvalidInput(
                        "the plugin's source was refused",
                        [
                            {
                                "path": "ref",
                                "message": f"'{source}' is a folder, not a git repository",
                            }
                        ],
                    )
                folder, info = local, {"kind": "path", "path": str(local)}
            else:
                url = local.as_uri() if local is not None else source
                if local is None:
                    sources.check_remote(source)
                fetched = await sources.fetch(
                    url, ref, scratch / "checkout", self.settings.plugin_git_timeout
                )
                folder = fetched.folder
                info = {
                    "kind": "git",
                    "repository_url": source,
                    "ref": ref,
                    "ref_kind": fetched.ref_kind,
                    "commit": fetched.commit,
                }
            if sub_directory:
                problem = await asyncio.to_thread(_sub_folder_problem, folder, sub_directory)
                if problem:
                    raise InvalidInput(
                        "the plugin's source was refused",
                        [{"path": "sub_directory", "message": problem}],
                    )
                folder = folder / sub_directory
                info["sub_directory"] = sub_directory
            return await self._publish(organization_id, actor, folder, info, scratch)

    async def publish_archive(
        self, organization_id: str, actor: str, archive: Path
    ) -> tuple[dict[str, Any], bool]:
        """From an uploaded tar or tar.gz of the plugin's folder."""
        async with self._scratch() as scratch:
            unpacked = scratch / "archive"
            await asyncio.to_thread(unpacked.mkdir)
            await asyncio.to_thread(package.extract, archive, unpacked, self.limits)
            folder = await asyncio.to_thread(package.plugin_root, unpacked)
            return await self._publish(organization_id, actor, folder, {"kind": "archive"}, scratch)

    async def _publish(
        self,
        organization_id: str,
        actor: str,
        folder: Path,
        source: dict[str, Any],
        scratch: Path,
    ) -> tuple[dict[str, Any], bool]:
        def read() -> tuple[manifests.Manifest, str]:
            data, _ = manifests.read_manifest(folder)
            manifest = manifests.validate_manifest(data)
            problems = policy_findings(manifest, self.settings)
            entry = folder / manifest.runtime.entry_point
            if not entry.is_file() or entry.is_symlink():
                problems.append(
                    {
                        "path": "runtime.entry_point",
                        "message": f"'{manifest.runtime.entry_point}' is not a file in the plugin",
                    }
                )
            try:
                package.scan(folder, self.limits)
            except InvalidInput as findings:
                problems.extend(findings.details)
            if problems:
                raise InvalidInput("the plugin was refused", problems)
            return manifest, manifests.protocol_of(manifest, folder), manifests.uses_socket(folder)

        manifest, protocol, socket = await asyncio.to_thread(read)
        artifact = await asyncio.to_thread(package.package, folder, scratch, self.limits)
        existing = await self._existing(organization_id, manifest.id, manifest.version)
        if existing is not None:
            return self._same_or_conflict(existing, artifact.sha256), False
        await self.blobs.put(artifact.sha256, artifact.path)
        now = utcnow()
        signed = {
            "id": manifest.id,
            "version": manifest.version,
            "sha256": artifact.sha256,
            "size": artifact.size,
            "created": isoformat(now),
        }
        key_id, signature = await asyncio.to_thread(self.keys.sign, signed)
        if self._keys is not None and key_id not in {k.key_id for k in self._keys[1]}:
            self._keys = None  # a rotated key: agents must find it at once
        row = {
            "organization_id": organization_id,
            "plugin_id": manifest.id,
            "version": manifest.version,
            "sha256": artifact.sha256,
            "size": artifact.size,
            "manifest": manifest.model_dump(mode="json", exclude_none=True),
            "protocol": protocol,
            "socket": socket,
            "signed": signed,
            "signature": signature,
            "key_id": key_id,
            "source": source,
            "status": "active",
            "status_reason": None,
            "created_at": now,
            "published_by": actor,
        }
        try:
            async with self.db.write() as conn:
                await self._upsert_plugin(conn, organization_id, manifest, now)
                await conn.execute(plugin_versions.insert().values(**row))
                await audit.append(
                    conn,
                    [
                        audit.entry(
                            organization_id,
                            actor,
                            "plugin.published",
                            "plugin",
                            manifest.id,
                            {
                                "version": manifest.version,
                                "sha256": artifact.sha256,
                                "source": source,
                            },
                            at=now,
                        )
                    ],
                )
        except IntegrityError:
            # published at the same moment by another request
            existing = await self._existing(organization_id, manifest.id, manifest.version)
            if existing is None:
                raise
            return self._same_or_conflict(existing, artifact.sha256), False
        log.info("plugin published", plugin=manifest.id, version=manifest.version)
        return version_view(SimpleNamespace(**row)), True

    @staticmethod
    def _same_or_conflict(existing: Any, sha256: str) -> dict[str, Any]:
        if existing.sha256 != sha256:
            raise Conflict(
                f"version {existing.version} of '{existing.plugin_id}' is published already "
                "with other content: versions never change, publish a new version",
                {"published_sha256": existing.sha256, "sha256": sha256},
            )
        return version_view(existing)

    async def _existing(self, organization_id: str, plugin_id: str, version: str) -> Any:
        async with self.db.read_latest() as conn:  # the other may not be committed yet
            return await version_row(conn, organization_id, plugin_id, version)

    async def _upsert_plugin(
        self, conn: AsyncConnection, organization_id: str, manifest: manifests.Manifest, now: Any
    ) -> None:
        values = {
            "name": manifest.name,
            "description": manifest.description,
            "type": manifest.type,
            "updated_at": now,
        }
        updated = await conn.execute(
            plugins.update()
            .where(plugins.c.organization_id == organization_id, plugins.c.id == manifest.id)
            .values(**values)
        )
        if not updated.rowcount:
            await conn.execute(
                plugins.insert().values(
                    organization_id=organization_id, id=manifest.id, created_at=now, **values
                )
            )

    # -- reading --------------------------------------------------------------------------

    async def list(self, organization_id: str) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    sa.select(plugins)
                    .where(plugins.c.organization_id == organization_id)
                    .order_by(plugins.c.id)
                )
            ).all()
            versions = (
                await conn.execute(
                    sa.select(
                        plugin_versions.c.plugin_id,
                        plugin_versions.c.version,
                        plugin_versions.c.status,
                    ).where(plugin_versions.c.organization_id == organization_id)
                )
            ).all()
        by_plugin: dict[str, list[Any]] = {}
        for v in versions:
            by_plugin.setdefault(v.plugin_id, []).append(v)
        return [self._plugin_view(r, by_plugin.get(r.id, [])) for r in rows]

    @staticmethod
    def _plugin_view(row: Any, versions: list[Any]) -> dict[str, Any]:
        rows = ordered(versions)
        usable = [v.version for v in rows if v.status == "active"]
        return {
            "id": row.id,
            "name": row.name,
            "description": row.description,
            "type": row.type,
            "latest": usable[-1] if usable else None,
            "versions": [{"version": v.version, "status": v.status} for v in rows],
            "created_at": isoformat(row.created_at),
            "updated_at": isoformat(row.updated_at),
        }

    async def get(self, organization_id: str, plugin_id: str) -> dict[str, Any]:
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    sa.select(plugins).where(
                        plugins.c.organization_id == organization_id, plugins.c.id == plugin_id
                    )
                )
            ).first()
            if row is None:
                raise NotFound(f"no plugin '{plugin_id}'")
            versions = (
                await conn.execute(
                    sa.select(
                        plugin_versions.c.plugin_id,
                        plugin_versions.c.version,
                        plugin_versions.c.status,
                    ).where(
                        plugin_versions.c.organization_id == organization_id,
                        plugin_versions.c.plugin_id == plugin_id,
                    )
                )
            ).all()
        return self._plugin_view(row, list(versions))

    async def version(self, organization_id: str, plugin_id: str, version: str) -> Any:
        row = await self._existing(organization_id, plugin_id, version)
        if row is None:
            raise NotFound(f"no version {version} of plugin '{plugin_id}'")
        return row

    async def set_status(
        self,
        organization_id: str,
        plugin_id: str,
        version: str,
        status: str,
        reason: str | None,
        actor: str,
    ) -> dict[str, Any]:
        """Deprecate (still resolves, shown as such), yank (no new workflow resolves it;
        those pinned to it keep running it) or restore a version."""
        async with self.db.write() as conn:
            updated = await conn.execute(
                plugin_versions.update()
                .where(
                    plugin_versions.c.organization_id == organization_id,
                    plugin_versions.c.plugin_id == plugin_id,
                    plugin_versions.c.version == version,
                )
                .values(status=status, status_reason=reason)
            )
            if not updated.rowcount:
                raise NotFound(f"no version {version} of plugin '{plugin_id}'")
            await audit.append(
                conn,
                [
                    audit.entry(
                        organization_id,
                        actor,
                        f"plugin.{ {'active': 'restored'}.get(status, status) }",
                        "plugin",
                        plugin_id,
                        {"version": version, "reason": reason},
                    )
                ],
            )
        return version_view(await self.version(organization_id, plugin_id, version))

    # -- resolving ------------------------------------------------------------------------
