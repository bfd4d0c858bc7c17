"""A merge divided among processes (torchrun, or `regmean merge --nproc N`): every rank plans the same steps and
output layout from the headers, runs its share of the steps and writes their tensors straight to their offsets in
the shared output shards; rank 0 creates the shards, writes headers, index, card and report, and reveals the folder
only after every rank has finished. The output folder must be on a filesystem every rank sees.

A rank that fails makes torchrun stop the others; rank 0's staging folder is then removed (or, if rank 0 itself was
killed, left under its hidden staging name and removed by the next merge into that output), so nothing that looks
complete is left.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Protocol

import torch.distributed as dist

from regmean import distributed
from regmean.distributed import PeerFailed
from regmean.errors import RegmeanError
from regmean.io.outputs import check_output_path
from regmean.io.writer import ShardedWriter
from regmean.merge.config import MergeConfig
from regmean.merge.files import FAILED_MARK
from regmean.merge.inputs import MergeInputs, open_inputs
from regmean.merge.journal import Journal, remove_journals, resume_key
from regmean.merge.output import OutputRequest, output_folders, write_output
from regmean.merge.plan import Planned, head_bytes
from regmean.merge.report import MergeReport
from regmean.merge.staging import check_output_dir
from regmean.methods import METHODS
from regmean.methods.base import Computed, MergeMethod, Step

FINISH_TIMEOUT = timedelta(days=7)
SECONDS_PER_FLOP = 1 / 50e9
SECONDS_PER_BYTE = 1 / 1e9
"""Relative weights of arithmetic and reading when steps are divided (a CPU's order of magnitude: only the
balance between the two matters)."""


def divide(steps: list[Step], ranks: int, rank0_bytes: int = 0) -> list[list[int]]:
    """Each rank's step numbers, in plan order: units (the blocks of one tensor stay together) given, largest
    first, to the least loaded rank, by estimated time (arithmetic for solved sites, bytes for plain tensors).
    Rank 0 starts loaded with `rank0_bytes` it reads besides (the heads it copies)."""
    units: dict[tuple[str, ...], list[int]] = {}
    for number, step in enumerate(steps):
        units.setdefault(step.outputs, []).append(number)
    costs = {key: sum(_seconds(steps[n]) for n in numbers) for key, numbers in units.items()}
    loads, shares = [rank0_bytes * SECONDS_PER_BYTE] + [0.0] * (ranks - 1), [[] for _ in range(ranks)]
    for key in sorted(units, key=lambda k: (-costs[k], units[k][0])):
        rank = min(range(ranks), key=lambda r: (loads[r], r))
        loads[rank] += costs[key]
        shares[rank] += units[key]
    return [sorted(share) for share in shares]


def _seconds(step: Step) -> float:
    cost = step.cost
    return cost.flops * SECONDS_PER_FLOP + (cost.read_bytes + cost.streamed_bytes) * SECONDS_PER_BYTE


class StepRunner(Protocol):
    """How this process plans a merge and runs steps (the engine's loop; `merge.engine.LocalRunner`)."""

    device: str
    """Where the steps compute (cpu, cuda:N)."""

    def plan(self, inputs: MergeInputs, log) -> Planned: ...

    def run(
        self, method: MergeMethod, steps: list[tuple[int, Step]], writers: list[ShardedWriter], heads: bool, journal
    ) -> dict[int, Computed]:
        """The numbered steps (and, with `heads`, the kept heads) written, journaled; their diagnostics."""


def merge_on_ranks(config: MergeConfig, request: OutputRequest, runner: StepRunner) -> MergeReport | None:
    """The merge as one rank of many. Returns the report on rank 0, None elsewhere. Each rank journals its steps
    beside rank 0's journal in the staging folder: an interrupted merge rerun on as many processes continues after
    every rank's finished steps."""
    if not METHODS[config.method].splits_across_processes:
        raise RegmeanError(f"method {config.method} runs in one process; drop --nproc / torchrun")
    rank, ranks = distributed.rank(), distributed.world_size()
    # on every rank: all fail alike, before any work
    check_output_dir(check_output_path(request.out_dir, request.sources), request.force)
    # the last exchange waits for the slowest rank, however long its share takes
    finish_group = distributed.collective(dist.new_group, backend="gloo", timeout=FINISH_TIMEOUT)
    inputs = open_inputs(config)
    ready = runner.plan(inputs, request.log if rank == 0 else None)
    method, steps, form = ready.method, ready.steps, ready.form
    key = resume_key(config, request.sources, form, method, steps, request.shard_bytes, runner.device)
    mine = [(n, steps[n]) for n in divide(steps, ranks, head_bytes(inputs))[rank]]
    if rank != 0:
        staged = _shared([None])
        try:
            writers = form.writers(output_folders(inputs, staged), request.shard_bytes, create=False)
            results = runner.run(method, mine, writers, False, key and Journal(staged, key, rank))
        except RegmeanError as exc:
            if not isinstance(exc, PeerFailed):  # bad input, not an interruption: nothing to keep for a rerun
                (staged / f"{FAILED_MARK}{rank}").touch()
            raise
        _gather(writers, results, finish_group)
        return None

    def fill(writers: list[ShardedWriter], staged: Path) -> MergeReport:
        journal = key and Journal(staged, key, 0)  # (written before the other ranks look at the folder)
        _shared([staged])  # the shards exist: the other ranks open them
        report = _finish(method, writers, runner.run(method, mine, writers, True, journal), finish_group)
        remove_journals(staged)  # every rank is done: nothing is left to resume
        return report

    return write_output(request, form, ready.plan.write_bytes, fill, resume_key=key)


def _shared(value: list) -> Path:
    """Rank 0's staging folder, known to every rank once rank 0 has created the shards in it."""
    distributed.collective(dist.broadcast_object_list, value, src=0)
    return Path(value[0])


def _gather(writers: list[ShardedWriter], results: dict[int, Computed], group) -> list:
    """Send this rank's written bytes and diagnostics to rank 0 (after its files are flushed)."""
    for w in writers:
        w.close()
    sent = ([w.written() for w in writers], results)
    gathered: list = [None] * distributed.world_size() if distributed.rank() == 0 else []
    distributed.collective(dist.gather_object, sent, gathered if distributed.rank() == 0 else None, dst=0, group=group)
    return gathered


def _finish(method: MergeMethod, writers: list[ShardedWriter], results: dict[int, Computed], group) -> MergeReport:
    """Rank 0: every rank's writes and diagnostics, the shards completed and named, the report in step order."""
    everything = dict(results)
    for written, share in _gather(writers, {}, group)[1:]:
        for w, counts in zip(writers, written, strict=True):
            w.add_written(counts)
        everything.update(share)
    for w in writers:
        w.finish()
    return MergeReport.of_steps(method, everything)


def check_divisible(recipe: Path) -> None:
    """The recipe parses, its method divides among processes, and its statistics files open (headers only): what
    every rank would refuse alike, said once before any process starts (`merge --nproc`)."""

    config = MergeConfig.from_file(recipe)
    method = METHODS[config.method]
    if not method.splits_across_processes:
        raise RegmeanError(f"method {config.method} runs in one process; drop --nproc / torchrun")
    problems: list[str] = []
    for model in config.models if method.statistics else []:
        try:
            method.statistics.reader(model.statistics)
        except RegmeanError as exc:
            problems += exc.problems
    if problems:
        raise RegmeanError(problems)
