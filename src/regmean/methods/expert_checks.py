"""What a mixture-of-experts model's statistics must satisfy against the model itself.

Only experts' inputs are of stream `routed` (a forged stream would lift a site's exact row count to a bound). Each
token goes to top-k experts (`num_experts_per_tok`, or another of the names in `TOP_K`), so an expert's two inputs
(routed hidden states; its down projection's input) count the same rows, and a block's experts together count
top-k x calls x the input's tokens: statistics measured with another routing, or with a count edited, break one of
these. The tokens routed to an expert are some of those its block's router reads: the trace of the expert's input
Gram is at most the router's (an expert's Grams multiplied by a constant break it, however few tokens it saw).
"""

from __future__ import annotations

from regmean.architecture import _router, expert_modules, expert_slots
from regmean.errors import RegmeanError
from regmean.stats_checks import RELATIVE_SLACK, Stream, expected_count

ALTERED = "the file was altered: measure again"


def expert_problems(inputs) -> list[str]:
    """Every file's routed sites against the model's experts and each model's routing (its config)."""
    slots = expert_slots(inputs.skeleton)
    blocks = expert_modules(inputs.skeleton)
    problems = []
    for entry, ckpt, st in zip(inputs.config.models, inputs.models, inputs.stats, strict=True):
        found = _placement_problems(st, slots) + (_top_k_problems(ckpt.config, entry.path) if blocks else [])
        for experts in blocks if not found else ():
            found += _count_problems(st, experts, _experts_per_token(ckpt.config), entry.path)
        problems += found[:1]
    return problems


def _placement_problems(st, slots: dict) -> list[str]:
    """A site is of stream `routed` exactly when it is an expert projection's."""
    for site, (stream, _) in st.site_streams.items():
        if (stream == Stream.ROUTED) != (site in slots):
            said = "an expert's routed input" if stream == Stream.ROUTED else f"of stream {stream!r}"
            return [f"{st.path}: site {site} is recorded as {said}, which is wrong for that module; {ALTERED}"]
    return []


def _count_problems(st, experts, top_k: tuple[str, int] | None, model_path) -> list[str]:
    """An expert's inputs count the same rows; the block's experts count top-k x calls x tokens in all (at most, where
    parameter-free experts take some)."""
    counts, calls = [], None
    for e in range(experts.count):
        sites = [st.modules.get(m) for readers in experts.reads(e).values() for m in readers]
        sites = list(dict.fromkeys(s for s in sites if s is not None))
        if not sites:
            continue
        rows = [st.count(s) for s in sites]
        if len(set(rows)) > 1:
            return [
                f"{st.path}: expert {e} of {experts.module} counts {rows[0]} rows at site {sites[0]} but "
                f"{rows[-1]} at {sites[-1]} (the same routed tokens); {ALTERED}"
            ]
        counts.append(rows[0])
        calls = st.site_streams.get(sites[0], (Stream.ROUTED, 1))[1]
    tokens = expected_count(st.provenance, Stream.INPUT, calls or 1)
    if len(counts) < experts.count or top_k is None or tokens is None or sum(counts) == top_k[1] * tokens:
        return []
    if experts.parameter_free and sum(counts) <= top_k[1] * tokens:  # the rest went to experts that compute nothing
        return []
    name, k = top_k
    return [
        f"{st.path}: the experts of {experts.module} count {sum(counts)} routed rows in all, but {model_path} routes "
        f"each token to {k} experts ({name}), {k * tokens} rows over the file's tokens; the "
        "statistics are of another routing or were altered: measure this model again"
    ]


TOP_K = ("num_experts_per_tok", "moe_k", "moe_topk", "num_experts_per_token", "top_k_experts")
"""What configs name the experts per token: most, ERNIE-4.5's, Aria's and Hunyuan's, Kimi-Linear's and Bailing's,
Gemma-4's."""


def _top_k_problems(config: dict, model_path) -> list[str]:
    """A top-k the config gives must be a count (a string or a fraction would switch the routing check off)."""
    for part in (config, config.get("text_config") or {}):
        for name in TOP_K if isinstance(part, dict) else ():
            value = part.get(name)
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                return [f"{model_path}/config.json: {name} is {value!r:.40}, not a count of experts; fix the config"]
    return []


def _experts_per_token(config: dict) -> tuple[str, int] | None:
    """The model config's experts per token (a multimodal config's text part too) and the name it is given, or
    None."""
    for part in (config, config.get("text_config") or {}):
        for name in TOP_K if isinstance(part, dict) else ():
            value = part.get(name)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return name, value
    return None


class RoutedTraces:
    """At merge time, each expert's routed hidden states against its router's input, per file (each router's
    Gram trace read once)."""

    def __init__(self, inputs):
        self.stats = inputs.stats
        routers = [name for name, module in inputs.skeleton.named_modules() if _router(module)]
        self.router_of: dict[str, str] = {}  # an expert's hidden-states site -> its block's router module
        for experts in expert_modules(inputs.skeleton):
            block = experts.module.rsplit(".", 1)[0] + "."
            mine = [name for name in routers if name.startswith(block)]
            for e in range(experts.count) if len(mine) == 1 else ():
                self.router_of |= dict.fromkeys(next(iter(experts.reads(e).values())), mine[0])
        self._traces: dict[tuple[int, str], float] = {}

    def check(self, sites: tuple[str, ...], stats: list) -> None:
        """Refuse a file whose expert at `sites` (one per file) has a larger input trace than its router's (none to
        check for Grams measured during the merge)."""
        if self.stats is None:
            return
        for k, (st, site, s) in enumerate(zip(self.stats, sites, stats, strict=True)):
            router = st.modules.get(self.router_of.get(site, ""))
            if router is None:
                continue
            if (k, router) not in self._traces:
                self._traces[k, router] = float(st.site(router).gram.diagonal().double().sum())
            mine, whole = float(s.gram.diagonal().double().sum()), self._traces[k, router]
            if mine > whole * (1 + RELATIVE_SLACK) + 1e-30:
                raise RegmeanError(
                    f"{st.path}: site {site}: the tokens routed to this expert have a larger sum of squares "
                    f"({mine:.3g}) than all the tokens its router read ({whole:.3g}, site {router}); {ALTERED}"
                )
