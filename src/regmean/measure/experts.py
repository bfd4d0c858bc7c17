"""Per-expert statistics of mixture-of-experts blocks: each expert's Grams over the tokens routed to it.

An experts module receives the block's tokens (flattened, [tokens, d_model]) and, per token, the indices of the
experts the router chose (or, as Llama-4's, each expert's copy of every token scaled by its router score, zero
where it was not chosen). Expert e's gate and up projections read the hidden states of the tokens routed to it;
its down projection reads act(gate) * up of those tokens, which the hook recomputes from the module's own weights
and gating (`_apply_gate`, as transformers' experts implementations do), so that fused 3-D parameters, transposed
layouts and custom activations are measured alike. Each expert's two inputs are sites of stream `routed`: their
row counts are the tokens routed there (at most the stream's tokens times the calls).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional

from regmean.architecture import Experts
from regmean.errors import RegmeanError


def expert_inputs(module: nn.Module, experts: Experts, expert: int, x: torch.Tensor) -> torch.Tensor:
    """The down projection's input for rows `x` routed to `expert`: act(gate) * up (or act(up)), bias included, by
    the module's own gating."""
    name = "gate_up_proj" if experts.gated else "up_proj"
    weight = getattr(module, name)[expert].to(x.dtype)
    out = x @ weight if experts.transposed else functional.linear(x, weight)
    bias = getattr(module, f"{name}_bias", None)
    if getattr(module, "has_bias", False) and bias is not None:
        out = out + bias[expert].to(x.dtype)
    if experts.gated:
        gate = getattr(module, "_apply_gate", None)
        if gate is not None:
            return gate(out)
        first, second = out.chunk(2, dim=-1)
        return module.act_fn(first) * second
    return module.act_fn(out)


def routed_rows(
    experts: Experts, args: tuple, wanted: Iterable[int], valid: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[tuple[int, torch.Tensor]]:
    """From an experts call's arguments: for each expert of `wanted` with a routed token, one at a time, (expert,
    the rows it reads of its tokens); `valid` keeps the rows that are not padding. The call is either (hidden
    states, top-k expert indices, ...) or, as Llama-4's, the experts' inputs alone: every expert reading every
    token scaled by its router score, zero where the router did not choose it. (Its down projection's input:
    `expert_inputs`, computed only where measured.)"""
    if len(args) >= 2 and isinstance(args[1], torch.Tensor) and not args[1].is_floating_point():
        return _chosen_rows(args[0], args[1], wanted, valid)
    if len(args) == 1 and isinstance(args[0], torch.Tensor) and args[0].shape[0] % experts.count == 0:
        return _scaled_rows(args[0].reshape(experts.count, -1, args[0].shape[-1]), wanted, valid)
    raise RegmeanError(f"{experts.module}: an experts call without the routing; --exclude its experts")


def _chosen_rows(
    hidden: torch.Tensor, routing: torch.Tensor, wanted: Iterable[int], valid: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[tuple[int, torch.Tensor]]:
    """Each wanted expert's tokens, by the top-k indices `routing` chose for each row of `hidden`."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    routing = routing.reshape(hidden.shape[0], -1)
    keep = valid(hidden)
    hidden, routing = hidden.index_select(0, keep), routing.index_select(0, keep)
    routed = set(routing.unique().tolist())
    for e in wanted:
        if e in routed:
            yield e, hidden[(routing == e).any(-1)]


def _scaled_rows(
    inputs: torch.Tensor, wanted: Iterable[int], valid: Callable[[torch.Tensor], torch.Tensor]
) -> Iterator[tuple[int, torch.Tensor]]:
    """Each wanted expert's rows of `inputs` [experts, tokens, d] that its router chose (not zero)."""
    for e in wanted:
        rows = inputs[e].index_select(0, valid(inputs[e]))
        rows = rows[rows.ne(0).any(-1)]
        if rows.shape[0]:
            yield e, rows
