"""Where a command may write, checked before any work: never over or inside an input, never over files this tool
did not write, never `.`, a home or a root folder, and one writer per output at a time."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from regmean.errors import RegmeanError

Inputs = Iterable[tuple[str, Path]]
"""(what it is, path) of every input of a command: 'model', 'statistics', 'data file', 'recipe', ..."""


def check_output_path(out: Path, inputs: Inputs) -> Path:
    """The output's real path, after refusing a symlink, a path under a file, a protected folder, and any overlap
    with an input (equal, containing it or inside it). Both paths are named.

    Overlap is decided on the files themselves (device and inode of each existing folder on the way), so other
    spellings of a path (case on case-insensitive file systems, bind mounts, `..`, symlinked parents) change
    nothing."""
    if out.is_symlink():
        raise RegmeanError(f"{out}: is a symbolic link (to {os.readlink(out)}); give the real output path")
    real = out.resolve()
    blocking = next((p for p in (real, *real.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None and blocking != real:
        raise RegmeanError(f"{out}: cannot be created, {blocking} is a file")
    out_chain = _identities(real)  # the output (if it exists) and every existing folder above it
    out_id = out_chain[0] if real.exists() else None
    for what, path in inputs:
        chain = _identities(Path(path).resolve()) if Path(path).exists() else []
        if not chain:
            continue  # a missing input is reported by the command that reads it
        if out_id == chain[0]:
            relation = "is"
        elif out_id is not None and out_id in chain[1:]:
            relation = "contains"
        elif chain[0] in out_chain:
            relation = "lies inside"
        else:
            continue
        raise RegmeanError(f"{out}: the output {relation} the {what} {path}; choose an output outside every input")
    _refuse_protected(out, out_id, out_chain)
    return real


def _identities(path: Path) -> list[tuple[int, int]]:
    """(device, inode) of `path` (when it exists) and of every existing folder above it, nearest first."""
    ids = []
    for p in (path, *path.parents):
        try:
            st = p.stat()
        except OSError:
            continue
        ids.append((st.st_dev, st.st_ino))
    return ids


def _refuse_protected(out: Path, out_id: tuple[int, int] | None, out_chain: list[tuple[int, int]]) -> None:
    if out_id is None:
        return  # a folder yet to be made is none of these
    cwd = _identities(Path.cwd())
    protected = {
        cwd[0]: "the current folder",
        _identities(Path.home())[0]: "a home folder",
        _identities(Path(out.resolve().anchor))[0]: "the root folder",
    }
    if out_id in protected:
        raise RegmeanError(f"{out}: is {protected[out_id]}; refusing to write an output there (name a new folder)")
    if out_id in cwd:
        raise RegmeanError(f"{out}: contains the current folder; refusing to write an output there")


def probe_writable(folder: Path) -> None:
    """Create and remove a file in `folder`: read-only folders and full disks fail here, before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=".regmean-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise RegmeanError(f"{folder}: cannot write here ({exc.strerror})") from None


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse before the work when the file system holding `folder` has less room than `needed` bytes."""
    from regmean.units import human

    free = shutil.disk_usage(folder).free
    if needed > free:
        raise RegmeanError(f"{folder}: {what} needs {human(needed)}, the disk has {human(free)} free; free some space")


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` (a hidden file beside it, named from its real path, so every spelling of
    one output takes the same lock) for the block; a second writer is refused.

    flock locks die with their process, so a killed run never leaves a stale lock behind."""
    out = out.resolve()
    lock = out.parent / f".{out.name}.regmean-lock"
    for _ in range(10):  # another process may unlink the lock file between our open and our flock: retry
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise RegmeanError(f"{out.parent}: cannot write here ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RegmeanError(
                    f"{out}: another regmean process is writing this output now; wait for it or choose another"
                ) from None
            raise
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    else:
        raise RegmeanError(f"{out}: could not lock the output (its lock file keeps changing)")
    try:
        yield
    finally:
        with suppress(FileNotFoundError):  # removed by hand meanwhile: nothing left to clean
            os.unlink(lock)
        os.close(fd)


def new_folders(path: Path) -> list[Path]:
    """The folders creating `path` would make, deepest first (to remove again if the run fails)."""
    return [p for p in (path, *path.parents) if not p.exists()]


def remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def listing(paths: list[Path], root: Path, limit: int = 5) -> str:
    """'a, b, c and 4 more': what a refusal would have deleted, relative to `root`."""
    names = sorted(str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in paths)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
