"""Sealed secrets: AES-GCM under the server's key, bound to what they belong to."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from stavily.security.credentials import StartRefused
from stavily.security.sealing import Sealer, Unsealable, sealer
from stavily.store import migrate
from stavily.store.db import Database


def test_a_sealed_value_opens_only_with_its_key_and_owner() -> None:
    one = Sealer("k" * 32)
    sealed = one.seal("whsec_abc", "hook_1")
    assert sealed.startswith("v1.") and "whsec_abc" not in sealed
    assert one.seal("whsec_abc", "hook_1") != sealed  # a new nonce each time
    assert one.open(sealed, "hook_1") == "whsec_abc"
    with pytest.raises(Unsealable):
        one.open(sealed, "hook_2")  # copied to another row
    with pytest.raises(Unsealable):
        Sealer("j" * 32).open(sealed, "hook_1")
    with pytest.raises(Unsealable):
        one.open(sealed[:-4] + "AAAA", "hook_1")
    with pytest.raises(Unsealable):
        one.open("plain", "hook_1")


def test_the_key_is_made_once_and_must_be_the_same_on_every_replica(tmp_path: Path) -> None:
    async def check() -> None:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
        try:
            await migrate.upgrade(db)
            first = await sealer(db, None, tmp_path / "a")
            assert (tmp_path / "a" / "secrets.key").stat().st_mode & 0o777 == 0o600
            again = await sealer(db, None, tmp_path / "a")
            assert again.open(first.seal("s", "o"), "o") == "s"
            with pytest.raises(StartRefused, match="STAVILY_SECRETS_KEY"):
                await sealer(db, None, tmp_path / "b")  # another data dir: another key
            with pytest.raises(StartRefused, match="too short"):
                await sealer(db, "short", tmp_path / "a")
        finally:
            await db.dispose()

    asyncio.run(check())


def test_previous_keys_open_and_reseal_moves_a_value_to_the_current_key() -> None:
    old, new = "o" * 32, "n" * 32
    sealed = Sealer(old).seal("whsec_abc", "hook_1")
    rotating = Sealer(new, [old])
    assert rotating.open(sealed, "hook_1") == "whsec_abc"
    again = rotating.resealed(sealed, "hook_1")
    assert again and Sealer(new).open(again, "hook_1") == "whsec_abc"
    with pytest.raises(Unsealable):
        Sealer(old).open(again, "hook_1")
    assert rotating.resealed(again, "hook_1") is None  # already the current key's
    with pytest.raises(Unsealable):
        rotating.resealed(Sealer("x" * 32).seal("s", "hook_1"), "hook_1")
    with pytest.raises(Unsealable):
        rotating.open(sealed, "hook_2")


def test_a_previous_key_must_be_long_enough(tmp_path: Path) -> None:
    async def check() -> None:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}")
        try:
            await migrate.upgrade(db)
            with pytest.raises(StartRefused, match="STAVILY_SECRETS_KEY_PREVIOUS"):
                await sealer(db, "n" * 32, tmp_path, "o" * 32 + ",short")
            assert (await sealer(db, "n" * 32, tmp_path, " o" * 20 + ", ")).open(
                Sealer("n" * 32).seal("s", "o"), "o"
            ) == "s"
        finally:
            await db.dispose()

    asyncio.run(check())
