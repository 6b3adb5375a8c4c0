"""Where a published plugin comes from: a git repository at a ref, or a server folder.

Git runs as a subprocess (the same `git` the official agents install with), with no
prompt for credentials and a time limit. A ref may be a branch, a tag or a commit: it is
fetched alone, shallow, and the commit it named is recorded, so that agents installing
the version later get exactly what was published."""

from __future__ import annotations

import asyncio
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from stavily.errors import InvalidInput

_REMOTE_SCHEMES = ("https", "http", "ssh", "git")
_SCP_LIKE = re.compile(r"^[\w.-]+@[\w.-]+:")  # git@github.com:org/repo.git
_REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")
_COMMIT = re.compile(r"^[0-9a-f]{7,40}$")
_FETCHED_KIND = re.compile(r"\t(branch|tag) '")


@dataclass(frozen=True)
class Fetched:
    folder: Path
    commit: str
    # what the ref named: tag | branch | commit (None: the default branch)
    ref_kind: str | None


def _problem(message: str, path: str = "source") -> InvalidInput:
    return InvalidInput("the plugin's source was refused", [{"path": path, "message": message}])


def local_folder(source: str, roots: list[Path]) -> Path | None:
    """The server folder `source` names (a path or file:// URL) if it is one, inside one
    of `roots`; None for a remote URL. InvalidInput outside the roots."""
    if source.startswith("file://"):
        path = Path(urlparse(source).path)
    elif "://" in source or _SCP_LIKE.match(source):
        return None
    else:
        path = Path(source)
    resolved = path.resolve()
    allowed = [r.resolve() for r in roots]
    if not any(resolved == r or r in resolved.parents for r in allowed):
        raise _problem(
            f"'{source}' is a path on the server, and no plugin source root holds it: "
            "publish a local folder with `stavily plugin publish PATH` (it uploads it), or "
            "set STAVILY_PLUGIN_SOURCE_ROOTS"
        )
    if not resolved.exists():
        raise _problem(f"'{source}' does not exist on the server")
    return resolved


def check_remote(source: str) -> None:
    scheme = urlparse(source).scheme
    if not (_SCP_LIKE.match(source) or scheme in _REMOTE_SCHEMES):
        raise _problem(f"'{source}' is not a git URL (https://, ssh://, git://) or a path")


def check_ref(ref: str | None) -> None:
    if ref is not None and (not _REF.match(ref) or ".." in ref or ref.endswith(".lock")):
        raise _problem(f"'{ref}' is not a branch, tag or commit name", "ref")


async def _git(args: list[str], cwd: Path, timeout: float) -> tuple[int, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd),
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_ASKPASS": "/bin/false",
        "GIT_CONFIG_NOSYSTEM": "1",
        # ssh: no prompt for a host key or a password, and no endless wait to connect
        "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o ConnectTimeout=10",
        "LC_ALL": "C",
    }
    try:
        process = await asyncio.create_subprocess_exec(
            "git",
            *args,
            cwd=cwd,
            env=env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        raise _problem(f"git cannot run on the server: {exc}") from None
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise _problem(f"git took longer than {timeout:g}s") from None
    return process.returncode or 0, output.decode(errors="replace").strip()


async def fetch(url: str, ref: str | None, into: Path, timeout: float) -> Fetched:
    """Check out `url` at `ref` (its default branch when None) into the empty `into`."""
    await asyncio.to_thread(into.mkdir, parents=True, exist_ok=True)
    code, out = await _git(["init", "-q", "."], into, timeout)
    if code:
        raise _problem(f"git init failed: {out}")
    wanted = ref or "HEAD"
    code, out = await _git(["fetch", "-q", "--depth", "1", "--", url, wanted], into, timeout)
    target = "FETCH_HEAD"
    if code and ref and _COMMIT.match(ref):
        # a commit the server does not hand out alone: fetch every branch and tag
        every = ["+refs/heads/*:refs/remotes/source/*", "+refs/tags/*:refs/tags/*"]
        code, out = await _git(["fetch", "-q", "--", url, *every], into, timeout)
        target = ref
    if code:
        last = out.splitlines()[-1] if out else "git fetch failed"
        raise _problem(f"cannot fetch '{wanted}' from '{url}': {last}")
    code, out = await _git(["checkout", "-q", "--detach", target], into, timeout)
    if code:
        raise _problem(f"cannot check out '{wanted}' from '{url}': {out}")
    code, commit = await _git(["rev-parse", "HEAD"], into, timeout)
    if code:
        raise _problem(f"cannot read the commit: {commit}")
    kind = None
    if ref is not None:
        # git says in FETCH_HEAD whether the name was a branch or a tag
        head = await asyncio.to_thread((into / ".git" / "FETCH_HEAD").read_text)
        named = _FETCHED_KIND.search(head) if target == "FETCH_HEAD" else None
        kind = named.group(1) if named else "commit"
    return Fetched(into, commit, kind)
