"""`regmean stats audit`: what a statistics file gives away, found by attacking it as an outsider would.

The outsider holds the file and the public model, nothing else. For every site whose input is a fixed vector per
token (or per token and position: `tokensites`), the file's Gram is decoded into the non-negative counts that
explain it best (`decode`). Given the owner's own data, the recovered tokens are scored against the truth: the
tokens that data put at that site, read exactly as `measure` read them.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from regmean.errors import RegmeanError
from regmean.io.data import Example
from regmean.loading import load_adapted
from regmean.measure.batching import make_batches
from regmean.measure.pipeline import prepare_inputs
from regmean.privacy.decode import Decoded, decode_counts
from regmean.privacy.tokensites import TokenSite, token_sites, token_vectors
from regmean.stats import StatisticsFile
from regmean.stats_checks import Stream

DEFAULT_POSITIONS = 32
"""Positions attacked at a site whose input depends on the position (the atoms are tokens x positions)."""

Atom = tuple[int, int]
"""(token id, position); position -1 at a site whose input does not depend on the position."""


@dataclass
class SiteAudit:
    """One site's decode and, given the owner's data, its score against the truth."""

    site: TokenSite
    positions: int  # positions attacked (0: the site's input is position-free)
    recovered: dict[Atom, int]  # atom -> count (rounded), for every atom decoded at >= 0.5
    decoded: Decoded
    seconds: float
    truth: Counter | None = None  # atom -> count in the owner's data (positions < `positions` where positional)
    unattacked: int = 0  # the owner's tokens at positions past those attacked

    def tokens(self) -> Counter:
        """Recovered counts per token id (positions added up)."""
        out: Counter = Counter()
        for (token, _), n in self.recovered.items():
            out[token] += n
        return out

    def score(self) -> dict[str, float] | None:
        """Recall and precision of the recovered atoms (distinct tokens, or token-position pairs), and the share
        of recovered atoms whose count is exact; None without the owner's data."""
        if self.truth is None:
            return None
        hits = set(self.recovered) & set(self.truth)
        return {
            "true": len(self.truth),
            "recovered": len(self.recovered),
            "hits": len(hits),
            "recall": len(hits) / max(1, len(self.truth)),
            "precision": len(hits) / max(1, len(self.recovered)),
            "exact_counts": sum(self.recovered[a] == self.truth[a] for a in hits),
        }


@dataclass
class Audit:
    stats: Path
    examples: int
    tokens: int
    protection: str
    sites: list[SiteAudit] = field(default_factory=list)
    withheld: list[TokenSite] = field(default_factory=list)  # token sites the file leaves out


def audit(
    stats_path: str | Path,
    model_dir: str | Path,
    examples: Sequence[Example] | None = None,
    *,
    base: str | Path | None = None,
    positions: int | None = None,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> Audit:
    """Decode every token site of the statistics at `stats_path` with the public model at `model_dir`; score the
    decode against `examples` (the owner's data) when given."""
    stats = StatisticsFile(stats_path)
    checkpoint, tokenizer, examples, _ = prepare_inputs(model_dir, base, False, examples or [])
    if checkpoint.fingerprint != stats.fingerprint:
        raise RegmeanError(f"{stats.path}: statistics of another model than {model_dir}; give the model they measured")
    model = load_adapted(checkpoint, device, torch.float32)
    vocab = model.get_input_embeddings().weight.shape[0]
    max_length = int(stats.provenance[0].get("max_length", 128)) if stats.provenance else 128
    attacked = min(max_length, positions or DEFAULT_POSITIONS)
    found = token_sites(model, list(stats.modules) + list(stats.skipped), vocab)
    by_site = {s.name: s for s in found if s.name in stats.site_names}
    result = Audit(Path(stats_path), stats.examples, stats.tokens, stats.protection)
    result.withheld = [s for s in found if s.name in stats.privacy.get("withheld", [])]
    for site in by_site.values():
        start = time.perf_counter()
        span = attacked if site.positional else 0
        if log is not None:
            log(f"decoding {site.describe()}" + (f", positions 0-{span - 1}" if span else ""))
        atoms = token_vectors(model, site, vocab, max(span, 1))
        decoded = decode_counts(atoms, stats.site(site.name).gram, log=log)
        recovered = {_atom(a, span): round(float(c)) for a, c in enumerate(decoded.counts) if c >= 0.5}
        result.sites.append(SiteAudit(site, span, recovered, decoded, time.perf_counter() - start))
    if examples:
        for entry in result.sites:
            entry.truth, entry.unattacked = _truth(examples, tokenizer, model, max_length, entry.positions, device)
    return result


def _atom(index: int, positions: int) -> Atom:
    return (index // positions, index % positions) if positions else (index, -1)


def _truth(examples, tokenizer, model, max_length: int, positions: int, device: str) -> tuple[Counter, int]:
    """The atoms the owner's data put at a site, read as `measure` read them (same tokenizer, truncation and
    padding mask), and the count of its tokens at positions past those attacked."""
    counts: Counter = Counter()
    beyond = 0
    for batch in make_batches(examples, tokenizer, model, 32, max_length, device):
        ids, mask = batch.inputs["input_ids"].cpu(), batch.masks[Stream.INPUT].cpu()
        where = mask.nonzero().tolist()
        for row, pos in where:
            if positions and pos >= positions:
                beyond += 1
                continue
            counts[(int(ids[row, pos]), pos if positions else -1)] += 1
    return counts, beyond
