"""The paper's experiments on packaged real data, one function per suite.

Every suite fine-tunes (or reuses cached) models from the packaged MiniLM, measures statistics on each model's own
training data, merges with RegMean and the baselines through the same engine, evaluates, and returns result rows
plus wall times per step. Reports are written by `regmean_bench.report`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from regmean.errors import RegmeanError
from regmean.merge.output import output_names
from regmean.scoring import score
from regmean_bench import data as D
from regmean_bench.baselines import ensemble
from regmean_bench.runner import Results, Runner, Settings, cap


def shared_label_space(
    run: Runner, task: str, parts: list[D.TextDataset], evals: dict[str, D.TextDataset], names: list[str] | None = None
) -> tuple[dict[str, dict[str, list]], list[Path], list]:
    """Models of one label space: each individual model, the data-free merges, Fisher, ensemble, RegMean (+ alpha
    sweep), RegMean++, MTL.

    Returns every method's predictions per eval set, the fine-tuned models and their Gram statistics (for
    incremental merging).
    """
    s = run.s
    names = names or [f"model{k}" for k in range(len(parts))]
    models = [run.train([p])[0] for p in parts]
    preds: dict[str, dict[str, list]] = {}
    grams: list[Path] = []
    for name, m in zip(names, models, strict=True):
        preds[f"individual:{name}"] = run.evaluate(m, evals)
    for method, folder in run.data_free(task, models).items():
        preds[method] = run.evaluate(folder, evals)
    if "fisher" in s.methods:
        fisher = [
            run.fisher_stats(m, p, f"{task}-fisher{k}") for k, (m, p) in enumerate(zip(models, parts, strict=True))
        ]
        preds["fisher"] = run.evaluate(run.merged(f"{task}-fisher", "fisher", models, fisher), evals)
    if "ensemble" in s.methods:
        preds["ensemble"] = {e: ensemble([preds[f"individual:{n}"][e] for n in names]) for e in evals}
    if "regmean" in s.methods:
        grams = [run.gram_stats(m, p, f"{task}-gram{k}") for k, (m, p) in enumerate(zip(models, parts, strict=True))]
        for alpha in sorted(set(s.alphas) | {s.alpha}):
            label = "regmean" if alpha == s.alpha else f"regmean(alpha={alpha:g})"
            out = run.merged(f"{task}-regmean-{alpha:g}", "regmean", models, grams, options={"alpha": alpha})
            preds[label] = run.evaluate(out, evals)
    if "regmean_plusplus" in s.methods:
        preds["regmean_plusplus"] = run.evaluate(run.plusplus(f"{task}-regmean_plusplus", models, parts), evals)
    if "mtl" in s.methods:
        preds["mtl"] = run.evaluate(run.train(parts)[0], evals)
    for method, per_eval in preds.items():
        for e, logits in per_eval.items():
            run.record(task, method, e, score(evals[e], logits))
    return preds, models, grams


# -- suites ------------------------------------------------------------------------------------------------------
PARTITION_TASKS = ("tweets", "rotten_tomatoes", "debates")


def suite_partitions(seed: int, s: Settings, tasks=PARTITION_TASKS) -> Results:
    """One task, two non-i.i.d. partitions of the training split, heads merged, evaluated on the full test split."""
    run = Runner("partitions", seed, s)
    for task in tasks:
        parts, test = partition_data(task, seed, s)
        shared_label_space(run, task, parts, {"test": test})
    return run.results


def partition_data(task: str, seed: int, s: Settings) -> tuple[list[D.TextDataset], D.TextDataset]:
    """The partitions suite's two skewed training parts of `task` and its test set."""
    train, _, test = D.split(D.load(task), seed)
    index, main = D.partition_noniid(train.labels, seed, size=s.train_size)
    parts = [train.subset(ix, f"{task}/part{k}") for k, ix in enumerate(index)]
    s.log(f"[partitions seed {seed}] {task}: main label {train.label_names[main]}, sizes {[len(p) for p in parts]}")
    return parts, cap(test, s.test_size, seed)


def suite_tasks(seed: int, s: Settings) -> Results:
    """Pairs of different tasks: bodies merged, heads kept; each task scored with the merged body + its own head."""
    run = Runner("tasks", seed, s)
    for pair in s.pairs:
        trains, tests = (list(sets) for sets in zip(*(task_data(t, seed, s) for t in pair), strict=True))
        name = "+".join(pair)
        models = [run.train([t])[0] for t in trains]
        outputs: dict[str, list[Path]] = {"individual": models}
        for method, folder in run.data_free(name, models, heads="keep").items():
            outputs[method] = _keep_dirs(folder, models)
        if "fisher" in s.methods:
            fisher = [
                run.fisher_stats(m, t, f"{name}-fisher{k}") for k, (m, t) in enumerate(zip(models, trains, strict=True))
            ]
            outputs["fisher"] = _keep_dirs(run.merged(f"{name}-fisher", "fisher", models, fisher, heads="keep"), models)
        if "regmean" in s.methods:
            grams = [
                run.gram_stats(m, t, f"{name}-gram{k}") for k, (m, t) in enumerate(zip(models, trains, strict=True))
            ]
            for alpha in sorted(set(s.alphas) | {s.alpha}):
                label = "regmean" if alpha == s.alpha else f"regmean(alpha={alpha:g})"
                out = run.merged(
                    f"{name}-regmean-{alpha:g}", "regmean", models, grams, options={"alpha": alpha}, heads="keep"
                )
                outputs[label] = _keep_dirs(out, models)
        if "regmean_plusplus" in s.methods:
            out = run.plusplus(f"{name}-regmean_plusplus", models, trains, heads="keep")
            outputs["regmean_plusplus"] = _keep_dirs(out, models)
        if "mtl" in s.methods:
            outputs["mtl"] = run.train(trains)
        for method, folders in outputs.items():
            for task, folder, test in zip(pair, folders, tests, strict=True):
                run.record(name, method, task, score(test, run.evaluate(folder, {task: test})[task]))
    return run.results


def task_data(task: str, seed: int, s: Settings) -> tuple[D.TextDataset, D.TextDataset]:
    """The tasks suite's training set of `task` and its test set."""
    train, _, test = D.split(D.load(task), seed)
    return cap(train, s.train_size, seed), cap(test, s.test_size, seed)


def _keep_dirs(out: Path, models: list[Path]) -> list[Path]:
    """The per-model folders a heads: keep merge wrote."""
    return [out / n for n in output_names(models)]


IN_DOMAINS = ("airline", "apple", "deflategate", "selfdriving")


def suite_domains(seed: int, s: Settings, in_domains=IN_DOMAINS) -> Results:
    """Shared-label multi-domain sentiment: one model per tweet sub-domain, merged; in-domain and OOD scores;
    incremental merging in order of the individual models' OOD score."""
    run = Runner("domains", seed, s)
    parts, evals = domain_data(seed, s, in_domains)
    preds, models, grams = shared_label_space(run, "tweet-domains", parts, evals, names=list(in_domains))

    if "regmean" in s.methods:  # incremental merging, models added in order of their OOD score
        ood = [e for e in evals if e.startswith("ood:")]

        def ood_score(method: str) -> float:
            return sum(score(evals[e], preds[method][e])["macro_f1"] for e in ood) / len(ood)

        order = sorted(range(len(parts)), key=lambda k: -ood_score(f"individual:{in_domains[k]}"))
        for n in range(1, len(order) + 1):
            chosen = [models[k] for k in order[:n]]
            stats = [grams[k] for k in order[:n]]
            for method in ("regmean", "average"):
                folder = (
                    chosen[0]
                    if n == 1
                    else run.merged(
                        f"incremental-{method}-{n}",
                        method,
                        chosen,
                        stats if method == "regmean" else None,
                        **({"options": {"alpha": s.alpha}} if method == "regmean" else {}),
                    )
                )
                got = run.evaluate(folder, {e: evals[e] for e in ood})
                value = sum(score(evals[e], got[e])["macro_f1"] for e in ood) / len(ood)
                run.results.curves.append(
                    {
                        "suite": "domains",
                        "seed": seed,
                        "n_models": n,
                        "method": method,
                        "added": in_domains[order[n - 1]],
                        "ood_macro_f1": value,
                    }
                )
    return run.results


def domain_data(seed: int, s: Settings, in_domains=IN_DOMAINS) -> tuple[list[D.TextDataset], dict[str, D.TextDataset]]:
    """The domains suite's training tweets of each in-domain, and its evaluation sets: each in-domain's test tweets
    (in:NAME), the held-out domains' and Rotten Tomatoes as positive/negative (ood:NAME)."""
    train, _, test = D.split(D.load("tweets"), seed)

    def domain(d: D.TextDataset, name: str) -> D.TextDataset:
        return d.subset([i for i, x in enumerate(d.domains) if x == name], f"tweets/{name}")

    parts = [cap(domain(train, n), s.train_size, seed) for n in in_domains]
    evals = {f"in:{n}": cap(domain(test, n), s.test_size // 2, seed) for n in in_domains}
    held_out = [n for n in D.TWEET_DOMAINS if n not in in_domains] + ["other"]
    for n in held_out:
        evals[f"ood:{n}"] = cap(domain(test, n), s.test_size, seed)
    rt = D.split(D.load_rotten_tomatoes(sentiment_only=True), seed)[2]
    rt = replace(rt, labels=[0 if y == 0 else 2 for y in rt.labels], label_names=train.label_names)  # to 3 labels
    evals["ood:rotten_tomatoes"] = cap(rt, s.test_size, seed)
    return parts, evals


def suite_ner(seed: int, s: Settings) -> Results:
    """WNUT-2016 NER: two random partitions of the training split, tags merged, entity F1 on the test split."""
    run = Runner("ner", seed, s)
    parts, test = ner_data(seed, s)
    shared_label_space(run, "wnut", parts, {"test": test})
    return run.results


def ner_data(seed: int, s: Settings) -> tuple[list[D.TextDataset], D.TextDataset]:
    """The ner suite's two random halves of WNUT-2016's training split (at most train_size each) and its test set."""
    train, _, test = D.split(D.load("wnut"), seed)
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    half = min(len(order) // 2, s.train_size)
    parts = [train.subset(sorted(order[k * half : (k + 1) * half]), f"wnut/part{k}") for k in range(2)]
    return parts, cap(test, s.test_size, seed)


@dataclass
class OwnTask:
    """One individual model's training data and the evaluation data of its own task (its in-domain data)."""

    suite: str
    train: D.TextDataset
    test: D.TextDataset


def own_tasks(suite: str, seed: int, s: Settings) -> list[OwnTask]:
    """Every individual model a suite fine-tunes at `seed`, with its own evaluation data: what a recipe must teach."""
    if suite == "partitions":  # each part is scored on the task's whole test set, as in the suite
        found = []
        for task in PARTITION_TASKS:
            parts, test = partition_data(task, seed, s)
            found += [OwnTask(suite, p, test) for p in parts]
        return found
    if suite == "tasks":
        return [OwnTask(suite, *task_data(t, seed, s)) for pair in s.pairs for t in pair]
    if suite == "domains":
        parts, evals = domain_data(seed, s)
        return [OwnTask(suite, p, evals[f"in:{n}"]) for p, n in zip(parts, IN_DOMAINS, strict=True)]
    if suite == "ner":
        parts, test = ner_data(seed, s)
        return [OwnTask(suite, p, test) for p in parts]
    raise RegmeanError(f"unknown suite {suite!r}: use one of {', '.join(SUITES)}")


def evaluation_sets(suite: str, seed: int, s: Settings) -> dict[str, dict[str, D.TextDataset]]:
    """A suite's evaluation sets at `seed`, by task (as its rows name them) and evaluation name; none for a suite
    defined elsewhere."""
    if suite == "partitions":
        return {task: {"test": partition_data(task, seed, s)[1]} for task in PARTITION_TASKS}
    if suite == "tasks":
        return {"+".join(pair): {t: task_data(t, seed, s)[1] for t in pair} for pair in s.pairs}
    if suite == "domains":
        return {"tweet-domains": domain_data(seed, s)[1]}
    if suite == "ner":
        return {"wnut": {"test": ner_data(seed, s)[1]}}
    return {}


def constant_rows(suite: str, seed: int, s: Settings) -> list[dict]:
    """The constant predictor's rows of a suite at `seed` (added by `run_bench` to every seed, including those kept
    from a run made before it was scored)."""
    run = Runner(suite, seed, s)
    for task, evals in evaluation_sets(suite, seed, s).items():
        run.record_constant(task, evals)
    return run.results.rows


SUITES: dict[str, Callable[[int, Settings], Results]] = {
    "partitions": suite_partitions,
    "tasks": suite_tasks,
    "domains": suite_domains,
    "ner": suite_ner,
}
