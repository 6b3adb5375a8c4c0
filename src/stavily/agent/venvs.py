"""One virtual environment per set of plugin requirements, so that a Python plugin runs with
what it declares and nothing else: never with whatever the agent's own interpreter happens to
have installed (httpx, psutil and the rest of the agent's dependencies stay out of reach).

An environment is built once, from the plugin's requirements file, and kept under the agent's
environments folder as `<root>/<digest[:24]>/`. The digest (sha256) covers the interpreter
(implementation, major.minor, machine) and the requirements, normalised: two plugin versions
that ask for the same packages share one environment, and a plugin with no requirements gets
the shared empty one (isolation matters even then).

Where packages come from is the operator's decision, never the plugin's. pip runs with the
agent's own environment variables and pip configuration, so PIP_INDEX_URL, PIP_EXTRA_INDEX_URL,
PIP_FIND_LINKS, PIP_NO_INDEX, PIP_TRUSTED_HOST, PIP_CERT, PIP_CONFIG_FILE and the like point
every agent at a mirror or at a folder of wheels. A requirements file that tries to choose for
itself (`--index-url`, `--find-links`, `--no-index`, `--trusted-host`, editables, URLs or paths)
is refused; so are nested files (`-r`, `-c`), because the digest must cover everything that
gets installed.

Building: `python -m venv --without-pip` into a scratch folder beside the target, the agent's
own pip (`pip --python <scratch>/bin/python install -r ...`, pip >= 22.3) installs into it, a
marker file (`.stavily-env.json`) is written last and the folder is renamed into place. A folder
without the marker is a leftover of a crash and is rebuilt; a failed build leaves nothing and is
tried again next time. One build per digest: an asyncio lock within the agent, an exclusive
`flock` on `<root>/<digest>.lock` between agents that share the folder.

Removing environments no plugin uses any more is not done here. Linux and macOS only.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("stavily.agent")

MARKER = ".stavily-env.json"
REQUIREMENTS_COPY = ".stavily-requirements.txt"
MAX_REQUIREMENTS_BYTES = 1024 * 1024
MAX_REQUIREMENTS_LINES = 1000
DEFAULT_REQUIREMENTS = "requirements.txt"
# Creating a venv without pip takes well under a second; a small install_timeout must not
# kill it, so it gets at least this long.
CREATE_TIMEOUT = 120.0
OUTPUT_KEPT = 64 * 1024
TAIL_LINES = 20
LISTED = 30
LOCK_POLL = 0.05

_PIP_PYTHON_OPTION = (22, 3)
_COMMENT = re.compile(r"(^|\s+)#.*$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*")
_ARCHIVE = (".whl", ".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tar.xz", ".txz")
_ARCHIVE_MORE = (".tlz", ".tar.lz", ".tar.lzma")

# Options a requirements file may use: they change how a package is picked, not where from.
_ALLOWED_OPTIONS = frozenset(
    {"--hash", "--pre", "--prefer-binary", "--only-binary", "--no-binary", "--require-hashes"}
)
_WHERE_FROM = (
    "a plugin may not choose where packages come from: the operator does, for the whole agent "
    "(PIP_INDEX_URL, PIP_FIND_LINKS, PIP_NO_INDEX and the like)"
)
_NESTED = (
    "nested requirement or constraint files are not allowed: the environment is keyed by this "
    "file's content, which must cover everything installed; list the requirements here"
)
_REFUSED_OPTIONS = {
    "-i": _WHERE_FROM,
    "--index-url": _WHERE_FROM,
    "--extra-index-url": _WHERE_FROM,
    "-f": _WHERE_FROM,
    "--find-links": _WHERE_FROM,
    "--trusted-host": _WHERE_FROM,
    "--no-index": _WHERE_FROM,
    "-e": "editable installs are not allowed: " + _WHERE_FROM,
    "--editable": "editable installs are not allowed: " + _WHERE_FROM,
    "-r": _NESTED,
    "--requirement": _NESTED,
    "-c": _NESTED,
    "--constraint": _NESTED,
}

# Variables of the agent's own environment pip must not see: each would install somewhere
# else than the new environment, or add to it what the digest does not cover.
_DROPPED_ENV = frozenset(
    {
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONUSERBASE",
        "PIP_TARGET",
        "PIP_PREFIX",
        "PIP_ROOT",
        "PIP_USER",
        "PIP_PYTHON",
        "PIP_REQUIREMENT",
        "PIP_EDITABLE",
        "_PIP_RUNNING_IN_SUBPROCESS",
    }
)


class DependencyFailed(Exception):
    """The plugin's requirements could not be installed; str() is the message for the step's log
    (what failed and the tail of pip's output), never a traceback."""


@dataclass(frozen=True)
class Requirements:
    """A plugin's requirements as they are installed: `lines` are pip's logical lines, without
    comments or blank lines, in order; `name` says where they came from in messages."""

    name: str
    lines: tuple[str, ...]

    @property
    def count(self) -> int:
        return sum(1 for line in self.lines if not line.startswith("-"))

    def described(self) -> str:
        if not self.count:
            return "no requirements"
        return f"{self.count} requirement{'s' if self.count != 1 else ''}"


def requirements_file(folder: Path, manifest: dict[str, Any]) -> Path | None:
    """The manifest's `runtime.requirements` (a path relative to the plugin folder, which must stay
    inside it: a `..` escape or absolute path or symlink out is DependencyFailed), else
    `requirements.txt` in the folder when it exists, else None. A declared file that is missing is
    DependencyFailed. `manifest` is the plugin.yaml mapping (the `plugin:` block already unwrapped),
    e.g. {"runtime": {"type": "python", "entry_point": "x.py", "requirements": "reqs.txt"}}."""
    runtime = manifest.get("runtime")
    declared = runtime.get("requirements") if isinstance(runtime, dict) else None
    if declared is None:
        default = folder / DEFAULT_REQUIREMENTS
        if not default.exists() and not default.is_symlink():
            return None
        return _inside(folder, DEFAULT_REQUIREMENTS)
    if not isinstance(declared, str) or not declared.strip():
        raise DependencyFailed("runtime.requirements must be a path relative to the plugin folder")
    if Path(declared).is_absolute():
        raise DependencyFailed(
            f"runtime.requirements must be relative to the plugin folder, not {declared!r}"
        )
    path = _inside(folder, declared)
    if not path.is_file():
        raise DependencyFailed(f"runtime.requirements names {declared!r}, which does not exist")
    return path


def _inside(folder: Path, relative: str) -> Path:
    """`folder / relative` once it is certain that it, and whatever symlinks it goes through,
    stay inside the plugin's folder: a requirements file elsewhere is someone else's file."""
    base = folder.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base) or path == base:
        raise DependencyFailed(
            f"the requirements file {relative!r} is outside the plugin folder; it must be inside"
        )
    return path


def read_requirements(path: Path | None, name: str = DEFAULT_REQUIREMENTS) -> Requirements:
    """The requirements in `path` (none for None), checked: at most 1 MiB and 1000 lines, and
    only requirement specifiers with markers and a few harmless options (--hash, --pre,
    --prefer-binary, --only-binary, --no-binary, --require-hashes). Blocking."""
    if path is None:
        return Requirements("no requirements file", ())
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_REQUIREMENTS_BYTES + 1)
    except OSError as exc:
        raise DependencyFailed(f"cannot read {name}: {exc.strerror or exc}") from None
    if len(data) > MAX_REQUIREMENTS_BYTES:
        raise DependencyFailed(f"{name} is larger than {MAX_REQUIREMENTS_BYTES // 1024} KiB")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DependencyFailed(f"{name} is not UTF-8 text") from None
    return Requirements(name, tuple(normalised(text, name)))


def normalised(text: str, name: str = DEFAULT_REQUIREMENTS) -> list[str]:
    """pip's logical lines of a requirements file (continuations joined, comments and blank
    lines dropped, stripped, in order), each checked; DependencyFailed names the first bad one."""
    lines: list[str] = []
    for number, line in _logical_lines(text):
        line = _COMMENT.sub("", line).strip()
        if not line:
            continue
        if len(lines) == MAX_REQUIREMENTS_LINES:
            raise DependencyFailed(f"{name} has more than {MAX_REQUIREMENTS_LINES} lines")
        problem = _problem(line)
        if problem:
            raise DependencyFailed(f"{name} line {number}: {problem}")
        lines.append(line)
    return lines


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """pip's join_lines: a line ending in a backslash goes on with the next one (a comment line
    never does); the joined line has the number of its first line."""
    joined: list[tuple[int, str]] = []
    pending: list[str] = []
    first = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.endswith("\\") or _COMMENT.match(line):
            if _COMMENT.match(line):
                line = " " + line
            if pending:
                joined.append((first, "".join([*pending, line])))
                pending = []
            else:
                joined.append((number, line))
        else:
            if not pending:
                first = number
            pending.append(line.strip("\\"))
    if pending:
        joined.append((first, "".join(pending)))
    return joined


def _problem(line: str) -> str | None:
    """Why pip must not be given this line, or None. Options are found the way pip finds them
    (from the first word starting with a dash, then shell-split), but more strictly: any
    whitespace separates words, and only the exact option names allowed pass, since pip also
    accepts abbreviations (`--index` for `--index-url`)."""
    if "${" in line:
        return "environment variables (${...}) are not expanded in a plugin's requirements"
    words = line.split()
    start = next((i for i, word in enumerate(words) if word.startswith("-")), len(words))
    requirement = " ".join(words[:start])
    try:
        options = shlex.split(" ".join(words[start:]))
    except ValueError:
        return "its options cannot be parsed"
    for option in options:
        if not option.startswith("-"):
            continue
        flag = option.split("=", 1)[0] if option.startswith("--") else option[:2]
        if flag in _REFUSED_OPTIONS:
            return f"{flag} is refused: {_REFUSED_OPTIONS[flag]}"
        if flag not in _ALLOWED_OPTIONS:
            allowed = ", ".join(sorted(_ALLOWED_OPTIONS))
            return f"{flag} is refused: the only options allowed are {allowed}"
    if requirement:
        return _requirement_problem(requirement)
    return None


def _requirement_problem(requirement: str) -> str | None:
    """Why a requirement is not a plain `name[extras] specifier ; marker`, or None: URLs, paths
    and archive file names install from wherever they point, not from the operator's index."""
    before_marker = requirement.split(";", 1)[0]
    name = _NAME.match(before_marker)
    direct = "://" in before_marker or any(c in before_marker for c in "@/\\:")
    if direct or name is None or name.group(0).lower().endswith(_ARCHIVE + _ARCHIVE_MORE):
        return (
            f"{requirement.split()[0]!r} is not a plain requirement (a name, a version and "
            f"markers): URLs, paths and archives are refused, {_WHERE_FROM}"
        )
    return None


def interpreter_identity() -> dict[str, str]:
    """What an environment built for this agent's interpreter depends on."""
    return {
        "implementation": sys.implementation.name,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        "machine": platform.machine(),
    }


def environment_digest(lines: Sequence[str]) -> str:
    """sha256 hex of the interpreter's identity and the normalised requirements."""
    content = {"interpreter": interpreter_identity(), "requirements": list(lines)}
    encoded = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def complete(env: Path, digest: str) -> bool:
    """Whether `env` is a whole environment for `digest`: its marker names it and its interpreter
    still runs (a base interpreter removed from under it leaves a dangling bin/python).
    Blocking."""
    try:
        marker = json.loads((env / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(marker, dict)
        and marker.get("digest") == digest
        and os.access(env / "bin" / "python", os.X_OK)
    )


class Environments:
    """The plugin environments under `root`, built on demand. `install_timeout` (seconds) limits
    each pip run, which is killed with everything it started when it is over; creating the venv
    gets at least CREATE_TIMEOUT, so a small limit still reaches pip."""

    def __init__(self, root: Path, install_timeout: float = 600.0) -> None:
        self.root = root.absolute()
        self.install_timeout = install_timeout
        self._locks: dict[str, asyncio.Lock] = {}

    def folder(self, digest: str) -> Path:
        return self.root / digest[:24]

    async def python_for(self, folder: Path, manifest: dict[str, Any]) -> tuple[Path, list[str]]:
        """The interpreter (<env>/bin/python) to run the plugin in `folder` with, and lines for
        the step's log saying what happened ("dependencies: reused environment 3fa1c2… (2
        requirements)", "dependencies: built environment 3fa1c2… in 4.2s from requirements.txt:
        psutil==5.9.8, ..."). Raises DependencyFailed, whose message is for the step's log."""
        requirements = await asyncio.to_thread(_requirements_of, folder, manifest)
        digest = environment_digest(requirements.lines)
        env = self.folder(digest)
        short = f"{digest[:12]}…"
        reused = f"dependencies: reused environment {short} ({requirements.described()})"
        async with self._locks.setdefault(digest, asyncio.Lock()):
            if await asyncio.to_thread(complete, env, digest):
                return env / "bin" / "python", [reused]
            try:
                await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
                async with _exclusive(self.root / f"{digest}.lock"):
                    # Another agent sharing the folder may have built it while we waited.
                    if await asyncio.to_thread(complete, env, digest):
                        return env / "bin" / "python", [reused]
                    seconds, installed = await self._build(requirements, digest, env)
            except OSError as exc:
                raise DependencyFailed(
                    f"could not create the plugin's environment in {self.root}: "
                    f"{exc.strerror or exc}"
                ) from None
        took = f"{seconds:.1f}s" if seconds >= 1 else f"{seconds:.2f}s"
        built = f"dependencies: built environment {short} in {took}"
        if not requirements.count:
            return env / "bin" / "python", [f"{built} ({requirements.described()})"]
        shown = ", ".join(installed[:LISTED]) or "nothing"
        if len(installed) > LISTED:
            shown += f" and {len(installed) - LISTED} more"
        return env / "bin" / "python", [f"{built} from {requirements.name}: {shown}"]

    async def _build(
        self, requirements: Requirements, digest: str, env: Path
    ) -> tuple[float, list[str]]:
        """Build the environment in a scratch folder, mark it, rename it to `env`; the caller
        holds the digest's lock. Nothing is left behind when it fails."""
        started = time.monotonic()
        await asyncio.to_thread(_clear_leftovers, env)
        scratch = env.with_name(f".{env.name}.build-{secrets.token_hex(4)}")
        python = scratch / "bin" / "python"
        try:
            await asyncio.to_thread(scratch.mkdir)
            with_pip = bool(requirements.count) and not pip_supports_python()
            await self._create(scratch, with_pip)
            if requirements.count:
                copy = scratch / REQUIREMENTS_COPY
                text = "\n".join(requirements.lines) + "\n"
                await asyncio.to_thread(copy.write_text, text, encoding="utf-8")
                pip = [str(python), "-m", "pip"]
                if not with_pip:
                    pip = [sys.executable, "-m", "pip", "--python", str(python)]
                await self._install(requirements, [*pip, *_install_arguments(copy)], scratch)
            await asyncio.to_thread(_relocate, scratch, env)
            installed = await asyncio.to_thread(installed_packages, scratch)
            seconds = time.monotonic() - started
            marker = {
                "digest": digest,
                "interpreter": interpreter_identity(),
                "requirements": list(requirements.lines),
                "installed": installed,
                "built_at": datetime.now(UTC).isoformat(timespec="seconds"),
                "seconds": round(seconds, 3),
            }
            await asyncio.to_thread(
                (scratch / MARKER).write_text, json.dumps(marker, indent=2), encoding="utf-8"
            )
            await asyncio.to_thread(os.rename, scratch, env)
        finally:
            await asyncio.to_thread(shutil.rmtree, scratch, ignore_errors=True)
        log.info(
            "plugin environment built",
            digest=digest,
            path=str(env),
            requirements=requirements.count,
            seconds=round(seconds, 3),
        )
        return seconds, installed

    async def _create(self, scratch: Path, with_pip: bool) -> None:
        command = [sys.executable, "-m", "venv", *([] if with_pip else ["--without-pip"])]
        timeout = max(self.install_timeout, CREATE_TIMEOUT)
        code, output = await _run([*command, str(scratch)], timeout, cwd=scratch)
        if code is None:
            raise DependencyFailed(
                f"could not create the plugin's environment: python -m venv timed out after "
                f"{timeout:g}s{_tail(output)}"
            )
        if code != 0:
            raise DependencyFailed(
                f"could not create the plugin's environment: python -m venv exited {code}"
                f"{_tail(output)}"
            )

    async def _install(self, requirements: Requirements, command: list[str], cwd: Path) -> None:
        code, output = await _run(command, self.install_timeout, cwd=cwd)
        what = f"could not install the plugin's requirements ({requirements.name}): pip"
        if code is None:
            raise DependencyFailed(
                f"{what} timed out after {self.install_timeout:g}s{_tail(output)}"
            )
        if code != 0:
            raise DependencyFailed(f"{what} exited {code}{_tail(output)}")


def _requirements_of(folder: Path, manifest: dict[str, Any]) -> Requirements:
    path = requirements_file(folder, manifest)
    if path is None:
        return read_requirements(None)
    return read_requirements(path, path.relative_to(folder.resolve()).as_posix())


def _install_arguments(requirements: Path) -> list[str]:
    return [
        "install",
        "--no-input",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "-r",
        str(requirements),
    ]


def pip_supports_python() -> bool:
    """Whether the agent's own pip can install into another interpreter (`--python`, pip 22.3);
    without it each environment gets its own pip, which costs a few seconds per build."""
    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    found = re.match(r"^(\d+)\.(\d+)", version)
    return bool(found) and (int(found[1]), int(found[2])) >= _PIP_PYTHON_OPTION


def _pip_environment() -> dict[str, str]:
    """The agent's environment, where the operator's PIP_* settings live, without what would
    make pip install anywhere but the new environment."""
    return {name: value for name, value in os.environ.items() if name not in _DROPPED_ENV}


async def _run(command: list[str], timeout: float, cwd: Path) -> tuple[int | None, str]:
    """Run `command` with its output (stdout and stderr together) captured; its exit status, or
    None when it ran out of time and its whole process group was killed."""
    process = await asyncio.create_subprocess_exec(
        *command,
        cwd=cwd,
        env=_pip_environment(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # Its own process group: pip --python starts a second interpreter, and one killpg
        # reaches both (and any build backend they start).
        start_new_session=True,
    )
    output = bytearray()

    async def collect() -> None:
        assert process.stdout is not None
        while chunk := await process.stdout.read(65536):
            output.extend(chunk)
            del output[:-OUTPUT_KEPT]
        await process.wait()

    try:
        await asyncio.wait_for(collect(), timeout)
    except TimeoutError:
        _kill_group(process.pid)
        await process.wait()
        return None, output.decode(errors="replace")
    except asyncio.CancelledError:
        _kill_group(process.pid)
        await process.wait()  # reaped now: a cancelled build leaves nothing running
        raise
    return process.returncode, output.decode(errors="replace")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(output: str) -> str:
    """The last lines of a command's output, for the message, or nothing."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    if not lines:
        return ""
    return ":\n" + "\n".join(line[:500] for line in lines[-TAIL_LINES:])


@contextlib.asynccontextmanager
async def _exclusive(path: Path) -> AsyncIterator[None]:
    """Hold an exclusive flock on `path` (another agent sharing the folder may be building the
    same environment), waited for in a thread so the event loop goes on. A cancelled wait stops
    the thread too: an agent shutting down is not held up by another agent's build."""
    stop = threading.Event()
    waiting = asyncio.ensure_future(asyncio.to_thread(_lock, path, stop))
    try:
        fd = await asyncio.shield(waiting)
    except asyncio.CancelledError:
        stop.set()
        waiting.add_done_callback(_unlock_when_done)  # it may have got the lock meanwhile
        raise
    assert fd is not None  # None only once stopped, and only a cancelled wait stops it
    try:
        yield
    finally:
        os.close(fd)


def _lock(path: Path, stop: threading.Event) -> int | None:
    """The file descriptor holding the lock, or None once `stop` is set. Blocking: it polls,
    so that it can give up, where a blocking flock could not be interrupted."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if stop.wait(LOCK_POLL):
                    os.close(fd)
                    return None
    except BaseException:
        os.close(fd)
        raise


def _unlock_when_done(waiting: asyncio.Future[int | None]) -> None:
    if not waiting.cancelled() and waiting.exception() is None:
        fd = waiting.result()
        if fd is not None:
            os.close(fd)


def _clear_leftovers(env: Path) -> None:
    """Remove what an interrupted build of this environment left: the folder itself when it has
    no valid marker, and scratch folders. Only called with the digest's lock held. Blocking."""
    if env.is_symlink() or env.is_file():
        env.unlink()
    elif env.exists():
        shutil.rmtree(env)
    for scratch in env.parent.glob(f".{env.name}.build-*"):
        shutil.rmtree(scratch, ignore_errors=True)


def _relocate(scratch: Path, env: Path) -> None:
    """Point what venv and pip wrote with the scratch folder's path (script shebangs, activate,
    pyvenv.cfg) at the final one, so console scripts still run after the rename. Blocking."""
    old, new = os.fsencode(scratch), os.fsencode(env)
    for path in [scratch / "pyvenv.cfg", *(scratch / "bin").iterdir()]:
        if path.is_symlink() or not path.is_file() or path.stat().st_size > 1024 * 1024:
            continue
        data = path.read_bytes()
        if old in data and b"\0" not in data:
            path.write_bytes(data.replace(old, new))


def installed_packages(env: Path) -> list[str]:
    """`name==version` for each distribution in the environment, like pip freeze, sorted."""
    found = {
        f"{dist.metadata['Name']}=={dist.version}"
        for site in env.glob("lib/python*/site-packages")
        for dist in importlib.metadata.distributions(path=[str(site)])
        if dist.metadata["Name"]
    }
    return sorted(found, key=str.lower)
