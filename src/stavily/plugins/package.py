"""A plugin's folder as one reproducible artifact, and the scan that refuses what must
not be packaged.

The artifact is a gzipped tar of the folder's regular files and directories, in sorted
order, with times, owners and modes normalised (0644, or 0755 for files executable by
their owner) and no gzip timestamp: the same content always gives the same bytes and
so the same sha256. Links are never packaged: one that stays inside the folder is
refused all the same (an agent would follow it elsewhere), like one that leaves it."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from stavily.errors import InvalidInput

# Not part of a plugin: version control and caches.
_SKIPPED = {".git", "__pycache__", ".hg", ".svn", ".DS_Store"}
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_file_bytes: int
    max_total_bytes: int
    max_files: int


@dataclass(frozen=True)
class Artifact:
    path: Path  # a temporary file; the caller stores it and removes it
    sha256: str
    size: int
    files: int


def scan(folder: Path, limits: Limits) -> list[tuple[str, Path, os.stat_result]]:
    """The folder's entries to package, in order; InvalidInput listing every finding."""
    findings: list[dict[str, str]] = []
    members: list[tuple[str, Path, os.stat_result]] = []
    total = 0
    root = folder.resolve()
    for current, dirs, files in os.walk(root, followlinks=False):
        dirs[:] = sorted(d for d in dirs if d not in _SKIPPED)
        here = Path(current)
        for name in sorted([*dirs, *(f for f in files if f not in _SKIPPED)]):
            path = here / name
            relative = path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                target = os.readlink(path)
                inside = root in (path.parent / target).resolve().parents
                findings.append(
                    {
                        "path": relative,
                        "message": f"a link to '{target}'"
                        + ("" if inside else ", outside the plugin's folder")
                        + ": plugins hold regular files only",
                    }
                )
                dirs[:] = [d for d in dirs if d != name]
                continue
            if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
                findings.append({"path": relative, "message": "not a regular file"})
                continue
            if stat.S_ISREG(info.st_mode):
                if info.st_size > limits.max_file_bytes:
                    findings.append(
                        {
                            "path": relative,
                            "message": f"{info.st_size} bytes: a file has at most "
                            f"{limits.max_file_bytes}",
                        }
                    )
                total += info.st_size
            if info.st_mode & (stat.S_ISUID | stat.S_ISGID):
                findings.append({"path": relative, "message": "set-user or set-group id"})
            members.append((relative, path, info))
    if total > limits.max_total_bytes:
        findings.append(
            {
                "path": "(root)",
                "message": f"{total} bytes in all: a plugin has at most {limits.max_total_bytes}",
            }
        )
    if len(members) > limits.max_files:
        findings.append(
            {
                "path": "(root)",
                "message": f"{len(members)} entries: a plugin has at most {limits.max_files}",
            }
        )
    if findings:
        raise InvalidInput("the plugin's folder was refused", findings)
    return members


def package(folder: Path, into: Path, limits: Limits) -> Artifact:
    """Scan `folder` and write its artifact to a new file in `into` (blocking: run it off
    the event loop)."""
    members = scan(folder, limits)
    into.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=".artifact-", suffix=".tar.gz", dir=into)
    digest = hashlib.sha256()
    size = 0

    class _Hashing(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: bytes) -> int:  # type: ignore[override]
            nonlocal size
            digest.update(data)
            size += len(data)
            return os.write(fd, data)

    try:
        sink = _Hashing()
        with gzip.GzipFile(fileobj=sink, mode="wb", mtime=0, filename="") as zipped:
            with tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for relative, path, info in members:
                    entry = tarfile.TarInfo(relative)
                    entry.mtime = 0
                    entry.uid = entry.gid = 0
                    entry.uname = entry.gname = ""
                    if stat.S_ISDIR(info.st_mode):
                        entry.type = tarfile.DIRTYPE
                        entry.mode = 0o755
                        tar.addfile(entry)
                        continue
                    entry.size = info.st_size
                    entry.mode = 0o755 if info.st_mode & stat.S_IXUSR else 0o644
                    with path.open("rb") as handle:
                        tar.addfile(entry, handle)
    except BaseException:
        os.close(fd)
        os.unlink(name)
        raise
    os.close(fd)
    files = sum(1 for _, _, info in members if stat.S_ISREG(info.st_mode))
    return Artifact(Path(name), digest.hexdigest(), size, files)


def extract(archive: IO[bytes] | Path, into: Path, limits: Limits) -> None:
    """Unpack a plugin archive (tar, gzipped or not) into the empty folder `into`,
    refusing absolute paths, `..`, links, devices and sizes past the limits; InvalidInput
    with every finding, or for an archive that cannot be read. Blocking."""
    findings: list[dict[str, str]] = []
    total = count = 0
    try:
        opened = (
            tarfile.open(archive, mode="r:*")
            if isinstance(archive, Path)
            else tarfile.open(fileobj=archive, mode="r:*")
        )
        with opened as tar:
            entries = []
            for member in tar:
                count += 1
                name = member.name
                parts = PurePosixPath(name).parts
                if name.startswith("/") or ".." in parts:
                    findings.append({"path": name, "message": "leaves the plugin's folder"})
                    continue
                if member.issym() or member.islnk():
                    findings.append(
                        {
                            "path": name,
                            "message": f"a link to '{member.linkname}': plugins hold "
                            "regular files only",
                        }
                    )
                    continue
                if not (member.isfile() or member.isdir()):
                    findings.append({"path": name, "message": "not a regular file"})
                    continue
                if member.isfile():
                    if member.size > limits.max_file_bytes:
                        findings.append(
                            {
                                "path": name,
                                "message": f"{member.size} bytes: a file has at most "
                                f"{limits.max_file_bytes}",
                            }
                        )
                    total += member.size
                entries.append(member)
                if count > limits.max_files or total > limits.max_total_bytes:
                    findings.append(
                        {"path": "(root)", "message": "the archive is larger than a plugin may be"}
                    )
                    break
            if findings:
                raise InvalidInput("the plugin archive was refused", findings)
            for member in entries:
                target = into.joinpath(*PurePosixPath(member.name).parts)
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                with source, target.open("wb") as out:
                    while chunk := source.read(CHUNK):
                        out.write(chunk)
                target.chmod(0o755 if member.mode & stat.S_IXUSR else 0o644)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError, zlib.error) as exc:
        raise InvalidInput(
            "the plugin archive cannot be read",
            [{"path": "(archive)", "message": f"not a tar or tar.gz archive: {exc}"}],
        ) from None


def plugin_root(folder: Path) -> Path:
    """An archive may hold the plugin's folder itself: the one folder inside, when the
    top holds no manifest but a single directory does."""
    from stavily.plugins.manifest import MANIFEST_NAMES

    if any((folder / n).is_file() for n in MANIFEST_NAMES):
        return folder
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir():
        return entries[0]
    return folder
