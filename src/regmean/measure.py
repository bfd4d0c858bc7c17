"""The measure step: run a model over local data and accumulate input statistics of its linear layers.

- One site per distinct input tensor, found on the first batch: modules whose inputs are the very same tensor
  objects in a forward pass share a site (q/k/v, gate/up, cross-attention k/v reading the encoder output).
- Padding is masked: every sequence input is matched to the mask of the stream it belongs to (the input ids, i.e.
  the encoder's, also read by cross-attention k/v; or the decoder's); per-example inputs (pooled [B, d]) have none.
- Eval mode, inference mode, sums in float32 (or float64) on the model's device.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn

from regmean import distributed, dtypes
from regmean.architecture import linear_layers
from regmean.devices import check_device
from regmean.errors import RegmeanError, one_line
from regmean.io.checkpoint import Checkpoint
from regmean.io.data import Example
from regmean.io.untrusted import compile_pattern
from regmean.loading import check_positions, load_model, load_tokenizer
from regmean.stats import SiteStats, Statistics


@dataclass
class Site:
    name: str
    modules: list[str]
    stream: str  # "input" (input_ids; the encoder's for enc-dec) | "decoder" | "example" (one row per example)
    d: int
    calls: int = 1  # calls of the hooked module per forward pass
    last_call: int = 0  # position of its last call among all measured modules' calls in a forward pass


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    masks: dict[str, torch.Tensor]  # stream -> [B, T] bool
    size: int
    _rows: dict[str, torch.Tensor | None] = field(default_factory=dict)

    def rows(self, stream: str) -> torch.Tensor | None:
        """Indices of the stream's real (unpadded) rows, computed once per batch; None when nothing is padding."""
        if stream not in self._rows:
            flat = self.masks[stream].reshape(-1)
            self._rows[stream] = None if bool(flat.all()) else flat.nonzero().squeeze(1)
        return self._rows[stream]


def select_modules(model: nn.Module, include: str | None, exclude: str | None) -> tuple[list[str], dict[str, str]]:
    """Linear modules to measure, and the skipped ones with the reason."""
    measured, skipped = [], {}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear | transformers.pytorch_utils.Conv1D)]
    layers = linear_layers(model)
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


def make_batches(
    examples: Sequence[Example], tokenizer, model: nn.Module, batch_size: int, max_length: int, device: str
) -> Iterator[Batch]:
    encdec = bool(getattr(model.config, "is_encoder_decoder", False))
    seq2seq_lm = encdec and hasattr(model, "prepare_decoder_input_ids_from_labels")
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        pairs = [e.text_pair for e in chunk] if chunk[0].text_pair is not None else None
        enc = tokenizer(
            [e.text for e in chunk], pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        check_positions(model.config, enc["input_ids"].shape[-1])
        inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        if "token_type_ids" in inputs and "token_type_ids" not in _forward_args(model):
            del inputs["token_type_ids"]
        mask = inputs["attention_mask"].bool()
        masks = {"input": mask}
        if encdec:
            if seq2seq_lm:
                if any(e.target is None for e in chunk):
                    raise RegmeanError(
                        f"{type(model).__name__} is an encoder-decoder LM: give the decoder targets (--target-field)"
                    )
                tgt = tokenizer(
                    text_target=[e.target for e in chunk],
                    padding=True,
                    truncation=True,
                    max_length=max_length,
                    return_tensors="pt",
                )
                labels = tgt["input_ids"].to(device)
                inputs["decoder_input_ids"] = model.prepare_decoder_input_ids_from_labels(labels=labels)
                inputs["decoder_attention_mask"] = tgt["attention_mask"].to(device)
                masks["decoder"] = inputs["decoder_attention_mask"].bool()
            else:
                # Sequence classification: the model feeds the decoder its input shifted right; decoder position t
                # exists in the unpadded example exactly when encoder position t does.
                masks["decoder"] = mask
        yield Batch(inputs, masks, len(chunk))


def _forward_args(model: nn.Module) -> set[str]:
    return set(inspect.signature(model.forward).parameters)


def _forward(model: nn.Module, batch: Batch) -> None:
    kwargs = dict(batch.inputs)
    if "use_cache" in _forward_args(model):
        kwargs["use_cache"] = False
    try:
        model(**kwargs)
    except (IndexError, RuntimeError, ValueError) as exc:  # torch and transformers' own failures on these inputs
        tokens = batch.inputs["input_ids"].shape[-1]
        raise RegmeanError(
            f"{type(model).__name__} failed on a batch of {tokens}-token inputs ({one_line(str(exc), 200)}); "
            "if the inputs are longer than the model accepts, lower --max-length"
        ) from exc


@contextmanager
def _hooks(handles: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def detect_sites(model: nn.Module, modules: list[str], batch: Batch) -> list[Site]:
    """Group modules by the identity of their input tensors over one forward pass, and find each group's stream."""
    calls: dict[str, list[int]] = {m: [] for m in modules}
    first_input: dict[str, torch.Tensor] = {}
    alive: list[torch.Tensor] = []  # holding every input keeps ids unique during the pass
    order: list[str] = []
    events: list[str] = []
    named = dict(model.named_modules())

    def pre_hook(name):
        def hook(_mod, args):
            x = args[0]
            alive.append(x)
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
    with _hooks(handles), torch.inference_mode():
        _forward(model, batch)

    never = [m for m in modules if not calls[m]]
    if never:
        raise RegmeanError(f"modules never called in a forward pass: {', '.join(never[:5])}; exclude them")
    last_call = {name: i for i, name in enumerate(events)}  # each module's last position in the pass
    encoder_prefix = next((n + "." for n, m in model.named_modules() if m is encoder), None)
    groups: dict[tuple[int, ...], list[str]] = {}
    for name in order:
        groups.setdefault(tuple(calls[name]), []).append(name)
    sites = []
    for key, members in groups.items():
        x = first_input[members[0]]
        if x.dim() == 2 and x.shape[0] == batch.size:
            stream = "example"
        elif encoder is None or members[0].startswith(encoder_prefix) or key[0] in encoder_out:
            stream = "input"
        else:
            stream = "decoder"
        sites.append(Site(members[0], members, stream, x.shape[-1], len(key), last_call[members[0]]))
    return sites


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


class _Collected(Exception):
    """Raised by the hook of the last site called in a forward pass: nothing after it is needed."""


class Accumulator:
    """Sums x x^T, x and row counts per site, over the rows that are not padding.

    `run` stops each forward pass right after the last measured input is summed: the rest of the network (for a
    causal LM, the vocabulary-wide lm_head; for a pass over an early block of sites, most of the model) would only
    compute outputs that nobody reads.
    """

    def __init__(self, model: nn.Module, sites: list[Site], dtype: torch.dtype, device: str):
        self.sites = sites
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
        self.handles = [named[s.name].register_forward_pre_hook(self._hook(s)) for s in sites]

    def run(self, batch: Batch) -> None:
        """One forward pass over `batch`, summing every site's inputs."""
        self.batch = batch
        self.calls_left = self.last.calls
        with suppress(_Collected):
            _forward(self.model, batch)

    def _hook(self, site: Site):
        def hook(_mod, args):
            x = args[0]
            rows = x.reshape(-1, x.shape[-1])
            if site.stream != "example":
                mask = self.batch.masks[site.stream]
                if mask.numel() != rows.shape[0]:
                    raise RegmeanError(
                        f"site {site.name}: input of shape {tuple(x.shape)} does not match the {site.stream} "
                        f"mask of shape {tuple(mask.shape)}; exclude this module"
                    )
                index = self.batch.rows(site.stream)
                if index is not None:
                    rows = rows.index_select(0, index)
            elif x.shape[0] != self.batch.size:
                raise RegmeanError(f"site {site.name}: per-example input of shape {tuple(x.shape)} changed size")
            rows = rows.to(self.dtype)
            s = self.stats[site.name]
            add_gram(s.gram, rows)
            s.sum.addmv_(rows.T, rows.new_ones(rows.shape[0]))
            s.count += rows.shape[0]
            if site is self.last:
                self.calls_left -= 1
                if self.calls_left == 0:
                    raise _Collected

        return hook

    def finish(self) -> None:
        """Fill the lower blocks of every Gram from the upper ones (`add_gram` accumulates only those)."""
        for s in self.stats.values():
            edges = gram_blocks(s.gram.shape[0])
            for i in range(len(edges) - 1):
                for j in range(i + 1, len(edges) - 1):
                    upper = s.gram[edges[i] : edges[i + 1], edges[j] : edges[j + 1]]
                    s.gram[edges[j] : edges[j + 1], edges[i] : edges[i + 1]].copy_(upper.T)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def measure(
    model_dir: str | Path,
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    max_length: int = 128,
    device: str = "cpu",
    stats_dtype: str = "float32",
    model_dtype: str = "float32",
    include: str | None = None,
    exclude: str | None = None,
    provenance: dict | None = None,
    progress: bool = True,
    log=None,
    max_stats_bytes: int | None = None,
    on_block: Callable[[Statistics, int, int], None] | None = None,
    allow_pickle: bool = False,
) -> Statistics:
    """Measure the statistics of every (selected) linear layer's input over `examples`.

    Inside a torch.distributed job each rank measures its shard of `examples` and the sums are reduced site by
    site to rank 0, whose returned statistics cover all examples (other ranks' hold no sites).

    With `max_stats_bytes`, sites are measured in blocks whose sums fit, one pass over the data per block; each
    finished block goes to `on_block(statistics, index, count)` (e.g. to be written) instead of staying in memory.
    A pickle checkpoint (`pytorch_model.bin`) is refused unless `allow_pickle`.
    """
    sums = dtypes.named(stats_dtype, dtypes.STATISTICS, "stats dtype")
    forward = dtypes.named(model_dtype, dtypes.FLOATS, "model dtype")
    if not examples:
        raise RegmeanError("no examples to measure on")
    check_device(device)
    checkpoint = Checkpoint(model_dir, allow_pickle)
    tokenizer = load_tokenizer(model_dir)
    fingerprint = checkpoint.fingerprint  # reads every weight: NaN or Inf is refused before the model loads
    model = load_model(model_dir, device, forward)
    modules, skipped = select_modules(model, include, exclude)
    local = distributed.shard(examples)
    batches = make_batches(local, tokenizer, model, batch_size, max_length, device)
    first = next(batches)
    sites = detect_sites(model, modules, first)
    distributed.check_same(repr([(s.name, s.modules, s.stream) for s in sites]), "the detected sites")
    width = sums.itemsize
    blocks = site_blocks(sites, width, max_stats_bytes)
    if log is not None and distributed.rank() == 0:
        gram_bytes = sum(s.d * (s.d + 1) * width for s in sites)
        passes = f"; {len(blocks)} passes, one block of sites each" if len(blocks) > 1 else ""
        log(
            f"{len(sites)} sites for {len(modules)} linear modules: {gram_bytes / 1e9:.2f} GB of {stats_dtype} sums "
            f"on {device}; {len(examples)} examples over {distributed.world_size()} process(es){passes}"
        )
    progress = progress and distributed.rank() == 0
    columns = [
        TextColumn("measuring"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("examples"),
        TimeRemainingColumn(),
    ]
    base = {
        "modules": {m: s.name for s in sites for m in s.modules},
        "fingerprint": fingerprint,
        "dtype": stats_dtype,
        "examples": len(examples),
        "skipped": skipped,
    }
    collected: dict[str, SiteStats] = {}
    tokens = 0
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("measure", total=len(local) * len(blocks))
        for b, block in enumerate(blocks):
            acc = Accumulator(model, block, sums, device)
            passes = (
                _chain(first, batches)
                if b == 0
                else make_batches(local, tokenizer, model, batch_size, max_length, device)
            )
            with _hooks(acc.handles), torch.inference_mode():
                for batch in passes:
                    acc.run(batch)
                    if b == 0:
                        tokens += int(batch.masks["input"].sum())
                    bar.advance(task, batch.size)
            acc.finish()
            for stat in acc.stats.values():  # one site at a time: never a second copy of all Grams
                distributed.sum_to_rank0(stat.gram)
                distributed.sum_to_rank0(stat.sum)
                stat.count = distributed.sum_int(stat.count, device)
            if b == 0:
                tokens = distributed.sum_int(tokens, device)
                record = {
                    "examples": len(examples),
                    "tokens": tokens,
                    "max_length": max_length,
                    "model_dtype": model_dtype,
                    "processes": distributed.world_size(),
                    **(provenance or {}),
                }
            # only rank 0 keeps the sums: N ranks on one machine never hold N host copies of every Gram
            part = (
                {n: SiteStats(st.gram.cpu(), st.sum.cpu(), st.count) for n, st in acc.stats.items()}
                if distributed.rank() == 0
                else {}
            )
            del acc
            if on_block is None:
                collected.update(part)
            else:
                on_block(Statistics(sites=part, tokens=tokens, provenance=[record], **base), b, len(blocks))
    return Statistics(sites=collected, tokens=tokens, provenance=[record], **base)


def site_blocks(sites: list[Site], width: int, max_bytes: int | None) -> list[list[Site]]:
    """Consecutive sites grouped so that each group's sums fit in `max_bytes` (a site larger than that alone)."""
    if max_bytes is None:
        return [sites]
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


def _chain(first: Batch, rest: Iterator[Batch]) -> Iterator[Batch]:
    yield first
    yield from rest
