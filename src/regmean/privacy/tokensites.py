"""Sites whose input is a fixed vector per vocabulary token: their Gram is a linear image of the data's token counts.

At a decoder's first layer (q/k/v read RMSNorm(embedding[token]) * w) the input of a row depends on its token
alone, whatever the position or the context: G = sum_t n_t u_t u_t^T. At an encoder's first layer with position
embeddings (BERT: LayerNorm(word + position + type)) it depends on the token and its position: one vector per
(token, position) pair. Both are found by probing the public model, never assumed from its class name.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from regmean.measure.batching import Batch, forward
from regmean.stats_checks import Stream

PROBE_LENGTH = 12
ATOM_CHUNK = 2048
"""Token sequences run through the model at a time while building a site's per-token vectors."""


@dataclass(frozen=True)
class TokenSite:
    """A site whose input rows are a function of their token (and, if `positional`, of their position)."""

    name: str
    positional: bool

    def describe(self) -> str:
        what = "token and position" if self.positional else "token"
        return f"{self.name} (input: one fixed vector per {what})"


class _Captured(Exception):
    """Raised by the capturing hook once every watched input is in: the rest of the forward pass is not needed."""


def site_inputs(model: nn.Module, sites: list[str], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each site's input on a forward pass over `input_ids` (all positions real, no padding): [B, T, d] where it has
    one row per token. Of an encoder-decoder, only the encoder runs: sites it does not reach are left out, as are
    names of no module (experts' projections: read by their experts module, routed tokens only)."""
    named = dict(model.named_modules())
    sites = [s for s in sites if s in named]
    seen: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def capture(_mod, args):
            if name not in seen:
                seen[name] = args[0].detach().float()
            if len(seen) == len(sites):
                raise _Captured

        return capture

    handles = [named[s].register_forward_pre_hook(hook(s)) for s in sites]
    mask = torch.ones_like(input_ids)
    try:
        with torch.inference_mode():
            if getattr(model.config, "is_encoder_decoder", False):  # the encoder's sites only: its input is the data
                model.get_encoder()(input_ids=input_ids, attention_mask=mask)
            else:
                forward(
                    model,
                    Batch({"input_ids": input_ids, "attention_mask": mask}, {Stream.INPUT: mask.bool()}, len(mask)),
                )
    except _Captured:
        pass
    finally:
        for h in handles:
            h.remove()
    return seen


def token_sites(model: nn.Module, sites: list[str], vocab_size: int, seed: int = 0) -> list[TokenSite]:
    """The sites among `sites` whose input depends on each row's token (and perhaps position) only.

    Probe: two random sequences that share every other token (same positions, other context), and the first
    sequence shifted by one position. Equal inputs at the shared tokens: context-free; equal after the shift too:
    position-free.
    """
    gen = torch.Generator().manual_seed(seed)
    a = torch.randint(0, vocab_size, (2, PROBE_LENGTH), generator=gen)
    b = torch.randint(0, vocab_size, (2, PROBE_LENGTH), generator=gen)
    b[:, ::2] = a[:, ::2]
    shifted = torch.cat([torch.randint(0, vocab_size, (2, 1), generator=gen), a[:, :-1]], dim=1)
    device = next(model.parameters()).device
    x, y, z = (site_inputs(model, sites, t.to(device)) for t in (a, b, shifted))
    found = []
    for name in sites:
        if (
            name not in x or x[name].dim() != 3 or x[name].shape[:2] != a.shape
        ):  # not one row per token (a pooled head, say)
            continue
        if not _same(x[name][:, ::2], y[name][:, ::2]):
            continue
        found.append(TokenSite(name, positional=not _same(x[name][:, :-1], z[name][:, 1:])))
    return found


def _same(u: torch.Tensor, v: torch.Tensor) -> bool:
    scale = float(u.abs().max()) or 1.0
    return bool(torch.allclose(u, v, rtol=1e-4, atol=1e-5 * scale))


def token_vectors(model: nn.Module, site: TokenSite, vocab_size: int, positions: int) -> torch.Tensor:
    """The site's input vector of every atom: [V, d] per token, or [V * P, d] per (token, position) pair, the
    atom of token t at position p being row t * P + p (P = `positions`)."""
    length = positions if site.positional else 1
    device = next(model.parameters()).device
    parts = []
    for ids in _token_chunks(vocab_size, length, max(1, ATOM_CHUNK // length)):
        inputs = site_inputs(model, [site.name], ids.to(device))[site.name]
        parts.append(inputs.reshape(-1, inputs.shape[-1]).cpu())
    return torch.cat(parts)


def _token_chunks(vocab_size: int, length: int, rows: int) -> Iterator[torch.Tensor]:
    """Sequences of one token repeated `length` times, for every token id in order, `rows` sequences at a time."""
    for start in range(0, vocab_size, rows):
        ids = torch.arange(start, min(start + rows, vocab_size))
        yield ids[:, None].expand(-1, length).contiguous()
