"""The merge loop: the method's steps, each loaded on a reader thread while the previous one computes, written
straight into the output shards. The engine knows no method: what to read and how to compute is the method's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from regmean import distributed
from regmean.devices import check_device
from regmean.errors import RegmeanError, check_flag, check_path, check_text
from regmean.io.outputs import check_output_path
from regmean.io.writer import DEFAULT_SHARD_BYTES, ShardedWriter
from regmean.merge.config import MergeConfig
from regmean.merge.forms import output_form
from regmean.merge.inputs import MergeInputs, config_differences, config_note, open_inputs
from regmean.merge.journal import Journal, resume_key, written_since
from regmean.merge.output import OutputRequest, write_output
from regmean.merge.parallel import merge_on_ranks
from regmean.merge.plan import MergePlan, Planned, check_memory, check_resident, make_plan
from regmean.merge.report import MergeReport
from regmean.merge.staging import check_output_dir
from regmean.methods import METHODS
from regmean.methods.base import Computed, MergeMethod, Step
from regmean.progress import progress as show_progress
from regmean.units import parse_size
from regmean.vocabulary import unchecked_note


def merge(
    config: MergeConfig | dict | str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    dry_run: bool = False,
    shard_size: int | str = DEFAULT_SHARD_BYTES,
    max_memory: int | str | None = None,
    device: str = "cpu",
    log=None,
    lora_rank: int | None = None,
) -> MergeReport | MergePlan | None:
    """Merge the models of `config` (a MergeConfig, a recipe mapping, or a YAML path) into `out_dir`.

    With heads: merge, `out_dir` is one model folder; with heads: keep, it holds one folder per input model (the
    merged body plus that model's own head). The plan (bytes, peak memory estimate) is computed first and passed to
    `log`; `dry_run` returns it without merging; `max_memory` refuses a merge whose estimate exceeds it. Tensors are
    read one at a time and written in shards of `shard_size`; nothing is left in `out_dir` unless the merge completes.
    `lora_rank` writes one LoRA adapter of that rank over the base model instead (the recipe's `output.lora`).
    `device` (cpu, cuda, cuda:N) is where the steps compute, for methods that can (RegMean, average); the reader
    thread stages each step's inputs there while the previous step computes. Under torchrun the steps are divided
    among the ranks (`merge.parallel`), and only rank 0 returns the report (the others None).
    """
    check_path(out_dir, "out_dir")
    for flag, name in ((force, "force"), (progress, "progress"), (dry_run, "dry_run")):
        check_flag(flag, name)
    check_text(device, "device")
    if log is not None and not callable(log):
        raise RegmeanError(f"log {log!r}: give a function of one line of text (e.g. print), or None")
    sources: list[tuple[str, Path]] = []
    if isinstance(config, dict):  # a recipe as a mapping, its relative paths taken from the working folder
        config = MergeConfig.parse(config, source="recipe", root=Path.cwd())
    if not isinstance(config, MergeConfig | str | Path):
        raise RegmeanError(f"merge: a recipe (a MergeConfig, a mapping, or a YAML path), not a {type(config).__name__}")
    if not isinstance(config, MergeConfig):
        sources.append(("recipe", Path(config)))
        config = MergeConfig.from_file(config)
    if lora_rank is not None:
        config = config.with_lora(lora_rank)
    sources += config.input_paths()
    out_dir = Path(out_dir)
    shard_bytes = parse_size(shard_size, "--shard-size")
    memory_limit = None if max_memory is None else parse_size(max_memory, "--max-memory")
    check_device_method(config.method, device)
    if dry_run:
        return LocalRunner(memory_limit, device, progress).plan(open_inputs(config), log).plan
    request = OutputRequest(out_dir, force, sources, shard_bytes, log)
    if distributed.launched():
        return merge_on_ranks(config, request, LocalRunner(memory_limit, distributed.init_from_env(device), progress))
    check_output_dir(check_output_path(out_dir, sources), force)  # before the inputs are opened and planned
    ready = LocalRunner(memory_limit, device, progress).plan(open_inputs(config), log)
    key = resume_key(config, sources, ready.form, ready.method, ready.steps, shard_bytes, device)
    fill = _journaled(ready.method, ready.steps, progress, key)
    return write_output(request, ready.form, ready.plan.write_bytes, fill, resume_key=key)


def _journaled(method: MergeMethod, steps: list[Step], progress: bool, key: str | None):
    """The writing of one process's merge: every step, journaled in the staging folder so that an interrupted run
    resumes (`merge.journal`; not without a `key`); the journal goes once the shards are complete."""

    def fill(writers: list[ShardedWriter], staged: Path) -> MergeReport:
        journal = None if key is None else Journal(staged, key)
        report = merge_into(method, steps, writers, progress, journal)
        if journal is not None:
            journal.close()
            journal.path.unlink()
        for w in writers:
            w.finish()
        return report

    return fill


def check_device_method(method: str, device: str) -> None:
    """Refuse, before any work, a device this machine lacks or a method that computes only on the CPU."""
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = "cpu"  # not a device name: check_device says so
    if kind != "cpu" and not METHODS[method].runs_on_device:
        on_device = ", ".join(name for name, cls in METHODS.items() if cls.runs_on_device)
        raise RegmeanError(f"--device {device}: method {method} merges on the CPU only ({on_device} run on a device)")
    if kind not in ("cpu", "cuda"):  # the solves are float64, which e.g. MPS lacks
        raise RegmeanError(f"--device {device}: merges run on cpu or cuda[:N]")
    check_device(device)


@dataclass(frozen=True)
class LocalRunner:
    """This process's way of planning a merge and running its steps (`merge.parallel.StepRunner`): on `device`,
    within `memory_limit` bytes, with a progress bar if `progress`."""

    memory_limit: int | None
    device: str = "cpu"
    progress: bool = True

    def plan(self, inputs: MergeInputs, log) -> Planned:
        """The method bound to the inputs, its steps, the output form and the plan (said to `log`, checked against
        the limit)."""
        method = METHODS[inputs.config.method](inputs, self.device)
        check_resident(method.resident_bytes(), self.memory_limit)
        form = output_form(inputs)  # (before the steps: an adapter needs some tensors whole)
        steps = method.plan()
        plan = make_plan(inputs, method, steps, form.layouts, self.device)
        plan.note = "; ".join(part for part in (plan.note, form.describe()) if part)
        plan.working_bytes = max(plan.working_bytes, form.working_bytes())
        if not form.resumable(method):
            plan.note += f"; an adapter output of {method.name} does not resume if interrupted"
        if log is not None:
            log(plan.describe())
            differences = config_differences(inputs)
            for note in [unchecked_note(inputs)] + [config_note(differences)] * bool(differences):
                if note:
                    log(note)
        check_memory(plan, self.memory_limit)
        return Planned(plan, method, steps, form)

    def run(
        self, method: MergeMethod, steps: list[tuple[int, Step]], writers: list[ShardedWriter], heads: bool, journal
    ) -> dict[int, Computed]:
        """One rank's steps (and, on rank 0, the heads), journaled, with a progress bar on rank 0 only."""
        results = run_steps(method, steps, writers, self.progress and heads, journal)
        if heads:
            write_heads(method.inputs, writers)
        if journal is not None:  # (rank 0 removes every rank's journal once all are done)
            journal.close()
        return results


def merge_into(
    method: MergeMethod, steps: list[Step], writers: list[ShardedWriter], progress: bool = True, journal=None
):
    """Run every step, writing its tensors to every writer; then, with heads: keep, each model's own head to its
    writer. A reader thread loads the next step's inputs while this one computes, so I/O overlaps the arithmetic.
    With a `journal`, the steps it records as finished are skipped and each finished step is recorded."""
    results = run_steps(method, list(enumerate(steps)), writers, progress, journal)
    write_heads(method.inputs, writers)
    return MergeReport.of_steps(method, results)


def run_steps(
    method: MergeMethod, steps: list[tuple[int, Step]], writers: list[ShardedWriter], progress=True, journal=None
) -> dict[int, Computed]:
    """Run the numbered steps in order, writing their tensors; returns each step's diagnostics (its tensors
    dropped), by number."""
    results = resumed(method, steps, writers, journal)
    todo = [(number, step) for number, step in steps if number not in results]
    shown = show_progress("merging", "steps", len(steps), len(results), progress)
    with shown as advance, ThreadPoolExecutor(1, "regmean-reader") as reader:
        pending = reader.submit(method.load, todo[0][1]) if todo else None
        for i, (number, step) in enumerate(todo):
            data = pending.result()
            pending = reader.submit(method.load, todo[i + 1][1]) if i + 1 < len(todo) else None
            computed = method.compute(step, data)
            del data
            before = [w.written() for w in writers] if journal else []
            write_step(computed, writers)
            if journal:
                journal.record(number, computed, written_since(before, writers))
            results[number] = computed
            advance(1)
    return results


def write_step(computed: Computed, writers: list[ShardedWriter]) -> None:
    """A step's tensors into every writer (with the metric each was solved in, for a low-rank output); what the
    first writer says of them goes into the step's notes. The tensors are dropped."""
    for name, tensor in computed.tensors.items():
        tensor = tensor.to("cpu")  # from the compute device (no copy on the CPU)
        metric = computed.metrics.get(name)
        metric = None if metric is None else metric.to("cpu")
        for i, w in enumerate(writers):
            note = w.add(name, tensor, computed.first_row, metric)
            if note is not None and i == 0:
                computed.notes.append(note)
    computed.tensors, computed.metrics = {}, {}


def resumed(method: MergeMethod, steps: list[tuple[int, Step]], writers: list[ShardedWriter], journal) -> dict:
    """The steps an interrupted run finished (from its journal): counted as written, given back to the method."""
    if journal is None or not journal.done:
        return {}
    results = journal.restore(writers)
    for number, step in steps:
        if number in results:
            method.restore(step, lambda key, rows=step.rows: writers[0].read(key, rows))
    return results


def write_heads(inputs: MergeInputs, writers: list[ShardedWriter]) -> None:
    """With heads: keep, each model's own head into its folder."""
    for key in inputs.head_keys():
        for model, w in zip(inputs.models, writers, strict=True):
            w.add(key, model.get(key))
