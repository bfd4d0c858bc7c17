"""Write merged model folders atomically: weights, config, tokenizer, model card, recipe and report."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from regmean import __version__
from regmean.errors import RegmeanError

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


def check_output_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not force:
        raise RegmeanError(f"{out_dir}: exists and is not empty; choose another folder or pass --force to replace it")


@contextmanager
def staged_output(out_dir: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling folder renamed to `out_dir` only when the block completes: an interrupted or failed
    merge leaves nothing that looks like a finished model folder."""
    check_output_dir(out_dir, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir) if out_dir.is_dir() else out_dir.unlink()
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


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
    """Folder names of a heads: keep merge: the input folders' names, numbered when they collide."""
    names = [m.name or f"model_{k}" for k, m in enumerate(models)]
    if len(set(names)) < len(names):
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
            f"- statistics masking: {inputs.stats[0].masking}",
        ]
    if inputs.stats:
        lines += ["", "## Statistics provenance", ""]
        for k, st in enumerate(inputs.stats):
            for record in getattr(st, "provenance", []):  # one record per measuring run (several after combine)
                lines.append(f"- model {k}: " + ", ".join(f"{key}={value}" for key, value in record.items()))
    lines += ["", "The full recipe is in `merge_config.yaml`, per-layer diagnostics in `merge_report.json`.", ""]
    return "\n".join(lines)
