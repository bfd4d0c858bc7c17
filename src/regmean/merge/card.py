"""The merged model's card (README.md): front matter as the Hugging Face Hub reads it, the models, the recipe,
diagnostics, every matrix averaged with its reason, provenance and the papers to cite."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

import yaml

from regmean import __version__
from regmean.heads import head_kind
from regmean.io.metadata import describe_record
from regmean.merge.report import MergeReport, diagnostic

if TYPE_CHECKING:
    from regmean.merge.inputs import MergeInputs

MAX_RECORDS = 20


def model_card(inputs: MergeInputs, report: MergeReport, recipe: str, own_head: int | None = None) -> str:
    """The card of one output folder; `recipe` is the merge_config.yaml written beside it."""
    config = inputs.config
    what = "model" if config.output.lora is None else "LoRA adapter"
    lines = [
        *front_matter(inputs),
        "",
        f"# Merged {what} ({config.method})",
        "",
        f"Made with regmean {__version__}: `{config.method}` over {len(config.models)} models of architecture "
        f"`{inputs.models[0].architecture}`.",
        "",
        *_models(inputs, report),
        *_adapter(inputs, report),
        *_recipe(inputs, own_head, recipe),
        *_diagnostics(report),
        *_provenance(inputs, report),
        "",
        "Per-layer diagnostics are in `merge_report.json`.",
        "",
        *_citation(report),
    ]
    return "\n".join(lines)


def front_matter(inputs: MergeInputs) -> list[str]:
    """The Hub's metadata: the inputs as given (`base_model`, a `merge` of them), library, tags, pipeline."""
    config, architecture = inputs.config, inputs.models[0].architecture
    meta: dict = {
        "library_name": "transformers",
        "base_model": [str(entry.path) for entry in config.models],
        "base_model_relation": "merge",
        "tags": list(dict.fromkeys(["merge", "regmean", config.method.replace("_", "-")])),
    }
    if config.output.lora is not None:  # an adapter over the base, made by merging the models
        from regmean.merge.lora_plan import adapter_base

        base = config.base_model or adapter_base(inputs).path
        meta.update(library_name="peft", base_model=[str(base)], base_model_relation="adapter")
        meta["tags"] += ["lora", "peft"]
    kind = head_kind(architecture)
    if kind is not None:
        meta["pipeline_tag"] = kind.pipeline
    return ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---"]


def _models(inputs: MergeInputs, report: MergeReport) -> list[str]:
    lines = [
        "## Models",
        "",
        f"| # | model | weight | weights hash | {'data' if report.data else 'statistics'} (examples, tokens) |",
        "|---|---|---|---|---|",
    ]
    for k, (entry, ckpt) in enumerate(zip(inputs.config.models, inputs.models, strict=True)):
        measured = inputs.stats[k].describe() if inputs.stats else "-"
        if report.data:
            measured = (
                f"{report.data[k]['examples']:,} examples, {report.data[k]['tokens']:,} tokens (read while merging)"
            )
        # the weights hash is read in full only when statistics were checked against it; not for data-free merges
        digest = ckpt.__dict__.get("fingerprint", {}).get("weights", "not computed")[:16]
        over = f" (LoRA adapter over `{ckpt.folders[0]}`)" if len(ckpt.folders) > 1 else ""
        lines.append(f"| {k} | `{entry.path}`{over} | {entry.weight} | {digest} | {measured} |")
    return lines


def _adapter(inputs: MergeInputs, report: MergeReport) -> list[str]:
    """An adapter output: its rank, what its truncation lost, what it leaves at the base's, and how to load it."""
    lora = inputs.config.output.lora
    if lora is None:
        return []
    architecture = inputs.models[0].architecture
    return [
        "",
        "## Adapter",
        "",
        f"A peft LoRA adapter of rank {lora.rank} over the base model: each changed linear layer holds the merged "
        "update's best rank-r approximation (layers solved from statistics: best in their own system's metric), "
        "changed heads and norms are saved whole (`modules_to_save`).",
        "",
        *[f"- {line}" for line in report.adapter_lines()],
        "",
        "```python",
        f"from transformers import {architecture}",
        "from peft import PeftModel",
        f'model = PeftModel.from_pretrained({architecture}.from_pretrained("BASE"), "THIS_FOLDER")',
        "```",
    ]


def _recipe(inputs: MergeInputs, own_head: int | None, recipe: str) -> list[str]:
    config = inputs.config
    lines = ["", "## Recipe", "", f"- method: `{config.method}`"]
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
    replay = "`regmean merge merge_config.yaml AGAIN/` run in this folder replays it"
    return [*lines, "", f"The full recipe (`merge_config.yaml`; {replay}):", "", "```yaml", recipe.rstrip(), "```"]


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


def _diagnostics(report: MergeReport) -> list[str]:
    s = report.summary()
    if not s.solved_layers:
        return []
    sampled = (
        f" (estimated on sampled output rows in {s.sampled_layers} layers, standard error at most "
        f"{s.max_error_stderr:.2g}; `diagnostics: exact` checks every row)"
        if s.sampled_layers
        else ""
    )
    averaged = Counter(report.averaged.values()).most_common()
    return [
        "",
        "## Diagnostics",
        "",
        f"- {s.solved_layers} linear layers merged by {report.title}; {s.ridge_layers} needed a ridge",
        f"- relative reconstruction error on each model's own statistics: mean {diagnostic(s.mean_relative_error, 4)}, "
        f"max {diagnostic(s.max_relative_error, 4)}{sampled}",
        f"- relative residual of the solved systems: at most {s.max_residual:.2g}",
        f"- matrices averaged instead: {len(report.averaged)}" + "".join(f"\n  - {n} {why}" for why, n in averaged),
        *[f"- {note}" for note in report.notes],
        *[f"- **{warning}**" for warning in report.warnings],
    ]


def _provenance(inputs: MergeInputs, report: MergeReport) -> list[str]:
    lines = []
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
    return lines


def _citation(report: MergeReport) -> list[str]:
    """The papers the method asks users to cite."""
    if not report.citations:
        return []
    return ["## Citation", "", *"\n\n".join(report.citations).splitlines(), ""]
