"""Write merged model folders atomically: weights, config, tokenizer, model card, recipe and report."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from regmean import __version__
from regmean.io.metadata import describe_record
from regmean.io.outputs import Inputs, check_free_space
from regmean.io.writer import Layout, ShardedWriter
from regmean.merge.files import CARD, COPIED_PATTERNS, RECIPE, REPORT, STAGING_MARK
from regmean.merge.report import MergeReport
from regmean.merge.staging import staged_output

if TYPE_CHECKING:
    from collections.abc import Callable

    from regmean.merge.inputs import MergeInputs

MAX_RECORDS = 20
"""Provenance records shown per model in the model card (all of them stay in the statistics file)."""


def write_output(
    out_dir: Path,
    force: bool,
    sources: Inputs,
    log,
    inputs: MergeInputs,
    write_bytes: int,
    layouts: list[Layout],
    shard_bytes: int,
    fill: Callable[[list[ShardedWriter], Path], MergeReport],
) -> MergeReport:
    """The merged folder(s), staged: shards laid out from `layouts`; `fill(writers, staged)` writes every tensor,
    completes the shards and returns the report; then config, tokenizer, card, recipe and report. The folder is
    revealed only when all of it is done."""
    with staged_output(out_dir, force, sources, log) as staged:
        check_free_space(staged, write_bytes, "the merged model", out_dir)
        folders = output_folders(inputs, staged)
        writers = [ShardedWriter(f, layout, shard_bytes) for f, layout in zip(folders, layouts, strict=True)]
        report = fill(writers, staged)
        finish_folders(inputs, folders, staged, report, out_dir)
    return report


def output_folders(inputs: MergeInputs, staged: Path) -> list[Path]:
    """heads: merge -> one folder; heads: keep -> one per input model (merged body + that model's head)."""
    if inputs.config.heads == "merge":
        return [staged]
    return [staged / name for name in output_names([Path(m.path) for m in inputs.config.models])]


def finish_folders(inputs: MergeInputs, folders: list[Path], staged: Path, report: MergeReport, out_dir: Path) -> None:
    """Config, tokenizer, model card, recipe and report next to the weights (staged; revealed at `out_dir`)."""
    vocab = inputs.vocab
    for k, folder in enumerate(folders):
        model = inputs.models[vocab.tokenizer_model if vocab else k]  # a grown vocabulary: the most tokens
        for source in model.folders:  # an adapter's own tokenizer files over its base's
            for pattern in COPIED_PATTERNS:
                for file in source.glob(pattern):
                    if file.is_file():
                        shutil.copy2(file, folder / file.name)
        if vocab is not None:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config, "vocab_size": vocab.total}, indent=2) + "\n")
        own = k if inputs.config.heads == "keep" else None
        (folder / CARD).write_text(model_card(inputs, report, own_head=own))
        _write_recipe(folder, inputs, report, out_dir / folder.relative_to(staged))
    if folders != [staged]:
        _write_recipe(staged, inputs, report, out_dir)


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


def _write_recipe(folder: Path, inputs: MergeInputs, report: MergeReport, final: Path) -> None:
    """The recipe, its paths relative to the folder's final place `final` (it replays from there), and the report,
    which lists every file of the folder: what --force may replace later."""
    (folder / RECIPE).write_text(inputs.config.relative_to(final).to_yaml())
    files = sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != STAGING_MARK
    )
    (folder / REPORT).write_text(json.dumps({**report.to_dict(), "files": sorted([*files, REPORT])}, indent=1))


def _vocabulary_line(inputs: MergeInputs) -> str:
    config, vocab = inputs.config, inputs.vocab
    taken = f"from `{config.tokenizer_source}`" if config.tokenizer_source else "averaged over the models with them"
    return (
        f"- vocabularies grown by added tokens ({', '.join(map(str, vocab.rows))} rows): {vocab.shared} shared "
        f"rows merged; {vocab.total - vocab.shared} added rows {taken}; tokenizer and config of "
        f"`{config.models[vocab.tokenizer_model].path}`"
    )


def _tokenizer_line(inputs: MergeInputs, own_head: int | None) -> str:
    """Whose tokenizer and config the folder has, and which models had no tokenizer files (their vocabulary could
    not be checked against the others')."""
    from regmean.vocabulary import without_tokenizer

    paths = [entry.path for entry in inputs.config.models]
    source = inputs.vocab.tokenizer_model if inputs.vocab else own_head or 0
    without = without_tokenizer(inputs)
    line = f"- tokenizer and config: from `{paths[source]}`"
    if str(paths[source]) in without:
        line = f"- config from `{paths[source]}`, which has no tokenizer files: this folder has none (copy one in)"
    if without:
        line += f"; without tokenizer files, their vocabulary unchecked: {', '.join(f'`{p}`' for p in without)}"
    return line


def _config_lines(inputs: MergeInputs) -> list[str]:
    """Where the models' configs differ (the folder has one's), each difference."""
    from regmean.merge.inputs import config_differences

    differences = config_differences(inputs)
    return [f"- configs differ: {'; '.join(f'`{d}`' for d in differences)}"] if differences else []


def model_card(inputs: MergeInputs, report: MergeReport, own_head: int | None = None) -> str:
    config = inputs.config
    lines = [
        "---",
        "library_name: transformers",
        "tags: [merge, regmean]",
        "---",
        "",
        f"# Merged model ({config.method})",
        "",
        f"Made with regmean {__version__}: `{config.method}` over {len(config.models)} models of architecture "
        f"`{inputs.models[0].architecture}`.",
        "",
        "## Models",
        "",
        f"| # | model | weight | weights hash | {'data' if report.data else 'statistics'} (examples, tokens) |",
        "|---|---|---|---|---|",
    ]
    for k, (entry, ckpt) in enumerate(zip(config.models, inputs.models, strict=True)):
        measured = inputs.stats[k].describe() if inputs.stats else "-"
        if report.data:
            measured = (
                f"{report.data[k]['examples']:,} examples, {report.data[k]['tokens']:,} tokens (read while merging)"
            )
        # the weights hash is read in full only when statistics were checked against it; not for data-free merges
        digest = ckpt.__dict__.get("fingerprint", {}).get("weights", "not computed")[:16]
        over = f" (LoRA adapter over `{ckpt.folders[0]}`)" if len(ckpt.folders) > 1 else ""
        lines.append(f"| {k} | `{entry.path}`{over} | {entry.weight} | {digest} | {measured} |")
    lines += ["", "## Recipe", "", f"- method: `{config.method}`"]
    lines += [f"- {k}: `{v}`" for k, v in config.options.items()]
    lines.append(f"- heads: `{config.heads}` (head modules: {', '.join(inputs.heads) or 'none'})")
    if own_head is not None:
        lines.append(f"- this folder: the merged body with the head of model {own_head}")
    lines.append(f"- embeddings: `{config.embeddings}`; LM head: `{config.lm_head}`")
    if inputs.vocab is not None:
        lines.append(_vocabulary_line(inputs))
    lines.append(_tokenizer_line(inputs, own_head))
    lines += _config_lines(inputs)
    if config.base_model:
        lines.append(f"- base model: `{config.base_model}`")
    s = report.summary()
    if s["regmean_layers"]:
        lines += [
            "",
            "## Diagnostics",
            "",
            f"- {s['regmean_layers']} linear layers merged by RegMean; {s['ridge_layers']} needed a ridge",
            f"- relative reconstruction error on each model's own statistics: mean {s['mean_relative_error']:.4g}, "
            f"max {s['max_relative_error']:.4g}"
            + (
                f" (estimated on sampled output rows in {s['sampled_layers']} layers, standard error at most "
                f"{s['max_error_stderr']:.2g}; `diagnostics: exact` checks every row)"
                if s["sampled_layers"]
                else ""
            ),
            f"- relative residual of the solved systems: at most {s['max_residual']:.2g}",
            f"- matrices averaged instead: {len(report.averaged)}"
            + "".join(f"\n  - {n} {reason}" for reason, n in Counter(report.averaged.values()).most_common()),
        ]
        lines += [f"- {note}" for note in report.notes]
    if inputs.stats:
        lines += ["", "## Statistics provenance", ""]
        for k, st in enumerate(inputs.stats):
            records = st.provenance  # one record per measuring run (several after combine)
            lines += [f"- model {k}: {describe_record(record)}" for record in records[:MAX_RECORDS]]
            if len(records) > MAX_RECORDS:
                lines.append(f"- model {k}: ... and {len(records) - MAX_RECORDS} more measuring runs")
    if report.data:
        lines += ["", "## Data provenance", ""]
        lines += [f"- model {k}: {describe_record(record)}" for k, record in enumerate(report.data)]
    lines += ["", "The full recipe is in `merge_config.yaml`, per-layer diagnostics in `merge_report.json`.", ""]
    return "\n".join(lines)
