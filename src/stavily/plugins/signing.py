"""The registry's Ed25519 signing keys, kept out of the database.

Keys live in `<data_dir>/plugin-keys/` (or STAVILY_PLUGIN_KEYS_DIR, shared by replicas):
one private key file per key (`<key_id>.key`, PEM, mode 0600) and its public half
(`<key_id>.pub`). The newest private key signs; rotation makes a new one and keeps the
older public keys, so versions signed before still verify. A retired key's private file
is removed (`rotate(retire=True)`): it can then sign nothing more.

What is signed is a version's manifest, `{"id", "version", "sha256", "size", "created"}`,
as canonical JSON (sorted keys, no spaces, UTF-8)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "ed25519"


def canonical(manifest: dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id_of(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_text(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def verify(public_key_b64: str, manifest: dict[str, Any], signature_b64: str) -> bool:
    """Whether `signature_b64` is the key's signature of `manifest` (used by agents)."""
    try:
        public = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
        public.verify(base64.b64decode(signature_b64), canonical(manifest))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class PublicKey:
    key_id: str
    public_key: str
    created_at: str
    signing: bool

    def view(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "algorithm": ALGORITHM,
            "public_key": self.public_key,
            "created_at": self.created_at,
            "signing": self.signing,
        }


class Keyring:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        # the newest key file's name, and its key
        self._signer: tuple[str, Ed25519PrivateKey] | None = None

    def ensure(self) -> None:
        """Make the first key on first start (of processes starting together, one makes
        it: the file is linked into place, which fails if the name exists)."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not any(self.folder.glob("*.key")):
            self._create()

    def _create(self) -> str:
        private = Ed25519PrivateKey.generate()
        key_id = key_id_of(private.public_key())
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        public = public_text(private.public_key()).encode() + b"\n"
        # `<stamp>-<key_id>`: names sort by age, the newest signs
        base = f"{stamp}-{key_id}"
        for suffix, data, mode in ((".pub", public, 0o644), (".key", pem, 0o600)):
            temporary = self.folder / f".{base}{suffix}.{os.getpid()}.{secrets.token_hex(4)}"
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            try:
                os.link(temporary, self.folder / f"{base}{suffix}")
            finally:
                os.unlink(temporary)
        return key_id

    def rotate(self, retire: bool = False) -> str:
        """A new signing key; `retire`: the older private keys are removed (their public
        halves stay, for the versions they signed)."""
        self.ensure()
        old = sorted(self.folder.glob("*.key"))
        key_id = self._create()
        if retire:
            for path in old:
                path.unlink()
        return key_id

    def signer(self) -> tuple[str, Ed25519PrivateKey]:
        """The newest private key; a key rotated by another process is seen at the next
        signature (the folder is listed each time: publishing is rare)."""
        keys = sorted(self.folder.glob("*.key"))
        if not keys:
            self.ensure()
            keys = sorted(self.folder.glob("*.key"))
        if self._signer is None or self._signer[0] != keys[-1].name:
            private = serialization.load_pem_private_key(keys[-1].read_bytes(), password=None)
            assert isinstance(private, Ed25519PrivateKey)
            self._signer = (keys[-1].name, private)
        return key_id_of(self._signer[1].public_key()), self._signer[1]

    def sign(self, manifest: dict[str, Any]) -> tuple[str, str]:
        """(key id, base64 signature) of the manifest, by the newest key."""
        key_id, private = self.signer()
        return key_id, base64.b64encode(private.sign(canonical(manifest))).decode()

    def public_keys(self) -> list[PublicKey]:
        signing = self.signer()[0]
        keys = []
        for path in sorted(self.folder.glob("*.pub")):
            stamp, _, key_id = path.stem.partition("-")
            created = datetime.strptime(stamp, "%Y%m%dT%H%M%S%f").replace(tzinfo=UTC)
            keys.append(
                PublicKey(
                    key_id=key_id,
                    public_key=path.read_text().strip(),
                    created_at=created.isoformat().replace("+00:00", "Z"),
                    signing=key_id == signing,
                )
            )
        return keys
