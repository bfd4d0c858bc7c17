"""What `measure` does to protect the owner's data: withhold the sites whose Grams decode into the bag of words,
and release everything else with differential privacy (`regmean.privacy.dp`)."""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from regmean import distributed
from regmean.errors import RegmeanError
from regmean.measure.batching import Batch
from regmean.measure.contributions import ContributionNorms
from regmean.measure.sites import Site
from regmean.privacy import dp
from regmean.privacy.tokensites import token_sites
from regmean.stats import WITHHELD, SiteStats
from regmean.stats_checks import Stream

STREAM_BOUNDS = (Stream.INPUT, Stream.DECODER)
"""Streams whose rows an example adds up to max_length of; every example also adds 1 to the examples' count."""


@dataclass(frozen=True)
class Protection:
    """What the owner asked for: withholding the token sites (the default, of `regmean measure` and
    `regmean.measure` alike: it costs a merge at most 0.4 points on the bench suites, docs/privacy.md), differential
    privacy, both, or neither (`Protection(withhold=False)`: the file decodes into the data's token counts)."""

    withhold: bool = True
    epsilon: float | None = None
    delta: float = 1e-5
    clip: float | None = None  # each site's bound, in multiples of its typical contribution (`typical_norms`); 1

    def __post_init__(self) -> None:
        """Refuse a budget that cannot be met before any work (the accountant runs later, once)."""
        if not isinstance(self.withhold, bool):
            raise RegmeanError(f"Protection withhold={self.withhold!r}: give True or False")
        numbers = {"epsilon": self.epsilon, "delta": self.delta, "clip": self.clip}
        for name, value in numbers.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise RegmeanError(f"Protection {name}={value!r}: give a number (--dp-{name} on the command line)")
        if self.epsilon is None:
            if self.clip is not None:
                raise RegmeanError("--dp-clip bounds a DP release: give --dp-epsilon (and --dp-delta) with it")
            return
        dp.check_budget(self.epsilon, self.delta)
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise RegmeanError(
                f"--dp-clip must be a positive number (1: each site's typical contribution), not {self.clip}"
            )

    def warning(self, exposed: list[str]) -> str | None:
        """One line on what the file will expose, when the owner chose no protection."""
        if self.withhold or self.epsilon is not None or not exposed:
            return None
        return (
            f"note: --expose-token-counts: site {exposed[0]} takes one fixed vector per token, so its Gram decodes "
            "into your data's token counts (see: regmean stats audit OUT --model MODEL --data DATA); without the flag "
            "it is withheld (a merge averages that layer), or protect it with --dp-epsilon"
        )

    def describe(self, release: dp.DPRelease | None, withheld: list[str]) -> str:
        parts = []
        if withheld:
            parts.append(f"withheld token sites: {', '.join(withheld)}")
        if release is not None:
            parts.append(release.describe())
        return "; ".join(parts) or "none"


def token_site_names(model: nn.Module, sites: list[Site]) -> list[str]:
    """The sites whose input is a fixed vector per token (or per token and position): their Grams decode."""
    vocab = model.get_input_embeddings().weight.shape[0]
    return [s.name for s in token_sites(model, [s.name for s in sites], vocab)]


def withhold_token_sites(model: nn.Module, sites: list[Site], skipped: dict[str, str]) -> tuple[list[Site], list[str]]:
    """The sites left once those whose input is a fixed vector per token are taken out (their modules go to
    `skipped`, so that a merge averages them and says why), and the names of those taken out."""
    found = set(token_site_names(model, sites))
    for site in sites:
        if site.name in found:
            skipped.update(dict.fromkeys(site.modules, WITHHELD))
    return [s for s in sites if s.name not in found], sorted(found)


"""The reason `skipped` gives for the modules of a fixed- or mixed-stream site in a DP release."""


class PrivateRelease:
    """The DP side of one measure: per-example row scales (clipping, from one pass over the data) before the sums,
    noise once on rank 0 after the processes' sums are added up."""

    def __init__(
        self,
        model: nn.Module,
        sites: list[Site],
        batches: Callable[[], Iterator[Batch]],
        asked: Protection,
        max_length: int,
        examples: int,
        device: str = "cpu",
    ):
        dp.check_delta_for(asked.delta, examples)
        norms = ContributionNorms(model, sites)
        a, b = norms.pass_over(batches())
        totals = {s: sum(int(r.sum()) for r in norms.rows[s]) for s in STREAM_BOUNDS if norms.rows[s]}
        totals = {s: distributed.sum_int(n, device) for s, n in totals.items()} | {Stream.EXAMPLE: examples}
        sigma = dp.calibrate(asked.epsilon, asked.delta)
        clip = asked.clip or 1.0
        self.release = dp.DPRelease(asked.epsilon, asked.delta, clip, sigma, len(sites), len(totals), max_length)
        bounds = clip * typical_norms(model, sites, max_length)
        self.bounds = {s.name: float(c) for s, c in zip(sites, bounds, strict=True)}
        scales = dp.row_scales(a, b, bounds)
        self.scales = {s.name: scales[:, i] for i, s in enumerate(sites)}
        self.clipped = distributed.sum_int(int((scales < 1).any(1).sum()), device)
        self.generator = torch.Generator().manual_seed(secrets.randbits(63))
        self.counts = {
            s: dp.noisy_count(n, self.release.count_noise(1 if s == Stream.EXAMPLE else max_length), self.generator)
            for s, n in totals.items()
        }

    def record(self) -> dict:
        """What the file says of the release: the budget and mechanism, each site's bound, the clipped examples."""
        return {"dp": self.release.record(), "site_bounds": self.bounds, "clipped_examples": self.clipped}

    def noisy(self, site: Site, stats: SiteStats) -> SiteStats:
        """A site's reduced sums with the mechanism's noise, its count from its stream's noisy count."""
        std = self.release.relative_noise * self.bounds[site.name]
        return SiteStats(
            dp.noisy_gram(stats.gram, std, self.generator),
            dp.noisy_vector(stats.sum, std, self.generator),
            site.calls * self.counts[site.stream],
        )


def typical_norms(model: nn.Module, sites: list[Site], max_length: int) -> torch.Tensor:
    """Each site's typical contribution norm, from the public model alone: the median over 16 random token
    sequences of min(max_length, 32) tokens."""
    vocab = model.get_input_embeddings().weight.shape[0]
    device = next(model.parameters()).device
    ids = torch.randint(0, vocab, (16, min(max_length, 32)), generator=torch.Generator().manual_seed(0)).to(device)
    mask = torch.ones_like(ids, dtype=torch.bool)
    inputs = {"input_ids": ids, "attention_mask": mask.long()}
    masks = {Stream.INPUT: mask}
    if getattr(model.config, "is_encoder_decoder", False):
        inputs |= {"decoder_input_ids": ids.clone(), "decoder_attention_mask": mask.long()}
        masks[Stream.DECODER] = mask
    a, b = ContributionNorms(model, sites).pass_over([Batch(inputs, masks, ids.shape[0])])
    return (a + b).sqrt().median(0).values


def noise_warning(privacy: dict, tokens: int) -> str | None:
    """One line when a DP release's noise is of the order of its data (noise on token counts at least a third of
    the tokens): its Grams carry little signal, and a merge may follow the noise."""
    noise = (privacy.get("dp") or {}).get("token_count_noise")
    if not isinstance(noise, int | float) or noise * 3 < max(tokens, 1):
        return None
    return (
        f"warning: the DP noise (about {noise:.0f} tokens on token counts) is of the order of the data ({tokens:,} "
        "tokens): these statistics carry little signal and may mislead a merge; measure more examples, or use a "
        "larger --dp-epsilon or fewer sites"
    )
