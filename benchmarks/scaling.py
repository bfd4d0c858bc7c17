"""How merge time and peak memory grow with depth and with the number of models.

    python benchmarks/scaling.py [--depths 8 16 32] [--ks 2 3 5] [--hidden 1024]

Llama-shaped models (bf16, sharded) of a fixed width at several depths, K fine-tunes each; statistics measured
on real text; RegMean and average merges timed with peak RSS and RssAnon. Writes docs/benchmarks/scaling.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, WORK, build_llamas, gib, llama_config, machine, measured, param_count, write_doc  # noqa: E402
from smollm2 import smollm2_folder  # noqa: E402
from vs_mergekit import OFFLINE, REGMEAN, texts_file  # noqa: E402


def statistics(model: Path, texts: Path) -> Path:
    out = model.parent / f"stats-{model.name}"
    if not out.is_dir():
        cmd = [str(REGMEAN), "measure", str(model), "--data", str(texts), "--out", str(out), "--expose-token-counts"]
        measured([*cmd, "--max-examples", "16", "--max-length", "64", "--batch-size", "8"], env=OFFLINE)
    return out


def merge_point(layers: int, k: int, hidden: int, texts: Path) -> dict:
    dims = {"hidden": hidden, "intermediate": hidden * 11 // 4}
    folder = WORK / f"scale-h{hidden}-l{layers}"
    _, *models = build_llamas(folder, layers, max(k, 3), tokenizer=smollm2_folder(), **dims)
    models = models[:k]
    stats = [statistics(m, texts) for m in models]
    row = {"layers": layers, "k": k, "params": param_count(llama_config(layers, **dims))}
    for method in ("average", "regmean"):
        cfg = {"method": method, "models": [{"path": str(m)} for m in models]}
        if method == "regmean":
            for entry, s in zip(cfg["models"], stats, strict=True):
                entry["statistics"] = str(s)
        path = folder / f"{method}-k{k}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        out = folder / f"out-{method}-k{k}"
        shutil.rmtree(out, ignore_errors=True)
        row[method] = measured([str(REGMEAN), "merge", str(path), str(out)], env=OFFLINE)
        shutil.rmtree(out, ignore_errors=True)
        got = row[method]
        print(
            f"layers {layers:3d} K {k}: {method:8s} {got['wall_s']:6.1f} s, peak RSS {gib(got['peak_rss'])} GiB, "
            f"RssAnon {gib(got['peak_rss_anon'])} GiB",
            flush=True,
        )
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 3, 5])
    ap.add_argument("--hidden", type=int, default=1024)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    texts = texts_file(WORK / "debates-short.jsonl", 16)
    rows = [merge_point(n, 3, args.hidden, texts) for n in args.depths]
    rows += [merge_point(args.depths[1], k, args.hidden, texts) for k in args.ks if k != 3]
    lines = [
        "# Scaling with depth and with the number of models",
        "",
        f"Llama-shaped models, hidden {args.hidden}, intermediate {args.hidden * 11 // 4}, vocabulary 49,152, bf16, "
        f"sharded at 1 GB; statistics from 16 debate transcripts (64 tokens). Machine: {machine()}.",
        "",
        "| layers | K | parameters | average s | average RssAnon GiB | RegMean s | RegMean peak RSS GiB "
        "| RegMean RssAnon GiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["k"], r["layers"])):
        a, m = r["average"], r["regmean"]
        lines.append(
            f"| {r['layers']} | {r['k']} | {r['params'] / 1e6:.0f}M | {a['wall_s']:.1f} | {gib(a['peak_rss_anon'])} "
            f"| {m['wall_s']:.1f} | {gib(m['peak_rss'])} | {gib(m['peak_rss_anon'])} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    write_doc("scaling", text, {"rows": rows, "root": str(ROOT)})


if __name__ == "__main__":
    main()
