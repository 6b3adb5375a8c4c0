"""The repository's packaging: compose.yaml, the Dockerfile, LICENSE, CHANGELOG.md and the
agent API's documentation (docs/agent-api.md) against what the server serves."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi.routing import APIRoute

from stavily.api import agents_v1, fleet, plugins
from stavily.config import Settings
from stavily.security.access import check_bootstrap_token

ROOT = Path(__file__).resolve().parents[2]
IMAGE_TAG = "stavily-orchestrator:packaging-test"

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}; $$ is a literal $
_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
)


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """A compose value as compose would run it with `env` (by default: nothing set)."""
    env = env or {}

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group("name"), match.group("op"), match.group("arg")
        if name in env and (env[name] or op not in (":-", ":?")):
            return env[name]
        if op in (":-", "-"):
            return arg or ""
        if op in (":?", "?"):
            raise AssertionError(f"compose would refuse to start: {name} is required ({arg})")
        return ""

    return _VARIABLE.sub(substitute, value)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def command_text(service: dict[str, Any]) -> str:
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key)
        if value is None:
            continue
        parts.extend(value if isinstance(value, list) else [value])
    return interpolate(" ".join(str(p) for p in parts))


def agent_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in services.items()
        if "stavily agent run" in command_text(service)
    }


def depends_on(service: dict[str, Any]) -> dict[str, str]:
    """Each dependency with its condition (the short list form: service_started)."""
    value = service.get("depends_on") or {}
    if isinstance(value, list):
        return dict.fromkeys(value, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in value.items()}


def published_ports(service: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(host address or None for every address, host port) of each published port."""
    published = []
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            if port.get("published") is not None:
                published.append((port.get("host_ip"), str(port["published"])))
            continue
        parts = str(port).split(":")
        if len(parts) == 1:  # a container port alone: published on a random host port
            published.append((None, ""))
        elif len(parts) == 2:
            published.append((None, parts[0]))
        else:
            published.append((":".join(parts[:-2]), parts[-2]))
    return published


# -- compose.yaml ------------------------------------------------------------------------------


def test_compose_has_postgres_the_orchestrator_and_two_agents(services: dict) -> None:
    assert {"postgres", "orchestrator"} <= services.keys()
    agents = agent_services(services)
    assert len(agents) == 2, sorted(agents)
    assert "orchestrator" not in agents and "postgres" not in agents


def test_postgres_is_16_with_a_healthcheck_and_a_volume(compose: dict, services: dict) -> None:
    postgres = services["postgres"]
    assert str(postgres["image"]).startswith("postgres:16")
    test = postgres["healthcheck"]["test"]
    assert "pg_isready" in (" ".join(test) if isinstance(test, list) else test)
    mounts = [str(v) for v in postgres.get("volumes") or []]
    data = [m for m in mounts if m.split(":")[1:2] == ["/var/lib/postgresql/data"]]
    assert data, mounts
    assert data[0].split(":")[0] in (compose.get("volumes") or {})  # a named volume


def test_the_orchestrator_waits_for_a_healthy_postgres(services: dict) -> None:
    assert depends_on(services["orchestrator"]).get("postgres") == "service_healthy"


def test_the_database_url_is_the_postgres_service_with_asyncpg(services: dict) -> None:
    postgres_env = environment(services["postgres"])
    url = environment(services["orchestrator"])["STAVILY_DATABASE_URL"]
    parts = urlsplit(url)
    assert parts.scheme == "postgresql+asyncpg"
    assert parts.hostname == "postgres"
    assert parts.port in (None, 5432)
    assert parts.username == postgres_env["POSTGRES_USER"]
    assert parts.password == postgres_env["POSTGRES_PASSWORD"]
    assert parts.path.lstrip("/") == postgres_env["POSTGRES_DB"]


def test_the_database_url_follows_the_password_given(services: dict) -> None:
    raw = services["orchestrator"]["environment"]["STAVILY_DATABASE_URL"]
    url = interpolate(raw, {"POSTGRES_PASSWORD": "f00dfeed"})
    assert urlsplit(url).password == "f00dfeed"


def test_postgres_is_never_published_on_every_address(services: dict) -> None:
    for host, _ in published_ports(services["postgres"]):
        assert host not in (None, "", "0.0.0.0", "::", "[::]"), host


def test_the_orchestrator_is_published_on_loopback_only(services: dict) -> None:
    ports = published_ports(services["orchestrator"])
    assert ports, "the orchestrator's port is published"
    for host, port in ports:
        assert host in ("127.0.0.1", "::1", "[::1]") and port == "8700", (host, port)


def test_the_orchestrator_settings_are_real_settings(services: dict) -> None:
    known = set(Settings.variables())
    env = environment(services["orchestrator"])
    unknown = {name for name in env if name.startswith("STAVILY_") and name not in known}
    assert not unknown
    assert env["STAVILY_HOST"] == "0.0.0.0" and env["STAVILY_PORT"] == "8700"


def test_the_placeholder_bootstrap_token_lets_the_server_start(services: dict) -> None:
    token = environment(services["orchestrator"])["STAVILY_BOOTSTRAP_TOKEN"]
    check_bootstrap_token(token)  # raises StartRefused when too weak
    assert "REPLACE" in token.upper()
    text = (ROOT / "compose.yaml").read_text(encoding="utf-8")
    assert re.search(r"bootstrap token.*REPLACE IT", text, re.S | re.I)


def test_agents_use_the_orchestrators_image_and_build(services: dict) -> None:
    orchestrator = services["orchestrator"]
    assert orchestrator.get("image") or orchestrator.get("build")
    for name, agent in agent_services(services).items():
        assert agent.get("image") == orchestrator.get("image"), name
        assert agent.get("build") == orchestrator.get("build"), name


def test_agents_enroll_once_with_a_token_made_by_the_enroll_job(services: dict) -> None:
    agents = agent_services(services)
    names, files = set(), set()
    for service_name, agent in agents.items():
        args = shlex.split(command_text(agent))
        assert "--enroll" in args and "--name" in args and "--credentials-file" in args
        names.add(args[args.index("--name") + 1])
        credentials = args[args.index("--credentials-file") + 1]
        files.add(credentials)
        mounts = [str(v).split(":") for v in agent.get("volumes") or []]
        assert any(credentials.startswith(m[1].rstrip("/") + "/") for m in mounts), (
            f"{service_name}: the credentials file is on a volume, kept across restarts"
        )
        assert environment(agent)["STAVILY_URL"] == "http://orchestrator:8700"
        jobs = [d for d, c in depends_on(agent).items() if c == "service_completed_successfully"]
        assert jobs, f"{service_name} starts after the job that makes the enrollment token"
        for job in jobs:
            assert "stavily enrollment create" in command_text(services[job])
            assert depends_on(services[job]).get("orchestrator") == "service_healthy"
            job_env = environment(services[job])
            assert job_env["STAVILY_URL"] == "http://orchestrator:8700"
            bootstrap = environment(services["orchestrator"])["STAVILY_BOOTSTRAP_TOKEN"]
            assert job_env["STAVILY_TOKEN"] == bootstrap
    assert len(names) == len(files) == len(agents), "each agent its own name and file"


def test_only_the_orchestrator_runs_the_images_healthcheck(services: dict) -> None:
    built = services["orchestrator"].get("image")
    for name, service in services.items():
        if name != "orchestrator" and service.get("image") == built:
            assert (service.get("healthcheck") or {}).get("disable") is True, name


# -- Dockerfile and .dockerignore --------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
    return instructions


def test_the_dockerfile_builds_on_python_311_slim_with_pip_install() -> None:
    instructions = dockerfile_instructions()
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1]
        for k, rest in instructions
        if k == "ARG" and "=" in rest
    }
    bases = [rest.split()[0] for k, rest in instructions if k == "FROM"]
    resolved = [re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), ""), b) for b in bases]
    assert resolved and all(b == "python:3.11-slim" for b in resolved), resolved
    runs = " ".join(rest for k, rest in instructions if k == "RUN")
    assert re.search(r"pip install (\S+ )*\.(\s|$)", runs)


def test_the_dockerfile_runs_as_a_non_root_user() -> None:
    users = [rest for k, rest in dockerfile_instructions() if k == "USER"]
    assert users, "a USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), user


def test_the_dockerfile_exposes_8700_and_checks_healthz() -> None:
    instructions = dockerfile_instructions()
    exposed = " ".join(rest for k, rest in instructions if k == "EXPOSE").split()
    assert "8700" in exposed or "8700/tcp" in exposed
    checks = [rest for k, rest in instructions if k == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "/healthz" in checks[0] and "urllib" in checks[0] and "curl" not in checks[0]


def test_the_dockerfile_serves_on_every_address_of_the_container() -> None:
    instructions = dockerfile_instructions()
    entrypoint = [rest for k, rest in instructions if k == "ENTRYPOINT"][-1]
    cmd = [rest for k, rest in instructions if k == "CMD"][-1]
    assert "stavily" in entrypoint and "serve" in cmd
    env = " ".join(rest for k, rest in instructions if k == "ENV")
    assert "STAVILY_HOST=0.0.0.0" in env or "--host 0.0.0.0" in cmd.replace('", "', " ")


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", "bench", ".stavily"} <= patterns
    assert {"**/__pycache__", ".pytest_cache", ".ruff_cache"} <= patterns
    # what the build copies must stay in
    assert not {"src", "pyproject.toml", "README.md", "LICENSE"} & patterns


# -- LICENSE and CHANGELOG.md ------------------------------------------------------------------


def test_license_is_apache_2_as_pyproject_says() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.lstrip().startswith("Apache License")
    assert "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert "Copyright 2026 The Stavily Orchestrator authors" in text
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert pyproject["project"]["license"] == "Apache-2.0"


def test_changelog_keeps_a_changelog() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert text.startswith("# Changelog")
    assert "keepachangelog.com" in text
    assert "## [Unreleased]" in text
    for section in ("### Added", "### Changed", "### Security"):
        assert section in text


# -- docs/agent-api.md -------------------------------------------------------------------------


def agent_routes() -> list[APIRoute]:
    routes = [
        r
        for r in (*agents_v1.router.routes, *fleet.public.routes, *plugins.public.routes)
        if isinstance(r, APIRoute)
    ]
    assert routes
    return routes


def test_the_agent_api_doc_names_every_agent_route() -> None:
    doc = (ROOT / "docs" / "agent-api.md").read_text(encoding="utf-8")
    missing = []
    for route in agent_routes():
        for method in route.methods:
            if f"`{method} {route.path}" not in doc:
                missing.append(f"{method} {route.path}")
    assert not missing, missing


def test_the_agent_api_doc_serves_no_route_the_server_lacks() -> None:
    doc = (ROOT / "docs" / "agent-api.md").read_text(encoding="utf-8")
    served = {(m, r.path) for r in agent_routes() for m in r.methods}
    table = doc.split("## Routes at a glance", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(GET|PUT|POST|DELETE|PATCH) (/agents/v1/[^`]*)`", table, re.M))
    assert listed == served
    # the documented Stavily sensor route, outside /agents/v1, is served and described
    assert "| `POST /api/v1/triggers` | agent |" in table
    assert "not yet served" not in doc


# -- building the image (only where a Docker daemon answers) -----------------------------------


def _docker_unavailable() -> str | None:
    docker = shutil.which("docker")
    if docker is None:
        return "docker is not on PATH"
    try:
        info = subprocess.run([docker, "info"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"docker info failed: {exc}"
    if info.returncode != 0:
        return "no Docker daemon answers (docker info failed)"
    return None


def test_the_image_builds_and_runs_as_its_user() -> None:
    unavailable = _docker_unavailable()
    if unavailable is not None:
        pytest.skip(f"cannot build the image here: {unavailable}")
    docker = shutil.which("docker") or "docker"
    subprocess.run([docker, "build", "-t", IMAGE_TAG, str(ROOT)], check=True, timeout=1800)
    try:
        user = subprocess.run(
            [docker, "image", "inspect", "-f", "{{.Config.User}}", IMAGE_TAG],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        assert user and user.split(":")[0] not in ("root", "0")
        version = subprocess.run(
            [docker, "run", "--rm", IMAGE_TAG, "version"],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        assert version.startswith("stavily ")
    finally:
        subprocess.run([docker, "image", "rm", "-f", IMAGE_TAG], check=False, capture_output=True)
