"""Crash-safe writes: a file or directory appears complete under its final name, or not at all.

A directory is replaced only when it holds nothing the new one does not (soralib never deletes what it did
not write), and a write that fails for lack of space raises `DiskFull` naming the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DiskFull, InputError

# torch.save's zip writer fails on a full disk without an errno ("[enforce fail at inline_container.cc:672]
# . unexpected pos 576 vs 534"): such a failure counts as a full disk when less than this is left.
_TORCH_WRITER, _NEARLY_FULL = "inline_container.cc", 16 * 2**20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary name in the same directory, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if disk_full(err, path):
            raise DiskFull(path) from err
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory; on success it replaces `path` whole.

    An existing `path` is moved aside first and deleted only once the new one is in place, so a crash
    leaves either the old directory or the new one (plus, at worst, a stray hidden temporary). It is
    replaced only if everything in it has a namesake in the new one: anything else (a file the user put
    there, a sub-directory) raises InputError and the old directory stays as it was. A symlink to a
    directory is followed: the directory it points to is replaced, the link stays.
    """
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    if path.exists() and not path.is_dir():
        raise InputError(f"{path} is a file, not a directory; choose another directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    old_copy = path.with_name(f".{path.name}.old")
    if not path.exists() and old_copy.exists():  # killed between the two renames last time: restore
        os.replace(old_copy, path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700; the directory gets the usual permissions
        yield tmp
        for child in tmp.iterdir():
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            extra = _shallowest(_tree(path) - _tree(tmp))
            if extra:
                raise InputError(f"{path} holds {name_list(extra)}, which soralib does not write there; "
                                 "move them out or choose another directory")
            old = old_copy
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(err, path):
            raise DiskFull(path) from err
        raise


def foreign_entries(directory: str | os.PathLike, owned: Iterable[str]) -> list[str]:
    """What `directory` holds besides the files named in `owned` (sub-directories end in "/", symlinks in
    "@"); [] if it does not exist. A file in place of the directory is foreign too."""
    directory = Path(directory)
    if not directory.is_dir():
        return [directory.name] if directory.exists() or directory.is_symlink() else []
    owned = set(owned)
    return sorted(_shown(p) for p in directory.iterdir() if p.is_symlink() or not p.is_file() or p.name not in owned)


def name_list(names: list[str], limit: int = 5) -> str:
    """'a, b, c and 4 more': the paths in the way, for a one-line error."""
    more = len(names) - limit
    return ", ".join(names[:limit]) + (f" and {more} more" if more > 0 else "")


def disk_full(err: BaseException, where: str | os.PathLike) -> DiskFull | None:
    """`err` as a DiskFull if it means no space was left, naming the file (if the error does) or `where`.

    Libraries report ENOSPC in their own ways: an OSError (Python), the OS's text in a message (safetensors:
    "No space left on device (os error 28)"), or a failure of torch.save's writer with no errno at all."""
    seen: BaseException | None = err
    for _ in range(8):  # the exception, what it was raised from, and so on
        if seen is None:
            break
        if isinstance(seen, DiskFull):
            return seen
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return DiskFull(seen.filename or where)
        if os.strerror(errno.ENOSPC) in str(seen):
            return DiskFull(where)
        seen = seen.__cause__ or seen.__context__
    if isinstance(err, RuntimeError) and _TORCH_WRITER in str(err) and _free_bytes(where) < _NEARLY_FULL:
        return DiskFull(where)
    return None


def _free_bytes(path: str | os.PathLike) -> int:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _shown(path: Path) -> str:
    return path.name + ("@" if path.is_symlink() else "/" if path.is_dir() else "")


def _tree(root: Path) -> set[str]:
    """Every path under `root`, relative; directories end in "/", symlinks (never written by soralib) in "@"."""
    found = set()
    for parent, dirs, files in os.walk(root):  # does not descend into symlinked directories
        for name in dirs + files:
            full = Path(parent, name)
            rel = full.relative_to(root).parent
            found.add(_shown(full) if rel == Path(".") else f"{rel}/{_shown(full)}")
    return found


def _shallowest(paths: set[str]) -> list[str]:
    """`paths` without those inside a listed directory: "sub/" stands for "sub/a" and "sub/b"."""
    return sorted(p for p in paths if not any(p != d and p.startswith(d) for d in paths if d.endswith("/")))
