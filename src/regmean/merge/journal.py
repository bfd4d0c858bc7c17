"""A merge's journal: the steps it finished, kept in its staging folder, so that a rerun of an interrupted merge with
the same inputs continues after them instead of starting over.

Each finished step appends one line (its number, its diagnostics, the bytes it wrote into each shard) once its
tensors are in the shards. The journal's first line is the merge's key: a hash of the regmean version, the recipe,
the output layout and shard size, the plan's steps, and the size, modification time, change time and inode of every
input file: a file rewritten or replaced since (even by `cp -p` or `rsync -a`, which keep the modification time)
has a new change time. A staging folder whose journal holds another key is never resumed (the inputs changed: it is
removed, as any stale staging folder)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from regmean import __version__, distributed
from regmean.errors import RegmeanError
from regmean.io.writer import Layout, ShardedWriter
from regmean.methods.base import Computed, LayerReport, OutputNote, Step

JOURNAL = ".regmean-journal.jsonl"
JOURNALS = ".regmean-journal*.jsonl"
"""Rank 0's journal (or a single process's), and every rank's (`journal_name`)."""


def merge_key(
    recipe: str,
    sources: list[tuple[str, Path]],
    layouts: list[Layout],
    steps: list[Step],
    shard_bytes: int,
    workers: object = 1,
) -> str:
    """What a resumed merge must share with the interrupted one (the processes too, which divide the steps, and the
    kind of device they compute on)."""
    digest = hashlib.blake2b(digest_size=16)
    plan = [(type(s).__name__, s.outputs, s.rows) for s in steps]
    shapes = [[(name, str(dtype), list(shape)) for name, (dtype, shape) in layout.items()] for layout in layouts]
    digest.update(json.dumps([__version__, recipe, shapes, plan, shard_bytes, workers], default=str).encode())
    for _, source in sources:
        files = [source] if source.is_file() else sorted(p for p in source.rglob("*") if p.is_file())
        for file in files:
            stat = file.stat()  # a file written or replaced since gets a new change time (or inode), whatever its mtime
            digest.update(f"{file}\0{stat.st_size}\0{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}\n".encode())
    return digest.hexdigest()


def resume_key(config, sources, form, method, steps: list[Step], shard_bytes: int, device: str) -> str | None:
    """The key an interrupted run of this merge journals its steps under (`merge.journal`), or None where it does
    not resume (an adapter output of a method that keeps state across steps). The kind of device is in it: a GPU's
    arithmetic rounds otherwise than a CPU's, and a resumed merge equals an uninterrupted one byte for byte."""
    if not form.resumable(method):
        return None
    recipe = config.relative_to(Path("/")).to_yaml()
    workers = (distributed.world_size(), torch.device(device).type)
    return merge_key(recipe, sources, form.layouts, steps, shard_bytes, workers)


def journal_key(folder: Path) -> str | None:
    """The key of the journal in a staging folder, or None (no journal, or an unreadable one)."""
    return _key_of(folder / JOURNAL)


def _key_of(path: Path) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            first = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return first.get("key") if isinstance(first, dict) else None


def remove_journals(folder: Path) -> None:
    """Every process's journal in a staging folder (the merge is complete)."""
    for journal in folder.glob(JOURNALS):
        journal.unlink()


def journal_name(rank: int) -> str:
    """Rank 0's journal (whose key says whether a staging folder resumes), or another rank's beside it."""
    return JOURNAL if rank == 0 else f".regmean-journal-rank{rank}.jsonl"


class Journal:
    """The finished steps of the merge staged in `folder` (those of an interrupted run with the same `key`), of one
    process (`rank`) of the merge."""

    def __init__(self, folder: Path, key: str, rank: int = 0):
        self.path = folder / journal_name(rank)
        self.done: dict[int, dict] = self._finished() if _key_of(self.path) == key else {}
        lines = [{"key": key}, *self.done.values()]  # rewritten whole: a line cut short by a kill is dropped
        self.path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the merge's duration)

    def _finished(self) -> dict[int, dict]:
        return finished_steps(self.path)

    def record(self, number: int, computed: Computed, written: list[list[dict[str, int]]]) -> None:
        """Step `number` is finished: its diagnostics and the bytes it wrote (per writer, per shard)."""
        line = {
            "step": number,
            "layers": [layer.to_dict() for layer in computed.layers],
            "base_missing": list(computed.base_missing),
            "notes": [note.to_dict() for note in computed.notes],
            "written": written,
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def restore(self, writers: list[ShardedWriter]) -> dict[int, Computed]:
        """The finished steps' diagnostics, their bytes counted as written in `writers`."""
        results = {}
        for number, line in self.done.items():
            try:
                for writer, counts in zip(writers, line["written"], strict=True):
                    writer.add_written(counts)
            except (ValueError, KeyError, TypeError, AttributeError):
                raise RegmeanError(
                    f"{self.path}: its finished steps do not match this merge's output (the journal was altered); "
                    "run the same command again: it starts over"
                ) from None
            results[number] = _computed(line)
        return results

    def close(self) -> None:
        self._file.close()


def finished_steps(path: Path) -> dict[int, dict]:
    """The steps a journal records, up to the first line that is not one (a last line cut short by a kill, or a
    line altered since); {} for a journal that cannot be read."""
    done = {}
    try:
        texts = path.read_text(encoding="utf-8").splitlines()[1:]
    except (OSError, UnicodeDecodeError):
        return {}
    for text in texts:
        try:
            line = json.loads(text)
            _computed(line)
            done[int(line["step"])] = line
        except (ValueError, KeyError, TypeError, AttributeError):
            break
    return done


def _computed(line: dict) -> Computed:
    """A journal line's diagnostics (a TypeError, KeyError or ValueError for a line that is not a step's)."""
    if not isinstance(line["written"], list) or not isinstance(line["base_missing"], list):
        raise TypeError("not a step")
    layers = [LayerReport(**row) for row in line["layers"]]
    notes = [OutputNote(**row) for row in line.get("notes", [])]
    return Computed({}, layers=layers, base_missing=line["base_missing"], notes=notes)


def written_since(before: list[list[dict[str, int]]], writers: list[ShardedWriter]) -> list[list[dict[str, int]]]:
    """The bytes each writer's shards took since `before` (their `written()` then), per tensor."""
    now = [w.written() for w in writers]
    return [
        [
            {name: size - old.get(name, 0) for name, size in shard.items() if size != old.get(name, 0)}
            for shard, old in zip(shards, olds, strict=True)
        ]
        for shards, olds in zip(now, before, strict=True)
    ]
