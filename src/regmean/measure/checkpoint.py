"""A long measure's progress, kept beside its output, so that a rerun with the same inputs continues where an
interrupted one stopped instead of starting over.

The folder holds, per process, one safetensors file of its pass in progress (its sums so far over its shard, the
examples they cover, the rows of every stream), rewritten whole at most every CHECKPOINT_SECONDS (and never more
often than 20 times the last save took), and rank 0's file per finished block of sites (the reduced sums). Its key
hashes the regmean version, the model's weights, the examples, and every option that changes the sums: a folder of
another key is never resumed (it is replaced). The sums are exact (a DP measure keeps no checkpoint), and the folder
is removed once the statistics are written. Sums continue in the same order, so a resumed measure's file is
identical to an uninterrupted one's.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from regmean import __version__
from regmean.distributed import PeerFailed
from regmean.io.staged import write_atomic
from regmean.statistic import ProvenanceRecord
from regmean.stats import SiteStats

CHECKPOINT_SECONDS = 60.0
CURRENT = "pass.safetensors"


def checkpoint_folder(target: Path) -> Path:
    """Where the measure writing statistics file `target` keeps its progress (hidden, beside it)."""
    return target.parent / f".{target.name}.checkpoint"


@contextmanager
def removed_unless_interrupted(folder: Path | None) -> Iterator[None]:
    """A measure's checkpoint, removed when the statistics are written or an error (bad input, a full disk) stops
    the run; kept only when it is interrupted (Ctrl-C, SIGTERM, a kill), for the rerun."""
    try:
        yield
    except PeerFailed:  # another process was interrupted (or failed: its own run says which)
        raise
    except Exception:
        _remove(folder)
        raise
    _remove(folder)


def _remove(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def measure_key(parts: list) -> str:
    """The hash of everything a measure's sums depend on (`parts`: JSON-able), with the regmean version."""
    return hashlib.blake2b(json.dumps([__version__, *parts], default=str).encode(), digest_size=16).hexdigest()


def examples_digest(examples) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for e in examples:
        digest.update(json.dumps([e.text, e.text_pair, e.target, e.templated]).encode())
    return digest.hexdigest()


@dataclass
class Resumed:
    """What an interrupted measure finished: whole blocks, and the pass in progress."""

    finished: list[tuple[dict[str, SiteStats], dict]] = field(default_factory=list)
    """Per finished block: its sums and its provenance record."""
    block: int = 0
    examples: int = 0
    """Examples of the block's pass already summed."""
    rows: dict[str, int] = field(default_factory=dict)
    stats: dict[str, SiteStats] = field(default_factory=dict)


class MeasureCheckpoint:
    """The checkpoint folder of one measure (`folder`), as one process (`rank`) keeps its part: its own key and
    pass in progress; rank 0 also the finished blocks (the reduced sums every rank contributed to)."""

    def __init__(self, folder: Path, key: str, log=None, rank: int = 0):
        self.folder, self.key, self.log, self.rank = folder, key, log, rank
        self.key_file = folder / f"key-rank{rank}.json"
        self.current = folder / f"pass-rank{rank}.safetensors"
        self.last_save = time.monotonic()
        self.save_seconds = 0.0
        self.failed = False
        """A save failed (e.g. the disk is full): the measure goes on without saving its progress."""

    def load(self) -> Resumed | None:
        """This process's part of an interrupted measure of the same key (else its files are removed)."""
        try:
            resumed = self._read()
        except (OSError, ValueError, KeyError, SafetensorError):
            resumed = None
        if resumed is None:
            for path in [self.key_file, self.current, *(self._blocks() if self.rank == 0 else [])]:
                path.unlink(missing_ok=True)
        return resumed

    def _blocks(self) -> list[Path]:
        blocks = []
        while (self.folder / f"block-{len(blocks)}.safetensors").is_file():
            blocks.append(self.folder / f"block-{len(blocks)}.safetensors")
        return blocks

    def _read(self) -> Resumed | None:
        if json.loads(self.key_file.read_text()).get("key") != self.key:
            return None
        resumed = Resumed()
        for path in self._blocks() if self.rank == 0 else []:
            stats, info = _read_stats(path)
            resumed.finished.append((stats, info["record"]))
        resumed.block = len(resumed.finished)
        if self.current.is_file():
            stats, info = _read_stats(self.current)
            resumed.block, resumed.stats, resumed.examples, resumed.rows = (
                info["block"],
                stats,
                info["examples"],
                info["rows"],
            )
        return resumed

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.key_file.write_text(json.dumps({"key": self.key}))

    def maybe_save(self, block: int, examples: int, rows: dict[str, int], stats: dict[str, SiteStats]) -> None:
        """Save the pass in progress if the last save is long enough ago."""
        now = time.monotonic()
        if self.failed or now - self.last_save < max(CHECKPOINT_SECONDS, 20 * self.save_seconds):
            return
        self._save(stats, {"block": block, "examples": examples, "rows": rows}, self.current)
        self.last_save = time.monotonic()
        self.save_seconds = self.last_save - now

    def finish_block(self, block: int, stats: dict[str, SiteStats], record: ProvenanceRecord) -> None:
        """Block `block` is reduced: rank 0 keeps its sums; every process's pass in progress is over."""
        if not self.failed and self.rank == 0:
            self._save(stats, {"record": record}, self.folder / f"block-{block}.safetensors")
        self.current.unlink(missing_ok=True)

    def _save(self, stats: dict[str, SiteStats], info: dict, path: Path) -> None:
        """Write a checkpoint file; if that fails, say so once and go on without saving progress."""
        try:
            _write_stats(stats, info, path)
        except OSError as exc:
            self.failed = True
            shutil.rmtree(self.folder, ignore_errors=True)
            if self.log is not None:
                self.log(f"could not save the measure's progress in {self.folder} ({exc}); going on without")


def _write_stats(stats: dict[str, SiteStats], info: dict, path: Path) -> None:
    tensors: dict[str, torch.Tensor] = {}
    counts = {}
    for i, (name, st) in enumerate(stats.items()):
        tensors[f"{i}.gram"], tensors[f"{i}.sum"] = st.gram.detach().cpu(), st.sum.detach().cpu()
        counts[name] = [i, int(st.count)]
    write_atomic(tensors, {"info": json.dumps({**info, "sites": counts})}, path)


def _read_stats(path: Path) -> tuple[dict[str, SiteStats], dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["info"])
    tensors = load_file(path)
    stats = {name: SiteStats(tensors[f"{i}.gram"], tensors[f"{i}.sum"], n) for name, (i, n) in info["sites"].items()}
    return stats, info
