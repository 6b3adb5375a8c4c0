"""security.store's envelope (values under a data key, the data key under the server's
key, each bound to where it belongs) and the store secrets' copies an instruction keeps
(security.secrets)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from stavily.security import secrets
from stavily.security.sealing import Sealer
from stavily.security.secrets import SecretPolicy, SecretUnavailable, name_problem
from stavily.security.store import SecretStore, SecretUnreadable

KEY = "k" * 32
VALUE = "store-value-Xy7-0123456789"


def _store(key: str = KEY) -> SecretStore:
    return SecretStore(None, Sealer(key))  # type: ignore[arg-type]  # no database used


def _wrapped(store: SecretStore, org: str, key_id: str) -> tuple[bytes, str]:
    raw = AESGCM.generate_key(bit_length=256)
    return raw, store.sealer.seal(base64.b64encode(raw).decode(), f"secret-key/{org}/{key_id}")


def test_a_value_opens_only_as_the_secret_it_was_stored_as() -> None:
    store = _store()
    _, wrapped = _wrapped(store, "org_a", "dk_1")
    aead = store._unwrap("org_a", "dk_1", wrapped)
    ciphertext = store._encrypt(aead, "org_a", "token", VALUE)
    assert VALUE not in ciphertext and base64.b64encode(VALUE.encode()).decode() not in ciphertext
    assert store._encrypt(aead, "org_a", "token", VALUE) != ciphertext  # a new nonce each time
    assert store._decrypt(aead, "org_a", "token", ciphertext) == VALUE
    for org, name in (("org_a", "other"), ("org_b", "token")):
        with pytest.raises(SecretUnreadable, match="altered or moved"):
            store._decrypt(aead, org, name, ciphertext)
    flipped = ciphertext[:-2] + ("A" if ciphertext[-2] != "A" else "B") + ciphertext[-1]
    for bad in (flipped, "v2." + ciphertext[3:], "v1.not base64!"):
        with pytest.raises(SecretUnreadable):
            store._decrypt(aead, "org_a", "token", bad)


def test_a_data_key_opens_only_for_its_organization_and_with_the_servers_key() -> None:
    store = _store()
    raw, wrapped = _wrapped(store, "org_a", "dk_1")
    for org, key_id in (("org_b", "dk_1"), ("org_a", "dk_2")):
        with pytest.raises(SecretUnreadable, match="does not open"):
            _store()._unwrap(org, key_id, wrapped)
    with pytest.raises(SecretUnreadable, match="does not open"):
        _store("another key of at least 32 chars")._unwrap("org_a", "dk_1", wrapped)
    assert raw.hex() not in wrapped
    # unwrapped once, then from memory; for its organization only
    first = store._unwrap("org_a", "dk_1", wrapped)
    assert store._unwrap("org_a", "dk_1", "no longer read") is first
    with pytest.raises(SecretUnreadable):
        store._unwrap("org_b", "dk_1", wrapped)


def test_names() -> None:
    for good in ("slack_token", "A", "_x", "db.password-2", "x" * 100):
        assert name_problem(good) is None, good
    for bad in ("", "-x", "1x", "has space", "a/b", "x" * 101, "é"):
        assert name_problem(bad), bad


# -- a store secret in an instruction (security.secrets) --------------------------------------

NONCE = "00112233aabbccdd"
POLICY = SecretPolicy(store=_store())


def _resolve(value: Any, refs: dict[str, Any], policy: SecretPolicy = POLICY) -> Any:
    return asyncio.run(secrets.resolve(None, value, NONCE, refs, policy, "org_a"))  # type: ignore[arg-type]


def test_steps_without_a_store_secret_in_use_read_nothing() -> None:
    """No connection is given: a read would fail."""
    env_only = {"a": {"env": "STAVILY_SECRET_A"}}
    assert _resolve({"x": secrets.mark(NONCE, "a")}, env_only) == (env_only, {})
    refs = {**env_only, "unused": {"store": "other"}}
    assert _resolve({"x": "no mark here"}, refs) == (env_only, {})
    assert _resolve({"x": "plain"}, refs, SecretPolicy()) == (env_only, {})


def test_a_store_secret_in_use_needs_a_store() -> None:
    with pytest.raises(SecretUnavailable, match="no secret store"):
        _resolve({"x": secrets.mark(NONCE, "t")}, {"t": {"store": "token"}}, SecretPolicy())


def test_the_copy_is_revealed_to_the_agent_and_masked_in_its_reports() -> None:
    store = POLICY.store
    assert store is not None
    refs = {"t": {"store": "token", "sealed": store.seal_copy("t", VALUE)}}
    config = {"header": f"Bearer {secrets.mark(NONCE, 't')}"}
    secrets.check_rendered(config, NONCE, refs, POLICY)
    assert secrets.reveal(config, NONCE, refs, POLICY) == {"header": f"Bearer {VALUE}"}
    report = {"log": [f"got {VALUE}", f"in hex {VALUE.encode().hex()}"]}
    assert secrets.mask(report, refs, POLICY) == {"log": ["got ***", "in hex ***"]}
    assert VALUE not in str(refs)


@pytest.mark.parametrize(
    "ref",
    [
        {"store": "token"},  # never read (a server without the store queued it)
        {
            "store": "token",
            "sealed": _store("another key of at least 32 chars").seal_copy("t", VALUE),
        },
        {"store": "token", "sealed": _store().seal_copy("other", VALUE)},  # another secret's
    ],
)
def test_a_copy_that_does_not_open_reaches_no_one(ref: dict[str, Any]) -> None:
    refs, config = {"t": ref}, {"x": secrets.mark(NONCE, "t")}
    with pytest.raises(SecretUnavailable, match="secret 't'"):
        secrets.check_rendered(config, NONCE, refs, POLICY)
    assert secrets.reveal(config, NONCE, refs, POLICY) == {"x": ""}
    assert secrets.mask({"x": VALUE}, refs, POLICY) == {"x": VALUE}  # nothing it knows of


def test_one_source_per_secret() -> None:
    problems = secrets.reference_problems(
        {"both": {"env": "STAVILY_SECRET_X", "store": "x"}, "stored": {"store": "x"}},
        SecretPolicy(),
    )
    assert problems == [
        {"path": "secrets.both", "message": "a secret has one source: env or store"}
    ]
