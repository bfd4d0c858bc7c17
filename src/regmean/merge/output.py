"""Write merged model folders atomically: weights, config, tokenizer, model card, recipe and report."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from regmean.io.outputs import Inputs, check_free_space
from regmean.io.tensorfile import StagedFileChanged
from regmean.io.writer import ShardedWriter
from regmean.merge.card import model_card
from regmean.merge.files import CARD, RECIPE, REPORT, STAGING_MARK
from regmean.merge.report import MergeReport
from regmean.merge.staging import clear_staged, staged_output

if TYPE_CHECKING:
    from collections.abc import Callable

    from regmean.merge.forms import ModelFolders
    from regmean.merge.inputs import MergeInputs


@dataclass(frozen=True)
class OutputRequest:
    """What the caller asked of a merge's output: where it goes, whether it may replace what is there, the inputs it
    must never write over, its largest shard, and who hears what happens (None: nobody)."""

    out_dir: Path
    force: bool
    sources: Inputs
    shard_bytes: int
    log: Callable[[str], None] | None = None


def write_output(
    request: OutputRequest,
    form: ModelFolders,
    write_bytes: int,
    fill: Callable[[list[ShardedWriter], Path], MergeReport],
    resume_key: str | None = None,
) -> MergeReport:
    """The merged folder(s), staged: `form` lays out the weights (model shards, or an adapter); `fill(writers,
    staged)` writes every tensor, completes the files and returns the report; then config, tokenizer, card, recipe
    and report. The folder is revealed only when all of it is done. With `resume_key`, an interrupted run's staged
    files of that key are written into again (`merge.journal`)."""
    from regmean.merge.journal import journal_key

    inputs, out_dir = form.inputs, request.out_dir
    with staged_output(out_dir, request.force, request.sources, request.log, resume_key) as staged:
        folders = output_folders(inputs, staged)
        writers = None
        if resume_key is not None and journal_key(staged) == resume_key:
            writers = _reopened(form, folders, request, staged)
        if writers is None:  # (a resumed merge's shards are laid out at their full size already)
            check_free_space(staged, write_bytes, f"the merged {form.kind}", out_dir)
            writers = form.writers(folders, request.shard_bytes, create=True)
        report = fill(writers, staged)
        finish_folders(form, folders, staged, report, out_dir)
    return report


def _reopened(form: ModelFolders, folders: list[Path], request: OutputRequest, staged: Path) -> list | None:
    """The interrupted merge's staged files, opened to write on, or None where one is gone or altered: then the
    staging folder is emptied (its journal too) and the merge starts over, said."""
    try:
        return form.writers(folders, request.shard_bytes, create=False)
    except StagedFileChanged as exc:
        clear_staged(staged)
        if request.log is not None:
            request.log(f"{exc.problems[0]}: starting the merge over")
        return None


def output_folders(inputs: MergeInputs, staged: Path) -> list[Path]:
    """heads: merge -> one folder; heads: keep -> one per input model (merged body + that model's head)."""
    if inputs.config.heads == "merge":
        return [staged]
    return [staged / name for name in output_names([Path(m.path) for m in inputs.config.models])]


def finish_folders(form: ModelFolders, folders: list[Path], staged: Path, report: MergeReport, out_dir: Path) -> None:
    """Config, tokenizer, model card, recipe and report next to the weights (staged; revealed at `out_dir`)."""
    inputs = form.inputs
    vocab = inputs.vocab
    for k, folder in enumerate(folders):
        model = inputs.models[vocab.tokenizer_model if vocab else k]  # a grown vocabulary: the most tokens
        for source in model.folders:  # an adapter's own tokenizer files over its base's
            for pattern in form.copied_patterns:
                for file in source.glob(pattern):
                    if file.is_file():
                        shutil.copy2(file, folder / file.name)
        form.finish_folder(folder, k)
        own = k if inputs.config.heads == "keep" else None
        recipe = inputs.config.relative_to(out_dir / folder.relative_to(staged)).to_yaml()
        (folder / CARD).write_text(model_card(inputs, report, recipe, own_head=own))
        _write_recipe(folder, recipe, report)
    if folders != [staged]:
        _write_recipe(staged, inputs.config.relative_to(out_dir).to_yaml(), report)


def output_names(models: list[Path]) -> list[str]:
    """Folder names of a heads: keep merge: each input folder's own name reduced to letters, digits, '.', '-' and
    '_' (so never '..', a separator or an absolute part), numbered when two collide (case-insensitively too) or
    when one would take the name of a file the merge writes beside them."""
    plain = [Path(os.path.normpath(os.path.abspath(m))).name for m in models]  # as written: symlinks not followed
    names = [re.sub(r"[^A-Za-z0-9._-]+", "_", n).lstrip(".") or f"model_{k}" for k, n in enumerate(plain)]
    taken = [n.lower() for n in names] + [f.lower() for f in (CARD, RECIPE, REPORT)]
    if len(set(taken)) < len(taken):
        names = [f"{k}_{n}" for k, n in enumerate(names)]
    return names


def _write_recipe(folder: Path, recipe: str, report: MergeReport) -> None:
    """The recipe (its paths relative to the folder's final place: it replays from there) and the report, which
    lists every file of the folder: what --force may replace later."""
    (folder / RECIPE).write_text(recipe)
    files = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != STAGING_MARK
    )
    (folder / REPORT).write_text(json.dumps({**report.to_dict(), "files": sorted([*files, REPORT])}, indent=1))
