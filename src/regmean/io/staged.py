"""Statistics files written under hidden names and revealed together: a run that fails or is killed never leaves a
file that looks complete, and --force replaces only files of the same format that regmean wrote."""

from __future__ import annotations

import glob
import json
import os
import sys
import tempfile
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path

import torch

from regmean.errors import RegmeanError
from regmean.io.metadata import Metadata
from regmean.io.outputs import (
    Inputs,
    check_free_space,
    check_output_path,
    new_folders,
    output_lock,
    probe_writable,
    remove_if_empty,
    room_for,
)
from regmean.io.tensorfile import PlannedFile, TensorFile


def write_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], target: Path) -> Path:
    """Write a safetensors file through a temporary file in the same folder, renamed when complete. The same
    tensors and metadata give the same bytes (metadata keys sorted, tensors laid out in a fixed order)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.tmp-")
    os.close(fd)
    try:
        layout = {name: (t.dtype, tuple(t.shape)) for name, t in tensors.items()}
        planned = PlannedFile(Path(tmp), layout, dict(sorted(metadata.items())))
        try:
            for name, tensor in tensors.items():
                planned.write(name, tensor.cpu())
        finally:
            planned.close()
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def file_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """About what a safetensors file of `tensors` takes: their bytes and a header (a little over, never under)."""
    data = sum(t.numel() * t.element_size() for t in tensors.values())
    names = sum(len(name.encode()) + 96 + 24 * t.dim() for name, t in tensors.items())
    return data + names + len(json.dumps(metadata).encode()) + 64


def written_by_regmean(path: Path, fmt: str) -> bool:
    """Whether `path` is a plain file of format `fmt` that regmean wrote (its format tag and a model fingerprint, as
    every file regmean writes carries): the only files regmean ever replaces."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        metadata = TensorFile(path).metadata
        return metadata.get("format") == fmt and bool(Metadata(metadata, path).fingerprint())
    except RegmeanError:
        return False


def replaceable_target(out: str | Path, file_name: str, fmt: str) -> Path:
    """The file a write into `out` makes (`target_file`), refused when something else than a `fmt` file of
    regmean's is there (a model's weights, a user's file): nothing is ever overwritten but our own."""
    if not isinstance(out, str | Path):
        raise RegmeanError(f"the output is a folder or a .safetensors path, not {type(out).__name__}")
    out = Path(out)
    if out.is_file() and out.suffix != ".safetensors":
        raise RegmeanError(f"{out}: exists and is a file, not a folder; choose another output")
    target = target_file(out, file_name)
    if (target.exists() or target.is_symlink()) and not written_by_regmean(target, fmt):
        raise RegmeanError(f"{target}: exists and is not a {fmt} file written by regmean; choose another output")
    return target


def target_file(out: Path, file_name: str) -> Path:
    """`out` itself when it names a .safetensors file, else `out/file_name`."""
    return out / file_name if out.is_dir() or out.suffix != ".safetensors" else out


class StagedFiles:
    """The files of one run into `out` (a folder, or a .safetensors file path), as a context manager.

    On entry, before any work: the output is checked against the inputs, made, checked writable and locked; files
    regmean already wrote there are replaced only with `replace` (anything else is never touched), and this
    output's own hidden files left by a killed run are removed (said to `log`)."""

    PREFIX = ".partial-"

    def __init__(
        self, out: Path, *, fmt: str, file_name: str, replace: bool, inputs: Inputs = (), log=None, blocks: str = ""
    ):
        self.out, self.fmt, self.replace, self.inputs, self.log = Path(out), fmt, replace, list(inputs), log
        self.file_name, self.block_glob = file_name, blocks
        self.staged: list[tuple[Path, Path]] = []
        self.staged_texts: list[tuple[Path, Path]] = []
        self.needed = 0
        self._stack = ExitStack()

    def __enter__(self) -> StagedFiles:
        real = check_output_path(self.out, self.inputs)
        if real.exists() and not real.is_dir() and real.suffix != ".safetensors":
            raise RegmeanError(f"{self.out}: exists and is a file, not a folder; choose another output")
        self.target = target_file(real, self.file_name)
        self.in_folder = self.target != real
        self.blocks = self.block_glob if self.in_folder else ""  # blocks only in a folder of their own
        folder = self.target.parent
        self._new = new_folders(folder)
        try:
            probe_writable(folder)
            self._stack.enter_context(output_lock(self.target))
            self._check_existing()
            for stale in self._leftovers():
                stale.unlink()
                if self.log is not None:
                    self.log(f"removed {stale}, left by an interrupted run")
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, exc_type, *_) -> None:
        self.discard()
        self._stack.close()
        if exc_type is not None:  # a failed run leaves no folder it made
            remove_if_empty(self._new)

    def _leftovers(self) -> list[Path]:
        """This output's hidden files (staged, and their temporaries) that a killed run left; never a neighbour's."""
        folder, found = self.target.parent, []
        for name in [glob.escape(self.target.name), *([self.blocks] if self.blocks else [])]:
            found += [*folder.glob(f"{self.PREFIX}{name}"), *folder.glob(f".{self.PREFIX}{name}.tmp-*")]
        return found

    def existing(self) -> list[Path]:
        """What the output holds now: the single file, or its blocks."""
        if self.target.is_file() or self.target.is_symlink():
            return [self.target]
        return sorted(self.target.parent.glob(self.blocks)) if self.blocks else []

    def _check_existing(self) -> None:
        existing = self.existing()
        if existing and not self.replace:
            raise RegmeanError(f"{existing[0]}: exists; choose another folder or pass --force to replace it")
        for path in existing:
            if not self._ours(path):
                raise RegmeanError(
                    f"{path}: not a {self.fmt} file written by regmean; --force will not replace it (nothing deleted)"
                )

    def _ours(self, path: Path) -> bool:
        return written_by_regmean(path, self.fmt)

    def reserve(self, needed: int, what: str = "the statistics file") -> None:
        """Refuse before the work when the output's disk has less room than the `needed` bytes the files will take
        (a disk that fills up later is said with this total)."""
        self.needed = needed
        check_free_space(self.target.parent, needed, what, self.target)

    def _room(self, final: Path, size: int) -> AbstractContextManager[None]:
        """Writing `size` bytes for `final`: a full disk is one line, and every staged file is removed first."""
        done = sum(hidden.stat().st_size for hidden, _ in self.staged + self.staged_texts if hidden.exists())
        return room_for(final, size, max(self.needed, done + size), self.discard)

    def stage(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str], final: Path | None = None) -> None:
        """Write one file under a hidden name; it becomes `final` (default: the target) at `commit`."""
        final = final or self.target
        hidden = final.with_name(self.PREFIX + final.name)
        with self._room(final, file_bytes(tensors, metadata)):
            written = write_atomic(tensors, metadata, hidden)
        self.staged.append((written, final))

    def stage_text(self, name: str, text: str, ours) -> bool:
        """Stage a text file `name` beside the output folder's files (revealed at `commit`), unless a file of that
        name is there that `ours(path)` does not recognise: that one is never replaced. Returns whether staged."""
        if not self.in_folder:  # a file path as output: nothing is written beside it
            return False
        final = self.target.parent / name
        if final.is_symlink() or (final.exists() and not (final.is_file() and ours(final))):
            if self.log is not None:
                self.log(f"{final}: not written by regmean; left as it is")
            return False
        hidden = final.with_name(self.PREFIX + name)
        self.staged_texts.append((hidden, final))  # (removed with the others if the disk is full)
        with self._room(final, len(text.encode())):
            hidden.write_text(text)
        return True

    def commit(self) -> list[Path]:
        """Replace whatever the output held (one file or blocks) by the staged files."""
        self._check_existing()  # again: files may have appeared during the run
        finals = {final for _, final in self.staged}
        for old in self.existing():
            if old not in finals:
                old.unlink()
        for hidden, final in self.staged + self.staged_texts:
            os.replace(hidden, final)
        written = [final for _, final in self.staged]
        self.staged, self.staged_texts = [], []
        return written

    def discard(self) -> None:
        for hidden, _ in self.staged + self.staged_texts:
            hidden.unlink(missing_ok=True)
        self.staged, self.staged_texts = [], []
