"""The measure step: run a model over local data and accumulate the input statistics of its linear layers.

Eval mode, inference mode, sums in float32 (or float64) on the model's device; padding rows excluded, each site by
its stream's mask (see `regmean.measure.sites`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from regmean import distributed, dtypes
from regmean.devices import check_device
from regmean.errors import RegmeanError, check_flag, check_path, check_text, check_whole_number
from regmean.io.adapter import is_adapter, open_model
from regmean.io.chat import render_chat
from regmean.io.data import Example
from regmean.loading import check_room_for_text, check_vocabulary_fits, load_adapted, load_tokenizer, tokenizer_folder
from regmean.measure.accumulate import Accumulator
from regmean.measure.batching import Batch, make_batches
from regmean.measure.checkpoint import MeasureCheckpoint, Resumed, examples_digest, measure_key
from regmean.measure.protect import (
    PrivateRelease,
    Protection,
    token_site_names,
    withhold_token_sites,
)
from regmean.measure.sites import NEVER_CALLED, Site, detect_sites, select_modules, site_blocks
from regmean.memory import Peak, peak_memory
from regmean.progress import progress as show_progress
from regmean.statistic import ProvenanceRecord
from regmean.stats import EXPERTS_UNCLIPPED, NO_EXAMPLE_BOUND, SiteStats, Statistics
from regmean.stats_checks import Stream
from regmean.units import human


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
    base: str | Path | None = None,
    protection: Protection | None = None,
    on_plan: Callable[[int], None] | None = None,
    checkpoint_dir: str | Path | None = None,
) -> Statistics:
    """Measure the statistics of every (selected) linear layer's input over `examples`.

    Inside a torch.distributed job each rank measures its shard of `examples` and the sums are reduced site by
    site to rank 0, whose returned statistics cover all examples (other ranks' hold no sites).

    With `max_stats_bytes`, sites are measured in blocks whose sums fit, one pass over the data per block; each
    finished block goes to `on_block(statistics, index, count)` (e.g. to be written) instead of staying in memory.
    A pickle checkpoint (`pytorch_model.bin`) is refused unless `allow_pickle`. `model_dir` may be a LoRA adapter
    folder over the base model folder `base` (or the one its config names, if local). With `checkpoint_dir` (the
    same folder for every process), progress is saved there now and then, and a measure of the same inputs
    interrupted earlier continues from it (`measure.checkpoint`); the caller removes it once the statistics are
    written. `protection` says what the file keeps back: by default the sites whose Grams decode into the data's
    token counts are withheld (`Protection(withhold=False)` keeps them; `epsilon` adds differential privacy).
    """
    sums = dtypes.named(stats_dtype, dtypes.STATISTICS, "stats dtype")
    _check_arguments(examples, protection, batch_size, max_length)
    _check_paths(model_dir, base, checkpoint_dir, provenance, device, progress)
    model, tokenizer, examples, described, fingerprint = _loaded(
        model_dir, base, allow_pickle, examples, device, model_dtype, max_length
    )
    modules, skipped = select_modules(model, include, exclude)
    local = distributed.shard(examples)

    def batches(start: int = 0) -> Iterator[Batch]:
        return make_batches(local[start:], tokenizer, model, batch_size, max_length, device)

    first_pass = batches()
    first = next(first_pass)
    sites, forward_peak = _detected(model, modules, first, skipped, device)
    protection = protection or Protection()
    sites, withheld, private = _protected(
        model, sites, skipped, protection, batches, (max_length, len(examples)), device, log
    )
    blocks = site_blocks(sites, sums.itemsize, max_stats_bytes)
    if on_plan is not None:  # e.g. refuse an output disk too small for the files, before the passes
        on_plan(statistics_bytes(sites, sums.itemsize))
    if log is not None and distributed.rank() == 0:
        log(_announcement(blocks, len(modules), sums, device, len(examples), skipped))
        log(_memory_estimate(model, blocks, sums, first, forward_peak, max_length))
    source = (Path(model_dir), None if base is None else Path(base))
    header = _header(sites, fingerprint, stats_dtype, len(examples), skipped, protection, private, withheld)
    options = [batch_size, max_length, stats_dtype, model_dtype, header["protection"], torch.device(device).type]
    key = _resume_key(fingerprint, examples, options, blocks)
    checkpoint = None
    if checkpoint_dir is not None and private is None:  # a DP release draws its noisy counts once: no resume
        checkpoint = MeasureCheckpoint(Path(checkpoint_dir), key, log, distributed.rank())
    passes = _Passes(model, sums, device, private, batches, _chain(first, first_pass), checkpoint, log)
    context = {"examples": header["examples"], "max_length": max_length, "model_dtype": model_dtype}
    context |= {"processes": distributed.world_size(), **described, **(provenance or {})}
    shown = show_progress("measuring", "examples", len(local) * len(blocks), 0, progress and distributed.rank() == 0)
    with shown as advance:
        collected, record = passes.run(blocks, advance, len(local), context, header, on_block)
    return Statistics(sites=collected, tokens=record["tokens"], provenance=[record], measured_model=source, **header)


def _detected(model, modules: list[str], first: Batch, skipped: dict[str, str], device: str):
    """The sites of the selected modules, from one forward pass over the first batch (the same on every process),
    and that pass's peak memory."""
    with peak_memory(device) as forward_peak:  # the site-detection pass is a whole forward pass
        sites = detect_sites(model, modules, first, skipped)
    distributed.check_same(repr([(s.name, s.modules, s.stream) for s in sites]), "the detected sites")
    return sites, forward_peak


def _resume_key(fingerprint, examples, options: list, blocks) -> str:
    """What an interrupted measure must share with this one to be continued: the model, the examples, the options,
    the processes (each one's key covers all the examples) and the blocks of sites."""
    options = [*options, distributed.world_size(), distributed.rank()]
    return measure_key([fingerprint, examples_digest(examples), options, [[(s.name, s.d) for s in b] for b in blocks]])


def _check_arguments(examples, protection, batch_size, max_length) -> None:
    """The Python API's arguments of the right kinds (the command line builds them itself)."""
    check_whole_number(batch_size, "batch_size", "examples")
    check_whole_number(max_length, "max_length", "tokens")
    if (
        isinstance(examples, str | Path)
        or not isinstance(examples, Sequence)
        or not all(isinstance(e, Example) for e in examples)
    ):
        raise RegmeanError("examples: a list of regmean.Example; read a data file with regmean.load_examples(path)")
    wrong = next((k for k, e in enumerate(examples) if not isinstance(e.text, str)), None)
    if wrong is not None:
        raise RegmeanError(f"examples[{wrong}]: its text is a {type(examples[wrong].text).__name__}, not a string")
    if not examples:
        raise RegmeanError("no examples to measure on")
    if protection is not None and not isinstance(protection, Protection):
        raise RegmeanError(f"protection: a regmean.Protection(...), not a {type(protection).__name__}")


def _check_paths(model_dir, base, checkpoint_dir, provenance, device, progress) -> None:
    check_text(device, "device")
    check_flag(progress, "progress")
    check_path(model_dir, "model_dir")
    check_path(base, "base", optional=True)
    check_path(checkpoint_dir, "checkpoint_dir", optional=True)
    if provenance is not None and not isinstance(provenance, dict):
        raise RegmeanError(f"provenance: a dict of what to record about the data, not {type(provenance).__name__}")


def _loaded(model_dir, base, allow_pickle: bool, examples, device: str, model_dtype: str, max_length: int):
    """The model loaded on `device` (an adapter folded over its base), its tokenizer, the examples as it reads them,
    what the provenance says of both, and the weights' fingerprint (reading every weight: NaN or Inf is refused
    before the model loads); the tokenizer checked against the model and the length."""
    forward = dtypes.named(model_dtype, dtypes.FLOATS, "model dtype")
    check_device(device)
    checkpoint, tokenizer, examples, described = prepare_inputs(model_dir, base, allow_pickle, examples)
    fingerprint = checkpoint.fingerprint
    model = load_adapted(checkpoint, device, forward)
    check_vocabulary_fits(model, tokenizer, tokenizer_folder(checkpoint.folders))
    check_room_for_text(tokenizer, max_length, tokenizer_folder(checkpoint.folders))
    return model, tokenizer, examples, described, fingerprint


def _agreed(resumed: Resumed | None) -> Resumed | None:
    """Every process resumes the blocks rank 0 kept as finished (with rank 0's provenance record), and its own pass
    in progress where that is of the next block."""
    shared: list = [None]
    if distributed.rank() == 0 and resumed is not None and resumed.finished:
        shared = [(len(resumed.finished), resumed.finished[0][1])]
    distributed.collective(dist.broadcast_object_list, shared, src=0)
    finished, record = shared[0] or (0, {})
    resumed = resumed or Resumed()
    if distributed.rank() != 0:
        resumed.finished = [({}, record)] * finished
    if resumed.block != finished:
        resumed.block, resumed.examples, resumed.rows, resumed.stats = finished, 0, {}, {}
    return resumed if finished or resumed.examples else None


def _header(sites, fingerprint, stats_dtype, examples, skipped, protection, private, withheld) -> dict:
    """What the statistics file says beside its sums: sites, model, dtype, examples, what was skipped and why,
    each site's stream, the protection."""
    return {
        "modules": {m: s.name for s in sites for m in s.modules},
        "fingerprint": fingerprint,
        "dtype": stats_dtype,
        "examples": private.counts[Stream.EXAMPLE] if private else examples,
        "skipped": skipped,
        "site_streams": {s.name: (s.stream, s.calls) for s in sites},
        "protection": protection.describe(private and private.release, withheld),
        "privacy": {"withheld": withheld, **(private.record() if private else {})},
    }


class _Passes:
    """The passes over the data, one per block of sites, each continued from a checkpoint where one was left."""

    def __init__(self, model, sums, device, private, batches, first_pass, checkpoint, log):
        self.model, self.sums, self.device, self.private = model, sums, device, private
        self.batches, self.first_pass, self.checkpoint = batches, first_pass, checkpoint
        self.resumed = checkpoint.load() if checkpoint is not None else None
        if checkpoint is not None and distributed.world_size() > 1:
            self.resumed = _agreed(self.resumed)
        if self.resumed is not None and log is not None and distributed.rank() == 0:
            done = f"{len(self.resumed.finished)} block(s) and {self.resumed.examples} examples"
            log(f"resuming the measure interrupted earlier ({done} done; checkpoint {checkpoint.folder})")
        if checkpoint is not None:
            checkpoint.start()
        self.record: ProvenanceRecord = {}

    def run(self, blocks, advance, examples: int, context: dict, header: dict, on_block) -> tuple[dict, dict]:
        """Every block's pass; each finished block to `on_block` (or kept); returns the kept sums and the record."""
        collected: dict[str, SiteStats] = {}
        for b, block in enumerate(blocks):
            part, record = self.block(b, block, advance, examples, context, b == len(blocks) - 1)
            if on_block is None:
                collected.update(part)
            else:
                on_block(Statistics(sites=part, tokens=record["tokens"], provenance=[record], **header), b, len(blocks))
        return collected, self.record

    def block(self, b: int, block: list[Site], advance, examples: int, context: dict, last: bool) -> tuple[dict, dict]:
        """Block `b`'s reduced sums and the provenance record (made on the first pass: every pass reads the same
        tokens)."""
        resumed, checkpoint = self.resumed, self.checkpoint
        if resumed is not None and b < len(resumed.finished):
            part, self.record = resumed.finished[b]
            advance(examples)
            return part, self.record
        acc = Accumulator(self.model, block, self.sums, self.device, self.private and self.private.scales)
        start, rows = 0, None
        if resumed is not None and b == resumed.block and resumed.examples:
            acc.restore(resumed.stats, resumed.examples)
            start, rows = resumed.examples, resumed.rows
            advance(start)
        data = self.first_pass if b == 0 and start == 0 else self.batches(start)
        after = None if checkpoint is None else lambda counted: checkpoint.maybe_save(b, acc.offset, counted, acc.stats)
        rows = acc.pass_over(data, advance, rows, after)
        if b == 0:
            totals = _stream_totals(rows, self.private, self.device)
            self.record = {"examples": context["examples"], **totals, **context}
        part = _reduced(acc, self.device, self.private)
        if checkpoint is not None and not last:  # (the last block is written right away)
            checkpoint.finish_block(b, part, self.record)
        return part, self.record


def statistics_bytes(sites: list[Site], itemsize: int) -> int:
    """What the statistics files take on disk: per site the packed Gram d(d+1)/2 and the sum d (`itemsize` bytes
    each), an int64 count, the header's entries for the three; and room for the metadata."""
    return sum((s.d * (s.d + 1) // 2 + s.d) * itemsize + 8 + 3 * (len(s.name) + 120) for s in sites) + 2**16


def _protected(
    model,
    sites: list[Site],
    skipped: dict[str, str],
    protection: Protection,
    batches,
    sizes: tuple[int, int],
    device: str,
    log,
) -> tuple[list[Site], list[str], PrivateRelease | None]:
    """The sites to measure once the token sites are withheld (if asked; else one line says what they expose),
    the names of those withheld, and the DP release (if asked: its clipping pass runs now); `sizes`: (max_length,
    the count of examples over all processes)."""
    withheld: list[str] = []
    if protection.withhold:
        sites, withheld = withhold_token_sites(model, sites, skipped)
        if not sites:
            raise RegmeanError(
                "no site left to measure once the token sites are withheld (measure's default); "
                "--expose-token-counts measures them"
            )
    else:
        warning = protection.warning(token_site_names(model, sites))
        if warning and log is not None and distributed.rank() == 0:
            log(warning)
    if protection.epsilon is None:
        return sites, withheld, None
    unbounded = [s for s in sites if s.stream in (Stream.FIXED, Stream.MIXED, Stream.ROUTED)]
    for site in unbounded:  # rows that follow no example, or a subset of its tokens: no per-example bound here
        reason = EXPERTS_UNCLIPPED if site.stream == Stream.ROUTED else NO_EXAMPLE_BOUND
        skipped.update(dict.fromkeys(site.modules, reason))
    sites = [s for s in sites if s not in unbounded]
    return sites, withheld, PrivateRelease(model, sites, batches, protection, *sizes, device)


def prepare_inputs(model_dir, base, allow_pickle: bool, examples: Sequence[Example]) -> tuple:
    """The model's checkpoint (an adapter over its base), its tokenizer, the examples as it reads them (chat
    formatted), and what the provenance says of both."""
    if base is not None and not is_adapter(model_dir):
        raise RegmeanError(f"{model_dir}: not a LoRA adapter folder (no adapter_config.json); --base is for adapters")
    checkpoint = open_model(model_dir, base, allow_pickle)
    tokenizer_dir = tokenizer_folder(checkpoint.folders)
    tokenizer = load_tokenizer(tokenizer_dir)
    examples, formatting = render_chat(examples, tokenizer, tokenizer_dir)
    described = {"adapter_of": checkpoint.base.path.name} if len(checkpoint.folders) > 1 else {}
    return checkpoint, tokenizer, examples, {**described, **({"formatting": formatting} if formatting else {})}


def _announcement(
    blocks: list[list[Site]], modules: int, sums: torch.dtype, device: str, examples: int, skipped: dict[str, str]
) -> str:
    """What will be measured, where, in how many passes; and the modules the data never runs, if any."""
    sites = [site for block in blocks for site in block]
    gram_bytes = sum(s.d * (s.d + 1) * sums.itemsize for s in sites)
    passes = f"; {len(blocks)} passes, one block of sites each" if len(blocks) > 1 else ""
    never = [m for m, why in skipped.items() if why == NEVER_CALLED]
    idle = f"\n{len(never)} linear modules never ran on this data (e.g. {never[0]}): not measured" if never else ""
    return (
        f"{len(sites)} sites for {modules} linear modules: {gram_bytes / 1e9:.2f} GB of {dtypes.name(sums)} sums "
        f"on {device}; {examples} examples over {distributed.world_size()} process(es){passes}{idle}"
    )


def _memory_estimate(
    model: torch.nn.Module, blocks: list[list[Site]], sums: torch.dtype, first: Batch, peak: Peak, max_length: int
) -> str:
    """Model + one block's sums + a forward pass's activations, the last measured on the first batch."""
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    block = max(sum(s.d * (s.d + 1) * sums.itemsize for s in b) for b in blocks)
    size, length = first.inputs["input_ids"].shape
    if peak.bytes is None:
        return f"memory: model {human(weights)} + sums {human(block)} + activations (not measurable here)"
    longer = f"; batches longer than {length} tokens (up to {max_length}) take more" if length < max_length else ""
    return (
        f"memory: about {human(weights + block + peak.bytes)} (model {human(weights)}, sums {human(block)}, "
        f"forward pass {human(peak.bytes)} measured on the first batch of {size} x {length} tokens{longer})"
    )


def _reduced(acc: Accumulator, device: str, private: PrivateRelease | None) -> dict[str, SiteStats]:
    """Every process's sums added up on rank 0, one site at a time (never a second copy of all Grams); only rank 0
    keeps them, on the host (so N ranks on one machine never hold N host copies of every Gram), and adds the DP
    noise there, once."""
    for stat in acc.stats.values():
        distributed.sum_to_rank0(stat.gram)
        distributed.sum_to_rank0(stat.sum)
        stat.count = distributed.sum_int(stat.count, device)
    if distributed.rank() != 0:
        return {}
    reduced = {n: SiteStats(st.gram.cpu(), st.sum.cpu(), st.count) for n, st in acc.stats.items()}
    if private is not None:
        reduced = {s.name: private.noisy(s, reduced[s.name]) for s in acc.sites}
    return reduced


def _stream_totals(rows: dict[str, int], private: PrivateRelease | None, device: str) -> dict[str, int]:
    """The provenance's rows of every stream (`stats_checks.STREAM_TOTALS`: tokens, decoder tokens), over all
    processes; under DP the noisy counts the sites' counts are made of."""
    totals = {"tokens": Stream.INPUT} | ({"decoder_tokens": Stream.DECODER} if Stream.DECODER in rows else {})
    if private is not None:
        return {key: private.counts[stream] for key, stream in totals.items()}
    return {key: distributed.sum_int(rows[stream], device) for key, stream in totals.items()}


def _chain(first: Batch, rest: Iterator[Batch]) -> Iterator[Batch]:
    yield first
    yield from rest
