"""Content-addressed storage of plugin artifacts: a folder by default, the database as an
option so that replicas share them (STAVILY_PLUGIN_STORE=database).

A blob is named by its sha256 and never changes; storing one that exists is a no-op.
Reads stream in pieces of 64 KiB: what a download holds in memory is a piece or two
(the transport's buffer stops the sender past its high-water mark), so serving a large
artifact to many agents at once keeps the server's memory flat. With pieces of a
megabyte, each of 200 downloads held two of them: 400 MiB more (bench/bench_plugins.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from stavily.store.db import Database
from stavily.store.models import plugin_blob_chunks

PIECE = 64 * 1024  # what a read yields
DB_CHUNK = 256 * 1024  # a row of plugin_blob_chunks


class BlobStore(Protocol):
    async def put(self, sha256: str, source: Path) -> None:
        """Store the file `source` (which the store may move) as blob `sha256`."""

    async def exists(self, sha256: str) -> bool: ...

    def read(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes `start` to `end` (exclusive) of the blob."""


class FolderStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def path(self, sha256: str) -> Path:
        return self.folder / "sha256" / sha256[:2] / sha256

    async def put(self, sha256: str, source: Path) -> None:
        target = self.path(sha256)

        def move() -> None:
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                source.unlink(missing_ok=True)
            else:
                os.replace(source, target)  # atomic: a reader sees all of it or nothing

        await asyncio.to_thread(move)

    async def exists(self, sha256: str) -> bool:
        return await asyncio.to_thread(self.path(sha256).is_file)

    async def read(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        handle = await asyncio.to_thread(self.path(sha256).open, "rb")
        try:
            await asyncio.to_thread(handle.seek, start)
            left = end - start
            while left > 0:
                # a new piece each time: the transport may keep it queued until it is sent
                piece = await asyncio.to_thread(handle.read, min(PIECE, left))
                if not piece:
                    break
                left -= len(piece)
                yield piece
        finally:
            handle.close()


class DatabaseStore:
    """Rows of 256 KiB in plugin_blob_chunks, written in one transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def put(self, sha256: str, source: Path) -> None:
        try:
            if not await self.exists(sha256):
                await self._insert(sha256, source)
        except IntegrityError:
            pass  # stored meanwhile by another publish of the same content
        finally:
            await asyncio.to_thread(source.unlink, missing_ok=True)

    async def _insert(self, sha256: str, source: Path) -> None:
        handle = await asyncio.to_thread(source.open, "rb")
        try:
            async with self.db.write() as conn:
                seq = 0
                while chunk := await asyncio.to_thread(handle.read, DB_CHUNK):
                    await conn.execute(
                        plugin_blob_chunks.insert().values(sha256=sha256, seq=seq, data=chunk)
                    )
                    seq += 1
        finally:
            handle.close()

    async def exists(self, sha256: str) -> bool:
        async with self.db.read() as conn:
            found = await conn.execute(
                sa.select(plugin_blob_chunks.c.seq).where(
                    plugin_blob_chunks.c.sha256 == sha256, plugin_blob_chunks.c.seq == 0
                )
            )
            return found.first() is not None

    async def read(self, sha256: str, start: int, end: int) -> AsyncIterator[bytes]:
        seq = start // DB_CHUNK
        offset = start - seq * DB_CHUNK
        left = end - start
        while left > 0:
            async with self.db.read() as conn:  # one chunk per read: no long transaction
                data = (
                    await conn.execute(
                        sa.select(plugin_blob_chunks.c.data).where(
                            plugin_blob_chunks.c.sha256 == sha256, plugin_blob_chunks.c.seq == seq
                        )
                    )
                ).scalar()
            if data is None:
                break
            row = memoryview(data)[offset : offset + left]
            offset = 0
            seq += 1
            left -= len(row)
            for at in range(0, len(row), PIECE):
                yield bytes(row[at : at + PIECE])
