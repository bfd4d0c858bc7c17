"""Nothing silent: every matrix of the body (a tensor of two or more dimensions) that a data-aware method did not
solve is listed with the reason it was merged by the plain rule instead (console, merge_report.json, card)."""

from __future__ import annotations

from collections import Counter, defaultdict

from regmean.architecture import LinearLayer, expert_modules, expert_slots
from regmean.checkpoint_keys import split_parameters
from regmean.methods.expert_checks import expert_problems
from regmean.stats import EXPERTS_UNCLIPPED, NO_EXAMPLE_BOUND, WITHHELD
from regmean.stats_checks import Stream, structure_problems


def averaged_matrices(inputs, solved: set[str], reasons: dict[str, str] | None = None) -> dict[str, str]:
    """Each body tensor of ndim >= 2 that is not the weight of a linear module in `solved` (those the method
    solved), with why it was averaged (`reasons` by module, where the method knows better); of a 3-D experts tensor,
    each expert (row) not solved, as `key[expert]`."""
    shapes, reasons = inputs.models[0].shapes, reasons or {}
    keys = {la.weight_key: m for m, la in inputs.linears.items() if la.expert is None}
    rows = defaultdict(list)
    for layer in inputs.linears.values():
        if layer.expert is not None:
            rows[layer.weight_key].append(layer)
    out, idle = {}, unrouted(inputs)
    experts = {x.module: x for x in expert_modules(inputs.skeleton)}
    for key in inputs.body_keys():
        module = keys.get(key) or inputs.module_of(key)
        if key in rows:
            unsolved = [la for la in rows[key] if la.module not in solved]
            out |= {
                f"{key}[{la.expert}]": reasons.get(la.module) or idle.get(la.module) or _reason(inputs, la.module)
                for la in unsolved
            }
            out |= dict.fromkeys((f"{key}[{e}]" for e in range(len(rows[key]), shapes[key][0])), NO_EXPERT)
        elif len(shapes[key]) >= 2 and module not in solved:
            out[key] = reasons.get(module) or idle.get(module) or _reason(inputs, module, key, experts)
    return out


def unrouted(inputs) -> dict[str, str]:
    """Expert projections to which no token of some model's data was routed (their site counts 0 rows), with the
    reason they are averaged."""
    out = {}
    for k, st in enumerate(inputs.stats or []):
        for module, site in st.modules.items():
            if st.site_streams.get(site, ("",))[0] == Stream.ROUTED and module not in out and st.count(site) == 0:
                st.site(site)  # its checks: no row, so nothing summed
                out[module] = f"expert to which no token of model {k}'s data was routed (0 rows)"
    return out


NO_EXPERT = "weights of a parameter-free (zero) expert, which the forward pass never uses"
"""Why rows (or per-expert keys) past a block's experts are averaged: LongCat keeps gate/up rows for them."""


def _reason(inputs, module: str, key: str = "", experts: dict | None = None) -> str:
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
    if module in (experts or {}):
        if key.endswith("_bias"):
            return "experts' biases (averaged, as every bias outside `bias: joint`)"
        parts, name = key.split("."), module.rsplit(".", 1)[-1]  # a per-expert key: <experts>.<e>.<projection>
        expert = next((int(n) for m, n in zip(parts, parts[1:], strict=False) if m == name and n.isdigit()), None)
        if len(inputs.models[0].shapes[key]) == 2 and expert is not None and expert >= experts[module].count:
            return NO_EXPERT
        return f"experts tensor in a layout the merge does not recognise ({kind})"
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


OWNERS_LEFT_OUT = (WITHHELD, NO_EXAMPLE_BOUND, EXPERTS_UNCLIPPED)
"""Why an owner's file may lack a site the others have (a protection they chose): that layer is averaged."""


def absent_weights(entry, ckpt, layers: list[LinearLayer]) -> str | None:
    """The problem of a model folder that lacks the weight of a linear layer to solve, if it does."""
    absent = [layer.weight_key for layer in layers if layer.weight_key not in ckpt]
    if not absent:
        return None
    return (
        f"{entry.path}: has no tensor {absent[0]} for a measured module ({len(absent)} missing); "
        "re-save the model with save_pretrained"
    )


def coverage_problems(inputs) -> list[str]:
    """Every measured module is a linear layer of the model, and every model measured the same modules."""
    problems = []
    splits = split_parameters(inputs.skeleton, inputs.models[0].keys()).values()
    stacked = {target.removesuffix(".weight") for targets in splits for target in targets}  # into one layer each
    known = set(inputs.linears) | set(expert_slots(inputs.skeleton)) | stacked
    for entry, ckpt, st in zip(inputs.config.models, inputs.models, inputs.stats, strict=True):
        unknown = sorted(set(st.modules) - known)
        if unknown:
            problems.append(f"{st.path}: statistics name modules the model lacks, e.g. {unknown[0]}")
        absent = absent_weights(entry, ckpt, [inputs.linears[m] for m in st.modules if m in inputs.linears])
        if absent:
            problems.append(absent)
    if not problems:
        covered = [set(st.modules) for st in inputs.stats]
        protected = {m for st in inputs.stats for m, why in st.skipped.items() if why in OWNERS_LEFT_OUT}
        partial = sorted(set.union(*covered) - set.intersection(*covered) - protected)
        if partial:
            lacking = next(st for st in inputs.stats if partial[0] not in st.modules)
            having = next(st for st in inputs.stats if partial[0] in st.modules)
            problems.append(
                f"{lacking.path}: has no statistics for module {partial[0]}, which {having.path} has ({len(partial)} "
                "modules measured by some models only); measure every model with the same include/exclude"
            )
    return problems or structure_problems(inputs.stats) or expert_problems(inputs)


DOMINANT = 0.8
"""A model whose median share of the solved layers' Gram weight is above this decides the merge nearly alone."""


def dominance_warnings(layers: list, paths: list[str]) -> list[str]:
    """One line for a model that carries most of the Grams' weight over the solved layers (median share above
    DOMINANT): the merge follows it, whether its inputs are larger, its weight higher or its file altered."""
    if len(paths) < 2 or not layers:
        return []
    out = []
    for k, path in enumerate(paths):
        shares = sorted(row.gram_share[k] for row in layers if len(row.gram_share) == len(paths))
        median = shares[(len(shares) - 1) // 2] if shares else 0.0
        if median > DOMINANT:
            out.append(
                f"warning: {path} carries a median {100 * median:.0f}% of the Grams' weight over the solved layers: "
                "the merge follows it nearly alone (larger inputs, a higher weight, or an altered statistics file)"
            )
    return out
