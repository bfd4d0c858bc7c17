"""What the numbers of a statistics file must satisfy, checked before any of them is solved.

A site's Gram is a sum of outer products x x^T, its sum a sum of x, its count the number of rows x: so the Gram's
diagonal is non-negative, every 2 x 2 principal minor is (Cauchy-Schwarz: G_ij^2 <= G_ii G_jj), each sum entry
obeys (sum x_j)^2 <= count * G_jj, and the count is the site's calls per forward pass times the rows of its stream
(tokens of the input or decoder, or examples) that the provenance records. A file that breaks one was corrupted or
forged; merging it would give garbage with exit 0.
"""

from __future__ import annotations

import json
import math
from enum import StrEnum
from pathlib import Path

import torch

from regmean.errors import RegmeanError
from regmean.statistic import ProvenanceRecord


class Stream(StrEnum):
    """What the rows of a site's input follow, which decides which of them count (its padding mask)."""

    INPUT = "input"
    """The input's tokens (input_ids; the encoder's for encoder-decoders)."""
    DECODER = "decoder"
    """The decoder's tokens."""
    EXAMPLE = "example"
    """One row per example (a classifier's pooled input)."""
    FIXED = "fixed"
    """Rows that follow no example or token (DeBERTa's relative-position embeddings): every row counts."""
    MIXED = "mixed"
    """Some calls read tokens, others fixed rows (DeBERTa-v3's shared query/key projections)."""
    ROUTED = "routed"
    """A mixture-of-experts expert's input: the input tokens routed to it (at most the input's tokens per call)."""


STREAM_TOTALS = {Stream.INPUT: "tokens", Stream.DECODER: "decoder_tokens", Stream.EXAMPLE: "examples"}
"""The provenance key that counts each stream's rows."""
RELATIVE_SLACK = 1e-3
"""Rounding a float32 accumulation may bring to an identity that holds with equality (proportional columns)."""
MAX_CALLS = 64
"""For files that do not record their sites' streams: the most calls per forward pass a count may stand for."""


MAX_LENGTH = 2**24
"""The longest max length a provenance may record (16M tokens per example)."""


def check_header(
    path: Path, modules: dict[str, str], streams: dict[str, tuple[str, int]], privacy: dict, records, totals=None
):
    """What the header says must agree with itself: each site is named after the first module that reads it (as
    measure names them), recorded streams are known kinds for sites of the file, a withheld site is absent, each
    provenance's max length is one a measure could have used (and its tokens fit in it), and the file's
    (examples, tokens) `totals` are its provenances' sums (not for a DP release, whose counts carry noise)."""
    sites = list(dict.fromkeys(modules.values()))
    first_reader = {}
    for module, site in modules.items():
        first_reader.setdefault(site, module)
    misnamed = [site for site in sites if first_reader[site] != site]
    unknown = sorted(set(streams) - set(sites))
    bogus = sorted(name for name, (stream, _) in streams.items() if stream not in set(Stream))
    present = sorted(set(privacy.get("withheld", [])) & set(sites))
    lengths = [r.get("max_length") for r in records if isinstance(r.get("max_length"), int)]
    renamed = f"site {misnamed[0]} is read first by module {first_reader[misnamed[0]]}" if misnamed else ""
    problems = [
        (misnamed, f"{renamed}, after which measure names a site"),
        (unknown, f"site_streams names {unknown[:1]} that the file has no statistics for"),
        (bogus, f"site {bogus[:1]} has a stream of no known kind (not one of {', '.join(Stream)})"),
        (present, f"site {present[:1]} is said to be withheld but its statistics are in the file"),
        ([n for n in lengths if not 0 < n <= MAX_LENGTH], f"a provenance max length outside 1 to {MAX_LENGTH}"),
    ]
    problems += [] if "dp" in privacy else _provenance_problems(records, totals)
    for found, what in problems:
        if found:
            raise RegmeanError(f"{path}: {what}; the file was altered: measure again")


def _provenance_problems(records: list[ProvenanceRecord], totals: tuple[int, int] | None) -> list[tuple[bool, str]]:
    """Counts the provenance records must agree on (as (found, what) pairs)."""

    def number(record: dict, key: str) -> int | None:
        value = record.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    problems = []
    for record in records:
        typed = [
            k
            for k in ("examples", "tokens", "decoder_tokens", "max_length")
            if k in record and number(record, k) is None
        ]
        if typed:
            problems.append((True, f"a provenance's {typed[0]} is {record[typed[0]]!r:.40}, not a count"))
        examples, length, processes = (number(record, k) for k in ("examples", "max_length", "processes"))
        for key in ("tokens", "decoder_tokens"):
            tokens = number(record, key)
            if key == "tokens" and None not in (tokens, examples) and tokens < examples:
                problems.append((True, f"a provenance records {tokens} tokens from {examples} examples"))
            if None not in (tokens, examples, length) and tokens > examples * length:
                problems.append(
                    (True, f"a provenance records {tokens} {key} from {examples} examples of at most {length}")
                )
        if processes is not None and processes < 1:
            problems.append((True, f"a provenance records {processes} processes"))
    sums = [sum(number(r, k) or 0 for r in records) for k in ("examples", "tokens")]
    complete = records and all(number(r, "examples") is not None and number(r, "tokens") is not None for r in records)
    if totals is not None and complete and tuple(sums) != tuple(totals):
        problems.append((True, f"its examples and tokens {tuple(totals)} are not its provenance's {tuple(sums)}"))
    return problems


def structure_problems(files: list) -> list[str]:
    """Statistics of one architecture have one structure: every file must map each module it shares with the
    reference to the same site, called as often per forward pass on the same stream (a file whose module map or
    calls were edited consistently within itself still differs from the others'). The reference is the structure
    most files share, so that the odd file is the one named (of two files, the first)."""
    signatures = [json.dumps([f.modules, f.site_streams], sort_keys=True) for f in files]
    first = files[max(range(len(files)), key=lambda k: (signatures.count(signatures[k]), -k))]
    problems = []
    for f in (f for f in files if f is not first):
        moved = [m for m in f.modules if m in first.modules and f.modules[m] != first.modules[m]]
        if moved:
            problems.append(
                f"{f.path}: module {moved[0]} reads site {f.modules[moved[0]]}, but site {first.modules[moved[0]]} "
                f"in {first.path}; one architecture has one site map: the file was altered, measure again"
            )
        if bool(f.site_streams) != bool(first.site_streams) or (
            f.site_streams and set(f.site_streams) != set(first.site_streams) and set(f.modules) == set(first.modules)
        ):
            problems.append(
                f"{f.path}: records its sites' streams unlike {first.path}; the file was altered: measure again"
            )
        shared = [s for s in f.site_streams if s in first.site_streams and f.site_streams[s] != first.site_streams[s]]
        if shared and not moved:
            name = shared[0]
            problems.append(
                f"{f.path}: site {name} is {f.site_streams[name]} (stream, calls per forward pass), but "
                f"{first.site_streams[name]} in {first.path}; the file was altered: measure again"
            )
    return problems


def expected_count(provenance: list[ProvenanceRecord], stream: str, calls: int) -> int | None:
    """The row count a site of `stream` called `calls` times per forward pass must have, from the provenance of
    every part of the file; None when a part does not record its stream's total."""
    key = STREAM_TOTALS.get(stream)
    totals = [record.get(key) for record in provenance] if key else [None]
    if not totals or not all(isinstance(t, int) and not isinstance(t, bool) for t in totals):
        return None
    return calls * sum(totals)


def count_limits(provenance: list[ProvenanceRecord], stream: tuple[str, int] | None) -> tuple[int | None, int | None]:
    """(the count a site of `stream` (kind, calls) must have, or None; the most it may have, or None)."""
    if stream is None:
        return None, count_bound(provenance)
    if stream[0] == Stream.ROUTED:  # each call routes each token to an expert at most once
        return None, expected_count(provenance, Stream.INPUT, stream[1])
    return expected_count(provenance, *stream), count_bound(provenance)


def count_bound(provenance: list[ProvenanceRecord]) -> int | None:
    """An upper bound on any site's count for files that do not record their sites' streams: examples x maximum
    length x `MAX_CALLS`, summed over the parts; None when a part records neither."""
    bound = 0
    for record in provenance:
        examples, length = record.get("examples"), record.get("max_length")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (examples, length)):
            return None
        bound += examples * max(length, 1) * MAX_CALLS
    return bound


def check_count(path: Path, name: str, count: int, expected: int | None, bound: int | None) -> None:
    if count < 0:
        raise RegmeanError(f"{path}: site {name} has a negative row count ({count}); measure again")
    if expected is not None and count != expected:
        raise RegmeanError(
            f"{path}: site {name} counts {count} rows, but the file's provenance gives {expected} for it; the file "
            "was altered: measure again"
        )
    if expected is None and bound is not None and count > bound:
        raise RegmeanError(
            f"{path}: site {name} counts {count} rows, more than its provenance allows ({bound}: examples x max "
            "length, or tokens x calls); the file was altered: measure again"
        )


def check_gram(path: Path, name: str, gram: torch.Tensor, total: torch.Tensor, count: int, noisy: bool) -> None:
    """The identities every sum of outer products satisfies; `noisy` (a DP release: the sums carry independent
    noise, the Gram was projected onto the PSD cone) skips the sum's bound."""
    diagonal = gram.diagonal().double()
    scale = float(diagonal.abs().max()) if diagonal.numel() else 0.0
    if count == 0 and (scale > 0 or bool(total.any())):
        raise RegmeanError(
            f"{path}: site {name} counts 0 rows but has non-zero sums; the file was altered: measure again"
        )
    floor = -RELATIVE_SLACK * scale - 1e-30
    if float(diagonal.min()) < floor:
        worst = int(diagonal.argmin())
        raise RegmeanError(
            f"{path}: site {name} has a negative sum of squares (Gram diagonal entry {worst} is "
            f"{float(diagonal[worst]):.3g}); not the statistics of any data: measure again"
        )
    diagonal = diagonal.clamp_min(0)
    _check_minors(path, name, gram, diagonal, scale)
    if not noisy:
        excess = total.double() ** 2 - max(count, 0) * diagonal * (1 + RELATIVE_SLACK)
        if excess.numel() and float(excess.max()) > RELATIVE_SLACK * scale * max(count, 1):
            worst = int(excess.argmax())
            raise RegmeanError(
                f"{path}: site {name}: its sum's entry {worst} is larger than {count} rows with that Gram allow; "
                "the sum, the Gram or the count was altered: measure again"
            )


def _check_minors(path: Path, name: str, gram: torch.Tensor, diagonal: torch.Tensor, scale: float) -> None:
    """|G_ij| <= sqrt(G_ii G_jj) for every pair, a block of rows at a time (bounded temporaries)."""
    root = diagonal.sqrt()
    for start in range(0, gram.shape[0], 256):
        rows = gram[start : start + 256].double()
        limit = root[start : start + 256, None] * root[None, :] * (1 + RELATIVE_SLACK) + RELATIVE_SLACK * scale
        bad = (rows.abs() > limit).nonzero()
        if len(bad):
            i, j = int(bad[0, 0]) + start, int(bad[0, 1])
            raise RegmeanError(
                f"{path}: site {name}: Gram entry ({i}, {j}) exceeds what its diagonal allows (|G_ij| <= "
                "sqrt(G_ii G_jj)); not the statistics of any data: measure again"
            )


SCALE_SPREAD = 1e3
"""The most two models' mean squared input norms at one site may differ by (a factor of 32 in the inputs' size).
Fine-tunes of one base are far closer: at most 12x over every site of the bench's merges (MiniLM fine-tuned on
different domains and tasks, three seeds); a file whose Grams were multiplied by a constant is not."""
MIN_ROUTED_ROWS = 64
"""An expert's site is scale-checked only where every model routed at least this many tokens to it (a handful of
tokens is no evidence of a model's scale)."""


def scale_outlier(mean_squares: list[float]) -> tuple[int, float] | None:
    """The model whose mean squared input norm at a site (trace(G) / count) lies more than SCALE_SPREAD from the
    others' median, with that median; or None. Of two models, the larger (which would dominate the merge). Models
    with no rows or a zero Gram are not compared."""
    known = [(v, k) for k, v in enumerate(mean_squares) if v > 0]
    if len(known) < 2:
        return None
    values = sorted(v for v, _ in known)
    median = values[(len(values) - 1) // 2]
    distance, worst = max((abs(math.log(v / median)), k) for v, k in known)
    if len(known) == 2:
        worst, median = max(known)[1], values[0]
    return (worst, median) if distance > math.log(SCALE_SPREAD) else None


def check_scales(files: list | None, sites: tuple[str, ...], stats: list) -> None:
    """Refuse a site where one model's inputs are 32 times larger or smaller than the others' (a Gram multiplied by a
    constant passes every identity, and would make that model's weights the merge). Among the files without DP
    (whose noisy traces and counts are not compared; a DP file switches nothing off for the others); not for Grams
    measured during the merge (no `files`) or experts that most models routed few tokens to."""
    if files is None:
        return
    routed = any(st.site_streams.get(name, ("",))[0] == Stream.ROUTED for st, name in zip(files, sites, strict=True))
    counts = sorted(s.count for s in stats)
    if routed and counts[(len(counts) - 1) // 2] < MIN_ROUTED_ROWS:  # the median: a forger's own count cannot
        return  # lift the check
    exact = ["dp" not in st.privacy for st in files]  # a DP file's noisy trace and count are not compared
    mean_squares = [
        float(s.gram.diagonal().sum()) / s.count if s.count and ok else 0.0 for s, ok in zip(stats, exact, strict=True)
    ]
    if scale_outlier(mean_squares) is not None:  # which file is the odd one out, only its owner can tell
        said = "; ".join(f"{st.path}: {v:.3g}" for st, v in zip(files, mean_squares, strict=True))
        raise RegmeanError(
            f"site {sites[0]}: the models' inputs differ in mean squared norm by more than a factor of 1,000 "
            f"({said}); fine-tunes of one model are never that far apart: a file was altered or is of another "
            "model, measure again"
        )


def files_by_site(handles: list) -> dict:
    """The file (of a measure's blocks) that holds each site; a site stored in two is refused, naming both (one
    block copied over another)."""
    found: dict = {}
    for handle in handles:
        for key in handle.keys():
            site = key.rsplit("::", 1)[0]
            first = found.setdefault(site, handle)
            if first is not handle:
                raise RegmeanError(
                    f"{handle.path}: site {site} is stored in {first.path.name} too; each block of a measure holds "
                    "its own sites: measure again"
                )
    return found
