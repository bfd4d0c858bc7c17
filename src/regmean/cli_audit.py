"""`regmean stats audit`: attack a statistics file as an outsider holding the public model would, and say what it
gives away; registered in cli.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from regmean.errors import RegmeanError

SHOWN_TOKENS = 40


def stats_audit(
    stats: Annotated[Path, typer.Argument(help="Statistics folder (or .safetensors file) to attack")],
    model: Annotated[Path, typer.Option(help="The public model the statistics were measured on")],
    base: Annotated[Path | None, typer.Option(help="Base model folder, if MODEL is a LoRA adapter")] = None,
    data: Annotated[
        Path | None, typer.Option(help="The owner's own data: score the decode against it (recall, precision)")
    ] = None,
    text_field: Annotated[str | None, typer.Option(help="Text column (default: the one the file records)")] = None,
    text_pair_field: Annotated[str | None, typer.Option(help="Second text column of a pair")] = None,
    messages_field: Annotated[str | None, typer.Option(help="Column of chat conversations")] = None,
    prompt_field: Annotated[str | None, typer.Option(help="Prompt column of prompt/response pairs")] = None,
    response_field: Annotated[str | None, typer.Option(help="Response column of prompt/response pairs")] = None,
    max_examples: Annotated[int | None, typer.Option(min=1, help="Read at most this many examples")] = None,
    positions: Annotated[
        int | None, typer.Option(min=1, help="Positions attacked where the input depends on the position (32)")
    ] = None,
    show: Annotated[int, typer.Option(min=0, help="Recovered tokens to print per site")] = SHOWN_TOKENS,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write every recovered token and count")] = None,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:1, mps ...")] = "cpu",
) -> None:
    """Decode the statistics into the owner's bag of words, as an outsider with the public model would."""
    from regmean.devices import check_device
    from regmean.io.data import CHAT_FIELDS, load_examples
    from regmean.io.outputs import check_output_path
    from regmean.loading import load_tokenizer, tokenizer_folder
    from regmean.privacy.audit import audit
    from regmean.stats import StatisticsFile

    console = Console(stderr=True, markup=False)
    check_device(device)
    if json_out is not None:
        check_output_path(json_out, [("statistics", stats), ("model", model), *([("data file", data)] if data else [])])
        if json_out.exists():
            raise RegmeanError(f"{json_out}: exists; choose another file (an audit is never written over a file)")
    examples = None
    if data is not None:
        record = (StatisticsFile(stats).provenance or [{}])[0]
        given = {"text_pair_field": text_pair_field, "messages_field": messages_field}
        given |= {"prompt_field": prompt_field, "response_field": response_field}
        fields = {k: v for k, v in given.items() if v} or {
            k: record[k] for k in ("text_pair_field", *CHAT_FIELDS) if k in record
        }
        if not any(k in fields for k in CHAT_FIELDS):
            fields["text_field"] = text_field or record.get("text_field", "text")
        examples = load_examples(data, max_examples=max_examples, **fields)
    result = audit(stats, model, examples, base=base, positions=positions, device=device, log=console.print)
    from regmean.io.adapter import open_model

    tokenizer = load_tokenizer(tokenizer_folder(open_model(model, base).folders))
    print(f"audit of {stats}: {result.examples:,} examples, {result.tokens:,} tokens; protection: {result.protection}")
    for withheld in result.withheld:
        print(f"site {withheld.describe()}: withheld from the file; nothing to decode")
    for entry in result.sites:
        _print_site(entry, tokenizer, show)
    if not result.sites and not result.withheld:
        print("no site of this model takes a per-token input: the bag-of-words decode does not apply")
    print(_verdict(result))
    if json_out is not None:
        json_out.write_text(json.dumps(_as_json(result, tokenizer), indent=1) + "\n")


def _print_site(entry, tokenizer, show: int) -> None:
    d = entry.decoded
    tokens = entry.tokens()
    state = "converged" if d.converged else f"stopped after {d.rounds} rounds, not converged"
    print(
        f"site {entry.site.describe()}: decoded in {entry.seconds:.1f} s ({state}, residual {d.residual:.1e}): "
        f"{len(tokens):,} distinct tokens, {sum(tokens.values()):,} tokens in all"
    )
    score = entry.score()
    if score is not None:
        what = "token-position pairs" if entry.positions else "distinct tokens"
        print(
            f"  against the owner's data: recall {score['recall']:.3f} ({score['hits']:,} of {score['true']:,} "
            f"{what}), precision {score['precision']:.3f}, exact counts {score['exact_counts']:,}"
            + (
                f"; {entry.unattacked:,} tokens past position {entry.positions - 1} unattacked"
                if entry.positions
                else ""
            )
        )
    if show and tokens:
        listed = ", ".join(f"{_text(tokenizer, t)!r} x{n}" for t, n in tokens.most_common(show))
        print(f"  recovered (most frequent first): {listed}")


def _text(tokenizer, token: int) -> str:
    return tokenizer.convert_tokens_to_string([tokenizer.convert_ids_to_tokens(token)])


def _verdict(result) -> str:
    scores = [e.score() for e in result.sites]
    if result.sites and all(s is not None for s in scores):
        best = max(s["recall"] for s in scores)
        advice = (
            ("; protect it: measure without --expose-token-counts (the default withholds these sites), or --dp-epsilon")
            if best > 0.05
            else ""
        )
        return f"verdict: an outsider with the public model recovers {best:.0%} of this data's distinct tokens{advice}"
    if result.sites:
        return "verdict: the tokens above are what an outsider with the public model reads from the file"
    return "verdict: no per-token site is in the file; the bag-of-words decode recovers nothing"


def _as_json(result, tokenizer) -> dict:
    return {
        "statistics": str(result.stats),
        "protection": result.protection,
        "withheld": [s.name for s in result.withheld],
        "sites": [
            {
                "site": e.site.name,
                "positional": e.site.positional,
                "positions": e.positions,
                "seconds": round(e.seconds, 3),
                "converged": e.decoded.converged,
                "residual": e.decoded.residual,
                "score": e.score(),
                "recovered": [
                    {"token": t, "text": _text(tokenizer, t), "position": p, "count": n}
                    for (t, p), n in sorted(e.recovered.items())
                ],
            }
            for e in result.sites
        ],
    }
