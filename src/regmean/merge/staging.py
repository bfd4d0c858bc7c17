"""Where a merge writes: a staging folder beside the output, renamed into place only when complete, and an existing
output replaced only when regmean wrote every file in it."""

from __future__ import annotations

import glob
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from regmean.distributed import PeerFailed
from regmean.errors import RegmeanError
from regmean.io.outputs import (
    Inputs,
    check_output_path,
    listing,
    new_folder,
    new_folders,
    no_room,
    output_lock,
    remove_if_empty,
    room_error,
)
from regmean.io.untrusted import parse_json
from regmean.merge.files import CARD, COPIED_PATTERNS, FAILED_MARK, RECIPE, REPORT, STAGING_MARK, WEIGHT_PATTERNS

SET_ASIDE_MARK = ".regmean-set-aside"
"""Marks the folder an old output is moved into while the new one takes its place."""


def _listed_files(out_dir: Path) -> set[str] | None:
    """The files the folder's merge report says the merge wrote; None when there is no usable list."""
    try:
        files = parse_json((out_dir / REPORT).read_bytes(), str(out_dir / REPORT)).get("files")
    except (OSError, RegmeanError, AttributeError):
        return None
    return set(files) if isinstance(files, list) and all(isinstance(f, str) for f in files) else None


OWN_NAMES = (*COPIED_PATTERNS, *WEIGHT_PATTERNS, CARD, RECIPE, REPORT)
"""Every file a merge writes has one of these names (a merge report listing any other file is not believed)."""


def foreign_entries(out_dir: Path) -> list[Path]:
    """What in an existing output folder regmean did not write: everything, unless its merge report lists the
    folder's files; then every file neither listed nor named as a merge names its files (reports older than that
    list: every top-level entry not named so)."""
    entries = sorted(out_dir.iterdir())
    if not (out_dir / REPORT).is_file():
        return entries
    listed = _listed_files(out_dir)
    if listed is None:
        return [e for e in entries if e.is_symlink() or not e.is_file() or not _own_name(e)]
    folders = {part for f in listed for part in (Path(f).parents) if part != Path(".")}
    foreign = []
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir)
        if any(parent in foreign for parent in path.parents):
            continue  # already listed by its folder
        if path.is_symlink():
            ours = False
        elif path.is_dir():
            ours = rel in folders
        else:
            ours = rel.as_posix() in listed and _own_name(path)
        if not ours:
            foreign.append(path)
    return foreign


def _own_name(path: Path) -> bool:
    return any(path.match(pattern) for pattern in OWN_NAMES)


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse a non-empty output without --force, and with --force anything but a folder a merge wrote."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise RegmeanError(f"{out_dir}: exists and is not a folder; choose another output")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise RegmeanError(f"{out_dir}: exists and is not empty; choose another folder or pass --force to replace it")
    foreign = foreign_entries(out_dir)
    if foreign:
        raise RegmeanError(
            f"{out_dir}: --force replaces only a folder regmean merged, but it holds {listing(foreign, out_dir)}; "
            "move those away or choose another folder (nothing was deleted)"
        )


@contextmanager
def staged_output(
    out_dir: Path, force: bool, inputs: Inputs, log=None, resume_key: str | None = None
) -> Iterator[Path]:
    """A staging folder beside `out_dir`, renamed to `out_dir` only when the block completes: a failed merge leaves
    nothing that looks like a finished model folder, and no folder it made.

    Before any work: the output is checked against every input and what --force may replace, and locked against a
    second writer; what killed runs into the same output left is cleaned up (and said). With `resume_key`, the
    staging folder of an interrupted run whose journal has that key is taken up again, and an interrupted run
    (Ctrl-C, SIGTERM) keeps its own when its journal records a finished step."""
    out_dir = check_output_path(out_dir, inputs)
    check_output_dir(out_dir, force)
    made = new_folders(out_dir.parent)
    try:
        with output_lock(out_dir):
            kept = _recover(out_dir, log, resume_key)
            with _staging(out_dir, kept, resume_key is not None, log) as tmp:
                yield tmp
                _replace(tmp, out_dir, force, log)
    except BaseException:
        remove_if_empty(made)
        raise


@contextmanager
def _staging(out_dir: Path, kept: Path | None, resumable: bool, log) -> Iterator[Path]:
    try:
        tmp = kept or new_folder(out_dir.parent, f".{out_dir.name}.partial-")
        (tmp / STAGING_MARK).touch()
    except OSError as exc:
        raise RegmeanError(f"{out_dir.parent}: cannot write here ({exc.strerror})") from None
    keep = False
    try:
        yield tmp
    except Exception as exc:
        reason = no_room(exc)
        if reason is None:
            keep = isinstance(exc, PeerFailed) and _kept(tmp, resumable, log)  # a peer was interrupted or failed
            raise
        needed = _planned_bytes(tmp)  # the shards are laid out at their full size when the writing starts
        shutil.rmtree(tmp)
        raise room_error(out_dir, needed, reason) from None
    except BaseException:  # Ctrl-C, SIGTERM: what is finished is kept for a rerun to continue
        keep = _kept(tmp, resumable, log)
        raise
    finally:
        if tmp.exists() and not keep:
            shutil.rmtree(tmp)


def _kept(tmp: Path, resumable: bool, log) -> bool:
    """Whether an interrupted merge's staging folder is kept for a rerun (it has finished steps), said if so."""
    keep = resumable and _finished_steps(tmp) > 0 and not list(tmp.glob(f"{FAILED_MARK}*"))
    if keep:
        _say(
            log,
            f"interrupted: the {_finished_steps(tmp)} finished steps are kept in {tmp}; run the same "
            "command again to continue from there",
        )
    return keep


def _finished_steps(folder: Path) -> int:
    """The steps a staging folder's journals (one per process of the merge) record as finished."""
    from regmean.merge.journal import JOURNALS, finished_steps

    return sum(len(finished_steps(journal)) for journal in folder.glob(JOURNALS))


def _planned_bytes(folder: Path) -> int:
    """The apparent size of the files under `folder`: sparse shards count at the size they were laid out with."""
    return sum(p.lstat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _recover(out_dir: Path, log, resume_key: str | None = None) -> Path | None:
    """Clean up after runs into `out_dir` that were killed: their staging folders are removed (but the one whose
    journal has `resume_key`, returned: its merge continues); an old output they had set aside is put back if the
    new one never took its place, else removed."""
    from regmean.merge.journal import journal_key

    name = glob.escape(out_dir.name)
    kept = None
    for stale in sorted(out_dir.parent.glob(f".{name}.partial-*")):
        marked = (stale / STAGING_MARK).is_file()
        if kept is None and marked and resume_key is not None and journal_key(stale) == resume_key:
            kept = stale
            _say(log, f"resuming the merge interrupted in {stale} ({_finished_steps(stale)} steps were finished)")
        elif marked or _empty_folder(stale):  # (killed before its mark was written)
            shutil.rmtree(stale)
            _say(log, f"removed {stale}, left by an interrupted merge into {out_dir}")
    for aside in out_dir.parent.glob(f".{name}.old-*"):
        if not ((aside / SET_ASIDE_MARK).is_file() or _empty_folder(aside)):
            continue
        if not out_dir.exists() and (aside / out_dir.name).is_dir():
            (aside / out_dir.name).rename(out_dir)
            _say(log, f"put back {out_dir}, set aside by a merge that was interrupted before replacing it")
        shutil.rmtree(aside)
    return kept


def _replace(tmp: Path, out_dir: Path, force: bool, log) -> None:
    """Move the finished folder into place; an old output is set aside first and deleted only afterwards."""
    check_output_dir(out_dir, force)  # again: files may have appeared during the merge
    (tmp / STAGING_MARK).unlink()
    aside = None
    if out_dir.exists():
        aside = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        (aside / SET_ASIDE_MARK).touch()
        out_dir.rename(aside / out_dir.name)
    tmp.rename(out_dir)
    if aside is not None:
        try:
            shutil.rmtree(aside)
        except OSError as exc:  # the merge is complete: say what is left rather than fail
            _say(log, f"warning: could not delete the replaced output, set aside in {aside} ({exc.strerror})")


def clear_staged(staged: Path) -> None:
    """Everything an interrupted merge staged (its files and journals), its staging mark kept: to start over."""
    for entry in staged.iterdir():
        if entry.name == STAGING_MARK:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def _empty_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and not any(path.iterdir())


def _say(log, message: str) -> None:
    if log is not None:
        log(message)
