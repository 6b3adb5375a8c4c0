"""What reaches a plugin's process: the environment, the arguments and the entry point are
decided by the agent and the plugin's manifest, never by the workflow alone. Every test
runs a real plugin process through `run_plugin`."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from stavily.agent.plugins import Outcome, run_plugin
from stavily.agent.runner import allow_env_patterns
from stavily.security.environment import REFUSED_ENVIRONMENT, refusal

# Records that it ran, then prints its argv and environment as one JSON object.
INSPECT = """\
import json, os, sys
open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ran"), "a").close()
json.dump({"argv": sys.argv[1:], "env": dict(os.environ)}, sys.stdout)
"""

LOADER_REASON = "loader and interpreter variables are never passed to plugins"
NOT_ALLOWED = (
    "is not allowed by the plugin's manifest (permissions.environment) or the agent's --allow-env"
)


def write_plugin(
    root: Path,
    plugin_id: str = "inspect",
    *,
    allow: Any = None,
    entry_point: str | None = "main.py",
    files: dict[str, str] | None = None,
) -> Path:
    folder = root / plugin_id
    folder.mkdir(parents=True)
    runtime: dict[str, Any] = {"type": "python", "version": "3.8+"}
    if entry_point is not None:
        runtime["entry_point"] = entry_point
    manifest: dict[str, Any] = {
        "id": plugin_id,
        "name": plugin_id,
        "version": "1.0.0",
        "type": "action",
        "runtime": runtime,
        "permissions": {"network": False},
    }
    if allow is not None:
        manifest["permissions"]["environment"] = allow
    (folder / "plugin.yaml").write_text(yaml.safe_dump({"plugin": manifest}))
    for name, text in (files or {"main.py": INSPECT}).items():
        (folder / name).write_text(text)
    return folder


def instruction(
    configuration: dict[str, Any] | None = None,
    plugin_id: str = "inspect",
    secret_environment: Any = None,
) -> dict[str, Any]:
    context: dict[str, Any] = {"step": "s"}
    if secret_environment is not None:
        context["secret_environment"] = secret_environment
    return {
        "id": "ins_test",
        "plugin_id": plugin_id,
        "instruction_type": "execute",
        "plugin_configuration": configuration or {},
        "input_data": {},
        "context": context,
        "timeout_seconds": 20,
    }


def seen(outcome: Outcome) -> dict[str, Any]:
    assert outcome.success, (outcome.error_message, outcome.stderr)
    return outcome.output  # type: ignore[no-any-return]


def assert_refused(outcome: Outcome, folder: Path, message: str) -> None:
    assert not outcome.success
    assert outcome.error_message == message, outcome.error_message
    assert not (folder / "ran").exists(), "the plugin was started anyway"


def assert_never_created(marker: Path) -> None:
    # An injected command may run in the background (webbrowser): give it time to show.
    time.sleep(0.5)
    assert not marker.exists(), "the injected command ran"


# -- the exploits -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preload_library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A shared library whose constructor creates a marker file: what LD_PRELOAD would load."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not sys.platform.startswith("linux"):
        pytest.skip("needs a C compiler on Linux")
    root = tmp_path_factory.mktemp("preload")
    marker = root / "preloaded"
    source = root / "pwn.c"
    source.write_text(
        textwrap.dedent(
            f"""\
            #include <fcntl.h>
            #include <unistd.h>
            __attribute__((constructor)) static void pwn(void) {{
                int fd = open("{marker}", O_CREAT | O_WRONLY, 0600);
                if (fd >= 0) close(fd);
            }}
            """
        )
    )
    library = root / "pwn.so"
    subprocess.run([compiler, "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library, marker


async def test_ld_preload_is_refused_and_never_loaded(
    tmp_path: Path, preload_library: tuple[Path, Path]
) -> None:
    library, marker = preload_library
    # Neither the manifest nor the agent can let it through.
    folder = write_plugin(tmp_path, allow=["*", "LD_PRELOAD"])
    outcome = await run_plugin(
        tmp_path,
        instruction({"environment": {"LD_PRELOAD": str(library)}}),
        allow_env=("LD_PRELOAD", "*"),
    )
    assert_refused(
        outcome,
        folder,
        f"environment variable 'LD_PRELOAD' is refused: {LOADER_REASON}",
    )
    assert_never_created(marker)


async def test_pythonpath_is_refused_and_sitecustomize_never_runs(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path)
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "sitecustomized"
    (evil / "sitecustomize.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    outcome = await run_plugin(
        tmp_path, instruction({"environment": {"PYTHONPATH": str(evil)}}), allow_env=("*",)
    )
    assert_refused(
        outcome, folder, f"environment variable 'PYTHONPATH' is refused: {LOADER_REASON}"
    )
    assert_never_created(marker)


async def test_pythonwarnings_and_browser_are_refused_and_the_command_never_runs(
    tmp_path: Path,
) -> None:
    """The stock-plugin exploit: PYTHONWARNINGS imports `antigravity`, which opens $BROWSER."""
    folder = write_plugin(tmp_path)
    marker = tmp_path / "browsed"
    environment = {
        "PYTHONWARNINGS": "all:0:antigravity.x:0:0",
        "BROWSER": f"sh -c 'touch {marker}' #%s",
    }
    outcome = await run_plugin(
        tmp_path, instruction({"environment": environment}), allow_env=("*",)
    )
    assert_refused(outcome, folder, f"environment variable 'BROWSER' is refused: {LOADER_REASON}")
    assert_never_created(marker)
    # Each alone is refused too.
    outcome = await run_plugin(
        tmp_path,
        instruction({"environment": {"PYTHONWARNINGS": environment["PYTHONWARNINGS"]}}),
        allow_env=("*",),
    )
    assert_refused(
        outcome, folder, f"environment variable 'PYTHONWARNINGS' is refused: {LOADER_REASON}"
    )


async def test_a_refused_name_is_reported_before_an_unallowed_one(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path)
    outcome = await run_plugin(
        tmp_path, instruction({"environment": {"AAA": "1", "ZZZ": "2", "LD_AUDIT": "x"}})
    )
    assert_refused(outcome, folder, f"environment variable 'LD_AUDIT' is refused: {LOADER_REASON}")


@pytest.mark.parametrize(
    "name",
    [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "LD_AUDIT",
        "ld_preload",
        "DYLD_INSERT_LIBRARIES",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "PYTHONWARNINGS",
        "PYTHONHOME",
        "PYTHONINSPECT",
        "PYTHONUSERBASE",
        "BROWSER",
        "PERL5LIB",
        "PERL5OPT",
        "PERLLIB",
        "RUBYOPT",
        "RUBYLIB",
        "NODE_OPTIONS",
        "NODE_PATH",
        "npm_config_script_shell",
        "BASH_ENV",
        "BASH_FUNC_ls",
        "ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "PS4",
        "PROMPT_COMMAND",
        "IFS",
        "GCONV_PATH",
        "LOCPATH",
        "MALLOC_CHECK_",
        "GLIBC_TUNABLES",
        "JAVA_TOOL_OPTIONS",
        "_JAVA_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "GIT_SSH_COMMAND",
        "GIT_CONFIG_GLOBAL",
        "SSH_ASKPASS",
        "OPENSSL_CONF",
        "LUA_INIT",
        "DOTNET_STARTUP_HOOKS",
        "XDG_CONFIG_HOME",
        "PAGER",
        "EDITOR",
        "LESSOPEN",
        "SHELL",
    ],
)
def test_the_deny_list_names_loader_interpreter_and_shell_variables(name: str) -> None:
    assert refusal(name) == LOADER_REASON


@pytest.mark.parametrize("name", ["SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE"])
def test_trust_store_variables_are_refused(name: str) -> None:
    assert refusal(name) is not None and "trust" in str(refusal(name))


@pytest.mark.parametrize(
    "name",
    [
        "PATH",
        "Path",
        "HOME",
        "LANG",
        "LC_ALL",
        "LC_CTYPE",
        "TMPDIR",
        "SYSTEMROOT",
        "STAVILY_INSTRUCTION_ID",
        "STAVILY_AGENT_SOCKET",
    ],
)
def test_base_variables_are_the_agents(name: str) -> None:
    assert refusal(name) is not None and "agent" in str(refusal(name))


@pytest.mark.parametrize("name", ["APP_MODE", "FOO", "HTTP_PROXY", "REGION", "DEBUG", "PGHOST"])
def test_ordinary_names_are_not_on_the_deny_list(name: str) -> None:
    assert refusal(name) is None


def test_the_deny_list_is_one_documented_constant() -> None:
    assert REFUSED_ENVIRONMENT
    for rule in REFUSED_ENVIRONMENT:
        assert rule.reason and (rule.prefixes or rule.names)


# -- what is allowed ----------------------------------------------------------------------


async def test_only_the_base_reaches_a_plugin_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_plugin(tmp_path)
    monkeypatch.setenv("AGENT_OWN_SECRET", "not for plugins")
    monkeypatch.setenv("PYTHONWARNINGS", "ignore")
    env = seen(await run_plugin(tmp_path, instruction()))["env"]
    assert env["STAVILY_INSTRUCTION_ID"] == "ins_test"
    assert "AGENT_OWN_SECRET" not in env and "PYTHONWARNINGS" not in env
    allowed = {
        *("PATH", "HOME", "LANG", "LC_ALL", "SYSTEMROOT"),
        # the agent's own: the run's private temporary folder, its socket, its word on
        # demo mode, unbuffered output
        *("TMPDIR", "TMP", "TEMP", "STAVILY_AGENT_SOCKET", "STAVILY_DEMO_MODE"),
        *("STAVILY_INSTRUCTION_ID", "PYTHONUNBUFFERED", "STAVILY_AGENT_RUN"),
    }
    # The interpreter may add a few of its own (LC_CTYPE on some platforms).
    assert set(env) - allowed <= {"LC_CTYPE"}, env


async def test_a_manifest_allowed_variable_arrives(tmp_path: Path) -> None:
    write_plugin(tmp_path, allow=["REGION", "APP_*"])
    outcome = await run_plugin(
        tmp_path,
        instruction({"environment": {"REGION": "eu", "APP_MODE": "fast", "APP_N": 3}}),
    )
    env = seen(outcome)["env"]
    assert (env["REGION"], env["APP_MODE"], env["APP_N"]) == ("eu", "fast", "3")


async def test_manifest_patterns_are_case_sensitive(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path, allow=["APP_*"])
    outcome = await run_plugin(tmp_path, instruction({"environment": {"app_mode": "x"}}))
    assert_refused(outcome, folder, f"environment variable 'app_mode' {NOT_ALLOWED}")


async def test_an_agent_allowed_variable_arrives(tmp_path: Path) -> None:
    write_plugin(tmp_path)
    outcome = await run_plugin(
        tmp_path,
        instruction({"environment": {"DEPLOY_TARGET": "blue", "DEBUG": True}}),
        allow_env=("DEPLOY_*", "DEBUG"),
    )
    env = seen(outcome)["env"]
    assert env["DEPLOY_TARGET"] == "blue"
    assert env["DEBUG"] == "true"


async def test_an_unallowed_variable_fails_the_step(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path, allow=["APP_*"])
    outcome = await run_plugin(
        tmp_path,
        instruction({"environment": {"APP_MODE": "x", "FOO": "bar"}}),
        allow_env=("DEPLOY_*",),
    )
    assert_refused(outcome, folder, f"environment variable 'FOO' {NOT_ALLOWED}")


async def test_a_secret_environment_name_arrives_without_an_allow_rule(tmp_path: Path) -> None:
    write_plugin(tmp_path)
    outcome = await run_plugin(
        tmp_path,
        instruction(
            {"environment": {"API_TOKEN": "s3cr3t-value"}}, secret_environment=["API_TOKEN"]
        ),
    )
    assert seen(outcome)["env"]["API_TOKEN"] == "s3cr3t-value"


async def test_a_secret_does_not_let_other_names_through(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path)
    outcome = await run_plugin(
        tmp_path,
        instruction(
            {"environment": {"API_TOKEN": "s3cr3t", "OTHER": "w"}},
            secret_environment=["API_TOKEN"],
        ),
    )
    assert_refused(outcome, folder, f"environment variable 'OTHER' {NOT_ALLOWED}")


async def test_a_denied_name_in_secret_environment_is_still_refused(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path)
    outcome = await run_plugin(
        tmp_path,
        instruction(
            {"environment": {"LD_PRELOAD": "/tmp/x.so"}}, secret_environment=["LD_PRELOAD"]
        ),
    )
    assert_refused(
        outcome, folder, f"environment variable 'LD_PRELOAD' is refused: {LOADER_REASON}"
    )


@pytest.mark.parametrize("malformed", ["API_TOKEN", {"API_TOKEN": True}, [1, "API_TOKEN"], 7])
async def test_a_malformed_secret_environment_counts_as_empty(
    tmp_path: Path, malformed: Any
) -> None:
    folder = write_plugin(tmp_path)
    outcome = await run_plugin(
        tmp_path,
        instruction({"environment": {"API_TOKEN": "v"}}, secret_environment=malformed),
    )
    assert_refused(outcome, folder, f"environment variable 'API_TOKEN' {NOT_ALLOWED}")


@pytest.mark.parametrize("name", ["PATH", "HOME", "TMPDIR", "LANG", "STAVILY_INSTRUCTION_ID"])
async def test_base_variables_cannot_be_overridden(tmp_path: Path, name: str) -> None:
    folder = write_plugin(tmp_path, allow=["*"])
    outcome = await run_plugin(
        tmp_path,
        instruction({"environment": {name: str(tmp_path)}}, secret_environment=[name]),
        allow_env=("*", name),
    )
    assert not outcome.success
    assert str(outcome.error_message).startswith(f"environment variable '{name}' is refused: ")
    assert "agent" in str(outcome.error_message)
    assert not (folder / "ran").exists()


async def test_a_malformed_manifest_permission_allows_nothing(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path, allow="APP_*")
    outcome = await run_plugin(tmp_path, instruction({"environment": {"APP_MODE": "x"}}))
    assert not outcome.success
    assert "permissions.environment" in str(outcome.error_message)
    assert not (folder / "ran").exists()
    # ...though the agent's own configuration still applies.
    outcome = await run_plugin(
        tmp_path, instruction({"environment": {"APP_MODE": "x"}}), allow_env=("APP_*",)
    )
    assert seen(outcome)["env"]["APP_MODE"] == "x"


# -- types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configuration", "message"),
    [
        (
            {"environment": ["A=1"]},
            "plugin_configuration.environment must be a mapping of names to values, not a list",
        ),
        (
            {"environment": "A=1"},
            "plugin_configuration.environment must be a mapping of names to values, not a string",
        ),
        (
            {"environment": {"APP_X": {"nested": 1}}},
            "environment variable 'APP_X' must be a string, number or boolean, not a mapping",
        ),
        (
            {"environment": {"APP_X": None}},
            "environment variable 'APP_X' must be a string, number or boolean, not null",
        ),
        (
            {"environment": {"APP_X": [1]}},
            "environment variable 'APP_X' must be a string, number or boolean, not a list",
        ),
        (
            {"environment": {"APP_X": "a\0b"}},
            "environment variable 'APP_X' holds a NUL character",
        ),
        (
            {"environment": {"APP=X": "1"}},
            "environment variable name 'APP=X' is invalid: letters, digits and underscores, "
            "not starting with a digit",
        ),
        (
            {"environment": {"1APP": "1"}},
            "environment variable name '1APP' is invalid: letters, digits and underscores, "
            "not starting with a digit",
        ),
        (
            {"arguments": "--flag"},
            "plugin_configuration.arguments must be a list of strings or numbers, not a string",
        ),
        (
            {"arguments": {"a": 1}},
            "plugin_configuration.arguments must be a list of strings or numbers, not a mapping",
        ),
        (
            {"arguments": ["ok", {"a": 1}]},
            "plugin_configuration.arguments[1] must be a string or a number, not a mapping",
        ),
        (
            {"arguments": [None]},
            "plugin_configuration.arguments[0] must be a string or a number, not null",
        ),
        (
            {"arguments": [True]},
            "plugin_configuration.arguments[0] must be a string or a number, not a boolean",
        ),
        (
            {"arguments": ["a\0b"]},
            "plugin_configuration.arguments[0] holds a NUL character",
        ),
        (
            {"entrypoint": ["main.py"]},
            "plugin_configuration.entrypoint must be a string, not a list",
        ),
    ],
)
async def test_bad_types_fail_the_step_clearly(
    tmp_path: Path, configuration: dict[str, Any], message: str
) -> None:
    folder = write_plugin(tmp_path, allow=["APP_*"])
    outcome = await run_plugin(tmp_path, instruction(configuration))
    assert_refused(outcome, folder, message)


async def test_plugin_configuration_must_be_a_mapping(tmp_path: Path) -> None:
    folder = write_plugin(tmp_path)
    step = instruction()
    step["plugin_configuration"] = ["main.py"]
    outcome = await run_plugin(tmp_path, step)
    assert_refused(outcome, folder, "plugin_configuration must be a mapping, not a list")


# -- arguments and the entry point --------------------------------------------------------


async def test_arguments_reach_the_plugin_after_its_entry_point(tmp_path: Path) -> None:
    write_plugin(tmp_path)
    marker = tmp_path / "interpreted"
    arguments = ["-c", f"open({str(marker)!r}, 'w').close()", 3, 1.5]
    output = seen(await run_plugin(tmp_path, instruction({"arguments": arguments})))
    assert output["argv"] == ["-c", arguments[1], "3", "1.5"]  # no input: no --input
    assert not marker.exists(), "an argument reached the interpreter"


async def test_the_step_cannot_pick_another_file_than_the_manifests(tmp_path: Path) -> None:
    other = "import os\nopen(os.path.join(os.path.dirname(__file__), 'other-ran'), 'w').close()\n"
    folder = write_plugin(tmp_path, files={"main.py": INSPECT, "tool.py": other})
    outcome = await run_plugin(tmp_path, instruction({"entrypoint": "tool.py"}))
    assert not outcome.success
    assert outcome.error_message == (
        "entrypoint 'tool.py' is refused: the plugin's manifest runs 'main.py' "
        "(runtime.entry_point)"
    )
    assert not (folder / "other-ran").exists() and not (folder / "ran").exists()


async def test_the_manifests_own_entry_point_may_be_named_by_the_step(tmp_path: Path) -> None:
    """The orchestrator fills `entrypoint` from the manifest, as official agents need."""
    write_plugin(tmp_path)
    assert seen(await run_plugin(tmp_path, instruction({"entrypoint": "main.py"})))
    assert seen(await run_plugin(tmp_path, instruction({"entrypoint": "./main.py"})))


async def test_without_a_manifest_entry_point_the_steps_is_used(tmp_path: Path) -> None:
    write_plugin(tmp_path, entry_point=None, files={"run.py": INSPECT})
    assert seen(await run_plugin(tmp_path, instruction({"entrypoint": "run.py"})))
    outcome = await run_plugin(tmp_path, instruction({"entrypoint": "../outside.py"}))
    assert outcome.error_message == "entrypoint '../outside.py' is not in the plugin"
    outcome = await run_plugin(tmp_path, instruction())
    assert outcome.error_message == "entrypoint is required"


# -- the agent's configuration ------------------------------------------------------------


def test_allow_env_patterns_join_the_flag_and_the_environment_variable() -> None:
    assert allow_env_patterns(["APP_*", "A,B"], "DEPLOY_*, REGION ,,") == (
        "APP_*",
        "A",
        "B",
        "DEPLOY_*",
        "REGION",
    )
    assert allow_env_patterns(None, None) == ()
    assert allow_env_patterns([], "") == ()
