"""`regmean measure`: a model's linear-layer input statistics on local data (registered in cli.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from regmean.cli_common import PICKLE_HELP, console, on_rank0
from regmean.errors import RegmeanError
from regmean.stats_checks import MAX_LENGTH

ModelDir = Annotated[
    Path, typer.Argument(help="Hugging Face model folder (config.json + safetensors), or a PEFT LoRA adapter")
]
Messages = Annotated[
    str | None, typer.Option(help="Column of chat conversations ([{role, content}, ...]), chat-templated")
]
Force = Annotated[
    bool, typer.Option("--force", help="Replace existing statistics (kept until the new ones are complete)")
]
MaxMemory = Annotated[
    str | None, typer.Option(help="Most memory for the sums, e.g. 8GB; more means several passes, one file each")
]
ExposeTokenCounts = Annotated[
    bool,
    typer.Option(
        "--expose-token-counts",
        help="Measure the token sites too: their Grams decode into your data's token counts (default: withheld)",
    ),
]
DpClip = Annotated[
    float | None, typer.Option(help="Per-example bound at each site, x its typical contribution on random tokens (1)")
]


def measure(
    model_dir: ModelDir,
    data: Annotated[Path, typer.Option(help="Local data file: .jsonl, .json, .csv, .tsv or .parquet")],
    out: Annotated[Path, typer.Option(help="Folder for the statistics file and its card")],
    base: Annotated[Path | None, typer.Option(help="Base model folder of a LoRA adapter MODEL_DIR")] = None,
    text_field: Annotated[str, typer.Option(help="Column holding the text")] = "text",
    text_pair_field: Annotated[str | None, typer.Option(help="Column holding the second text of a pair")] = None,
    target_field: Annotated[str | None, typer.Option(help="Decoder target column (encoder-decoder LMs)")] = None,
    messages_field: Messages = None,
    prompt_field: Annotated[str | None, typer.Option(help="Prompt column of prompt/response pairs")] = None,
    response_field: Annotated[str | None, typer.Option(help="Response column of prompt/response pairs")] = None,
    max_examples: Annotated[int | None, typer.Option(min=1, help="Use at most this many examples")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 16,
    max_length: Annotated[int, typer.Option(min=1, max=MAX_LENGTH, help="Truncate inputs to this many tokens")] = 128,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps ...")] = "cpu",
    stats_dtype: Annotated[str, typer.Option(help="float32 or float64 sums")] = "float32",
    model_dtype: Annotated[str, typer.Option(help="float32, float64, bfloat16 or float16 forward")] = "float32",
    include: Annotated[str | None, typer.Option(help="Regex: measure only matching module names")] = None,
    exclude: Annotated[str | None, typer.Option(help="Regex: skip matching module names")] = None,
    force: Force = False,
    allow_pickle: Annotated[bool, typer.Option("--allow-pickle", help=PICKLE_HELP)] = False,
    nproc: Annotated[int, typer.Option(min=1, help="Processes on this machine (runs torchrun for you)")] = 1,
    max_memory: MaxMemory = None,
    expose_token_counts: ExposeTokenCounts = False,
    dp_epsilon: Annotated[float | None, typer.Option(help="Release with (epsilon, delta)-DP: the whole file")] = None,
    dp_delta: Annotated[float | None, typer.Option(help="The delta of --dp-epsilon  [default: 1e-5]")] = None,
    dp_clip: DpClip = None,
    withhold: Annotated[str | None, typer.Option(hidden=True, help="Older spelling: token-sites | none")] = None,
) -> None:
    """Measure a model's linear-layer input statistics on local data (run by each model owner).

    Data-parallel: `torchrun --nproc_per_node N -m regmean measure ...` or `--nproc N`; rank 0 writes the file.
    """
    from regmean import distributed
    from regmean.launch import relaunch_with_torchrun
    from regmean.units import parse_size

    if nproc > 1 and not distributed.launched():
        relaunch_with_torchrun(nproc, data=data)
    if withhold not in (None, "token-sites", "none"):
        raise RegmeanError(f"--withhold {withhold}: token-sites (the default now) or none (--expose-token-counts)")
    expose_token_counts = expose_token_counts or withhold == "none"
    if max_memory is not None and out.suffix == ".safetensors" and not out.is_dir():
        raise RegmeanError(f"{out}: --max-memory may write several blocks; give a folder as --out")
    options = {
        "batch_size": batch_size,
        "max_length": max_length,
        "stats_dtype": stats_dtype,
        "model_dtype": model_dtype,
        "include": include,
        "exclude": exclude,
        "max_stats_bytes": None if max_memory is None else parse_size(max_memory, "--max-memory"),
        "allow_pickle": allow_pickle,
        "base": base,
        "protection": _protection(not expose_token_counts, dp_epsilon, dp_delta, dp_clip),  # a bad budget: refused now
        "device": distributed.init_from_env(device),
    }
    chat = {"messages_field": messages_field, "prompt_field": prompt_field, "response_field": response_field}
    fields = {"text_field": text_field, "text_pair_field": text_pair_field, "target_field": target_field}
    _measure_into(out, force, model_dir, data, chat if any(chat.values()) else fields, max_examples, options)


def _protection(withhold: bool, dp_epsilon: float | None, dp_delta: float | None, dp_clip: float | None):
    from regmean.measure.protect import Protection

    if dp_delta is not None and dp_epsilon is None:
        raise RegmeanError("--dp-delta is the delta of a DP release: give --dp-epsilon with it")
    delta = 1e-5 if dp_delta is None else dp_delta
    return Protection(withhold, dp_epsilon, delta, dp_clip)


def _measure_into(out: Path, force: bool, model_dir: Path, data: Path, fields: dict, max_examples, options) -> None:
    """Measure and write the statistics file and its card (rank 0 writes: each finished block leaves memory for
    disk, all are shown together at the end); progress is kept beside it for a rerun if interrupted."""
    from regmean.io.adapter import input_paths
    from regmean.io.data import load_examples
    from regmean.io.staged import target_file
    from regmean.measure import measure as run_measure
    from regmean.measure.card import CARD, is_ours, statistics_card
    from regmean.measure.checkpoint import checkpoint_folder, removed_unless_interrupted
    from regmean.stats import FILE_NAME, BlockWriter

    base = options["base"]
    sources = [*input_paths([model_dir], base), ("data file", data)]  # an adapter's base, given or implied
    with on_rank0(lambda: BlockWriter(out, force, sources, console.print)) as writer:
        examples = load_examples(data, max_examples=max_examples, **fields)
        provenance = {"data": data.name, **{k: v for k, v in fields.items() if v}}
        resume = checkpoint_folder(writer.target if writer else target_file(out, FILE_NAME))  # (every process's)
        with removed_unless_interrupted(resume if writer else None):  # rank 0 removes it, once written
            stats = run_measure(
                model_dir,
                examples,
                provenance=provenance,
                log=console.print,
                on_block=writer.write if writer else lambda *_: None,
                on_plan=writer.reserve if writer else None,
                checkpoint_dir=resume,
                **options,
            )
            if writer is None:
                return
            files = [final.name for _, final in writer.staged]
            writer.stage_text(CARD, statistics_card(stats, model_dir, out, files, base), is_ours)
            written = writer.commit()
    _say_measured(written[0] if len(written) == 1 else out, stats)


def _say_measured(path: Path, stats) -> None:
    """What measure wrote, in one line, and a DP release's warning when its noise outweighs its data."""
    from regmean import distributed
    from regmean.measure.protect import noise_warning

    console.print(
        f"wrote {path}: {len(set(stats.modules.values()))} sites for {len(stats.modules)} modules, "
        f"{stats.examples} examples, {stats.tokens} tokens, {distributed.world_size()} process(es); "
        f"protection: {stats.protection}"
    )
    warning = noise_warning(stats.privacy, stats.tokens)
    if warning:
        console.print(warning)
