"""Credential rules without a server: bootstrap tokens, the agent JWT key file, the cache."""

from __future__ import annotations

import multiprocessing
import stat
from pathlib import Path

import pytest

from stavily.security import agent_tokens
from stavily.security.access import WEAK_BOOTSTRAP, check_bootstrap_token
from stavily.security.credentials import CredentialCache, StartRefused
from tests.harness import ADMIN_TOKEN


@pytest.mark.parametrize(
    "token",
    [
        "a",
        "stv_short",
        "a" * 64,  # long, but one character
        "abcdabcdabcdabcdabcdabcdabcdabcdabcd",  # 36 characters, 4 distinct
        "stv_0123456789abcdef0123456789a",  # 31 characters
    ],
)
def test_weak_bootstrap_tokens_are_refused(token: str) -> None:
    with pytest.raises(StartRefused) as refused:
        check_bootstrap_token(token)
    assert refused.value.message == WEAK_BOOTSTRAP
    assert "\n" not in WEAK_BOOTSTRAP and "openssl rand -hex 32" in WEAK_BOOTSTRAP


@pytest.mark.parametrize(
    "token",
    [
        None,  # none given: one is generated
        ADMIN_TOKEN,
        "stv_e2e_admin_token_0123456789abcdefghij",
        "stv_" + "0123456789abcdef" * 4,  # stv_$(openssl rand -hex 32) has this shape
    ],
)
def test_strong_enough_bootstrap_tokens_pass(token: str | None) -> None:
    check_bootstrap_token(token)


def test_the_key_file_is_made_once_with_mode_0600(tmp_path: Path) -> None:
    data_dir = tmp_path / "not-yet"
    key = agent_tokens.load_key(None, data_dir)
    path = data_dir / agent_tokens.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(key) >= agent_tokens.MIN_KEY_LENGTH
    assert agent_tokens.load_key(None, data_dir) == key  # read again, not made again
    assert [p.name for p in data_dir.iterdir()] == [agent_tokens.KEY_FILE]  # no temporaries


def _load_together(
    barrier: multiprocessing.synchronize.Barrier, data_dir: Path, out: object
) -> None:
    barrier.wait()
    out.put(agent_tokens.load_key(None, data_dir))  # type: ignore[attr-defined]


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    """`serve --workers N`: each process finds no file and makes one; one wins, the others
    read the winner's key, never a half-written file."""
    context = multiprocessing.get_context("fork")
    count = 8
    barrier = context.Barrier(count)
    out = context.Queue()
    processes = [
        context.Process(target=_load_together, args=(barrier, tmp_path, out)) for _ in range(count)
    ]
    for process in processes:
        process.start()
    keys = [out.get(timeout=30) for _ in processes]
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0
    assert len(set(keys)) == 1
    assert keys[0] == agent_tokens.load_key(None, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [agent_tokens.KEY_FILE]


def test_a_configured_key_comes_first_and_must_be_long_enough(tmp_path: Path) -> None:
    configured = "k" * 16 + "0123456789abcdef"
    assert agent_tokens.load_key(configured, tmp_path) == configured
    assert not (tmp_path / agent_tokens.KEY_FILE).exists()  # no file when the variable is set
    with pytest.raises(StartRefused) as refused:
        agent_tokens.load_key("too-short", tmp_path)
    assert refused.value.message == agent_tokens.SHORT_KEY


def test_a_key_file_without_a_usable_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / agent_tokens.KEY_FILE).write_text("short\n")
    with pytest.raises(StartRefused, match="holds no key of at least 32"):
        agent_tokens.load_key(None, tmp_path)


def test_a_lookup_begun_before_a_clear_is_not_cached() -> None:
    """A request read the agent before another replica's revoke committed, and the
    replica heard of the revoke before the request cached what it read: not cached."""
    cache: CredentialCache[str] = CredentialCache(ttl=60)
    assert cache.get("key") is None  # the lookup begins
    cache.clear()  # a revocation is heard meanwhile
    cache.put("key", "as it was before the revocation")
    assert cache.get("key") is None
    cache.put("key", "read after the revocation")  # the next lookup's
    assert cache.get("key") == "read after the revocation"
    cache.put("other", "never looked up first")
    assert cache.get("other") == "never looked up first"
