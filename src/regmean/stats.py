"""The statistics file: per-site sufficient statistics of linear-layer inputs, in safetensors.

A *site* is one distinct input tensor: the modules that read it (q/k/v, gate/up, every cross-attention k/v that
reads the encoder output) share its statistics. For each site we store sums, so files from disjoint data add up:

    {site}::gram_upper  [d (d + 1) / 2]  sum over unmasked rows of x x^T: its upper triangle, row by row
    {site}::sum         [d]              sum over unmasked rows of x
    {site}::count       [1]              number of rows (int64)

A Gram is symmetric, so format version 2 stores half of it; version-1 files (`{site}::gram`, [d, d], whole) are
still read. Either is read back as the whole [d, d] matrix, one site at a time.

The safetensors header metadata holds the format version, the model fingerprint, the module -> site map and the
provenance. Reading is lazy: `StatisticsFile.site(name)` reads one site's tensors.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from regmean import __version__
from regmean.dtypes import FLOATS, STATISTICS, STORED_NAMES
from regmean.errors import RegmeanError, check_path, one_line
from regmean.io.metadata import Metadata
from regmean.io.outputs import Inputs
from regmean.io.staged import StagedFiles, replaceable_target, target_file, write_atomic
from regmean.io.tensorfile import TensorFile
from regmean.io.untrusted import all_finite
from regmean.statistic import ProvenanceRecord, Statistic
from regmean.stats_checks import check_count, check_gram, check_header, count_limits, files_by_site

FORMAT = "regmean.gram"
FORMAT_VERSION = 2
FILE_NAME = "statistics.safetensors"
WITHHELD = "withheld: its input is one fixed vector per token, so its Gram decodes into the data's token counts"
"""The reason `skipped` gives for the modules of a token site `measure` left out (its default, unless
--expose-token-counts)."""
EXPERTS_UNCLIPPED = "left out under DP: an expert's inputs (the tokens routed to it) are not clipped per example"
NO_EXAMPLE_BOUND = "left out under DP: its input rows follow no example (no per-example bound to clip them to)"
"""The reasons `skipped` gives for the modules of a site a DP release left out."""
PACK_ROWS = 256
"""Rows of a Gram packed or unpacked at a time (bounded temporaries whatever the width)."""


def pack_upper(gram: torch.Tensor) -> torch.Tensor:
    """The upper triangle of a [d, d] matrix, row by row: [d (d + 1) / 2]."""
    d = gram.shape[0]
    out = gram.new_empty(d * (d + 1) // 2)
    start = 0
    for i in range(d):
        out[start : start + d - i] = gram[i, i:]
        start += d - i
    return out


def unpack_upper(packed: torch.Tensor, d: int) -> torch.Tensor:
    """The symmetric [d, d] matrix whose upper triangle `pack_upper` packed (bit-exact)."""
    out = packed.new_empty(d, d)
    start = 0
    for i in range(d):
        out[i, i:] = packed[start : start + d - i]
        start += d - i
    for a in range(0, d, PACK_ROWS):  # the lower triangle mirrored, a block of rows at a time
        b = min(a + PACK_ROWS, d)
        out[b:, a:b] = out[a:b, b:].T
        block = out[a:b, a:b]
        block.copy_(torch.triu(block) + torch.triu(block, 1).T)
    return out


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
    provenance: list[ProvenanceRecord] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # module -> reason it has no statistics
    protection: str = "none"  # in words: withheld sites, differential privacy
    privacy: dict = field(default_factory=dict)  # {"withheld": [site, ...], "dp": DPRelease.record()}
    site_streams: dict[str, tuple[str, int]] = field(default_factory=dict)  # site -> (stream, calls per pass)
    measured_model: tuple[Path, Path | None] | None = field(default=None, compare=False)
    """Where measure read the model (its folder, and an adapter's base): for the statistics card; not saved."""

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
            "protection": self.protection,
            "privacy": json.dumps(self.privacy),
            "site_streams": json.dumps(self.site_streams),
        }


BLOCK_PATTERN = "statistics-*-of-*.safetensors"


BLOCK_NAME = re.compile(r"statistics-(\d{5})-of-(\d{5})\.safetensors")


def stats_files(path: str | Path) -> list[Path]:
    """The file(s) of a statistics folder: statistics.safetensors, or every block statistics-i-of-n.safetensors."""
    single = target_file(Path(path), FILE_NAME)
    if single.is_file() or not Path(path).is_dir():
        return [single]
    blocks = sorted(Path(path).glob(BLOCK_PATTERN))
    if not blocks:
        return [single]
    numbered = [BLOCK_NAME.fullmatch(b.name) for b in blocks]
    bad = [b for b, m in zip(blocks, numbered, strict=True) if m is None]
    if bad:
        raise RegmeanError(f"{bad[0]}: not a statistics block name (statistics-00001-of-00003.safetensors)")
    n = int(numbered[0].group(2))
    if sorted((int(m.group(1)), int(m.group(2))) for m in numbered) != [(i, n) for i in range(1, n + 1)]:
        raise RegmeanError(
            f"{path}: {len(blocks)} statistics blocks present, not blocks 1 to {n}; the measure did not finish"
        )
    return blocks


def block_path(out: str | Path, index: int, count: int) -> Path:
    return Path(out) / f"statistics-{index + 1:05d}-of-{count:05d}.safetensors"


def save(stats: Statistics, out: str | Path) -> Path:
    """Write statistics to `out` (a folder or a .safetensors path), replacing only a statistics file regmean wrote;
    `BlockWriter` writes a measure's blocks."""
    if not isinstance(stats, Statistics):
        raise RegmeanError(f"save_statistics takes the Statistics regmean.measure returns, not {type(stats).__name__}")
    return write_atomic(_tensors(stats), stats.metadata(), replaceable_target(out, FILE_NAME, FORMAT))


def _tensors(stats: Statistics) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for name, s in stats.sites.items():
        tensors[f"{name}::gram_upper"] = pack_upper(s.gram)
        tensors[f"{name}::sum"] = s.sum.contiguous()
        tensors[f"{name}::count"] = torch.tensor([s.count], dtype=torch.int64)
    return tensors


class BlockWriter(StagedFiles):
    """The statistics files of one measure (or combine), revealed together at `commit` (see `StagedFiles`)."""

    def __init__(self, out: str | Path, replace: bool = False, inputs: Inputs = (), log=None):
        super().__init__(
            Path(out), fmt=FORMAT, file_name=FILE_NAME, replace=replace, inputs=inputs, log=log, blocks=BLOCK_PATTERN
        )

    def write(self, stats: Statistics, index: int, count: int) -> None:
        if count > 1 and not self.blocks:
            raise RegmeanError(f"{self.out}: statistics in {count} blocks need a folder of their own as output")
        final = self.target if count == 1 else block_path(self.target.parent, index, count)
        self.stage(_tensors(stats), stats.metadata(), final)


def open_statistics(path: Path, fmt: str, what: str) -> tuple[TensorFile, Metadata]:
    """Open a statistics safetensors file lazily and check its format tag; returns (handle, metadata)."""
    if not path.is_file():
        raise RegmeanError(f"{path}: {what} not found (measure them first)")
    try:
        handle = TensorFile(path)
    except RegmeanError as exc:
        raise RegmeanError(f"{exc.problems[0]} ({what}: measure again)") from exc
    meta = Metadata(handle.metadata, path)
    if handle.metadata.get("format") != fmt:
        found = one_line(str(handle.metadata.get("format")), 40)
        raise RegmeanError(f"{path}: not a file of {what} (format {found!r}, expected {fmt})")
    if meta.natural("format_version", "0") > FORMAT_VERSION:
        raise RegmeanError(f"{path}: written by a newer regmean (format {meta.text('format_version')}); upgrade")
    return handle, meta


class StatisticsFile:
    """Statistics opened lazily (one file, or one per block of sites): metadata now, a site's tensors when asked.

    Everything the header says is checked at open: metadata types, and for every site a square Gram, a sum and
    a count of the right shapes and dtypes."""

    def __init__(self, path: str | Path):
        check_path(path, "StatisticsFile")
        files = stats_files(path)
        self.path = files[0] if len(files) == 1 else Path(path)
        opened = [open_statistics(f, FORMAT, "regmean statistics") for f in files]
        meta = opened[0][1]
        self.meta = meta.meta
        self.files = files
        self.nbytes = sum(f.stat().st_size for f in files)
        self.fingerprint = meta.fingerprint()
        self.modules = meta.str_map("modules")
        self.dtype = meta.text("dtype")
        if self.dtype not in STATISTICS:
            raise RegmeanError(f"{self.path}: metadata 'dtype' must be float32 or float64, not {self.dtype!r:.40}")
        self.examples, self.tokens = meta.natural("examples"), meta.natural("tokens")
        self.masking = meta.text("masking")
        self.provenance = meta.records("provenance")
        self.skipped = meta.str_map("skipped", "{}")
        self.protection = meta.text("protection", "none")
        self.privacy = meta.privacy()
        self.site_streams = meta.site_streams()
        self.site_names = list(dict.fromkeys(self.modules.values()))  # forward order
        totals = (self.examples, self.tokens)
        check_header(self.path, self.modules, self.site_streams, self.privacy, self.provenance, totals)
        for handle, block in opened:
            if block.meta != self.meta:  # every block of one measure carries the same metadata
                raise RegmeanError(f"{handle.path}: a block of another measure than {files[0]}; measure again")
        self._handles: dict[str, TensorFile] = files_by_site([handle for handle, _ in opened])
        for name in self.site_names:
            self._check_site(name)

    def describe(self) -> str:
        return f"{self.examples} examples, {self.tokens} tokens ({self.dtype})"

    def _check_site(self, name: str) -> None:
        handle = self._handle(name)
        shape = handle.shape(f"{name}::sum") if f"{name}::sum" in handle else ()
        d = shape[0] if len(shape) == 1 else -1
        dtype = STORED_NAMES[FLOATS[self.dtype]]
        gram = (f"{name}::gram_upper", (d * (d + 1) // 2,)) if self._packed(name) else (f"{name}::gram", (d, d))
        expected = {f"{name}::sum": (dtype, (d,)), gram[0]: (dtype, gram[1]), f"{name}::count": ("I64", (1,))}
        if f"{name}::gram" in handle and f"{name}::gram_upper" in handle:
            raise RegmeanError(
                f"{handle.path}: site {name} holds its Gram twice ({name}::gram and {name}::gram_upper); one "
                "measure writes one: measure again"
            )
        for key, (want_dtype, want_shape) in expected.items():
            if key not in handle or handle.dtype(key) != want_dtype or handle.shape(key) != want_shape:
                found = (handle.dtype(key), handle.shape(key)) if key in handle else "nothing"
                raise RegmeanError(
                    f"{handle.path}: incomplete statistics for site {name}: {key} should be {want_dtype} "
                    f"{list(want_shape)}, found {found}; measure again"
                )

    def _packed(self, name: str) -> bool:
        """Whether the site's Gram is stored as its upper triangle (format 2) rather than whole (format 1)."""
        return f"{name}::gram_upper" in self._handle(name)

    @property
    def gram_layout(self) -> str:
        """How the Grams are stored: 'upper triangle' (format 2) or 'whole' (format 1)."""
        packed = [self._packed(name) for name in self.site_names]
        return "upper triangle" if all(packed) else "mixed" if any(packed) else "whole"

    def gram_nbytes(self, name: str) -> int:
        """Bytes of the site's Gram as stored (about half of the matrix's in format 2)."""
        d = self.site_shape(name)[0]
        stored = d * (d + 1) // 2 if self._packed(name) else d * d
        return stored * FLOATS[self.dtype].itemsize

    def _handle(self, name: str):
        if name not in self._handles:
            raise RegmeanError(f"{self.path}: no statistics for site {name}")
        return self._handles[name]

    def site(self, name: str, check: bool = True) -> SiteStats:
        """The site's sums; `check`: refused unless finite and satisfying what sums of outer products satisfy."""
        handle = self._handle(name)
        total, count = handle.get(f"{name}::sum"), self.count(name)
        if self._packed(name):
            gram = unpack_upper(handle.get(f"{name}::gram_upper"), total.shape[0])
        else:
            gram = handle.get(f"{name}::gram")
        if check and not (all_finite(gram) and all_finite(total)):
            raise RegmeanError(
                f"{self.path}: site {name} has NaN or Inf values; measure again (try --stats-dtype float64)"
            )
        if check:
            check_gram(handle.path, name, gram, total, count, noisy="dp" in self.privacy)
        return SiteStats(gram, total, count)

    def count(self, name: str) -> int:
        """The site's row count (reads 8 bytes, no Gram), checked against the rows its provenance records."""
        handle = self._handle(name)
        count = int(handle.get(f"{name}::count")[0])
        check_count(handle.path, name, count, *count_limits(self.provenance, self.site_streams.get(name)))
        return count

    def content_digest(self) -> str:
        """A hash of what the data contributed (every site's sum vector and row count): equal for two copies of
        the same statistics, different for statistics of different data. Reads no Gram."""
        digest = hashlib.blake2b(digest_size=16)
        for name in sorted(self.site_names):
            handle = self._handle(name)
            for part in ("sum", "count"):
                digest.update(handle.get(f"{name}::{part}").numpy().tobytes())
        return digest.hexdigest()

    def site_shape(self, name: str) -> tuple[int, ...]:
        """The Gram's shape, [d, d]."""
        d = self._handle(name).shape(f"{name}::sum")[0]
        return (d, d)

    def load(self, check: bool = True) -> Statistics:
        return Statistics(
            sites={n: self.site(n, check) for n in self.site_names},
            modules=dict(self.modules),
            fingerprint=dict(self.fingerprint),
            dtype=self.dtype,
            examples=self.examples,
            tokens=self.tokens,
            masking=self.masking,
            provenance=list(self.provenance),
            skipped=dict(self.skipped),
            protection=self.protection,
            privacy=dict(self.privacy),
            site_streams=dict(self.site_streams),
        )


GRAM = Statistic("measure", StatisticsFile, "regmean.cli_measure:measure")
"""Gram statistics: measured by `regmean measure` (`regmean.measure.pipeline`), read by RegMean."""
