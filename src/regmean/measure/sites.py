"""Sites: the distinct input tensors of the measured linear layers, found by watching one forward pass.

Modules whose inputs are the very same tensor objects in a forward pass share a site (q/k/v, gate/up,
cross-attention k/v reading the encoder output). Each site belongs to a stream, whose padding mask applies to it:
the input ids' (the encoder's, for encoder-decoders), the decoder's, or none for per-example inputs ([B, d]).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from regmean.architecture import Experts, expert_slots, linear_layers
from regmean.errors import RegmeanError
from regmean.io.untrusted import compile_pattern
from regmean.measure.batching import Batch, forward
from regmean.stats_checks import Stream
from regmean.units import human


@dataclass
class Site:
    name: str
    modules: list[str]
    stream: Stream
    d: int
    calls: int = 1  # calls of the hooked module per forward pass
    last_call: int = 0  # position of its last call among all measured modules' calls in a forward pass


def select_modules(model: nn.Module, include: str | None, exclude: str | None) -> tuple[list[str], dict[str, str]]:
    """Linear modules to measure, and the skipped ones with the reason."""
    measured, skipped = [], {}
    layers = linear_layers(model)
    slots = expert_slots(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | Conv1D) or n in layers] + list(slots)
    layers = layers | dict.fromkeys(slots)
    keep = compile_pattern(include, "--include") if include else None
    drop = compile_pattern(exclude, "--exclude") if exclude else None
    for name in names:
        if name not in layers:
            skipped[name] = "weight tied to another parameter (averaged)"
        elif keep and not keep.search(name):
            skipped[name] = f"not matched by include {include!r}"
        elif drop and drop.search(name):
            skipped[name] = f"matched by exclude {exclude!r}"
        else:
            measured.append(name)
    if not measured:
        raise RegmeanError("no linear module left to measure (check --include / --exclude)")
    return measured, skipped


@contextmanager
def hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


NEVER_CALLED = "never called in a forward pass on this data (e.g. a vision tower measured on text)"


def detect_sites(
    model: nn.Module, modules: list[str], batch: Batch, skipped: dict[str, str] | None = None
) -> list[Site]:
    """Group modules by the identity of their input tensors over one forward pass, and find each group's stream;
    expert projections (`measure.experts`) get a site per expert input, called when their experts module is.
    Modules the pass never calls go to `skipped`, with the reason (without it, they are refused)."""
    slots = expert_slots(model)
    wanted = [m for m in modules if m in slots]
    experts = {slots[m][0].module: slots[m][0] for m in wanted}
    modules = [m for m in modules if m not in slots] + list(experts)
    calls: dict[str, list[int]] = {m: [] for m in modules}
    first_input: dict[str, torch.Tensor] = {}
    alive: list[torch.Tensor] = []  # holding every input keeps ids unique during the pass
    order: list[str] = []
    events: list[str] = []
    named = dict(model.named_modules())

    inputs: dict[int, torch.Tensor] = {}

    def pre_hook(name):
        def hook(_mod, args):
            x = args[0]
            alive.append(x)
            inputs[id(x)] = x
            calls[name].append(id(x))
            events.append(name)
            if name not in first_input:
                first_input[name] = x
                order.append(name)

        return hook

    encoder_out: list[int] = []
    handles = [named[m].register_forward_pre_hook(pre_hook(m)) for m in modules]
    encoder = model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else None
    if encoder is not None:
        handles.append(encoder.register_forward_hook(lambda _m, _a, out: encoder_out.append(id(out[0]))))
    with hooks(handles), torch.inference_mode():
        forward(model, batch)

    _set_aside_idle([m for m in modules if not calls[m]], experts, {m: slots[m][0].module for m in wanted}, skipped)
    last_call = {name: i for i, name in enumerate(events)}  # each module's last position in the pass
    encoder_prefix = next((n + "." for n, m in model.named_modules() if m is encoder), None)
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in order:
        if name not in experts:  # hooked for their calls; their sites are the routed ones below
            groups.setdefault(tuple(calls[name]), []).append(name)
    sites = []
    for key, members in groups.items():
        x = first_input[members[0]]
        decoder = encoder is not None and not members[0].startswith(encoder_prefix) and key[0] not in encoder_out
        stream = _stream(x, [inputs[i] for i in key], batch, decoder)
        sites.append(Site(members[0], members, stream, x.shape[-1], len(key), last_call[members[0]]))
    for name, block in experts.items():
        sites += _routed_sites(block, wanted, len(calls[name]), last_call[name])
    if not sites:  # every selected module was set aside: none ran on this data
        raise RegmeanError(f"none of the {len(calls)} selected linear modules ran on this data; select others")
    return sites


def _set_aside_idle(never: list[str], experts: dict, expert_of: dict[str, str], skipped: dict | None) -> None:
    """Modules a forward pass never called go to `skipped` with the reason (an experts block: each of its measured
    projections), and a block among them leaves `experts`; without `skipped` they are refused."""
    if never and skipped is None:
        raise RegmeanError(f"modules never called in a forward pass: {', '.join(never[:5])}; exclude them")
    for name in never:  # (never called: not in the pass's call order either, so no site)
        if name in experts:
            skipped.update({m: NEVER_CALLED for m, block in expert_of.items() if block == name})
            del experts[name]
        else:
            skipped[name] = NEVER_CALLED


def _stream(first: torch.Tensor, calls: list[torch.Tensor], batch: Batch, decoder: bool) -> Stream:
    """A site's stream from its inputs: example (one row per example), else the input's or decoder's tokens, or
    fixed / mixed where some calls' rows follow no token of that stream's mask."""
    if first.dim() == 2 and first.shape[0] == batch.size:
        return Stream.EXAMPLE
    stream = Stream.DECODER if decoder else Stream.INPUT
    follows = {follows_mask(x, batch.masks[stream]) for x in calls}
    return stream if follows == {True} else Stream.FIXED if follows == {False} else Stream.MIXED


def _routed_sites(experts: Experts, wanted: list[str], calls: int, last_call: int) -> list[Site]:
    """Each expert's two input sites, with the projections of it that are measured."""
    sites = []
    for e in range(experts.count):
        for name, readers in experts.reads(e).items():
            chosen = [r for r in readers if r in wanted]
            if chosen:
                d = experts.d_model if name != experts.slot(e, "down_proj") else experts.d_inner
                sites.append(Site(chosen[0], chosen, Stream.ROUTED, d, calls, last_call))
    return sites


def follows_mask(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether an input's rows are the tokens of a stream, in the mask's order: shaped like it but for dimensions of
    one ([B, T, d]; DeepSeek's [B, 1, T, d]), or flattened ([B T, d], as MoE blocks pass tokens to shared experts)."""
    lead, want = [n for n in x.shape[:-1] if n != 1], [n for n in mask.shape if n != 1]
    return lead == want or (x.dim() == 2 and x.shape[0] == mask.numel())


def site_blocks(sites: list[Site], width: int, max_bytes: int | None) -> list[list[Site]]:
    """Consecutive sites grouped so that each group's sums fit in `max_bytes`; refused when one site's alone do not
    (no plan could keep the limit)."""
    if max_bytes is None:
        return [sites]
    largest = max(sites, key=lambda site: site.d)
    if largest.d * (largest.d + 1) * width > max_bytes:
        need = human(largest.d * (largest.d + 1) * width)
        raise RegmeanError(
            f"--max-memory {human(max_bytes)}: the sums of site {largest.name} alone take {need}; give at least {need}"
        )
    blocks: list[list[Site]] = [[]]
    used = 0
    for site in sites:
        size = site.d * (site.d + 1) * width
        if blocks[-1] and used + size > max_bytes:
            blocks.append([])
            used = 0
        blocks[-1].append(site)
        used += size
    return blocks
