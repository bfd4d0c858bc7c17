"""The statistics file: per-site sufficient statistics of linear-layer inputs, in safetensors.

A *site* is one distinct input tensor: the modules that read it (q/k/v, gate/up, every cross-attention k/v that
reads the encoder output) share its statistics. For each site we store sums, so files from disjoint data add up:

    {site}::gram   [d, d]  sum over unmasked rows of x x^T
    {site}::sum    [d]     sum over unmasked rows of x
    {site}::count  [1]     number of rows (int64)

The safetensors header metadata holds the format version, the model fingerprint, the module -> site map and the
provenance. Reading is lazy: `StatisticsFile.site(name)` reads one site's tensors.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file

from regmean import __version__
from regmean.errors import RegmeanError
from regmean.io.tensorfile import TensorFile

FORMAT = "regmean.gram"
FORMAT_VERSION = 1
FILE_NAME = "statistics.safetensors"


@dataclass
class SiteStats:
    gram: torch.Tensor
    sum: torch.Tensor
    count: int

    def __add__(self, other: SiteStats) -> SiteStats:
        return SiteStats(self.gram + other.gram, self.sum + other.sum, self.count + other.count)


@dataclass
class Statistics:
    """Statistics held in memory (what `measure` produces and `save` writes)."""

    sites: dict[str, SiteStats]
    modules: dict[str, str]  # module name -> site name
    fingerprint: dict[str, str]
    dtype: str
    examples: int
    tokens: int
    masking: str = "attention-mask: padding rows excluded (encoder, decoder and cross-attention inputs)"
    provenance: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> reason it has no statistics

    def metadata(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "library": f"regmean {__version__}",
            "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            "modules": json.dumps(self.modules),
            "dtype": self.dtype,
            "examples": str(self.examples),
            "tokens": str(self.tokens),
            "masking": self.masking,
            "provenance": json.dumps(self.provenance),
            "skipped": json.dumps(self.skipped),
        }


BLOCK_PATTERN = "statistics-*-of-*.safetensors"


def stats_path(path: str | Path) -> Path:
    path = Path(path)
    return path / FILE_NAME if path.is_dir() or path.suffix != ".safetensors" else path


def stats_files(path: str | Path) -> list[Path]:
    """The file(s) of a statistics folder: statistics.safetensors, or every block statistics-i-of-n.safetensors."""
    single = stats_path(path)
    if single.is_file() or not Path(path).is_dir():
        return [single]
    blocks = sorted(Path(path).glob(BLOCK_PATTERN))
    if not blocks:
        return [single]
    n = int(blocks[0].stem.rsplit("-of-", 1)[1])
    if len(blocks) != n:
        raise RegmeanError(f"{path}: {len(blocks)} of {n} statistics blocks present; the measure did not finish")
    return blocks


def block_path(out: str | Path, index: int, count: int) -> Path:
    return Path(out) / f"statistics-{index + 1:05d}-of-{count:05d}.safetensors"


def save(stats: Statistics, out: str | Path) -> Path:
    """Write statistics to `out` (a folder or a .safetensors path); `BlockWriter` writes a measure's blocks."""
    return write_atomic(_tensors(stats), stats.metadata(), stats_path(out))


def _tensors(stats: Statistics) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, s in stats.sites.items():
        tensors[f"{name}::gram"] = s.gram.contiguous()
        tensors[f"{name}::sum"] = s.sum.contiguous()
        tensors[f"{name}::count"] = torch.tensor([s.count], dtype=torch.int64)
    return tensors


class BlockWriter:
    """The files of one measure, written as each block finishes under hidden names and revealed together by
    `commit`: a measure that fails or is killed never leaves a statistics file, whole or partial."""

    PREFIX = ".partial-"

    def __init__(self, out: str | Path, replace: bool = False):
        self.out = Path(out)
        self.staged: list[tuple[Path, Path]] = []
        existing = self.existing()
        if existing and not replace:
            raise RegmeanError(f"{existing[0]}: exists; choose another folder or pass --force to replace it")
        for stale in self.out.glob(f"{self.PREFIX}statistics*.safetensors"):  # left by a killed measure
            stale.unlink()

    def existing(self) -> list[Path]:
        """The statistics the folder holds now: one file or blocks."""
        single = stats_path(self.out)
        return [single] if single.is_file() else sorted(self.out.glob(BLOCK_PATTERN))

    def write(self, stats: Statistics, index: int, count: int) -> None:
        final = stats_path(self.out) if count == 1 else block_path(self.out, index, count)
        hidden = final.with_name(self.PREFIX + final.name)
        self.staged.append((write_atomic(_tensors(stats), stats.metadata(), hidden), final))

    def commit(self) -> list[Path]:
        """Replace whatever statistics the folder held (one file or blocks) by the staged files."""
        finals = {final for _, final in self.staged}
        for old in self.existing():
            if old not in finals:
                old.unlink()
        for hidden, final in self.staged:
            os.replace(hidden, final)
        written = [final for _, final in self.staged]
        self.staged = []
        return written

    def discard(self) -> None:
        for hidden, _ in self.staged:
            hidden.unlink(missing_ok=True)
        self.staged = []


def write_atomic(tensors: dict[str, torch.Tensor], metadata: dict[str, str], target: Path) -> Path:
    """Write a safetensors file through a temporary file in the same folder, renamed when complete."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".stats-", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def open_statistics(path: Path, fmt: str, what: str):
    """Open a statistics safetensors file lazily and check its format tag; returns (handle, metadata)."""
    if not path.is_file():
        raise RegmeanError(f"{path}: {what} not found (measure them first)")
    try:
        handle = TensorFile(path)
    except RegmeanError as exc:
        raise RegmeanError(f"{exc.problems[0]} ({what}: measure again)") from exc
    meta = handle.metadata
    if meta.get("format") != fmt:
        raise RegmeanError(f"{path}: not a file of {what} (format {meta.get('format')!r}, expected {fmt})")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise RegmeanError(f"{path}: written by a newer regmean (format {meta['format_version']}); upgrade")
    return handle, meta


class StatisticsFile:
    """Statistics opened lazily (one file, or one per block of sites): metadata now, a site's tensors when asked."""

    def __init__(self, path: str | Path):
        files = stats_files(path)
        self.path = files[0] if len(files) == 1 else Path(path)
        opened = [open_statistics(f, FORMAT, "regmean statistics") for f in files]
        self._handles = {}
        for handle, _ in opened:
            for key in handle.keys():
                self._handles.setdefault(key.rsplit("::", 1)[0], handle)
        meta = opened[0][1]
        self.meta = meta
        self.nbytes = sum(f.stat().st_size for f in files)
        self.fingerprint: dict[str, str] = json.loads(meta["fingerprint"])
        self.modules: dict[str, str] = json.loads(meta["modules"])
        self.dtype: str = meta["dtype"]
        self.examples, self.tokens = int(meta["examples"]), int(meta["tokens"])
        self.masking: str = meta["masking"]
        self.provenance: list[dict] = json.loads(meta["provenance"])
        self.skipped: dict[str, str] = json.loads(meta.get("skipped", "{}"))
        self.site_names = list(dict.fromkeys(self.modules.values()))  # forward order

    def _handle(self, name: str):
        if name not in self._handles:
            raise RegmeanError(f"{self.path}: no statistics for site {name}")
        return self._handles[name]

    def site(self, name: str, check_finite: bool = True) -> SiteStats:
        handle = self._handle(name)
        try:
            gram = handle.get(f"{name}::gram")
            total = handle.get(f"{name}::sum")
            count = int(handle.get(f"{name}::count")[0])
        except KeyError as exc:
            raise RegmeanError(f"{self.path}: incomplete statistics for site {name} (no {exc})") from exc
        if check_finite and not (torch.isfinite(gram).all() and torch.isfinite(total).all()):
            raise RegmeanError(
                f"{self.path}: site {name} has NaN or Inf values; measure again (try --stats-dtype float64)"
            )
        return SiteStats(gram, total, count)

    def site_shape(self, name: str) -> tuple[int, ...]:
        return self._handle(name).shape(f"{name}::gram")

    def load(self) -> Statistics:
        return Statistics(
            sites={n: self.site(n, check_finite=False) for n in self.site_names},
            modules=dict(self.modules),
            fingerprint=dict(self.fingerprint),
            dtype=self.dtype,
            examples=self.examples,
            tokens=self.tokens,
            masking=self.masking,
            provenance=list(self.provenance),
            skipped=dict(self.skipped),
        )


def combine(paths: list[str | Path]) -> Statistics:
    """Sum statistics of the same model measured on disjoint data: exactly the statistics of the union."""
    if not paths:
        raise RegmeanError("combine needs at least one statistics file")
    files = [StatisticsFile(p) for p in paths]
    first = files[0]
    problems = []
    for f in files[1:]:
        if f.fingerprint != first.fingerprint:
            problems.append(f"{f.path}: measured on a different model than {first.path}; cannot combine")
        if f.modules != first.modules:
            problems.append(f"{f.path}: measured different modules than {first.path} (check include/exclude)")
        if f.dtype != first.dtype:
            problems.append(f"{f.path}: dtype {f.dtype} differs from {first.path} ({first.dtype})")
    if problems:
        raise RegmeanError(problems)
    total = first.load()
    for f in files[1:]:
        for name in total.sites:
            total.sites[name] = total.sites[name] + f.site(name, check_finite=False)
        total.examples += f.examples
        total.tokens += f.tokens
        total.provenance += f.provenance
    return total
