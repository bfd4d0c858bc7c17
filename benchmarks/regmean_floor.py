"""RegMean's merge time against its arithmetic floor, and against a plain in-memory merge (the peers' way).

    python benchmarks/regmean_floor.py [--layers 22] [--hidden 2048] [--peer-layers 4] [--peer-hidden 1024]

1. Floor: three Llama-shaped fine-tunes of one base (default 3 x 1.17B, bf16), statistics measured by `regmean
   measure` on real text, `regmean merge` timed (and an average merge of the same models, for the reading and
   writing alone). The floor is the floating-point work RegMean's sites cannot avoid (per site: K products
   G_i D_i^T, one Cholesky factorisation, two triangular solves, all float64 as the merge runs them) over this
   machine's float64 GEMM rate, measured in the same run; the same work with float32 products over the float32
   rate is given too. Diagnostics' share of the merge comes from merge_report.json.
2. Peer-style: smaller models that fit in memory, merged the way the peers do (every model and Gram in RAM,
   W = inverse(sum G~_i) (sum G~_i W_i^T), float32, an explicit inverse) in a process of its own: wall time and peak
   RSS against `regmean merge`, and each one's distance (relative, max-abs per tensor) from the float64 optimum.

Writes docs/benchmarks/regmean_floor.md (+ .json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import DOCS, WORK, build_llamas, gib, llama_config, machine, measured, param_count, write_doc  # noqa: E402
from vs_mergekit import OFFLINE, REGMEAN, texts_file  # noqa: E402

ALPHA = 0.9


def gemm_rates(size: int = 2048, width: int = 4096, repeats: int = 3) -> dict[str, float]:
    """FLOP/s of a [size, size] x [size, width] product in float32 and float64 on this machine's threads."""
    import torch

    rates = {}
    for dtype in (torch.float32, torch.float64):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, width, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        rates[str(dtype).removeprefix("torch.")] = 2.0 * size * size * width / best
    return rates


def site_shapes(stats_dir: Path, model: Path) -> list[tuple[int, int]]:
    """(d_in, d_out) of every solved site: its width and the rows of the layers that read it."""
    from regmean.io.checkpoint import Checkpoint
    from regmean.stats import StatisticsFile

    stats, ckpt = StatisticsFile(stats_dir), Checkpoint(model)
    rows: dict[str, int] = defaultdict(int)
    for module, site in stats.modules.items():
        rows[site] += ckpt.shape(f"{module}.weight")[0]
    return [(stats.site_shape(site)[0], d_out) for site, d_out in rows.items()]


def floor_seconds(shapes: list[tuple[int, int]], k: int, rates: dict[str, float]) -> dict[str, float]:
    products = sum(2.0 * k * d * d * d_out for d, d_out in shapes)
    solve = sum(d**3 / 3 + 2.0 * d * d * d_out for d, d_out in shapes)
    return {
        "products_gflop": products / 1e9,
        "solve_gflop": solve / 1e9,
        "float64_s": (products + solve) / rates["float64"],
        "float32_products_s": products / rates["float32"] + solve / rates["float64"],
    }


def statistics_of(models: list[Path], texts: Path, examples: int) -> list[Path]:
    out = []
    for m in models:
        stats = m.parent / f"stats-{m.name}"
        if not list(stats.glob("statistics*.safetensors")):
            cmd = [str(REGMEAN), "measure", str(m), "--data", str(texts), "--out", str(stats), "--expose-token-counts"]
            measured([*cmd, "--max-examples", str(examples), "--max-length", "128", "--batch-size", "8"], env=OFFLINE)
        out.append(stats)
    return out


def timed_merge(
    method: str, models: list[Path], stats: list[Path], name: str, dtype: str = "auto"
) -> tuple[dict, Path]:
    cfg = WORK / "configs" / f"floor-{name}.yaml"
    cfg.parent.mkdir(parents=True, exist_ok=True)
    recipe: dict = {"method": method, "models": [{"path": str(m)} for m in models], "dtype": dtype}
    if method == "regmean":
        recipe["options"] = {"alpha": ALPHA}
        for entry, s in zip(recipe["models"], stats, strict=True):
            entry["statistics"] = str(s)
    cfg.write_text(yaml.safe_dump(recipe))
    out = WORK / f"out-floor-{name}"
    row = measured([str(REGMEAN), "merge", str(cfg), str(out), "--force"], env=OFFLINE)
    return row, out


def floor_part(args, texts: Path) -> dict:
    dims = {"hidden": args.hidden, "intermediate": args.hidden * 11 // 4}
    folder = WORK / (f"llama-{args.layers}" if args.hidden == 2048 else f"llama-{args.layers}-h{args.hidden}")
    from smollm2 import smollm2_folder

    _, *models = build_llamas(folder, args.layers, 3, tokenizer=smollm2_folder(), **dims)
    stats = statistics_of(models, texts, args.stats_examples)
    rates = gemm_rates()
    average, _ = timed_merge("average", models, stats, f"average-{args.layers}")
    regmean, out = timed_merge("regmean", models, stats, f"regmean-{args.layers}")
    report = json.loads((out / "merge_report.json").read_text())
    floor = floor_seconds(site_shapes(stats[0], models[0]), len(models), rates)
    return {
        "params": param_count(llama_config(args.layers, **dims)),
        "rates": rates,
        "floor": floor,
        "average": average,
        "regmean": regmean,
        "diagnostics_s": sum(layer["diagnostics_seconds"] for layer in report["layers"]),
    }


def load_model(folder: Path) -> dict:
    """Every tensor of a model folder, float32, in memory."""
    import torch
    from safetensors.torch import load_file

    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state |= {k: v.to(torch.float32) for k, v in load_file(file).items()}
    return state


def peer_merge(models: list[Path], stats: list[Path], modules: list[str], out_file: Path) -> None:
    """The peers' RegMean of `modules`, written plainly: all models and Grams in RAM, float32, an explicit inverse
    per module."""
    import torch
    from safetensors.torch import save_file

    from regmean.stats import StatisticsFile

    states = [load_model(m) for m in models]
    files = [StatisticsFile(s) for s in stats]
    grams = {site: [f.site(site).gram / f.count(site) for f in files] for site in files[0].site_names}
    merged = {}
    for module in modules:
        site = files[0].modules[module]
        shrunk = []
        for g in grams[site]:
            diag = torch.diag(torch.diagonal(g))
            shrunk.append(ALPHA * g + (1 - ALPHA) * diag)
        inverse = torch.inverse(sum(shrunk))  # deliberately: the peers' way, measured against ours
        key = f"{module}.weight"
        rhs = sum(g @ s[key].T for g, s in zip(shrunk, states, strict=True))
        merged[key] = (inverse @ rhs).T.contiguous()
    save_file(merged, out_file)


def optimum_distances(
    models: list[Path], stats: list[Path], modules: list[str], merged: dict[str, dict]
) -> dict[str, dict]:
    """Each merge's distance from the float64 optimum (LU solve of the float64 normal equations), per tensor
    relative max-abs: the largest and the median over the solved tensors."""
    import statistics

    import torch

    from regmean.stats import StatisticsFile

    states = [load_model(m) for m in models]
    files = [StatisticsFile(s) for s in stats]
    distances: dict[str, list[float]] = {name: [] for name in merged}
    by_site = defaultdict(list)
    for module in modules:
        by_site[files[0].modules[module]].append(f"{module}.weight")
    for site, keys in by_site.items():
        gs = []
        for f in files:
            g = f.site(site).gram.to(torch.float64) / f.count(site)
            gs.append(ALPHA * g + (1 - ALPHA) * torch.diag(torch.diagonal(g)))
        a = sum(gs)
        for key in keys:
            rhs = sum(g @ s[key].to(torch.float64).T for g, s in zip(gs, states, strict=True))
            best = torch.linalg.solve(a, rhs).T
            for name, tensors in merged.items():
                got = tensors[key].to(torch.float64)
                distances[name].append(float((got - best).abs().max() / best.abs().max()))
    return {n: {"max": max(d), "median": statistics.median(d)} for n, d in distances.items()}


def peer_part(args, texts: Path) -> dict:
    dims = {"hidden": args.peer_hidden, "intermediate": args.peer_hidden * 11 // 4}
    folder = WORK / f"llama-{args.peer_layers}-h{args.peer_hidden}"
    from smollm2 import smollm2_folder

    _, *models = build_llamas(folder, args.peer_layers, 3, tokenizer=smollm2_folder(), **dims)
    stats = statistics_of(models, texts, args.stats_examples)
    # float32 output, as the peer's: the distances compare the solves, not a rounding to bf16
    ours, out = timed_merge("regmean", models, stats, f"peer-regmean-{args.peer_layers}", dtype="float32")
    modules = [layer["module"] for layer in json.loads((out / "merge_report.json").read_text())["layers"]]
    peer_file = WORK / f"peer-merge-{args.peer_layers}.safetensors"
    paths = {"models": [str(m) for m in models], "stats": [str(s) for s in stats], "out": str(peer_file)}
    job = json.dumps({**paths, "modules": modules})
    peer = measured([sys.executable, __file__, "--peer-run", job], env=OFFLINE)
    merged = {"regmean": load_model(out), "peer (float32, inverse)": load_model_file(peer_file)}
    return {
        "params": param_count(llama_config(args.peer_layers, **dims)),
        "regmean": ours,
        "peer": peer,
        "distance": optimum_distances(models, stats, modules, merged),
    }


def load_model_file(file: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(file)


def document(args, floor: dict | None, peer: dict | None) -> str:
    lines = ["# RegMean against its arithmetic floor and against an in-memory merge", "", f"Machine: {machine()}.", ""]
    if floor:
        f, rates = floor["floor"], floor["rates"]
        wall = floor["regmean"]["wall_s"]
        lines += [
            f"3 x {floor['params'] / 1e9:.2f}B Llama-shaped models ({args.layers} layers, hidden {args.hidden}, bf16), "
            f"statistics from {args.stats_examples} debate transcripts. GEMM rate measured in this run: float32 "
            f"{rates['float32'] / 1e9:.0f} GFLOP/s, float64 {rates['float64'] / 1e9:.0f} GFLOP/s. The sites need "
            f"{f['products_gflop']:.0f} GFLOP of products and {f['solve_gflop']:.0f} GFLOP of factorisation and "
            "solves.",
            "",
            "| | seconds | RegMean merge / this |",
            "|---|---:|---:|",
            f"| RegMean merge (`regmean merge`) | {wall:.1f} | 1.00 |",
            f"| floor: all float64, at the float64 GEMM rate | {f['float64_s']:.1f} | {wall / f['float64_s']:.2f} |",
            f"| floor if the products were float32 | {f['float32_products_s']:.1f} | "
            f"{wall / f['float32_products_s']:.2f} |",
            f"| average merge of the same models (reading and writing) | {floor['average']['wall_s']:.1f} | "
            f"{wall / floor['average']['wall_s']:.2f} |",
            "",
            f"Diagnostics (sampled reconstruction errors and residuals) took {floor['diagnostics_s']:.1f} s, "
            f"{100 * floor['diagnostics_s'] / wall:.1f}% of the merge. Peak RSS of the merge "
            f"{gib(floor['regmean']['peak_rss'])} GiB.",
            "",
        ]
    if peer:
        d = peer["distance"]
        lines += [
            f"In memory, the peers' way: 3 x {peer['params'] / 1e6:.0f}M ({args.peer_layers} layers, hidden "
            f"{args.peer_hidden}), both written in float32; distance from the float64 optimum is max-abs relative "
            "per solved tensor.",
            "",
            "| merge | wall s | peak RSS GiB | distance: largest | distance: median |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in (("regmean", peer["regmean"]), ("peer (float32, inverse)", peer["peer"])):
            lines.append(
                f"| {name} | {row['wall_s']:.1f} | {gib(row['peak_rss'])} | {d[name]['max']:.1e} | "
                f"{d[name]['median']:.1e} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--peer-layers", type=int, default=4)
    ap.add_argument("--peer-hidden", type=int, default=1024)
    ap.add_argument("--stats-examples", type=int, default=8)
    ap.add_argument("--skip-floor", action="store_true", help="keep the floor figures of the last run")
    ap.add_argument("--skip-peer", action="store_true", help="keep the peer-style figures of the last run")
    ap.add_argument("--peer-run", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer_run:
        job = json.loads(args.peer_run)
        peer_merge([Path(m) for m in job["models"]], [Path(s) for s in job["stats"]], job["modules"], Path(job["out"]))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    texts = texts_file(WORK / "debates.jsonl")
    earlier = DOCS / "regmean_floor.json"  # a part skipped now keeps its figures from the last run
    kept = json.loads(earlier.read_text()) if earlier.is_file() else {}
    floor = kept.get("floor") if args.skip_floor else floor_part(args, texts)
    peer = kept.get("peer") if args.skip_peer else peer_part(args, texts)
    text = document(args, floor, peer)
    print(text)
    write_doc("regmean_floor", text, {"floor": floor, "peer": peer})


if __name__ == "__main__":
    main()
