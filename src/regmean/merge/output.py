"""Write merged model folders atomically: weights, config, tokenizer, model card, recipe and report."""

from __future__ import annotations

import glob
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from regmean import __version__
from regmean.errors import RegmeanError, one_line
from regmean.io.checkpoint import SAFETENSORS_INDEX
from regmean.io.metadata import describe_record
from regmean.io.outputs import Inputs, check_output_path, listing, new_folders, output_lock, remove_if_empty

if TYPE_CHECKING:
    from regmean.merge.engine import MergeReport
    from regmean.merge.inputs import MergeInputs

# config, generation settings and every tokenizer file format transformers writes
COPIED_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "spiece.model",
    "sentencepiece*.model",
    "chat_template.*",
)


WEIGHT_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", SAFETENSORS_INDEX)
OWN_FILES = ("README.md", "merge_config.yaml", "merge_report.json")
STAGING_MARK = ".regmean-staging"
MAX_RECORDS = 20
"""Provenance records shown per model in the model card (all of them stay in the statistics file)."""


def foreign_entries(out_dir: Path) -> list[Path]:
    """What in an existing output folder regmean did not write: everything, unless the folder holds a
    merge_report.json and only the files a merge writes (and per-model folders of the same kind)."""
    entries = list(out_dir.iterdir())
    if not (out_dir / "merge_report.json").is_file():
        return entries
    ours = (*COPIED_PATTERNS, *WEIGHT_PATTERNS, *OWN_FILES)
    foreign = []
    for entry in entries:
        if entry.is_symlink():
            foreign.append(entry)
        elif entry.is_dir():
            inner = foreign_entries(entry) if (entry / "merge_report.json").is_file() else [entry]
            foreign += [entry] if inner else []
        elif not any(entry.match(pattern) for pattern in ours):
            foreign.append(entry)
    return foreign


def check_output_dir(out_dir: Path, force: bool) -> None:
    """Refuse a non-empty output without --force, and with --force anything but a folder a merge wrote."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise RegmeanError(f"{out_dir}: exists and is not a folder; choose another output")
    if not any(out_dir.iterdir()):
        return
    if not force:
        raise RegmeanError(f"{out_dir}: exists and is not empty; choose another folder or pass --force to replace it")
    foreign = foreign_entries(out_dir)
    if foreign:
        raise RegmeanError(
            f"{out_dir}: --force replaces only a folder regmean merged, but it holds {listing(foreign, out_dir)}; "
            "move those away or choose another folder (nothing was deleted)"
        )


@contextmanager
def staged_output(out_dir: Path, force: bool, inputs: Inputs, log=None) -> Iterator[Path]:
    """A staging folder beside `out_dir`, renamed to `out_dir` only when the block completes: an interrupted or
    failed merge leaves nothing that looks like a finished model folder.

    Before any work: the output is checked against every input and what --force may replace, locked against a
    second writer, and staging folders left by killed runs into the same output are removed."""
    check_output_path(out_dir, inputs)
    check_output_dir(out_dir, force)
    made = new_folders(out_dir.parent)
    try:
        with _locked_staging(out_dir, force, log) as tmp:
            yield tmp
    except BaseException:
        remove_if_empty(made)  # a failed merge leaves no folder it made
        raise


@contextmanager
def _locked_staging(out_dir: Path, force: bool, log) -> Iterator[Path]:
    with output_lock(out_dir):
        for stale in _left_by_killed_runs(out_dir):
            shutil.rmtree(stale)
            if log is not None:
                log(f"removed {stale}, left by an interrupted merge into {out_dir}")
        try:
            tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
            (tmp / STAGING_MARK).touch()
        except OSError as exc:
            raise RegmeanError(f"{out_dir.parent}: cannot write here ({exc.strerror})") from None
        try:
            yield tmp
            (tmp / STAGING_MARK).unlink()
            _replace(tmp, out_dir, force)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def _left_by_killed_runs(out_dir: Path) -> list[Path]:
    """Staging folders (marked) and set-aside old outputs (holding only `out_dir`'s name) of runs that died."""
    name = glob.escape(out_dir.name)
    staging = [p for p in out_dir.parent.glob(f".{name}.partial-*") if (p / STAGING_MARK).is_file()]
    old = [p for p in out_dir.parent.glob(f".{name}.old-*") if [e.name for e in p.iterdir()] == [out_dir.name]]
    return staging + old


def _replace(tmp: Path, out_dir: Path, force: bool) -> None:
    """Move the finished folder into place; an old output is set aside first and deleted only afterwards."""
    check_output_dir(out_dir, force)  # again: files may have appeared during the merge
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        out_dir.rename(old / out_dir.name)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old)


def output_folders(inputs: MergeInputs, staged: Path) -> list[Path]:
    """heads: merge -> one folder; heads: keep -> one per input model (merged body + that model's head)."""
    if inputs.config.heads == "merge":
        return [staged]
    return [staged / name for name in output_names([Path(m.path) for m in inputs.config.models])]


def finish_folders(inputs: MergeInputs, folders: list[Path], staged: Path, report: MergeReport) -> None:
    """Config, tokenizer, model card, recipe and report next to the weights."""
    for k, folder in enumerate(folders):
        source = Path(inputs.config.models[k].path)
        for pattern in COPIED_PATTERNS:
            for file in source.glob(pattern):
                if file.is_file():
                    shutil.copy2(file, folder / file.name)
        own = k if inputs.config.heads == "keep" else None
        (folder / "README.md").write_text(model_card(inputs, report, own_head=own))
        _write_recipe(folder, inputs, report)
    if folders != [staged]:
        _write_recipe(staged, inputs, report)


def output_names(models: list[Path]) -> list[str]:
    """Folder names of a heads: keep merge: each input folder's own name reduced to letters, digits, '.', '-' and
    '_' (so never '..', a separator or an absolute part), numbered when two collide (case-insensitively too) or
    when one would take the name of a file the merge writes beside them."""
    names = [
        re.sub(r"[^A-Za-z0-9._-]+", "_", m.resolve().name).lstrip(".") or f"model_{k}" for k, m in enumerate(models)
    ]
    taken = [n.lower() for n in names] + [f.lower() for f in OWN_FILES]
    if len(set(taken)) < len(taken):
        names = [f"{k}_{n}" for k, n in enumerate(names)]
    return names


def _write_recipe(folder: Path, inputs: MergeInputs, report: MergeReport) -> None:
    (folder / "merge_config.yaml").write_text(inputs.config.to_yaml())
    (folder / "merge_report.json").write_text(json.dumps(report.to_dict(), indent=1))


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
        "| # | model | weight | weights hash | statistics (examples, tokens) |",
        "|---|---|---|---|---|",
    ]
    for k, (entry, ckpt) in enumerate(zip(config.models, inputs.models, strict=True)):
        st = inputs.stats[k] if inputs.stats else None
        measured = f"{st.examples} examples" if st else "-"
        if st is not None and hasattr(st, "tokens"):
            measured += f", {st.tokens} tokens ({st.dtype})"
        # the weights hash is read in full only when statistics were checked against it; not for data-free merges
        digest = ckpt.__dict__.get("fingerprint", {}).get("weights", "not computed")[:16]
        lines.append(f"| {k} | `{entry.path}` | {entry.weight} | {digest} | {measured} |")
    lines += ["", "## Recipe", "", f"- method: `{config.method}`"]
    lines += [f"- {k}: `{v}`" for k, v in config.options.items()]
    lines.append(f"- heads: `{config.heads}` (head modules: {', '.join(inputs.heads) or 'none'})")
    if own_head is not None:
        lines.append(f"- this folder: the merged body with the head of model {own_head}")
    lines.append(f"- embeddings: `{config.embeddings}`; LM head: `{config.lm_head}`")
    if config.base_model:
        lines.append(f"- base model: `{config.base_model}`")
    s = report.summary()
    if inputs.stats and s["regmean_layers"]:
        lines += [
            "",
            "## Diagnostics",
            "",
            f"- {s['regmean_layers']} linear layers merged by RegMean; {s['ridge_layers']} needed a ridge",
            f"- relative reconstruction error on each model's own statistics: mean {s['mean_relative_error']:.4g}, "
            f"max {s['max_relative_error']:.4g}",
            f"- linear layers averaged for lack of statistics: {len(report.averaged_linears)}",
            f"- statistics masking: {one_line(inputs.stats[0].masking, 300)}",
        ]
    if inputs.stats:
        lines += ["", "## Statistics provenance", ""]
        for k, st in enumerate(inputs.stats):
            records = getattr(st, "provenance", [])  # one record per measuring run (several after combine)
            lines += [f"- model {k}: {describe_record(record)}" for record in records[:MAX_RECORDS]]
            if len(records) > MAX_RECORDS:
                lines.append(f"- model {k}: ... and {len(records) - MAX_RECORDS} more measuring runs")
    lines += ["", "The full recipe is in `merge_config.yaml`, per-layer diagnostics in `merge_report.json`.", ""]
    return "\n".join(lines)
