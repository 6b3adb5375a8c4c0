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
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from stavily.security import agent_tokens
from stavily.store.db import Database

KEY_FILE = "secrets.key"
SETTING = "STAVILY_SECRETS_KEY"
FINGERPRINT_NAME = "secrets-key-sha256"
MISMATCH = (
    "this server's secrets key ({source}) differs from the one the other replicas use: "
    "set the same STAVILY_SECRETS_KEY on every replica"
)
_VERSION = "v1."
_NONCE = 12


class Unsealable(ValueError):
    """A sealed value this key cannot open (another key's, or altered)."""


class Sealer:
    def __init__(self, key: str) -> None:
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"stavily sealing v1"
        ).derive(key.encode())
        self._aead = AESGCM(derived)

    def seal(self, value: str, owner: str) -> str:
        nonce = os.urandom(_NONCE)
        sealed = self._aead.encrypt(nonce, value.encode(), owner.encode())
        return _VERSION + base64.urlsafe_b64encode(nonce + sealed).decode()

    def open(self, sealed: str, owner: str) -> str:
        if not sealed.startswith(_VERSION):
            raise Unsealable("not a sealed value")
        try:
            raw = base64.urlsafe_b64decode(sealed[len(_VERSION) :])
            return self._aead.decrypt(raw[:_NONCE], raw[_NONCE:], owner.encode()).decode()
        except (InvalidTag, ValueError) as exc:
            raise Unsealable("sealed with another key, or altered") from exc


async def sealer(db: Database, configured: str | None, data_dir: Path) -> Sealer:
    """This server's Sealer, its key checked against the other replicas'. StartRefused
    when the key is too short or not theirs."""
    key = agent_tokens.load_key(configured, data_dir, KEY_FILE, SETTING)
    source = SETTING if configured is not None else f"from {data_dir / KEY_FILE}"
    await agent_tokens.check_fingerprint(db, key, source, FINGERPRINT_NAME, MISMATCH)
    return Sealer(key)
