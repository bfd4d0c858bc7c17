"""Forward-order stages for a method that measures while it merges (RegMean++).

Each repeated block (an element of an `nn.ModuleList`: a transformer layer) is one stage. A measured site outside
every block (a pooler, a classifier, an LM head), or one whose input is shared by several blocks (T5's encoder
output, read by every decoder block's cross-attention), is a stage of its own. Stages are ordered by the first call
of their sites in a forward pass, so whatever a stage's inputs depend on belongs to an earlier stage or to the
stage's own block.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from regmean.measure.sites import Site


@dataclass(frozen=True)
class Stage:
    name: str
    """The block's module name, or the site's."""
    block: str | None
    """The block's tensor-name prefix ('bert.encoder.layer.3.'); None for a stage of one site outside blocks."""
    sites: tuple[Site, ...]


def block_prefixes(model: nn.Module) -> list[str]:
    """'name.i.' for every element of every ModuleList of `model`."""
    prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            prefixes += [f"{name}.{child}." if name else f"{child}." for child, _ in module.named_children()]
    return prefixes


def outer_block(module: str, prefixes: list[str]) -> str | None:
    """The outermost block holding `module` (T5: the block, not the layer list inside it), or None."""
    owners = [p for p in prefixes if module.startswith(p)]
    return min(owners, key=len) if owners else None


def forward_stages(model: nn.Module, sites: list[Site]) -> list[Stage]:
    """The stages of `sites`, which `detect_sites` lists in the order of their first call."""
    prefixes = block_prefixes(model)
    grouped: dict[str, list[Site]] = {}
    blocks: dict[str, str | None] = {}
    for site in sites:
        owners = {outer_block(m, prefixes) for m in site.modules}
        block = owners.pop() if len(owners) == 1 else None
        name = block.removesuffix(".") if block else site.name
        grouped.setdefault(name, []).append(site)
        blocks[name] = block
    return [Stage(name, blocks[name], tuple(members)) for name, members in grouped.items()]
