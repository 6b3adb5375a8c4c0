"""Plugin environments, with real venv and pip runs and no network: pip installs a wheel built
here from a local folder, through the PIP_* variables an operator would set for a mirror."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
from pathlib import Path
from typing import Any

import psutil
import pytest

from stavily.agent import venvs
from stavily.agent.venvs import (
    MARKER,
    DependencyFailed,
    Environments,
    environment_digest,
    installed_packages,
    normalised,
    requirements_file,
)
from tests.plugin_fixtures import build_wheel


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    return tmp_path / "wheels"


@pytest.fixture(autouse=True)
def offline(tmp_path: Path, wheels: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pip finds packages in `wheels` only, and reads no pip.conf of this machine."""
    wheels.mkdir()
    build_wheel(wheels, "tinydep", "1.0")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_CACHE_DIR", str(tmp_path / "pip-cache"))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "envs"


def plugin(
    tmp_path: Path, name: str, requirements: str | None, declared: str | None = None
) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path / "plugins" / name
    folder.mkdir(parents=True)
    (folder / "main.py").write_text("print('{}')\n")
    if requirements is not None:
        (folder / "requirements.txt").write_text(requirements)
    runtime: dict[str, Any] = {"type": "python", "entry_point": "main.py"}
    if declared is not None:
        runtime["requirements"] = declared
    return folder, {"runtime": runtime}


async def run(*command: str | Path) -> tuple[int, str]:
    """Run a command the way a plugin is run: a small environment, nothing of the agent's."""
    process = await asyncio.create_subprocess_exec(
        *map(str, command),
        env={"PATH": "/usr/bin:/bin"},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, output.decode()


async def cannot_import(python: Path, module: str) -> bool:
    code, output = await run(python, "-c", f"import {module}")
    return code != 0 and "ModuleNotFoundError" in output


def left_in(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if not path.name.endswith(".lock"))


def survivors(root: Path) -> list[int]:
    """Processes still running with a path under `root` on their command line."""
    return [
        process.info["pid"]
        for process in psutil.process_iter(["pid", "cmdline"])
        if str(root) in " ".join(process.info["cmdline"] or [])
    ]


def lock_of_the_empty_environment(root: Path) -> Path:
    root.mkdir()
    return root / f"{environment_digest([])}.lock"


# -- building and sharing ------------------------------------------------------------------


async def test_plugin_gets_its_requirements_and_nothing_of_the_agent(
    tmp_path: Path, root: Path
) -> None:
    folder, manifest = plugin(tmp_path, "one", "tinydep==1.0\n")
    python, logs = await Environments(root).python_for(folder, manifest)

    assert python.parent.parent.parent == root and python.name == "python"
    assert len(logs) == 1 and logs[0].startswith("dependencies: built environment ")
    assert logs[0].endswith("from requirements.txt: tinydep==1.0")
    code, output = await run(
        python, "-c", "import sys, tinydep; print(tinydep.VERSION, sys.prefix)"
    )
    assert code == 0, output
    assert output.split() == ["1.0", str(python.parent.parent)]
    # The agent has these; the plugin must not see them.
    assert await cannot_import(python, "httpx")
    assert await cannot_import(python, "psutil")
    # Console scripts were written in the scratch folder, and still run after the rename.
    code, output = await run(python.parent / "tinydep")
    assert (code, output.strip()) == (0, "tinydep 1.0")

    marker = json.loads((python.parent.parent / MARKER).read_text())
    assert marker["installed"] == ["tinydep==1.0"]
    assert marker["requirements"] == ["tinydep==1.0"]

    # The same requirements, written differently: the same environment, not built again.
    other, manifest = plugin(tmp_path, "two", "# pinned\n\n   tinydep==1.0   # the one\n")
    again, logs = await Environments(root).python_for(other, manifest)
    assert again == python
    assert logs == [f"dependencies: reused environment {marker['digest'][:12]}… (1 requirement)"]


async def test_no_requirements_get_an_empty_environment_of_their_own(
    tmp_path: Path, root: Path
) -> None:
    environments = Environments(root)
    folder, manifest = plugin(tmp_path, "bare", None)
    python, logs = await environments.python_for(folder, manifest)

    assert logs[0].startswith("dependencies: built environment ")
    assert logs[0].endswith("(no requirements)")
    assert await cannot_import(python, "httpx")
    assert installed_packages(python.parent.parent) == []
    assert not (python.parent / "pip").exists()

    # Only comments in requirements.txt: nothing to install, the same empty environment.
    other, manifest = plugin(tmp_path, "comments", "# nothing yet\n\n")
    again, logs = await environments.python_for(other, manifest)
    assert again == python
    assert logs[0].startswith("dependencies: reused environment ")


async def test_concurrent_calls_build_once(tmp_path: Path, root: Path) -> None:
    environments = Environments(root)
    plugins = [plugin(tmp_path, f"p{i}", "tinydep==1.0\n") for i in range(3)]
    results = await asyncio.gather(*(environments.python_for(f, m) for f, m in plugins))

    assert len({python for python, _ in results}) == 1
    lines = [line for _, logs in results for line in logs]
    assert sum("built environment" in line for line in lines) == 1
    assert sum("reused environment" in line for line in lines) == 2
    assert left_in(root) == [results[0][0].parent.parent.name]


async def test_a_leftover_without_marker_is_rebuilt(tmp_path: Path, root: Path) -> None:
    environments = Environments(root)
    folder, manifest = plugin(tmp_path, "bare", None)
    python, _ = await environments.python_for(folder, manifest)
    env = python.parent.parent
    (env / MARKER).unlink()  # as if the agent died just before writing it
    (env / "half-written").write_text("")
    (root / f".{env.name}.build-dead").mkdir()

    again, logs = await environments.python_for(folder, manifest)
    assert again == python
    assert logs[0].startswith("dependencies: built environment ")
    assert (env / MARKER).is_file()
    assert not (env / "half-written").exists()
    assert left_in(root) == [env.name]


async def test_a_relative_root_gives_an_absolute_interpreter(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    folder, manifest = plugin(tmp_path, "bare", None)
    python, _ = await Environments(Path("envs")).python_for(folder, manifest)
    assert python.is_absolute() and python.parent.parent.parent == tmp_path / "envs"
    code, output = await run(python, "-c", "print(1)")
    assert (code, output) == (0, "1\n")


async def test_the_pip_fallback_gives_the_environment_its_own_pip(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An agent whose pip is older than 22.3 (no --python) installs with the new venv's pip."""
    monkeypatch.setattr(venvs, "pip_supports_python", lambda: False)
    folder, manifest = plugin(tmp_path, "old-pip", "tinydep==1.0\n")
    python, logs = await Environments(root).python_for(folder, manifest)

    assert "tinydep==1.0" in logs[0]
    code, output = await run(python, "-c", "import tinydep")
    assert code == 0, output
    assert await cannot_import(python, "httpx")


async def test_another_agent_holding_the_lock_is_waited_for(tmp_path: Path, root: Path) -> None:
    """Two agents sharing the folder: the flock on <digest>.lock, waited for off the loop."""
    held = os.open(lock_of_the_empty_environment(root), os.O_RDWR | os.O_CREAT)
    released = False
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        folder, manifest = plugin(tmp_path, "bare", None)
        environments = Environments(root)
        waiting = asyncio.create_task(environments.python_for(folder, manifest))
        await asyncio.sleep(0.2)  # the loop runs on while the task waits
        assert not waiting.done()
        os.close(held)
        released = True
        _, logs = await asyncio.wait_for(waiting, 10)
        assert logs[0].startswith("dependencies: built environment ")
    finally:
        if not released:
            os.close(held)


async def test_a_cancelled_wait_for_the_lock_lets_it_go(tmp_path: Path, root: Path) -> None:
    path = lock_of_the_empty_environment(root)
    held = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        folder, manifest = plugin(tmp_path, "bare", None)
        waiting = asyncio.create_task(Environments(root).python_for(folder, manifest))
        await asyncio.sleep(0.2)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        os.close(held)
    # The thread waiting for it has given up, or it got it and gave it back at once.
    probe = os.open(path, os.O_RDWR)
    try:
        for _ in range(100):
            try:
                fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(0.02)
        else:
            pytest.fail("the lock was never released")
    finally:
        os.close(probe)
    assert left_in(root) == []


# -- failures ------------------------------------------------------------------------------


async def test_a_missing_package_fails_leaves_nothing_and_is_tried_again(
    tmp_path: Path, root: Path, wheels: Path
) -> None:
    environments = Environments(root)
    folder, manifest = plugin(tmp_path, "wants", "tinydep==1.0\nnosuchpkg==9\n")
    with pytest.raises(DependencyFailed) as failed:
        await environments.python_for(folder, manifest)

    message = str(failed.value)
    assert message.startswith(
        "could not install the plugin's requirements (requirements.txt): pip exited 1:\n"
    )
    assert "No matching distribution found for nosuchpkg==9" in message
    assert "Traceback" not in message
    assert left_in(root) == []

    # Not remembered as failed: once the package can be found, the next run builds.
    build_wheel(wheels, "nosuchpkg", "9")
    python, logs = await environments.python_for(folder, manifest)
    assert logs[0].endswith(": nosuchpkg==9, tinydep==1.0")
    assert left_in(root) == [python.parent.parent.name]


async def test_the_install_timeout_kills_pip(tmp_path: Path, root: Path) -> None:
    folder, manifest = plugin(tmp_path, "slow", "tinydep==1.0\n")
    with pytest.raises(DependencyFailed) as failed:
        await Environments(root, install_timeout=0.05).python_for(folder, manifest)

    assert str(failed.value).startswith(
        "could not install the plugin's requirements (requirements.txt): pip timed out after 0.05s"
    )
    await asyncio.sleep(0.3)  # a pip that survived would go on writing its files meanwhile
    assert left_in(root) == []
    assert survivors(root) == []


async def test_a_cancelled_build_kills_pip_and_what_it_started(
    tmp_path: Path, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pip --python runs a second interpreter: killing only the first would leave it going.
    Here it hangs on an index that accepts connections and never answers."""
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("PIP_FIND_LINKS", f"http://127.0.0.1:{port}/")
    folder, manifest = plugin(tmp_path, "hangs", "tinydep==1.0\n")
    try:
        building = asyncio.create_task(Environments(root).python_for(folder, manifest))
        await asyncio.wait_for(connected.wait(), 30)  # pip's second interpreter is waiting
        building.cancel()
        with pytest.raises(asyncio.CancelledError):
            await building
    finally:
        server.close()
    await asyncio.sleep(0.2)
    assert survivors(root) == []
    assert left_in(root) == []


@pytest.mark.parametrize(
    ("line", "named"),
    [
        ("--index-url http://x", "--index-url is refused: a plugin may not choose where"),
        ("-i http://x", "-i is refused"),
        ("--extra-index-url=http://x", "--extra-index-url is refused"),
        ("--extra-index http://x", "--extra-index is refused"),  # pip would take the abbreviation
        ("-fhttp://x", "-f is refused"),
        ("--find-links /tmp/wheels", "--find-links is refused"),
        ("--trusted-host x", "--trusted-host is refused"),
        ("--no-index", "--no-index is refused"),
        ("-e .", "-e is refused: editable installs"),
        ("--editable=git+https://x/y", "--editable is refused"),
        ("-r other.txt", "-r is refused: nested requirement"),
        ("-c constraints.txt", "-c is refused: nested"),
        ("tinydep==1.0 --hash=sha256:00 --find-links=/tmp", "--find-links is refused"),
        ('tinydep==1.0 --hash=sha256:00 "--index-url=http://x"', "--index-url is refused"),
        ("--use-feature=truststore", "--use-feature is refused: the only options allowed"),
        ("https://example.com/tinydep-1.0-py3-none-any.whl", "is not a plain requirement"),
        ("tinydep @ https://example.com/tinydep.whl", "is not a plain requirement"),
        ("./vendored", "is not a plain requirement"),
        ("tinydep-1.0-py3-none-any.whl", "is not a plain requirement"),
        ("tinydep==${VERSION}", "environment variables"),
    ],
)
async def test_a_requirements_file_may_not_choose_where_packages_come_from(
    tmp_path: Path, root: Path, line: str, named: str
) -> None:
    folder, manifest = plugin(tmp_path, "sly", f"# deps\n\npsutil==5.9.8\n{line}\n")
    with pytest.raises(DependencyFailed) as failed:
        await Environments(root).python_for(folder, manifest)

    assert str(failed.value).startswith("requirements.txt line 4: ")
    assert named in str(failed.value)
    assert not await asyncio.to_thread(root.exists)


def test_a_continued_line_is_checked_whole_and_named_by_its_first_line() -> None:
    text = "tinydep==1.0 \\\n    --hash=sha256:00 \\\n    --index-url=http://x\n"
    with pytest.raises(DependencyFailed, match=r"^requirements.txt line 1: --index-url"):
        normalised(text)


def test_plain_requirements_markers_and_hashes_pass() -> None:
    text = (
        "# comment\n"
        "tinydep==1.0 ; python_version >= '3.8' \\\n"
        "    --hash=sha256:00 --hash sha256:11\n"
        "psutil[test]>=5,<8  # why\n"
        "--require-hashes\n"
        "colorama (>=0.4) ; sys_platform == 'win32'\n"
    )
    assert normalised(text) == [
        "tinydep==1.0 ; python_version >= '3.8'     --hash=sha256:00 --hash sha256:11",
        "psutil[test]>=5,<8",
        "--require-hashes",
        "colorama (>=0.4) ; sys_platform == 'win32'",
    ]


def test_the_digest_covers_the_requirements_and_their_order() -> None:
    assert environment_digest(["a==1", "b==2"]) == environment_digest(["a==1", "b==2"])
    assert environment_digest(["a==1", "b==2"]) != environment_digest(["b==2", "a==1"])
    assert environment_digest([]) != environment_digest(["a==1"])
    assert len(environment_digest([])) == 64


async def test_limits_on_the_requirements_file(tmp_path: Path, root: Path) -> None:
    folder, manifest = plugin(tmp_path, "huge", "x" * (1024 * 1024 + 1))
    with pytest.raises(DependencyFailed, match="larger than 1024 KiB"):
        await Environments(root).python_for(folder, manifest)
    many = "".join(f"pkg{i}==1\n" for i in range(1001))
    folder, manifest = plugin(tmp_path, "many", many)
    with pytest.raises(DependencyFailed, match="more than 1000 lines"):
        await Environments(root).python_for(folder, manifest)


# -- where the requirements file is --------------------------------------------------------


def test_the_requirements_file_declared_or_by_default(tmp_path: Path) -> None:
    folder, manifest = plugin(tmp_path, "default", "tinydep==1.0\n")
    assert requirements_file(folder, manifest) == (folder / "requirements.txt").resolve()

    folder, manifest = plugin(tmp_path, "none", None)
    assert requirements_file(folder, manifest) is None
    assert requirements_file(folder, {}) is None

    folder, manifest = plugin(tmp_path, "declared", None, declared="deps/plugin-reqs.txt")
    (folder / "deps").mkdir()
    (folder / "deps" / "plugin-reqs.txt").write_text("tinydep==1.0\n")
    assert requirements_file(folder, manifest) == (folder / "deps" / "plugin-reqs.txt").resolve()


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        ("../outside.txt", "outside the plugin folder"),
        ("deps/../../outside.txt", "outside the plugin folder"),
        ("/etc/passwd", "must be relative to the plugin folder"),
        ("link.txt", "outside the plugin folder"),
        ("missing.txt", "names 'missing.txt', which does not exist"),
        ("", "must be a path"),
    ],
)
async def test_a_declared_requirements_file_must_be_inside_and_exist(
    tmp_path: Path, root: Path, declared: str, message: str
) -> None:
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "outside.txt").write_text("tinydep==1.0\n")
    folder, manifest = plugin(tmp_path, "escape", None, declared=declared)
    (folder / "link.txt").symlink_to(tmp_path / "plugins" / "outside.txt")
    with pytest.raises(DependencyFailed, match=message):
        requirements_file(folder, manifest)
    with pytest.raises(DependencyFailed, match=message):
        await Environments(root).python_for(folder, manifest)


def test_a_default_requirements_file_linking_out_is_refused(tmp_path: Path) -> None:
    (tmp_path / "secret.txt").write_text("tinydep==1.0\n")
    folder, manifest = plugin(tmp_path, "linked", None)
    (folder / "requirements.txt").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(DependencyFailed, match="outside the plugin folder"):
        requirements_file(folder, manifest)
