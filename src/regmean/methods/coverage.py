"""Nothing silent: every matrix of the body (a tensor of two or more dimensions) that a data-aware method did not
solve is listed with the reason it was merged by the plain rule instead (console, merge_report.json, card)."""

from __future__ import annotations

from collections import Counter

from regmean.stats import WITHHELD


def averaged_matrices(inputs, solved: set[str]) -> dict[str, str]:
    """Each body tensor of ndim >= 2 whose module is not in `solved` (the linear modules the method solved), with
    why it was averaged."""
    shapes = inputs.models[0].shapes
    return {
        key: _reason(inputs, inputs.module_of(key))
        for key in inputs.body_keys()
        if len(shapes[key]) >= 2 and inputs.module_of(key) not in solved
    }


def _reason(inputs, module: str) -> str:
    config = inputs.config
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
