"""Sums of x x^T, x and row counts per site over the rows that are not padding, collected by forward hooks."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from contextlib import suppress

import torch
from torch import nn

from regmean.architecture import Experts, expert_slots
from regmean.errors import RegmeanError
from regmean.measure.batching import Batch, forward
from regmean.measure.experts import expert_inputs, routed_rows
from regmean.measure.sites import Site, follows_mask, hooks
from regmean.stats import SiteStats
from regmean.stats_checks import Stream

GRAM_BLOCK = 512
"""Grams wider than twice this are accumulated by blocks on and above the diagonal only: x x^T is symmetric, so
the lower blocks are copies (filled once by `Accumulator.finish`), saving up to half the multiply-adds. (Narrower
blocks measured no faster end to end on 2 cores: small products lose more in efficiency than they save.)"""


def gram_blocks(d: int) -> list[int]:
    """Block edges of a d-wide Gram: [0, d] (one block) unless d >= 2 * GRAM_BLOCK."""
    if d < 2 * GRAM_BLOCK:
        return [0, d]
    n = -(-d // GRAM_BLOCK)
    return [round(i * d / n) for i in range(n + 1)]


def add_gram(gram: torch.Tensor, rows: torch.Tensor) -> None:
    """gram += rows^T rows on and above the block diagonal (see `gram_blocks`)."""
    edges = gram_blocks(gram.shape[0])
    if len(edges) == 2:
        gram.addmm_(rows.T, rows)
        return
    for i in range(len(edges) - 1):
        a = rows[:, edges[i] : edges[i + 1]]
        for j in range(i, len(edges) - 1):
            gram[edges[i] : edges[i + 1], edges[j] : edges[j + 1]].addmm_(a.T, rows[:, edges[j] : edges[j + 1]])


class Collected(Exception):
    """Raised by the hook of the last site called in a forward pass: nothing after it is needed."""


class Accumulator:
    """Sums x x^T, x and row counts per site, over the rows that are not padding.

    `run` stops each forward pass right after the last measured input is summed: the rest of the network (for a
    causal LM, the vocabulary-wide lm_head; for a pass over an early block of sites, most of the model) would only
    compute outputs that nobody reads.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: list[Site],
        dtype: torch.dtype,
        device: str,
        scales: dict[str, torch.Tensor] | None = None,
    ):
        """`scales`: per site, a factor per example (in data order) that multiplies its rows there (DP clipping)."""
        self.sites = sites
        self.scales = None if scales is None else {s.name: scales[s.name].to(device, dtype) for s in sites}
        self.offset = 0  # examples of the data before the current batch
        self.dtype = dtype
        self.stats = {
            s.name: SiteStats(
                torch.zeros(s.d, s.d, dtype=dtype, device=device), torch.zeros(s.d, dtype=dtype, device=device), 0
            )
            for s in sites
        }
        self.batch: Batch | None = None
        self.model = model
        self.last = max(sites, key=lambda s: s.last_call)
        self.calls_left = 0
        named = dict(model.named_modules())
        self.handles = [
            named[s.name].register_forward_pre_hook(self._hook(s)) for s in sites if s.stream != Stream.ROUTED
        ]
        routed: dict[str, dict[int, list[Site]]] = {}
        slots = expert_slots(model) if any(s.stream == Stream.ROUTED for s in sites) else {}
        for site in sites:
            if site.stream == Stream.ROUTED:
                experts, e = slots[site.name]
                routed.setdefault(experts.module, {}).setdefault(e, []).append(site)
        blocks = {experts.module: experts for experts, _ in slots.values()}
        for name, by_expert in routed.items():
            self.handles.append(named[name].register_forward_pre_hook(self._experts_hook(blocks[name], by_expert)))

    def run(self, batch: Batch) -> None:
        """One forward pass over `batch`, summing every site's inputs."""
        self.batch = batch
        self.calls_left = self.last.calls
        with suppress(Collected):
            forward(self.model, batch)

    def pass_over(
        self,
        batches: Iterable[Batch],
        advance: Callable[[int], None] | None = None,
        rows: dict[str, int] | None = None,
        after_batch: Callable[[dict[str, int]], None] | None = None,
    ) -> dict[str, int]:
        """One pass over the data (or the rest of one: `rows` counted already), then the hooks removed and the
        Grams completed; returns the real rows of every stream (`Batch.stream_rows`; `advance` is told each batch's
        size, `after_batch` the rows so far)."""
        counted: Counter[str] = Counter(rows or {})
        with hooks(self.handles), torch.inference_mode():
            for batch in batches:
                self.run(batch)
                self.offset += batch.size
                counted.update(batch.stream_rows())
                if advance is not None:
                    advance(batch.size)
                if after_batch is not None:
                    after_batch(dict(counted))
        self.finish()
        return dict(counted)

    def restore(self, stats: dict[str, SiteStats], examples: int) -> None:
        """Continue an interrupted pass: its sums so far, over its first `examples` examples."""
        for name, st in stats.items():
            self.stats[name].gram.copy_(st.gram)
            self.stats[name].sum.copy_(st.sum)
            self.stats[name].count = st.count
        self.offset = examples

    def _hook(self, site: Site):
        def hook(_mod, args):
            x = args[0]
            rows = x.reshape(-1, x.shape[-1])
            if site.stream in (Stream.INPUT, Stream.DECODER, Stream.MIXED):
                stream = Stream.INPUT if site.stream == Stream.MIXED else site.stream
                mask = self.batch.masks[stream]
                if follows_mask(x, mask):
                    index = self.batch.rows(stream)
                    rows = rows if index is None else rows.index_select(0, index)
                elif site.stream != Stream.MIXED:
                    raise RegmeanError(
                        f"site {site.name}: input of shape {tuple(x.shape)} does not match the {stream} "
                        f"mask of shape {tuple(mask.shape)}; exclude this module"
                    )
            elif site.stream == Stream.EXAMPLE and x.shape[0] != self.batch.size:
                raise RegmeanError(f"site {site.name}: per-example input of shape {tuple(x.shape)} changed size")
            rows = rows.to(self.dtype)
            if self.scales is not None:
                rows = rows * self._row_scales(site, x, rows.shape[0])[:, None]
            self._add(site, rows)
            self._called([site])

        return hook

    def _experts_hook(self, experts: Experts, by_expert: dict[int, list[Site]]):
        """One hook per experts module: each measured expert's inputs over the tokens routed to it, one expert at
        a time (its down projection's input recomputed only where that site is measured)."""
        down = {e: experts.slot(e, "down_proj") for e in by_expert}

        def hook(module, args):
            for e, x in routed_rows(experts, args, sorted(by_expert), self._input_tokens):
                for site in by_expert[e]:
                    rows = expert_inputs(module, experts, e, x) if site.name == down[e] else x
                    self._add(site, rows.to(self.dtype))
            self._called([site for sites in by_expert.values() for site in sites])

        return hook

    def _input_tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """The indices of the flattened rows `hidden` that are input tokens, not padding."""
        mask = self.batch.masks[Stream.INPUT]
        if hidden.shape[0] != mask.numel():
            raise RegmeanError(
                f"experts read {hidden.shape[0]} rows where the input has {mask.numel()} token positions; exclude "
                "the experts (--exclude 'experts')"
            )
        index = self.batch.rows(Stream.INPUT)
        return torch.arange(hidden.shape[0], device=hidden.device) if index is None else index

    def _add(self, site: Site, rows: torch.Tensor) -> None:
        s = self.stats[site.name]
        add_gram(s.gram, rows)
        s.sum.addmv_(rows.T, rows.new_ones(rows.shape[0]))
        s.count += rows.shape[0]

    def _called(self, sites: list[Site]) -> None:
        """After a call that summed `sites`: stop the forward pass once the last site's last call is done."""
        if any(site is self.last for site in sites):
            self.calls_left -= 1
            if self.calls_left == 0:
                raise Collected

    def _row_scales(self, site: Site, x: torch.Tensor, n: int) -> torch.Tensor:
        """The scale of each summed row: its example's."""
        scales = self.scales[site.name][self.offset : self.offset + self.batch.size]
        if site.stream == Stream.EXAMPLE:
            return scales
        per_example = x.reshape(-1, x.shape[-1]).shape[0] // self.batch.size
        index = self.batch.rows(site.stream)
        owner = torch.arange(n, device=scales.device) if index is None else index
        return scales[owner // per_example]

    def finish(self) -> None:
        """Fill the lower blocks of every Gram from the upper ones (`add_gram` accumulates only those)."""
        for s in self.stats.values():
            edges = gram_blocks(s.gram.shape[0])
            for i in range(len(edges) - 1):
                for j in range(i + 1, len(edges) - 1):
                    upper = s.gram[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
                    s.gram[edges[j] : edges[j + 1], edges[i] : edges[i + 1]].copy_(upper.T)
