"""Differentially private statistics: one Gaussian mechanism over everything a statistics file releases.

The released vector is, for every site, the Gram's upper triangle (as stored) and the sum of the inputs, plus one
row count per stream (tokens, decoder tokens, examples; each site's count is its calls per token times its
stream's). Each example's contribution to that vector is clipped to L2 norm `clip`:

- at each site s its rows are scaled by a factor g_s <= 1 so that its Gram and sum there have norm at most c_s
  (the Gram scales by g_s^2, the sum by g_s), the site bounds c_s splitting sqrt(3)/2 clip (sum of c_s^2 =
  3/4 clip^2) in proportion to what the public model puts at each site: sites differ in scale by orders of
  magnitude, and one bound for all would drown the small ones in the large ones' noise;
- its counts enter as m * clip / (2 L sqrt(S)) for S streams and L the most rows one example can add to a stream
  (max_length tokens; 1 example), so that they have norm at most clip / 2.

Adding or removing one example then moves the vector by at most `clip` in L2 norm, and Gaussian noise of standard
deviation `noise_multiplier * clip` on every released number (an upper triangle of i.i.d. noise: a symmetric noise
matrix, the "Analyze Gauss" construction) makes the whole file (epsilon, delta)-DP, the multiplier calibrated by
Google's dp-accounting (privacy loss distributions, add-or-remove neighbours). Noisy Grams are then projected onto
the positive semidefinite cone (eigenvalues floored at 0): post-processing, which costs no privacy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from regmean.errors import RegmeanError

GRAM_SHARE = math.sqrt(3) / 2
"""The part of the clipping norm left to the Grams and sums; the counts take the rest (clip / 2)."""


@dataclass(frozen=True)
class DPRelease:
    """The privacy budget of one statistics file, and the mechanism that spends it."""

    epsilon: float
    delta: float
    clip: float  # bound on one example's contribution (L2, over every released number)
    noise_multiplier: float  # noise standard deviation / clip

    @property
    def noise_std(self) -> float:
        return self.noise_multiplier * self.clip

    def describe(self) -> str:
        return (
            f"differential privacy: ({self.epsilon:g}, {self.delta:g})-DP for the whole file (add or remove one "
            f"example); contributions clipped to {self.clip:.4g}, Gaussian noise of std {self.noise_std:.4g}"
        )

    def record(self) -> dict:
        return {**asdict(self), "noise_std": self.noise_std, "accountant": ACCOUNTANT, "psd_projection": True}


ACCOUNTANT = "dp-accounting PLD (Gaussian mechanism, add-or-remove neighbours)"
PLD_INTERVAL = 1e-3
"""The accountant's discretisation of the privacy loss (its estimate stays pessimistic: coarser is only safer and
faster; 1e-3 gives the default 1e-4's noise multiplier to 6 digits, 15 times faster)."""
MAX_EPSILON = 100.0


def calibrate(epsilon: float, delta: float) -> float:
    """The smallest noise multiplier (std / L2 sensitivity) for which one Gaussian mechanism is (epsilon, delta)-DP,
    from dp-accounting's privacy-loss-distribution accountant."""
    if not (math.isfinite(epsilon) and 0 < epsilon <= MAX_EPSILON):
        raise RegmeanError(
            f"--dp-epsilon must be a positive number up to {MAX_EPSILON:g} (a larger budget protects nothing), "
            f"not {epsilon}"
        )
    if not (0 < delta < 1):
        raise RegmeanError(f"--dp-delta must lie between 0 and 1 (e.g. 1e-5), not {delta}")
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    def accountant():
        return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_INTERVAL)

    return float(dp_accounting.calibrate_dp_mechanism(accountant, dp_accounting.GaussianDpEvent, epsilon, delta))


def site_bounds(typical: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-site bounds c_s in proportion to `typical` (each site's typical contribution norm, from the public model),
    with sum of c_s^2 = (sqrt(3)/2 clip)^2."""
    shares = typical.double().clamp_min(1e-30)
    return shares * (GRAM_SHARE * clip / float(shares.norm()))


def row_scales(gram_norms: torch.Tensor, sum_norms: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """The factor g <= 1 per example and site with g^4 a + g^2 b <= c^2, for a = the squared norm of its Gram's upper
    triangle there, b = that of its sum and c = the site's bound (the largest such g: a root of a quadratic in g^2);
    [examples, sites]."""
    a, b = gram_norms.double(), sum_norms.double()
    budget = bounds.double().pow(2).expand_as(a)
    g2 = torch.where(a > 0, (-b + torch.sqrt(b * b + 4 * a * budget)) / (2 * a.clamp_min(1e-300)), budget / b)
    return g2.clamp(max=1.0).sqrt()


def count_weight(clip: float, bound: int, streams: int) -> float:
    """What one row of a stream weighs in the released vector: clip / (2 L sqrt(S)), so that one example's counts
    (at most L rows in each of S streams) have norm at most clip / 2."""
    return clip / (2 * bound * math.sqrt(streams))


def noisy_gram(gram: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    """Gram + a symmetric matrix of i.i.d. N(0, std^2) upper-triangle entries, projected onto the PSD cone."""
    d = gram.shape[0]
    noise = torch.randn(d, d, generator=gen, dtype=torch.float64) * std
    noise = torch.triu(noise) + torch.triu(noise, 1).T
    values, vectors = torch.linalg.eigh(gram.double() + noise)
    return ((vectors * values.clamp_min(0)) @ vectors.T).to(gram.dtype)


def noisy_vector(values: torch.Tensor, std: float, gen: torch.Generator) -> torch.Tensor:
    return (values.double() + torch.randn(values.shape, generator=gen, dtype=torch.float64) * std).to(values.dtype)


def noisy_count(total: int, weight: float, std: float, gen: torch.Generator) -> int:
    """A stream's row count released through the same mechanism (weight * total + noise, divided back), at least 1."""
    released = weight * total + float(torch.randn((), generator=gen, dtype=torch.float64)) * std
    return max(1, round(released / weight))
