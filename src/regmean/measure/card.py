"""The statistics card: a README.md beside a measure's statistics, so that a statistics folder can be published like
a model (what was measured, on what, and how to use it), without a word of the data itself."""

from __future__ import annotations

from pathlib import Path

import yaml

from regmean import __version__
from regmean.io.data import DATA_FIELDS
from regmean.statistic import ProvenanceRecord
from regmean.stats import FORMAT_VERSION, Statistics

CARD = "README.md"
MARK = "<!-- regmean statistics card -->"
"""Marks a card regmean wrote: only such a card is ever replaced (a README.md of the user's own is left alone)."""
PROVENANCE_COLUMNS = ("data", "fields", "formatting", "examples", "tokens", "max_length", "model_dtype", "processes")


def is_ours(path: Path) -> bool:
    try:
        return MARK in path.read_text(errors="replace")[:2000]
    except OSError:
        return False


def statistics_card(stats: Statistics, model: Path, out: Path, files: list[str], base: Path | None = None) -> str:
    """The card's text: model fingerprint, data provenance, format and dtype, and the recipe lines that use it."""
    fp = stats.fingerprint
    sites = len(set(stats.modules.values()))
    meta = {
        "base_model": str(model),
        "tags": ["regmean", "merge-statistics"],
        "statistics_format": f"regmean.gram version {FORMAT_VERSION}",
        "protection": stats.protection,
    }
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(),
        "---",
        MARK,
        "",
        f"# RegMean statistics of `{model.name}`",
        "",
        f"Input statistics (Gram matrices, sums and row counts) of the linear layers of `{model}`, measured by regmean "
        f"{__version__} on its owner's data, for merging with RegMean (ICLR 2023, \"Dataless Knowledge Fusion by "
        'Merging Weights of Language Models"). They hold no text: only sums over the inputs the layers saw.',
        "",
        "## Model",
        "",
        f"- architecture: `{fp.get('architecture', '?')}` (model type `{fp.get('model_type', '?')}`)",
        f"- weights hash: `{fp.get('weights', '?')}` (a merge refuses these statistics for any other weights)",
        f"- tensor names and shapes hash: `{fp.get('shapes', '?')}`",
        "",
        "## Statistics",
        "",
        f"- format: regmean.gram version {FORMAT_VERSION} (safetensors; each Gram stored as its upper triangle)",
        f"- dtype: {stats.dtype}; {sites} sites for {len(stats.modules)} linear modules"
        + (f" ({len(stats.skipped)} modules skipped)" if stats.skipped else ""),
        f"- {stats.examples:,} examples, {stats.tokens:,} tokens; {stats.masking}",
        f"- files: {', '.join(f'`{f}`' for f in files)}",
        "",
        "## Privacy",
        "",
        f"- protection: {stats.protection}",
        "- what a file without protection reveals: at a site whose input is one fixed vector per token (a decoder's "
        "first layer), the Gram decodes into the data's token counts; `regmean stats audit` runs that attack",
        "- the fine-tuned model itself, if published, leaks about its training data on its own",
        "",
        "## Data provenance",
        "",
        "| " + " | ".join(PROVENANCE_COLUMNS) + " |",
        "|" + "---|" * len(PROVENANCE_COLUMNS),
        *[_provenance_row(record) for record in stats.provenance],
        "",
        "## Use in a merge recipe",
        "",
        "```yaml",
        *([f"base_model: {base}  # the LoRA adapter's base"] if base else []),
        "models:",
        f"  - path: {model}",
        f"    statistics: {out}",
        "```",
        "",
    ]
    return "\n".join(lines)


def _provenance_row(record: ProvenanceRecord) -> str:
    fields = ", ".join(f"{k.removesuffix('_field')}: `{record[k]}`" for k in DATA_FIELDS if record.get(k))
    values = {**record, "fields": fields}
    if record.get("adapter_of"):
        values["data"] = f"{record.get('data', '')} (LoRA adapter over `{record['adapter_of']}`)"
    return "| " + " | ".join(str(values.get(c, "")).replace("|", "/") for c in PROVENANCE_COLUMNS) + " |"


def save_statistics(stats: Statistics, out: str | Path) -> Path:
    """Statistics written as `regmean measure` writes them: the file (`stats.save`) and, into a folder of their own
    (not beside a .safetensors path), the statistics card (README.md; a README.md regmean did not write is left
    alone), when `stats` knows the model it was measured on."""
    from regmean.stats import save

    path = save(stats, out)
    card = path.parent / CARD
    into_folder = Path(out).suffix != ".safetensors" or Path(out).is_dir()
    if into_folder and stats.measured_model is not None and (not card.exists() or is_ours(card)):
        model, base = stats.measured_model
        card.write_text(statistics_card(stats, model, path.parent, [path.name], base))
    return path
