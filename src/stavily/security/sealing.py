"""Secrets the server must read back (a webhook's signing secret) are kept sealed in the
database: AES-GCM under a key of the server's, so that whoever reads the database (a
backup, a replica's dump) cannot sign a request.

The key is kept like the agent JWT key (security.agent_tokens): `STAVILY_SECRETS_KEY`,
else the file `<data_dir>/secrets.key`, made on first start (0600); the database holds
its fingerprint, so a replica with another key refuses to start. The key's text is
stretched to 256 bits with HKDF-SHA256, so any text of at least 32 characters will do
(`openssl rand -hex 32`).

A sealed value is `v1.<base64url(nonce || ciphertext+tag)>`, its associated data the
id of what it belongs to: a sealed secret copied to another row does not open.

Rotation (docs/secrets.md). Start every replica with the new key as STAVILY_SECRETS_KEY
and the old one in STAVILY_SECRETS_KEY_PREVIOUS: values sealed with either open, new ones
are sealed with the new key, and the first replica to start records the new key's
fingerprint. `stavily db rekey` then re-seals, online, what the database holds under the
old key (security.rekey); after it, the previous key can go.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from stavily.security import agent_tokens
from stavily.security.credentials import StartRefused
from stavily.store.db import Database

KEY_FILE = "secrets.key"
SETTING = "STAVILY_SECRETS_KEY"
FINGERPRINT_NAME = "secrets-key-sha256"
MISMATCH = (
    "this server's secrets key ({source}) differs from the one the other replicas use: "
    "set the same STAVILY_SECRETS_KEY on every replica (to change the key, give the old "
    "one as STAVILY_SECRETS_KEY_PREVIOUS: docs/secrets.md)"
)
_VERSION = "v1."
_NONCE = 12


class Unsealable(ValueError):
    """A sealed value this key cannot open (another key's, or altered)."""


def _aead(key: str) -> AESGCM:
    derived = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=None, info=b"stavily sealing v1"
    ).derive(key.encode())
    return AESGCM(derived)


class Sealer:
    """Seals with `key`; opens what `key` or one of the `previous` keys sealed."""

    def __init__(self, key: str, previous: Sequence[str] = ()) -> None:
        self._aead = _aead(key)
        self._previous = [_aead(old) for old in previous]

    def seal(self, value: str, owner: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, value.encode(), owner.encode())
        return _VERSION + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, sealed: str, owner: str) -> str:
        return self._opened(sealed, owner)[0]

    def resealed(self, sealed: str, owner: str) -> str | None:
        """`sealed` sealed anew with the current key, or None if it already is. Unsealable
        when no key opens it."""
        value, current = self._opened(sealed, owner)
        return None if current else self.seal(value, owner)

    def _opened(self, sealed: str, owner: str) -> tuple[str, bool]:
        """The value, and whether the current key sealed it."""
        if not sealed.startswith(_VERSION):
            raise Unsealable("not a sealed value")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(_VERSION) :])
        except ValueError as exc:
            raise Unsealable("altered") from exc
        for aead in (self._aead, *self._previous):
            try:
                value = aead.decrypt(raw[:_NONCE], raw[_NONCE:], owner.encode()).decode()
            except (InvalidTag, ValueError):
                continue
            return value, aead is self._aead
        raise Unsealable("sealed with another key, or altered")


def previous_keys(configured: str | None) -> list[str]:
    """STAVILY_SECRETS_KEY_PREVIOUS: keys separated by commas."""
    keys = [key.strip() for key in (configured or "").split(",") if key.strip()]
    for key in keys:
        if len(key) < agent_tokens.MIN_KEY_LENGTH:
            raise StartRefused(
                f"a key in {SETTING}_PREVIOUS is shorter than "
                f"{agent_tokens.MIN_KEY_LENGTH} characters"
            )
    return keys


async def sealer(
    db: Database, configured: str | None, data_dir: Path, previous: str | None = None
) -> Sealer:
    """This server's Sealer, its key checked against the other replicas'. StartRefused
    when a key is too short or the key is not theirs (nor replaces theirs: theirs is
    among the `previous` keys)."""
    key = agent_tokens.load_key(configured, data_dir, KEY_FILE, SETTING)
    old = previous_keys(previous)
    source = SETTING if configured is not None else f"from {data_dir / KEY_FILE}"
    await agent_tokens.check_fingerprint(db, key, source, FINGERPRINT_NAME, MISMATCH, old)
    return Sealer(key, old)
