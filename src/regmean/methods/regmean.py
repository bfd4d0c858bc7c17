"""RegMean: the linear layers that read one input site solved together from their statistics (the math is in
`least_squares`); every other tensor averaged."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Literal

import torch
from pydantic import Field

from regmean.architecture import LinearLayer, is_head_key
from regmean.dtypes import itemsize
from regmean.errors import RegmeanError, one_line
from regmean.methods.average import Average
from regmean.methods.base import Computed, Cost, LayerReport, Step, TensorStep
from regmean.methods.coverage import averaged_matrices, coverage_problems, dominance_warnings, summarize, unrouted
from regmean.methods.expert_checks import RoutedTraces
from regmean.methods.least_squares import (
    MIN_SAMPLED_ROWS,
    SAMPLED_FRACTION,
    IndefiniteGram,
    affine_gram,
    check_rows,
    reconstruction_error,
    regmean_solve,
)
from regmean.recipe_model import RecipeModel
from regmean.stats import GRAM, WITHHELD, SiteStats
from regmean.stats_checks import check_scales

REGMEAN_BIBTEX = """@inproceedings{jin2023dataless,
  title = {Dataless Knowledge Fusion by Merging Weights of Language Models},
  author = {Jin, Xisen and Ren, Xiang and Preotiuc-Pietro, Daniel and Cheng, Pengxiang},
  booktitle = {The Eleventh International Conference on Learning Representations (ICLR)},
  year = {2023}
}"""


class RegMeanOptions(RecipeModel):
    alpha: float = Field(0.9, ge=0.0, le=1.0)
    """Off-diagonal multiplier: 1 = plain RegMean, 0 = per-feature weighted average."""
    gram_weighting: Literal["mean", "sum"] = "mean"
    """mean: each model's Gram divided by its row count (reference code); sum: raw sums (the paper's formula)."""
    bias: Literal["average", "joint"] = "average"
    """average: biases averaged; joint: weight and bias solved together by affine least squares."""
    diagnostics: Literal["sampled", "exact"] = "sampled"
    """sampled: reconstruction errors and residuals estimated on a seeded 1% of each layer's output rows (with
    their standard errors); exact: on every row (as much arithmetic again as the merge's products)."""
    verify_grams: bool = True
    """Prove each model's Gram positive semidefinite (one Cholesky factorisation per model and site) before it is
    used: a Gram that is not is no data's statistics, and the merge stops naming its file. false: only the cheap
    identities checked on reading (diagonal, 2 x 2 minors, counts)."""


@dataclass(frozen=True, kw_only=True)
class SiteStep(Step):
    """The linear layers that read one input site, solved together: one system matrix serves them all."""

    sites: tuple[str, ...]
    """The site's name in each model's statistics."""
    layers: tuple[LinearLayer, ...]


@dataclass
class SiteInputs:
    stats: list[SiteStats]
    params: list[dict[str, torch.Tensor]]
    """Per model: the weight (and, for joint bias, the bias) of every layer of the site."""


def solvable(inputs, module: str) -> bool:
    """Whether a linear module of the body is solved from statistics: heads only with heads: merge, an untied LM
    head only with lm_head: regmean."""
    layer = inputs.linears[module]
    if inputs.config.heads == "keep" and is_head_key(layer.weight_key, inputs.heads):
        return False
    return module != inputs.lm_head or inputs.config.lm_head == "regmean"


def site_groups(inputs) -> dict[tuple[str, ...], list[LinearLayer]]:
    """Measured body linear layers grouped by their site in every model (less experts some model routed no token
    to: `coverage.unrouted`)."""
    groups: dict[tuple[str, ...], list[LinearLayer]] = defaultdict(list)
    idle = unrouted(inputs)
    for name, layer in inputs.linears.items():
        if all(name in st.modules for st in inputs.stats) and solvable(inputs, name) and name not in idle:
            groups[tuple(st.modules[name] for st in inputs.stats)].append(layer)
    return groups


def _weight(tensor: torch.Tensor, layer: LinearLayer) -> torch.Tensor:
    """As [d_out, d_in] whatever the storage (Conv1D stores [d_in, d_out]; an expert's row of a 3-D tensor)."""
    tensor = tensor if layer.expert is None else tensor[0]
    return tensor.T if layer.transposed else tensor


class RegMean(Average):
    """Linear layers with statistics solved by RegMean; every other tensor averaged."""

    name = "regmean"
    title = "RegMean"
    citations = (f"RegMean:\n\n```bibtex\n{REGMEAN_BIBTEX}\n```",)
    options = RegMeanOptions
    statistics = GRAM

    @classmethod
    def check(cls, inputs) -> list[str]:
        problems = coverage_problems(inputs)
        if problems:
            return problems
        for sites, layers in site_groups(inputs).items():
            for st, name in zip(inputs.stats, sites, strict=True):
                d = st.site_shape(name)[0]
                wrong = [layer for layer in layers if layer.d_in != d]
                if wrong:
                    problems.append(f"{st.path}: site {name} is {d} wide, {wrong[0].module} reads {wrong[0].d_in}")
                elif st.count(name) == 0:
                    problems.append(f"{st.path}: site {name} has zero rows; measure on non-empty data")
        return problems

    def plan(self) -> list[Step]:
        groups = site_groups(self.inputs)
        joint = self.settings.bias == "joint"
        site_of, expert_rows = {}, defaultdict(dict)
        for sites, layers in groups.items():
            for layer in layers:
                if layer.expert is not None:  # a row of a 3-D experts tensor: one step per row
                    expert_rows[layer.weight_key][layer.expert] = sites
                    continue
                site_of[layer.weight_key] = sites
                if layer.bias_key and joint:
                    site_of[layer.bias_key] = sites
        steps: list[Step] = []
        planned = set()
        for key in self.inputs.body_keys():
            sites = site_of.get(key)
            if key in expert_rows:
                steps += self._expert_steps(key, expert_rows[key], groups)
            elif sites is None:
                steps += self.tensor_steps(key)
            elif sites not in planned:
                planned.add(sites)
                steps.append(self._site_step(sites, groups[sites]))
        return steps

    def _expert_steps(self, key: str, by_expert: dict[int, tuple[str, ...]], groups) -> list[Step]:
        """A 3-D experts tensor, one row (expert) per step: solved where the expert has statistics, else averaged."""
        first = self.inputs.models[0]
        shape, size = first.shapes[key], itemsize(first.dtype(key))
        steps: list[Step] = []
        for e in range(shape[0]):
            if e in by_expert:
                steps.append(replace(self._site_step(by_expert[e], groups[by_expert[e]]), rows=(e, e + 1)))
            else:
                cost = self.cost(math.prod(shape[1:]), size, len(self.inputs.models))
                steps.append(TensorStep(outputs=(key,), cost=cost, rows=(e, e + 1), key=key))
        return steps

    def _site_step(self, sites: tuple[str, ...], layers: list[LinearLayer]) -> SiteStep:
        inputs, joint = self.inputs, self.settings.bias == "joint"
        k, first = len(inputs.models), inputs.models[0]
        d, d_out = layers[0].d_in + 1, sum(layer.d_out for layer in layers)
        gram_bytes = self._gram_bytes()
        weight_bytes = sum(
            math.prod(first.shapes[la.weight_key][la.expert is not None :]) * itemsize(first.dtype(la.weight_key))
            for la in layers
        )
        outputs = [la.weight_key for la in layers] + [la.bias_key for la in layers if joint and la.bias_key]
        # K Grams unpacked; one float64 Gram being added, the system and its factor; K float64 weights, their
        # average, one deviation, the right-hand side, the solution, the solve's copy of it and the merged weights.
        # Products G_i D_i^T, the factorisation (and K more proving the Grams semidefinite), the solves; the
        # diagnostics (K errors and the residual) on the checked rows.
        checked = d_out if self.settings.diagnostics == "exact" else max(MIN_SAMPLED_ROWS, SAMPLED_FRACTION * d_out)
        stored = self._stored_gram_bytes(sites)
        cost = Cost(
            stored + k * weight_bytes,
            gram_bytes * k * d * d + 8 * 3 * d * d + 8 * (k + 6) * d_out * d,
            2.0 * k * d * d * d_out
            + (1 + k * self.settings.verify_grams) * d**3 / 3
            + 2.0 * d * d * d_out
            + 2.0 * (2 * k + 1) * d * d * min(checked, d_out),
            unpacked_bytes=max(0, gram_bytes * k * (d - 1) * (d - 1) - stored),
        )
        return SiteStep(outputs=tuple(outputs), cost=cost, sites=sites, layers=tuple(layers))

    def _gram_bytes(self) -> int:
        """Bytes per entry of the Grams as read."""
        return 8 if self.inputs.stats[0].dtype == "float64" else 4

    def _stored_gram_bytes(self, sites: tuple[str, ...]) -> int:
        """The site's Grams as the statistics files store them (format 2: the upper triangle)."""
        return sum(st.gram_nbytes(name) for st, name in zip(self.inputs.stats, sites, strict=True))

    @cached_property
    def _routed_traces(self) -> RoutedTraces:
        return RoutedTraces(self.inputs)

    def describe(self, steps: list[Step]) -> str:
        solved = {layer.module for s in steps if isinstance(s, SiteStep) for layer in s.layers}
        averaged = summarize(averaged_matrices(self.inputs, solved))
        unchecked = self._unchecked_counts()
        return (
            f"{len(solved)} RegMean layers"
            + (f"; {averaged}" if averaged else "")
            + (f"; {unchecked}" if unchecked else "")
        )

    def _unchecked_counts(self) -> str:
        """Said when some files do not record their sites' streams (older measures): their row counts are checked
        only against a bound (examples x max length x 64), not exactly."""
        older = [str(st.path) for st in self.inputs.stats if not st.site_streams]
        if not older:
            return ""
        return (
            f"row counts only bounded, not checked exactly, in {len(older)} file(s) that do not record their sites' "
            f"streams ({', '.join(older[:2])}): measure again for exact checks"
        )

    def _withheld(self) -> list[str]:
        """Linear layers whose statistics some owner withheld (`measure`'s default, unless --expose-token-counts):
        averaged."""
        stats = self.inputs.stats
        return sorted(
            {m for st in stats for m, why in st.skipped.items() if why == WITHHELD and m in self.inputs.linears}
        )

    def load(self, step: Step):
        if not isinstance(step, SiteStep):
            return super().load(step)
        joint = self.settings.bias == "joint"
        stats = []
        for st, name in zip(self.inputs.stats, step.sites, strict=True):
            site = st.site(name)
            gram, total = self.stage([site.gram, site.sum])
            stats.append(SiteStats(gram, total, site.count))
        keys = [la.weight_key for la in step.layers] + [la.bias_key for la in step.layers if joint and la.bias_key]
        params = [
            dict(zip(keys, self.stage([model.get(key, step.rows) for key in keys]), strict=True))
            for model in self.inputs.models
        ]
        return SiteInputs(stats, params)

    def _indefinite(self, step: SiteStep, grams: list[torch.Tensor], index: int | None) -> RegmeanError | None:
        """When a solve fails: the statistics file whose Gram is not positive semidefinite (no sum of outer
        products is): model `index`'s, or the first whose eigenvalues say so; named, or None."""
        for k, (st, name, gram) in enumerate(zip(self.inputs.stats, step.sites, grams, strict=True)):
            if index is not None and k != index:
                continue
            if index is None:  # which one: only eigenvalues can tell
                eigenvalues = torch.linalg.eigvalsh(gram.double())
                if float(eigenvalues[0]) >= -1e-6 * float(eigenvalues.abs().max()):
                    continue
            if "dp" in st.privacy:  # an honest release whose noise outweighs its data
                return RegmeanError(
                    f"{st.path}: site {name}: this DP release is too noisy for its data (its noisy sums leave the "
                    "system indefinite); measure more examples or a larger epsilon, or merge with bias: average"
                )
            return RegmeanError(
                f"{st.path}: site {name}: its Gram is not positive semidefinite (no Cholesky factorisation, even "
                "with rounding's slack); not the statistics of any data: measure again"
            )
        return None

    def compute(self, step: Step, data) -> Computed:
        if not isinstance(step, SiteStep):
            return super().compute(step, data)
        opts = self.settings
        stats = data.stats
        check_scales(self.inputs.stats, step.sites, stats)
        self._routed_traces.check(step.sites, stats)
        counts = torch.tensor([s.count for s in stats], dtype=torch.float64)
        relative = self.weights / self.weights.max()  # the solution depends only on the ratios; keeps Grams finite
        scale = relative / counts if opts.gram_weighting == "mean" else relative
        joint = opts.bias == "joint"
        layers = list(step.layers)
        with_bias, without = [la for la in layers if la.bias_key], [la for la in layers if not la.bias_key]
        subgroups = [with_bias, without] if joint else [layers]
        out = Computed({}, None if step.rows is None else step.rows[0])
        for group in subgroups:
            if group:
                self._solve(step, group, joint and group[0].bias_key is not None, data, scale, out)
        return out

    def _solve(self, step: SiteStep, group: list[LinearLayer], affine: bool, data: SiteInputs, scale, out) -> None:
        """Solve the layers of `group` together (stacked output rows), into `out`."""
        d_in = data.stats[0].gram.shape[0]
        grams = [affine_gram(s.gram, s.sum, s.count) if affine else s.gram for s in data.stats]
        dtype = {
            la.module: self.inputs.output_dtype(la.weight_key, data.params[0][la.weight_key].dtype) for la in group
        }
        stacked = _stacked_weights(data.params, group, affine, d_in)
        exact = self.settings.diagnostics == "exact"
        rows = [check_rows(layer.d_out, layer.module, exact) for layer in group]
        try:
            # a DP file's sum and count carry noise of their own: its affine Gram need not be semidefinite
            files = self.inputs.stats or [None] * len(grams)
            verify = [self.settings.verify_grams and not (affine and st and "dp" in st.privacy) for st in files]
            solution = regmean_solve(stacked, grams, scale, self.weights, self.settings.alpha, verify=verify)
        except FloatingPointError as exc:
            index = exc.index if isinstance(exc, IndefiniteGram) else None
            raise self._indefinite(step, grams, index) or RegmeanError(
                f"site {step.sites[0]}: {exc}; check the statistics and the models' weights"
            ) from None
        traces = [float(g.diagonal().double().sum()) * float(c) for g, c in zip(grams, scale, strict=True)]
        shares = [t / sum(traces) if sum(traces) > 0 else 0.0 for t in traces]
        started = time.perf_counter()
        residual = solution.residual(_stacked_rows(group, rows))
        diagnostics = _errors(solution.merged, stacked, grams, group, rows)
        seconds = (time.perf_counter() - started) / len(group)
        start = 0
        for layer, checked, errors in zip(group, rows, diagnostics, strict=True):
            part = solution.merged[start : start + layer.d_out]
            start += layer.d_out
            w = part[:, :d_in].to(dtype[layer.module])
            w = w.T.contiguous() if layer.transposed else w.contiguous()
            out.tensors[layer.weight_key] = w if layer.expert is None else w.unsqueeze(0)
            if layer.weight_key in self.inputs.exact_keys:  # an adapter output factors it in this metric
                out.metrics[layer.weight_key] = solution.factor[:d_in, :d_in]
            if affine:
                out.tensors[layer.bias_key] = part[:, d_in].to(dtype[layer.module]).contiguous()
            out.layers.append(
                LayerReport(
                    module=layer.module,
                    site=step.sites[0],
                    ridge=solution.ridge,
                    relative_error=[e.value for e in errors],
                    bias="joint" if affine else "average",
                    error_stderr=[e.stderr for e in errors],
                    checked_rows=layer.d_out if checked is None else len(checked),
                    sampled=checked is not None,
                    residual=residual,
                    diagnostics_seconds=seconds,
                    tensor=layer.weight_key,
                    gram_share=shares,
                )
            )

    def finish(self, report) -> None:
        measured = {la.module for group in site_groups(self.inputs).values() for la in group}
        report.averaged = averaged_matrices(self.inputs, measured)
        report.notes.append(f"statistics masking: {one_line(self.inputs.stats[0].masking, 300)}")
        withheld = self._withheld()
        if withheld:
            report.notes.append(
                f"averaged, their statistics withheld by the owners (token sites: they decode into the data's "
                f"token counts): {', '.join(withheld)}"
            )
        for k, st in enumerate(self.inputs.stats):
            if st.protection != "none":
                report.notes.append(f"statistics of model {k}: {one_line(st.protection, 300)}")
        report.notes += [self._unchecked_counts()] * bool(self._unchecked_counts())
        report.warnings += dominance_warnings(report.layers, [str(m.path) for m in self.inputs.config.models])


def _stacked_weights(params: list[dict], group: list[LinearLayer], affine: bool, d_in: int) -> torch.Tensor:
    """[K, rows of the group, d_in (+1 with the bias)] float64: each model's weights of the group's layers as
    [d_out, d_in] (Conv1D transposed), stacked, their biases as the last column when solved jointly."""
    rows = sum(layer.d_out for layer in group)
    first = params[0][group[0].weight_key]
    out = torch.empty(len(params), rows, d_in + affine, dtype=torch.float64, device=first.device)
    for k, own in enumerate(params):
        start = 0
        for layer in group:
            block = out[k, start : start + layer.d_out]
            block[:, :d_in].copy_(_weight(own[layer.weight_key], layer))
            if affine:
                block[:, d_in].copy_(own[layer.bias_key])
            start += layer.d_out
    return out


def _errors(merged, stacked, grams, group: list[LinearLayer], rows: list[torch.Tensor | None]) -> list[list]:
    """Per layer of the group, each model's relative reconstruction error (on the layer's checked rows); each Gram
    converted to float64 once for all the layers."""
    errors: list[list] = [[] for _ in group]
    for k, gram in enumerate(grams):
        gram64, start = gram.to(torch.float64), 0
        for j, (layer, checked) in enumerate(zip(group, rows, strict=True)):
            end = start + layer.d_out
            errors[j].append(reconstruction_error(merged[start:end], stacked[k, start:end], gram64, checked))
            start = end
    return errors


def _stacked_rows(group: list[LinearLayer], rows: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The checked rows of layers solved together, as rows of their stacked outputs (None: every row)."""
    if all(r is None for r in rows):
        return None
    parts, start = [], 0
    for layer, checked in zip(group, rows, strict=True):
        parts.append(start + (torch.arange(layer.d_out) if checked is None else checked))
        start += layer.d_out
    return torch.cat(parts)
