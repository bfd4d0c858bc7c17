"""Data-free merges against mergekit, and RegMean, on 3 fine-tunes of a ~1.2B-parameter Llama (bf16, sharded).

    python benchmarks/vs_mergekit.py [--layers 22] [--runs 3] [--skip-mergekit] [--skip-regmean]

Builds the models under runs/bench (random-init base + small perturbations), installs mergekit 0.1.5 in its own
virtual environment, runs mergekit `linear` vs our `average` and mergekit `task_arithmetic` vs ours, alternately,
`--runs` times each, checks both tools wrote the same weights (docs/benchmarks/vs_mergekit.md); then measures each
model's statistics on real text and merges with RegMean (docs/benchmarks/regmean_1b.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (
    ROOT,
    WORK,
    build_llamas,
    gib,
    llama_config,
    machine,
    measured,
    median_of,
    param_count,
    side_venv,
    write_doc,
)  # noqa: E402

REGMEAN = ROOT / ".venv" / "bin" / "regmean"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TA_WEIGHT = 0.3


def mergekit_config(method: str, models: list[Path], base: Path) -> dict:
    cfg = {
        "merge_method": method,
        "models": [
            {"model": str(m), "parameters": {"weight": TA_WEIGHT if method != "linear" else 1.0}} for m in models
        ],
        "dtype": "bfloat16",
    }
    if method == "task_arithmetic":
        cfg["base_model"] = str(base)
        cfg["parameters"] = {"normalize": False}
    return cfg


def regmean_config(method: str, models: list[Path], base: Path, stats: list[Path] | None = None) -> dict:
    cfg: dict = {"method": method, "models": [{"path": str(m)} for m in models], "dtype": "bfloat16"}
    if method == "task_arithmetic":
        cfg["base_model"] = str(base)
        cfg["options"] = {"scaling": TA_WEIGHT}
    if stats:
        for entry, s in zip(cfg["models"], stats, strict=True):
            entry["statistics"] = str(s)
    return cfg


def same_weights(a: Path, b: Path) -> float:
    """Largest absolute difference between two model folders' tensors (bf16 outputs of the same formula)."""
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from regmean.io.checkpoint import Checkpoint

    x, y = Checkpoint(a), Checkpoint(b)
    assert set(x.keys()) == set(y.keys()), "different tensor names"
    worst = 0.0
    for key in x.keys():
        diff = (x.get(key).float() - y.get(key).float()).abs().max()
        worst = max(worst, float(diff))
        if not torch.isfinite(diff):
            return float("inf")
    return worst


def texts_file(path: Path, n: int = 64) -> Path:
    """Real English text from the packaged debates corpus, one JSON object per line."""
    sys.path.insert(0, str(ROOT / "src"))
    from regmean_bench.data import load

    data = load("debates")
    with path.open("w") as f:
        for text in data.texts[:n]:
            f.write(json.dumps({"text": text}) + "\n")
    return path


def compare(args, base: Path, models: list[Path], params: int) -> None:
    """Our average / task arithmetic vs mergekit's linear / task_arithmetic, alternating; writes vs_mergekit.md."""
    mk = side_venv("mergekit", "mergekit==0.1.5")
    cfgs = WORK / "configs"
    rows, checks = {}, {}
    for ours, theirs in (("average", "linear"), ("task_arithmetic", "task_arithmetic")):
        (cfgs / f"mk-{theirs}.yaml").write_text(yaml.safe_dump(mergekit_config(theirs, models, base)))
        (cfgs / f"rm-{ours}.yaml").write_text(yaml.safe_dump(regmean_config(ours, models, base)))
        runs: dict[str, list] = {"mergekit": [], "regmean": []}
        for r in range(args.runs):
            for tool in ("mergekit", "regmean"):
                out = WORK / f"out-{tool}-{ours}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "mergekit":
                    cmd = [str(mk / "mergekit-yaml"), str(cfgs / f"mk-{theirs}.yaml"), str(out), "--quiet"]
                else:
                    cmd = [str(REGMEAN), "merge", str(cfgs / f"rm-{ours}.yaml"), str(out)]
                got = measured(cmd, env=OFFLINE, cwd=WORK)
                runs[tool].append(got)
                print(
                    f"{ours:16s} run {r + 1} {tool:8s} {got['wall_s']:6.1f} s  peak RSS {gib(got['peak_rss'])} GiB  "
                    f"peak RssAnon {gib(got['peak_rss_anon'])} GiB",
                    flush=True,
                )
        checks[ours] = same_weights(WORK / f"out-mergekit-{ours}", WORK / f"out-regmean-{ours}")
        rows[ours] = {tool: median_of(r) for tool, r in runs.items()} | {"runs": runs}
    lines = [
        "# Data-free merges vs mergekit 0.1.5",
        "",
        f"3 fine-tunes of a {params / 1e9:.2f}B-parameter Llama ({args.layers} layers, hidden {args.hidden}, "
        "GQA 32/4 heads, untied lm_head), bf16, sharded safetensors. Median of "
        f"{args.runs} runs, alternating tools. Machine: {machine()}.",
        "",
        "| merge | tool | wall s | peak RSS GiB | peak RssAnon GiB |",
        "|---|---|---:|---:|---:|",
    ]
    for ours, row in rows.items():
        for tool in ("mergekit", "regmean"):
            m = row[tool]
            lines.append(f"| {ours} | {tool} | {m['wall_s']:.1f} | {gib(m['peak_rss'])} | {gib(m['peak_rss_anon'])} |")
    lines += [
        "",
        "| merge | wall ratio (regmean / mergekit) | RssAnon ratio | peak RSS ratio | max abs weight diff |",
        "|---|---:|---:|---:|---:|",
    ]
    for ours, row in rows.items():
        a, b = row["regmean"], row["mergekit"]
        lines.append(
            f"| {ours} | {a['wall_s'] / b['wall_s']:.2f} | {a['peak_rss_anon'] / b['peak_rss_anon']:.2f} | "
            f"{a['peak_rss'] / b['peak_rss']:.2f} | {checks[ours]:.3g} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_doc("vs_mergekit", text, {"rows": rows, "checks": checks, "params": params})


def regmean_merge(args, base: Path, models: list[Path], params: int) -> None:
    """Each model's statistics measured on real text, then RegMean over the three; writes regmean_1b.md."""
    texts = texts_file(WORK / "debates.jsonl")
    stats, measures = [], {}
    for m in models:
        out = m.parent / f"stats-{m.name}"
        if not (out / "statistics.safetensors").is_file() and not list(out.glob("statistics-*")):
            cmd = [str(REGMEAN), "measure", str(m), "--data", str(texts), "--out", str(out), "--expose-token-counts"]
            cmd += ["--max-examples", str(args.stats_examples), "--max-length", "128", "--batch-size", "8"]
            measures[m.name] = measured(cmd, env=OFFLINE)
            got = measures[m.name]
            print(f"measured {m.name}: {got['wall_s']:.0f} s, peak RSS {gib(got['peak_rss'])} GiB", flush=True)
        stats.append(out)
    cfg = WORK / "configs" / "rm-regmean.yaml"
    cfg.write_text(yaml.safe_dump(regmean_config("regmean", models, base, stats)))
    out = WORK / "out-regmean-regmean"
    shutil.rmtree(out, ignore_errors=True)
    row = measured([str(REGMEAN), "merge", str(cfg), str(out)], env=OFFLINE)
    lines = [
        "# RegMean on 3 x 1B Llama",
        "",
        f"The models of the mergekit comparison (3 x {params / 1e9:.2f}B, {args.layers} layers, hidden "
        f"{args.hidden}, bf16); statistics measured by `regmean measure` on {args.stats_examples} debate "
        f"transcripts of up to 128 tokens (float32 sums). RegMean alpha 0.9. Machine: {machine()}.",
        "",
        "| step | wall s | peak RSS GiB | peak RssAnon GiB |",
        "|---|---:|---:|---:|",
    ]
    for name, got in measures.items():
        lines.append(f"| measure {name} | {got['wall_s']:.1f} | {gib(got['peak_rss'])} | {gib(got['peak_rss_anon'])} |")
    lines.append(f"| merge (regmean) | {row['wall_s']:.1f} | {gib(row['peak_rss'])} | {gib(row['peak_rss_anon'])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_doc("regmean_1b", text, {"merge": row, "measure": measures, "params": params})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-mergekit", action="store_true", help="only the RegMean run")
    ap.add_argument("--skip-regmean", action="store_true", help="only the mergekit comparison")
    ap.add_argument("--stats-examples", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=2048, help="width (intermediate = 11/4 of it)")
    args = ap.parse_args()

    (WORK / "configs").mkdir(parents=True, exist_ok=True)
    from smollm2 import smollm2_folder

    dims = {"hidden": args.hidden, "intermediate": args.hidden * 11 // 4}
    folder = WORK / (f"llama-{args.layers}" if args.hidden == 2048 else f"llama-{args.layers}-h{args.hidden}")
    base, *models = build_llamas(folder, args.layers, 3, tokenizer=smollm2_folder(), **dims)
    params = param_count(llama_config(args.layers, **dims))
    print(f"models: 3 x {params / 1e9:.2f}B parameters under {folder}")
    if not args.skip_mergekit:
        compare(args, base, models, params)
    if not args.skip_regmean:
        regmean_merge(args, base, models, params)


if __name__ == "__main__":
    main()
