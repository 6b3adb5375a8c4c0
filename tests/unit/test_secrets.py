"""security.secrets: where secrets may come from, marks, revealing and masking."""

from __future__ import annotations

import base64
import binascii
import json
from urllib.parse import quote

import pytest

from stavily.config import Settings
from stavily.security import secrets
from stavily.security.secrets import SecretPolicy, SecretUnavailable

POLICY = SecretPolicy.of("STAVILY_SECRET_", "API_KEY, STAVILY_DATABASE_URL", Settings.variables())
VALUE = "hunter2-correct-horse"


@pytest.mark.parametrize(
    ("variable", "allowed"),
    [
        ("STAVILY_SECRET_TOKEN", True),
        ("API_KEY", True),  # listed
        ("STAVILY_BOOTSTRAP_TOKEN", False),  # a setting
        ("STAVILY_DATABASE_URL", False),  # a setting, even when listed
        ("STAVILY_SECRET_ENV_NAMES", False),  # a setting under the prefix
        ("STAVILY_TEST_DATABASE_URL", False),  # STAVILY_* outside the prefix
        ("HOME", False),
        ("PATH", False),
    ],
)
def test_policy(variable: str, allowed: bool) -> None:
    assert (POLICY.problem(variable) is None) is allowed


def test_reference_problems_have_paths() -> None:
    refs = {
        "ok": {"env": "STAVILY_SECRET_OK"},
        "token": {"env": "STAVILY_BOOTSTRAP_TOKEN"},
        "vaulted": {"vault": "kv/x"},
        "none": {},
    }
    problems = secrets.reference_problems(refs, POLICY)
    assert [p["path"] for p in problems] == [
        "secrets.token.env",
        "secrets.vaulted.vault",
        "secrets.none",
    ]
    assert "setting of the orchestrator" in problems[0]["message"]


def test_reveal_replaces_only_marks_of_this_nonce(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAVILY_SECRET_TOK", VALUE)
    refs = {"tok": {"env": "STAVILY_SECRET_TOK"}}
    nonce = secrets.new_nonce()
    forged = secrets.mark("0" * 16, "tok")  # what an input could carry
    config = {"h": f"Bearer {secrets.mark(nonce, 'tok')}", "x": [forged]}
    revealed = secrets.reveal(config, nonce, refs, POLICY)
    assert revealed == {"h": f"Bearer {VALUE}", "x": [forged]}


def test_reveal_never_hands_out_a_mark(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STAVILY_SECRET_GONE", raising=False)
    refs = {"gone": {"env": "STAVILY_SECRET_GONE"}, "bad": {"env": "STAVILY_BOOTSTRAP_TOKEN"}}
    nonce = secrets.new_nonce()
    config = {"a": secrets.mark(nonce, "gone"), "b": secrets.mark(nonce, "bad")}
    assert secrets.reveal(config, nonce, refs, POLICY) == {"a": "", "b": ""}


def test_check_rendered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAVILY_SECRET_TOK", VALUE)
    refs = {"tok": {"env": "STAVILY_SECRET_TOK"}, "gone": {"env": "STAVILY_SECRET_GONE"}}
    monkeypatch.delenv("STAVILY_SECRET_GONE", raising=False)
    nonce = secrets.new_nonce()
    secrets.check_rendered({"a": f"x{secrets.mark(nonce, 'tok')}y"}, nonce, refs, POLICY)
    with pytest.raises(SecretUnavailable, match="changed by a template expression"):
        secrets.check_rendered({"a": secrets.mark(nonce, "tok").upper()}, nonce, refs, POLICY)
    with pytest.raises(SecretUnavailable, match="STAVILY_SECRET_GONE is not set"):
        secrets.check_rendered({"a": secrets.mark(nonce, "gone")}, nonce, refs, POLICY)


def test_environment_names() -> None:
    nonce = secrets.new_nonce()
    config = {
        "environment": {
            "API_TOKEN": secrets.mark(nonce, "tok"),
            "HEADER": f"Bearer {secrets.mark(nonce, 'tok')}",  # not the secret as it is
            "PLAIN": "x",
        }
    }
    assert secrets.environment_names(config, nonce, ["tok"]) == ["API_TOKEN"]
    assert secrets.environment_names({"environment": "x"}, nonce, ["tok"]) == []


def _encodings(value: str) -> dict[str, str]:
    raw = value.encode()
    return {
        "exact": value,
        "reversed": value[::-1],
        "base64": base64.b64encode(raw).decode(),
        "base64 inside a longer text": base64.b64encode(b"user:" + raw + b"!").decode(),
        "base64 shifted by one": base64.b64encode(b"x" + raw).decode(),
        "urlsafe base64": base64.urlsafe_b64encode(b"??" + raw).decode(),
        "hex": binascii.hexlify(raw).decode(),
        "HEX": binascii.hexlify(raw).decode().upper(),
        "url-encoded": quote(value, safe=""),
        "json-escaped": json.dumps(value)[1:-1],
    }


@pytest.mark.parametrize("value", [VALUE, "p@ss/w+rd=?&", "ключ-секрет-🙂"])
def test_mask_hides_the_value_in_the_forms_a_plugin_prints(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("STAVILY_SECRET_TOK", value)
    refs = {"tok": {"env": "STAVILY_SECRET_TOK"}}
    report = {name: f"got <{text}> here" for name, text in _encodings(value).items()}
    report[value] = "as a key too"
    masked = secrets.mask(report, refs, POLICY)
    dumped = json.dumps(masked, ensure_ascii=False)
    for name, text in _encodings(value).items():
        assert text not in dumped, name
    assert "***" in masked["reversed"]
    assert "as a key too" in masked.values()


def test_mask_leaves_short_values_derived_forms_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAVILY_SECRET_PIN", "42")
    refs = {"pin": {"env": "STAVILY_SECRET_PIN"}}
    assert secrets.mask({"a": "42 and 24"}, refs, POLICY) == {"a": "*** and 24"}
