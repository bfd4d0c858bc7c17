"""Where a command may write, checked before any work: never over or inside an input, never over files this tool
did not write, never `.`, a home or a root folder, and one writer per output at a time."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from regmean.errors import RegmeanError
from regmean.io.untrusted import resolve_user_path
from regmean.units import human

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
    real = resolve_user_path(out, "output")
    blocking = next((p for p in (real, *real.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None and blocking != real:
        raise RegmeanError(f"{out}: cannot be created, {blocking} is a file")
    out_chain = _identities(real)  # the output (if it exists) and every existing folder above it
    out_id = out_chain[0] if real.exists() else None
    for what, path in inputs:
        chain = _identities(resolve_user_path(path, what)) if Path(path).exists() else []
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
        _identities(Path(resolve_user_path(out, "output").anchor))[0]: "the root folder",
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


def check_free_space(folder: Path, needed: int, what: str, name: Path | None = None) -> None:
    """Refuse before the work when the file system holding `folder` has less room than `needed` bytes (the message
    names `name`, default the folder)."""
    free = free_bytes(folder)
    if needed > free:
        raise RegmeanError(
            f"{name or folder}: {what} needs {human(needed)}, the disk has {human(free)} free; free space or choose "
            "another output"
        )


NO_ROOM = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded"}


def no_room(exc: BaseException) -> str | None:
    """'the disk is full' (or its quota) when `exc` is a write that ran out of room; None for any other failure
    (every safetensors file is written by `io.tensorfile.PlannedFile`: its failures are OSErrors)."""
    return NO_ROOM.get(exc.errno) if isinstance(exc, OSError) else None


def free_bytes(folder: Path) -> int:
    """Free bytes on the file system holding `folder` (its nearest existing parent)."""
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), Path(folder.anchor or "."))
    return shutil.disk_usage(existing).free


def room_error(path: Path, needed: int, reason: str = "the disk is full") -> RegmeanError:
    """`path` could not be written for lack of room: what it needed and what is free (once the run's own files
    are removed, so call it after cleaning up)."""
    if _no_free_inodes(path.parent):  # bytes to spare, but no file can be made
        return RegmeanError(
            f"{path}: the file system has no free inodes (no room for another file); delete files or "
            "choose another output"
        )
    free = f"{human(free_bytes(path.parent))} free"
    return RegmeanError(
        f"{path}: {reason} ({f'{human(needed)} needed, ' if needed else ''}{free}); free space or choose another output"
    )


def _no_free_inodes(folder: Path) -> bool:
    """Whether the file system holding `folder` counts inodes and has none free."""
    existing = next((p for p in (folder, *folder.parents) if p.is_dir()), Path(folder.anchor or "."))
    try:
        stat = os.statvfs(existing)
    except (OSError, AttributeError):
        return False
    return stat.f_files > 0 and stat.f_favail == 0


@contextmanager
def room_for(path: Path, size: int, needed: int, cleanup: Callable[[], None]) -> Iterator[None]:
    """The block writes `path` (`size` bytes, of `needed` for the whole output): refused first when its disk has
    less than `size` free; a write that finds the disk full (or over quota) is one line naming `path`, said after
    `cleanup` removed what the run wrote."""
    if size > free_bytes(path.parent):
        cleanup()
        raise room_error(path, needed)
    try:
        yield
    except Exception as exc:
        reason = no_room(exc)
        if reason is None:
            raise
        cleanup()
        raise room_error(path, needed, reason) from None


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on `out` (a hidden file beside it, named from its real path, so every spelling of
    one output takes the same lock) for the block; a second writer is refused.

    flock locks die with their process, so a killed run never leaves a stale lock behind."""
    out = resolve_user_path(out, "output")
    lock = out.parent / f".{out.name}.regmean-lock"
    for _ in range(10):  # another process may unlink the lock file between our open and our flock: retry
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)  # never through a planted link
        except OSError as exc:
            if exc.errno == errno.EISDIR:
                raise RegmeanError(f"{lock}: a folder where the output's lock file goes; remove it") from None
            if exc.errno == errno.ELOOP:
                raise RegmeanError(f"{lock}: a symbolic link where the output's lock file goes; remove it") from None
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


def new_folder(parent: Path, prefix: str) -> Path:
    """A new uniquely named folder in `parent` with the permissions any folder made there gets (mkdtemp's are 0700,
    which a merged model folder renamed into place would keep)."""
    folder = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    return folder
