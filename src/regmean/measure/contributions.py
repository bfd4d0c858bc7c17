"""Each example's contribution to the statistics, for differential privacy: one pass over the data that measures,
per example, the squared norms of its Grams' upper triangles and of its sums over every site, and its row count
per stream (what `regmean.privacy.dp` clips)."""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import suppress

import torch
from torch import nn

from regmean.measure.accumulate import Collected
from regmean.measure.batching import Batch, forward
from regmean.measure.sites import Site, hooks
from regmean.stats_checks import Stream


class ContributionNorms:
    """Per example and site: a = ||triu(X^T X)||_F^2 and b = ||X^T 1||^2 over its unpadded rows X at the site. A site
    called several times per forward pass adds up its calls' norms first (the triangle inequality: a bound, exact
    for one call)."""

    def __init__(self, model: nn.Module, sites: list[Site]):
        self.model = model
        self.sites = sites
        self.grams: list[torch.Tensor] = []
        self.sums: list[torch.Tensor] = []
        self.rows: dict[Stream, list[torch.Tensor]] = {Stream.INPUT: [], Stream.DECODER: []}
        self._batch: Batch | None = None
        self._norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._last, self._calls_left = max(sites, key=lambda s: s.last_call), 0
        named = dict(model.named_modules())
        self.handles = [named[s.name].register_forward_pre_hook(self._hook(s)) for s in sites]

    def pass_over(self, batches: Iterable[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared norms (a, b), [examples, sites] in data order and the order of `sites`."""
        with hooks(self.handles), torch.inference_mode():
            for batch in batches:
                self._batch, self._norms, self._calls_left = batch, {}, self._last.calls
                with suppress(Collected):  # stopped after the last site: the rest (an LM head, say) is not needed
                    forward(self.model, batch)
                self.grams.append(torch.stack([self._norms[s.name][0] for s in self.sites], 1).pow(2).cpu())
                self.sums.append(torch.stack([self._norms[s.name][1] for s in self.sites], 1).pow(2).cpu())
                for stream in self.rows:
                    if stream in batch.masks:
                        self.rows[stream].append(batch.masks[stream].sum(1).cpu())
        return torch.cat(self.grams), torch.cat(self.sums)

    def _hook(self, site: Site):
        def hook(_mod, args):
            x = args[0].double()
            if site.stream == Stream.EXAMPLE:
                x = x[:, None, :]
            else:
                x = x.reshape(self._batch.size, -1, x.shape[-1]) * self._batch.masks[site.stream][..., None]
            outer = torch.bmm(x, x.transpose(1, 2)).pow(2).sum((1, 2))  # ||X^T X||_F^2 = ||X X^T||_F^2
            diagonal = x.pow(2).sum(1).pow(2).sum(1)
            gram = ((outer + diagonal) / 2).sqrt()  # the upper triangle's norm
            total = x.sum(1).pow(2).sum(1).sqrt()
            before = self._norms.get(site.name, (0.0, 0.0))
            self._norms[site.name] = (before[0] + gram, before[1] + total)
            if site is self._last:
                self._calls_left -= 1
                if self._calls_left == 0:
                    raise Collected

        return hook
