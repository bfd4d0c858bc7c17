"""Nothing silent: every matrix of the body (a tensor of two or more dimensions) that a data-aware method did not
solve is listed with the reason it was merged by the plain rule instead (console, merge_report.json, card)."""

from __future__ import annotations

from collections import Counter

from regmean.architecture import expert_modules
from regmean.stats import WITHHELD
from regmean.stats_checks import ROUTED


def averaged_matrices(inputs, solved: set[str], reasons: dict[str, str] | None = None) -> dict[str, str]:
    """Each body tensor of ndim >= 2 that is not the weight of a linear module in `solved` (those the method
    solved), with why it was averaged (`reasons` by module, where the method knows better)."""
    shapes = inputs.models[0].shapes
    keys = {inputs.linears[m].weight_key: m for m in inputs.linears}
    solved_keys = {key for key, module in keys.items() if module in solved}
    return {
        key: (reasons or {}).get(keys.get(key, "")) or _reason(inputs, keys.get(key) or inputs.module_of(key))
        for key in inputs.body_keys()
        if len(shapes[key]) >= 2 and key not in solved_keys and inputs.module_of(key) not in solved
    }


def unrouted(inputs) -> dict[str, str]:
    """Expert projections to which no token of some model's data was routed (their site counts 0 rows), with the
    reason they are averaged."""
    out = {}
    for k, st in enumerate(inputs.stats or []):
        for module, site in st.modules.items():
            if st.site_streams.get(site, ("",))[0] == ROUTED and module not in out and st.count(site) == 0:
                out[module] = f"expert to which no token of model {k}'s data was routed (0 rows)"
    return out


def _reason(inputs, module: str) -> str:
    config = inputs.config
    idle = unrouted(inputs).get(module)
    if idle:
        return idle
    if module in inputs.embeddings:
        return f"embedding (embeddings: {config.embeddings})"
    if module == inputs.lm_head:
        return f"LM head (lm_head: {config.lm_head})"
    if module in inputs.linears:
        skipped = [st.skipped[module] for st in inputs.stats or [] if module in st.skipped]
        if any(why == WITHHELD for why in skipped):
            return "linear layer whose statistics the owners withheld (a token site)"
        if skipped:
            return f"linear layer without statistics ({skipped[0]})"
        return "linear layer without statistics"
    try:
        kind = type(inputs.skeleton.get_submodule(module)).__name__
    except AttributeError:
        kind = "a tensor the model class does not name"
    if module in {x.module for x in expert_modules(inputs.skeleton)}:
        return f"experts fused in one 3-D tensor on disk ({kind}; RegMean solves experts stored one tensor each)"
    return f"not a linear layer the method measures ({kind})"


def summarize(averaged: dict[str, str], limit: int = 4) -> str:
    """'17 matrices averaged: 16 not a linear layer ... (e.g. a.weight), 1 LM head (lm_head: average)'; '' if none."""
    if not averaged:
        return ""
    counts = Counter(averaged.values())
    example = {reason: key for key, reason in reversed(averaged.items())}
    parts = [f"{n} {reason} (e.g. {example[reason]})" for reason, n in counts.most_common(limit)]
    more = len(counts) - limit
    return f"{matrices(len(averaged))} averaged: " + "; ".join(parts) + (f"; {more} more" if more > 0 else "")


def matrices(count: int) -> str:
    return f"{count} matrix" if count == 1 else f"{count} matrices"
