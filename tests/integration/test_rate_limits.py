"""Rate limits over real HTTP: per token, per source address, per agent and per webhook;
refused credentials block their source; with Redis, two replicas share one budget.

Each test speaks from source addresses of its own: the server trusts X-Forwarded-For from
loopback (uvicorn's proxy headers), as it would from a proxy on its host."""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stavily.workflows.webhooks import sign
from tests.e2e.support import ADMIN_TOKEN, CLI, Processes, base_env, wait_healthy
from tests.harness import PG_URL, Orchestrator, api_token, free_port, fresh_database, serve

REDIS_URL = os.environ.get("STAVILY_TEST_REDIS_URL")
NEEDS_REDIS = pytest.mark.skipif(
    not REDIS_URL, reason="STAVILY_TEST_REDIS_URL is not set: shared-limit runs skipped"
)
LIMITS = {
    "api_rate_limit": "20/minute",
    "source_rate_limit": "40/minute",
    "failed_credential_limit": "4/minute",
    "webhook_rate_limit": "3/minute",
    "agent_rate_limit": "5/second",
}


@pytest.fixture(scope="module")
def limited(backend: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orchestrator]:
    tmp = tmp_path_factory.mktemp(f"limits-{backend}")
    with fresh_database(backend, tmp) as url, serve(url, tmp, **LIMITS) as running:
        assert running.api.headers["Authorization"] == f"Bearer {running.token}"  # the admin's
        yield running


def source() -> str:
    """An address of the test's own, in a /64 of its own (IPv6's documentation prefix)."""
    part = uuid.uuid4().hex
    return f"2001:db8:{part[:4]}:{part[4:8]}::{part[8:12]}"


def client(orch: Orchestrator, address: str, token: str | None = None) -> httpx.Client:
    made = orch.client(token)
    made.headers["X-Forwarded-For"] = address
    return made


def assert_limited(response: httpx.Response, limit: int, window: int, message: str) -> None:
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["code"] == "rate_limited" and message in error["message"]
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= window and error["details"] == {"retry_after": retry_after}
    assert response.headers["RateLimit-Limit"] == str(limit)
    assert response.headers["RateLimit-Remaining"] == "0"
    assert response.headers["RateLimit-Reset"] == str(retry_after)
    assert response.headers["RateLimit-Policy"] == f"{limit};w={window}"


def test_a_token_past_its_limit_gets_429_and_other_tokens_do_not(limited: Orchestrator) -> None:
    address = source()
    first = client(limited, address, api_token(limited, "viewer"))
    answers = [first.get("/api/v1/agents").status_code for _ in range(20)]
    assert answers == [200] * 20
    assert_limited(first.get("/api/v1/agents"), 20, 60, "too many requests with this token")
    other = client(limited, address, api_token(limited, "viewer"))
    assert other.get("/api/v1/agents").status_code == 200  # per token: same address


def test_a_source_past_its_budget_is_refused_whatever_it_presents(limited: Orchestrator) -> None:
    address = source()
    anonymous = client(limited, address)
    # no credential at all: 401, and not counted as a refused one (it would block at 4)
    assert {anonymous.get("/api/v1/agents").status_code for _ in range(40)} == {401}
    good = client(limited, address, api_token(limited, "viewer"))
    assert_limited(good.get("/api/v1/agents"), 40, 60, "too many requests from this address")
    assert_limited(good.get("/healthz"), 40, 60, "from this address")
    # the agent API has a budget of its own per source, and other sources are untouched
    agent_id, key = limited.create_agent()
    beat = client(limited, address, key).post(
        f"/agents/v1/{agent_id}/heartbeat", json={"status": "online"}
    )
    assert beat.status_code == 200, beat.text
    assert client(limited, source(), limited.token).get("/api/v1/agents").status_code == 200


def test_refused_credentials_block_their_source_even_with_a_good_token(
    limited: Orchestrator,
) -> None:
    address, token = source(), api_token(limited, "viewer")
    for n in range(4):
        wrong = client(limited, address, f"stv_wrong_{n}_{uuid.uuid4().hex}")
        assert wrong.get("/api/v1/agents").status_code == 401
    good = client(limited, address, token)
    assert_limited(good.get("/api/v1/agents"), 4, 60, "too many refused credentials")
    assert_limited(good.get("/healthz"), 4, 60, "too many refused credentials")
    # the good token itself is not spent, nor other sources blocked
    assert client(limited, source(), token).get("/api/v1/agents").status_code == 200


def test_the_same_refused_credential_again_counts_once(limited: Orchestrator) -> None:
    """An agent whose key was revoked keeps retrying it: that is no guessing."""
    address = source()
    wrong = client(limited, address, f"stv_revoked_{uuid.uuid4().hex}")
    assert {wrong.get("/api/v1/agents").status_code for _ in range(10)} == {401}
    good = client(limited, address, api_token(limited, "viewer"))
    assert good.get("/api/v1/agents").status_code == 200


def test_agent_credentials_and_webhook_signatures_count_as_refused_credentials(
    limited: Orchestrator,
) -> None:
    address = source()
    agent_id, key = limited.create_agent()
    for n in range(2):
        beat = client(limited, address, f"stva_wrong_{n}_{uuid.uuid4().hex}").post(
            f"/agents/v1/{agent_id}/heartbeat", json={"status": "online"}
        )
        assert beat.status_code == 401
    hook = webhook(limited)
    for n in range(2):
        forged = deliver(limited, hook, address, secret=f"whsec_forged_{n}")
        assert forged.status_code == 401, forged.text
    agent = client(limited, address, key)
    blocked = agent.post(f"/agents/v1/{agent_id}/heartbeat", json={"status": "online"})
    assert_limited(blocked, 4, 60, "too many refused credentials")
    assert_limited(deliver(limited, hook, address), 4, 60, "too many refused credentials")


def test_an_agent_past_its_limit_gets_429_and_other_agents_do_not(limited: Orchestrator) -> None:
    address = source()
    (flood_id, flood_key), (calm_id, calm_key) = limited.create_agent(), limited.create_agent()
    flood = client(limited, address, flood_key)
    url = f"/agents/v1/{flood_id}/heartbeat"
    answers = [flood.post(url, json={"status": "online"}).status_code for _ in range(6)]
    assert answers[:5] == [200] * 5, answers
    limited_answer = flood.post(url, json={"status": "online"})
    assert_limited(limited_answer, 5, 1, "too many requests from this agent")
    calm = client(limited, address, calm_key)
    assert (
        calm.post(f"/agents/v1/{calm_id}/heartbeat", json={"status": "online"}).status_code == 200
    )


def webhook(orch: Orchestrator) -> dict[str, object]:
    name = f"limited-{uuid.uuid4().hex[:8]}"
    orch.apply(f"name: {name}\nactions:\n  steps:\n  - name: only\n    plugin: noop\n")
    response = orch.api.post("/api/v1/webhooks", json={"workflow": name})
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def deliver(
    orch: Orchestrator, hook: dict[str, object], address: str, secret: str | None = None
) -> httpx.Response:
    body = b'{"delivery": "%s"}' % uuid.uuid4().hex.encode()
    signature = sign(secret or str(hook["secret"]), body, int(time.time()))
    return httpx.post(
        str(hook["url"]),
        content=body,
        headers={
            "Content-Type": "application/json",
            "X-Stavily-Signature": signature,
            "X-Forwarded-For": address,
        },
    )


def test_a_webhook_past_its_limit_gets_429_per_sender(limited: Orchestrator) -> None:
    hook, other = webhook(limited), webhook(limited)
    sender = source()
    answers = [deliver(limited, hook, sender).status_code for _ in range(3)]
    assert answers == [202] * 3
    assert_limited(deliver(limited, hook, sender), 3, 60, "too many deliveries to this webhook")
    assert deliver(limited, other, sender).status_code == 202  # another webhook
    assert deliver(limited, hook, source()).status_code == 202  # another sender


def test_unsigned_requests_to_a_webhook_block_their_source_not_the_sender(
    limited: Orchestrator,
) -> None:
    hook, other, forger, sender = webhook(limited), webhook(limited), source(), source()
    unsigned = {"Content-Type": "application/json", "X-Forwarded-For": forger}
    answers = [  # three: the webhook limit (per sender) is 3, the refused-credential one 4
        httpx.post(str(hook["url"]), content=b"{}", headers=unsigned).status_code for _ in range(3)
    ]
    answers.append(httpx.post(str(other["url"]), content=b"{}", headers=unsigned).status_code)
    assert answers == [401] * 4  # no signature at all: refused, and counted as a guess
    blocked = httpx.post(str(other["url"]), content=b"{}", headers=unsigned)
    assert_limited(blocked, 4, 60, "refused credentials")
    assert deliver(limited, hook, sender).status_code == 202  # its budget is untouched


@NEEDS_REDIS
@pytest.mark.skipif(not PG_URL, reason="STAVILY_TEST_DATABASE_URL is not set: replicas need it")
def test_two_replicas_share_one_budget_through_redis(tmp_path: Path) -> None:
    shared = {
        "redis_url": REDIS_URL,
        "api_rate_limit": "10/minute",
        "failed_credential_limit": "3/minute",
        "agent_jwt_key": "replicas-share-this-key-0123456789abcdef",
        "secrets_key": "replicas-share-this-key-0123456789abcdef",
    }
    with (
        fresh_database("postgresql", tmp_path) as url,
        serve(url, tmp_path / "a", **shared) as first,
        serve(url, tmp_path / "b", **shared) as second,
    ):
        token, address = api_token(first, "viewer"), source()
        replicas = [client(first, address, token), client(second, address, token)]
        answers = [replicas[n % 2].get("/api/v1/agents").status_code for n in range(10)]
        assert answers == [200] * 10  # five on each
        for replica in replicas:
            assert_limited(replica.get("/api/v1/agents"), 10, 60, "with this token")
        # refused credentials are counted together: the third, on the first replica,
        # blocks the source there; the second blocks it at its next refused one
        address = source()
        for n, orch in enumerate((first, second, first)):
            assert client(orch, address, f"stv_wrong_{n}").get("/api/v1/agents").status_code == 401
        good = api_token(first, "viewer")
        assert_limited(client(first, address, good).get("/healthz"), 3, 60, "refused credentials")
        assert client(second, address, "stv_wrong_3").get("/api/v1/agents").status_code == 401
        assert_limited(client(second, address, good).get("/healthz"), 3, 60, "refused credentials")


@NEEDS_REDIS
@pytest.mark.skipif(not PG_URL, reason="STAVILY_TEST_DATABASE_URL is not set: replicas need it")
def test_two_serve_processes_share_one_budget_through_redis(tmp_path: Path) -> None:
    """Two `stavily serve` processes on one database and one Redis: a token's requests,
    alternating between them, get one budget between the two; a token of its own on each
    would have had twice as many."""
    with fresh_database("postgresql", tmp_path) as url, contextlib.ExitStack() as stack:
        processes = Processes(tmp_path / "processes")
        stack.callback(processes.close)
        env = {
            **base_env(),
            "STAVILY_DATABASE_URL": url,
            "STAVILY_BOOTSTRAP_TOKEN": ADMIN_TOKEN,
            "STAVILY_REDIS_URL": str(REDIS_URL),
            "STAVILY_API_RATE_LIMIT": "10/minute",
            "STAVILY_AGENT_JWT_KEY": "replicas-share-this-key-0123456789abcdef",
            "STAVILY_SECRETS_KEY": "replicas-share-this-key-0123456789abcdef",
        }
        servers = {}
        for name in ("a", "b"):  # started together, as replicas are
            port = free_port()
            servers[f"http://127.0.0.1:{port}"] = processes.start(
                f"serve-{name}",
                [*CLI, "serve", "--port", str(port)],
                {**env, "STAVILY_DATA_DIR": str(tmp_path / name)},
            )
        for served, server in servers.items():
            wait_healthy(served, server)
        urls = list(servers)
        made = httpx.post(
            f"{urls[0]}/api/v1/tokens",
            json={"name": "shared", "role": "viewer"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert made.status_code == 201, made.text
        headers = {"Authorization": f"Bearer {made.json()['token']}"}
        answers = [
            httpx.get(f"{urls[n % 2]}/api/v1/agents", headers=headers).status_code
            for n in range(20)
        ]
        assert answers == [200] * 10 + [429] * 10, answers


def test_with_redis_down_the_api_answers_and_limits_hold_in_memory(tmp_path: Path) -> None:
    with (
        fresh_database("sqlite", tmp_path) as url,
        serve(url, tmp_path, redis_url="redis://127.0.0.1:9/0", api_rate_limit="5/minute") as orch,
    ):
        viewer = client(orch, source(), api_token(orch, "viewer"))
        began = time.monotonic()
        assert [viewer.get("/api/v1/agents").status_code for _ in range(5)] == [200] * 5
        assert time.monotonic() - began < 5  # not held up by the Redis that is not there
        assert_limited(viewer.get("/api/v1/agents"), 5, 60, "too many requests with this token")
