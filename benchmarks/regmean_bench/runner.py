"""What every suite shares: its settings, its results, and the runner of one suite at one seed (timing,
fine-tuning, statistics, merging, scoring)."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from regmean.io.data import Example
from regmean.measure import measure
from regmean.measure.fisher import measure_fisher, save_fisher
from regmean.measure.protect import Protection
from regmean.merge import MergeConfig, merge
from regmean.methods import METHODS
from regmean.scoring import predict, score
from regmean.stats import save
from regmean_bench import data as D
from regmean_bench.baselines import constant
from regmean_bench.train import Recipe, fine_tune

DATA_FREE: dict[str, dict] = {
    "task_arithmetic": {"scaling": 0.4},
    "ties": {"density": 0.2, "scaling": 1.0},
    "dare": {"drop_rate": 0.5, "combine": "ties", "scaling": 1.0},
}
"""The data-free baselines on task vectors (base: the packaged MiniLM) and their options: task arithmetic's usual
scaling, TIES' paper defaults, DARE on TIES (its seed is the run's)."""

EVERY_SITE = Protection(withhold=False)


TASK_PAIRS = (("tweets", "rotten_tomatoes"), ("debates", "chatterbot"))
"""The different-tasks suite's pairs: one body fine-tuned apart on each task of a pair, then merged."""


@dataclass
class Settings:
    base: Path
    work: Path
    recipe: Recipe = field(default_factory=Recipe)
    train_size: int = 1000  # examples per fine-tuned model
    test_size: int = 1000  # examples per evaluation set
    stats_size: int = 1000  # examples each owner measures Grams on
    fisher_size: int = 128  # examples for the (per-example gradient) Fisher
    alpha: float = 0.9
    alphas: tuple[float, ...] = (0.0, 0.1, 0.5, 0.9, 1.0)
    methods: tuple[str, ...] = ("average", *DATA_FREE, "fisher", "ensemble", "regmean", "regmean_plusplus", "mtl")
    keep_work: bool = False  # keep each seed's statistics and merged models (else deleted once the seed is scored)
    device: str = "cpu"  # fine-tuning, Fisher, measuring, merging and evaluation
    pairs: tuple[tuple[str, str], ...] = TASK_PAIRS  # the tasks suite's pairs of tasks
    log: Callable[[str], None] = partial(print, flush=True)  # a run in the background shows where it is

    def seed_dir(self, suite: str, seed: int) -> Path:
        """Statistics and merged models of one suite at one seed."""
        return self.work / suite / f"seed{seed}"


@dataclass
class Results:
    rows: list[dict] = field(default_factory=list)  # suite, seed, task, eval, method, metric, value
    times: list[dict] = field(default_factory=list)  # suite, seed, step, seconds
    curves: list[dict] = field(default_factory=list)  # incremental merging: n_models, method, eval, value

    def extend(self, other: Results) -> None:
        self.rows += other.rows
        self.times += other.times
        self.curves += other.curves


class Runner:
    """Shared machinery of one suite run at one seed: timing, statistics, merging, evaluation."""

    def __init__(self, suite: str, seed: int, s: Settings):
        self.suite, self.seed, self.s = suite, seed, s
        self.work = s.seed_dir(suite, seed)
        self.results = Results()

    def timed(self, step: str, fn, *args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        self.results.times.append(
            {"suite": self.suite, "seed": self.seed, "step": step, "seconds": time.perf_counter() - start}
        )
        return out

    def record(self, task: str, method: str, eval_name: str, metrics: dict[str, float]) -> None:
        for metric, value in metrics.items():
            self.results.rows.append(
                {
                    "suite": self.suite,
                    "seed": self.seed,
                    "task": task,
                    "eval": eval_name,
                    "method": method,
                    "metric": metric,
                    "value": value,
                }
            )

    def record_constant(self, task: str, evals: dict[str, D.TextDataset]) -> None:
        """The score of the best constant predictor (the majority class) of every evaluation set: the floor any
        model that learned its task must clear."""
        for name, data in evals.items():
            self.record(task, "constant", name, score(data, constant(data)))

    def train(self, tasks: list[D.TextDataset]) -> list[Path]:
        self.s.log(f"[{self.suite} seed {self.seed}] fine-tune on {' + '.join(t.name for t in tasks)}")
        return self.timed(
            "fine-tune" if len(tasks) == 1 else "mtl-train",
            fine_tune,
            self.s.base,
            tasks,
            self.s.recipe,
            self.seed,
            log=self.s.log,
            device=self.s.device,
        )

    def owner_texts(self, data: D.TextDataset) -> list[str]:
        """The texts each model's owner measures on (for Grams now, or for RegMean++ while merging)."""
        return [" ".join(t) if data.token_level else t for t in data.texts[: self.s.stats_size]]

    def gram_stats(self, model: Path, data: D.TextDataset, tag: str) -> Path:
        stats = self.timed(
            "measure",
            measure,
            model,
            [Example(t) for t in self.owner_texts(data)],
            max_length=self.s.recipe.max_length,
            batch_size=32,
            progress=False,
            device=self.s.device,
            protection=EVERY_SITE,  # (the bench's figures; benchmarks/privacy_quality.py measures withholding's cost)
        )
        return save(stats, self.work / "stats" / tag).parent

    def fisher_stats(self, model: Path, data: D.TextDataset, tag: str) -> Path:
        part = data.subset(range(min(len(data), self.s.fisher_size)))
        fisher = self.timed("fisher", measure_fisher, model, part, self.s.recipe.max_length, self.seed, self.s.device)
        return save_fisher(fisher, model, self.work / "fisher" / tag, len(part)).parent

    def merged(self, tag: str, method: str, models: list[Path], stats: list[Path] | None = None, **recipe) -> Path:
        entries = [
            {"path": str(m), **({"statistics": str(st)} if stats else {})}
            for m, st in zip(models, stats or [None] * len(models), strict=True)
        ]
        return self._merge(tag, "merge", MergeConfig(method=method, models=entries, **recipe))

    def plusplus(self, tag: str, models: list[Path], parts: list[D.TextDataset], **recipe) -> Path:
        """RegMean++ (alpha as RegMean's), each model measured while merging on the texts its owner measures on."""
        entries = []
        for k, (model, part) in enumerate(zip(models, parts, strict=True)):
            file = self.work / "data" / f"{tag}{k}.jsonl"
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_text("".join(json.dumps({"text": t}) + "\n" for t in self.owner_texts(part)))
            data = {"file": str(file), "batch_size": 32, "max_length": self.s.recipe.max_length}
            entries.append({"path": str(model), "data": data})
        options = {"alpha": self.s.alpha}
        config = MergeConfig(method="regmean_plusplus", models=entries, options=options, **recipe)
        return self._merge(tag, "regmean++ merge", config)

    def _merge(self, tag: str, step: str, config: MergeConfig) -> Path:
        out = self.work / "merged" / tag
        device = self.s.device if METHODS[config.method].runs_on_device else "cpu"  # the others merge on the CPU
        self.timed(step, merge, config, out, force=True, progress=False, device=device)
        return out

    def data_free(self, tag: str, models: list[Path], **recipe) -> dict[str, Path]:
        """The merged model(s) of every data-free method the settings ask for: average and those on task vectors."""
        out = {}
        if "average" in self.s.methods:
            out["average"] = self.merged(f"{tag}-average", "average", models, **recipe)
        for method, options in DATA_FREE.items():
            if method in self.s.methods:
                options = {**options, "seed": self.seed} if method == "dare" else options
                base = str(self.s.base)
                out[method] = self.merged(f"{tag}-{method}", method, models, base_model=base, options=options, **recipe)
        return out

    def evaluate(self, model: Path, evals: dict[str, D.TextDataset]) -> dict[str, list]:
        length, device = self.s.recipe.max_length, self.s.device
        return {name: self.timed("evaluate", predict, model, d, length, device=device) for name, d in evals.items()}


def cap(data: D.TextDataset, n: int, seed: int) -> D.TextDataset:
    if len(data) <= n:
        return data
    index = sorted(random.Random(seed).sample(range(len(data)), n))
    return data.subset(index)
