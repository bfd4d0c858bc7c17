"""Differentially private statistics: one Gaussian mechanism over everything a statistics file releases.

The released vector holds, for every one of the S sites, the Gram's upper triangle (as stored) and the sum of the
inputs, and one row count per stream (tokens, decoder tokens, examples; each site's count is its calls per token
times its stream's). Each block is weighted so that one example moves the whole vector by at most 1 (L2):

- site s: the example's rows there are scaled by a factor g <= 1 so that its Gram and sum at s have norm at most
  c_s (the Gram scales by g^2, the sum by g), and the block is weighted by sqrt(3/4) / (sqrt(S) c_s). The bound
  c_s is `clip` times the site's typical contribution, measured on random tokens with the public model: sites
  differ in scale by orders of magnitude, and every site keeps the same noise relative to its own bound;
- the counts are weighted by 1 / (2 L sqrt(streams)), L the most rows one example adds to the stream (max_length
  tokens; 1 example), so that they move the vector by at most 1/2.

Gaussian noise of std sigma on every weighted number (an upper triangle of i.i.d. noise: a symmetric noise
matrix, the "Analyze Gauss" construction) makes the file (epsilon, delta)-DP, sigma calibrated by Google's
dp-accounting (privacy loss distributions, add-or-remove neighbours). Divided back by the weights, that is noise of
std sigma sqrt(S) c_s / sqrt(3/4) on site s and 2 sigma L sqrt(streams) rows on a count. Noisy Grams are then
projected onto the positive semidefinite cone (eigenvalues floored at 0): post-processing, which costs no privacy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from regmean.errors import RegmeanError

GRAM_SHARE = math.sqrt(3) / 2
"""The part of the unit bound left to the Grams and sums; the counts take the rest (1/2)."""


@dataclass(frozen=True)
class DPRelease:
    """The privacy budget of one statistics file, and the mechanism that spends it."""

    epsilon: float
    delta: float
    clip: float  # each site's bound on one example's contribution, in multiples of its typical contribution
    noise_multiplier: float  # sigma: noise std of the weighted vector, whose sensitivity is 1
    sites: int
    streams: int
    max_length: int

    @property
    def relative_noise(self) -> float:
        """Noise std on a site's Gram entries and sums, in multiples of the site's bound c_s."""
        return self.noise_multiplier * math.sqrt(self.sites) / GRAM_SHARE

    def count_noise(self, bound: int) -> float:
        """Noise std, in rows, of a stream's count whose examples add at most `bound` rows each."""
        return 2 * self.noise_multiplier * bound * math.sqrt(self.streams)

    def describe(self) -> str:
        return (
            f"differential privacy: ({self.epsilon:g}, {self.delta:g})-DP for the whole file (add or remove one "
            f"example); each example clipped at every site to {self.clip:g} x the public model's typical "
            f"contribution there, Gaussian noise of {self.relative_noise:.3g} x that bound on every Gram entry and "
            f"sum of the {self.sites} sites, of {self.count_noise(self.max_length):.0f} tokens on token counts"
        )

    def record(self) -> dict:
        extra = {"relative_noise": self.relative_noise, "token_count_noise": self.count_noise(self.max_length)}
        return {**asdict(self), **extra, "accountant": ACCOUNTANT, "psd_projection": True}


ACCOUNTANT = "dp-accounting PLD (Gaussian mechanism, add-or-remove neighbours)"
PLD_INTERVAL = 1e-3
"""The accountant's discretisation of the privacy loss (its estimate stays pessimistic: coarser is only safer and
faster; 1e-3 gives the default 1e-4's noise multiplier to 6 digits, 15 times faster)."""
MAX_EPSILON = 100.0
MAX_DELTA = 0.01


def calibrate(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier (std / L2 sensitivity) for which one Gaussian mechanism is (epsilon, delta)-DP,
    from dp-accounting's privacy-loss-distribution accountant."""
    check_budget(epsilon, delta)
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    def accountant():
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_INTERVAL)

    return float(dp_accounting.calibrate_dp_mechanism(accountant, dp_accounting.GaussianDpEvent, epsilon, delta))


def check_budget(epsilon: float, delta: float) -> None:
    if not (math.isfinite(epsilon) and 0 < epsilon <= MAX_EPSILON):
        raise RegmeanError(
            f"--dp-epsilon must be a positive number up to {MAX_EPSILON:g} (a larger budget protects nothing), "
            f"not {epsilon}"
        )
    if not (0 < delta <= MAX_DELTA):
        raise RegmeanError(
            f"--dp-delta must be a positive number up to {MAX_DELTA:g} (a larger one may release whole examples; "
            f"e.g. 1e-5), not {delta}"
        )


def check_delta_for(delta: float, examples: int) -> None:
    """delta below 1/n: a mechanism that publishes each of n examples with probability delta is (0, delta)-DP, so a
    delta of 1/n or more guarantees nothing."""
    if delta * examples >= 1:
        raise RegmeanError(
            f"--dp-delta {delta:g} is not below 1/{examples} (the data's examples): it would allow releasing one "
            f"example outright; give --dp-delta below {1 / examples:.1g} (1e-5 or less is usual)"
        )


def row_scales(gram_norms: torch.Tensor, sum_norms: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """The factor g <= 1 per example and site with g^4 a + g^2 b <= c^2, for a = the squared norm of its Gram's upper
    triangle there, b = that of its sum and c = the site's bound (the largest such g: a root of a quadratic in g^2);
    [examples, sites]."""
    a, b = gram_norms.double(), sum_norms.double()
    budget = bounds.double().pow(2).expand_as(a)
    g2 = torch.where(a > 0, (-b + torch.sqrt(b * b + 4 * a * budget)) / (2 * a.clamp_min(1e-300)), budget / b)
    return g2.clamp(max=1.0).sqrt()


def noisy_gram(gram: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """Gram + a symmetric matrix of i.i.d. N(0, std^2) upper-triangle entries, projected onto the PSD cone."""
    d = gram.shape[0]
    noise = torch.randn(d, d, generator=gen, dtype=torch.float64) * std
    noise = torch.triu(noise) + torch.triu(noise, 1).T
    values, vectors = torch.linalg.eigh(gram.double() + noise)
    return ((vectors * values.clamp_min(0)) @ vectors.T).to(gram.dtype)


def noisy_vector(values: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    return (values.double() + torch.randn(values.shape, generator=gen, dtype=torch.float64) * std).to(values.dtype)


def noisy_count(total: int, std: float, gen: torch.Generator) -> int:
    """A stream's row count with the mechanism's noise (std in rows), rounded, at least 1."""
    return max(1, round(total + float(torch.randn((), generator=gen, dtype=torch.float64)) * std))
