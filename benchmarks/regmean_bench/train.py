"""Fine-tuning for the benchmarks: AdamW, linear warm-up then linear decay (the paper's recipe, sized for CPU).

Models are cached on disk under a hash of (base weights, data, recipe, seed, task layout): reruns reuse them.
Multi-task learning with different label sets trains one shared body with one head per task.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers as tf

from regmean.io.checkpoint import Checkpoint
from regmean.io.labelled import TextDataset, batches
from regmean.loading import load_tokenizer
from regmean.scoring import classifier_class


@dataclass(frozen=True)
class Recipe:
    epochs: int = 5  # with lr 2e-4, every suite's individual models learn their task (benchmarks/recipe_search.py)
    lr: float = 2e-4  # the paper: 1e-5 for 10 epochs on base-size models; MiniLM on a CPU budget needs more
    batch_size: int = 16
    max_length: int = 64
    warmup: float = 0.06
    weight_decay: float = 0.01


def cache_root() -> Path:
    return Path(os.environ.get("REGMEAN_CACHE", "~/.cache/regmean")).expanduser()


def data_hash(data: TextDataset) -> str:
    h = hashlib.blake2b(digest_size=12)
    h.update(json.dumps([data.texts, data.labels, data.label_names]).encode())
    return h.hexdigest()


def _new_model(base: Path, data: TextDataset):
    cls = classifier_class(data.token_level)
    tf.utils.logging.set_verbosity_error()  # the "newly initialized head" notice is expected here
    return cls.from_pretrained(
        base,
        num_labels=len(data.label_names),
        id2label=dict(enumerate(data.label_names)),
        label2id={n: i for i, n in enumerate(data.label_names)},
    )


def fine_tune(
    base: str | Path, tasks: list[TextDataset], recipe: Recipe, seed: int, log=print, device: str = "cpu"
) -> list[Path]:
    """Train one model on `tasks` (one task: a plain fine-tune; several: shared body, one head each), on `device`.

    Tasks with identical label names are concatenated into one task first (same label space, one head).
    Returns one model folder per distinct task, cached (models trained on an accelerator apart from the CPU's).
    """
    base = Path(base)
    tasks = _merge_same_label_space(tasks)
    out = _cache_folder(base, tasks, recipe, seed, device)
    folders = [out / f"task{k}" for k in range(len(tasks))]
    if (out / "done").exists():
        return folders
    torch.manual_seed(seed)
    tok = load_tokenizer(base)
    models = [_new_model(base, t).to(device) for t in tasks]
    prefix = models[0].base_model_prefix
    for m in models[1:]:  # one shared body
        setattr(m, prefix, getattr(models[0], prefix))
    _train(models, tasks, tok, recipe, torch.Generator().manual_seed(seed), log, device)
    _save(out, models, tok, {"recipe": asdict(recipe), "seed": seed, "tasks": [t.name for t in tasks]})
    return folders


def _cache_folder(base: Path, tasks: list[TextDataset], recipe: Recipe, seed: int, device: str) -> Path:
    """Where the models trained from `base` on `tasks` with `recipe` and `seed` are cached."""
    key = hashlib.blake2b(digest_size=12)
    key.update(Checkpoint(base).fingerprint["weights"].encode())
    accelerator = [] if torch.device(device).type == "cpu" else [torch.device(device).type]
    key.update(json.dumps([asdict(recipe), seed, [data_hash(t) for t in tasks], *accelerator]).encode())
    return cache_root() / "models" / key.hexdigest()


def _train(models: list, tasks: list[TextDataset], tok, recipe: Recipe, gen: torch.Generator, log, device: str):
    """AdamW over the models' distinct parameters; each epoch draws every task's batches in one shuffled order."""
    params = list({id(p): p for m in models for p in m.parameters()}.values())
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() > 1], "weight_decay": recipe.weight_decay},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0},
        ],
        lr=recipe.lr,
    )
    total = sum(-(-len(t) // recipe.batch_size) for t in tasks) * recipe.epochs
    sched = tf.get_linear_schedule_with_warmup(opt, int(recipe.warmup * total), total)
    for m in models:
        m.train()
    for epoch in range(recipe.epochs):
        plan = []
        for k, t in enumerate(tasks):
            order = torch.randperm(len(t), generator=gen).tolist()
            plan += [(k, b) for b in batches(tok, t, recipe.batch_size, recipe.max_length, order)]
        running = 0.0
        for j in torch.randperm(len(plan), generator=gen).tolist():
            k, batch = plan[j]
            loss = models[k](**{name: t.to(device) for name, t in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            running += loss.item()
        log(f"  epoch {epoch + 1}/{recipe.epochs}: mean loss {running / max(len(plan), 1):.4f}")


def _save(out: Path, models: list, tok, record: dict) -> None:
    """Write the models (one folder each) and the `done` record into `out` at once: a partial folder never shows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".partial-"))
    for k, m in enumerate(models):
        m.eval().cpu().save_pretrained(tmp / f"task{k}")
        tok.save_pretrained(tmp / f"task{k}")
    (tmp / "done").write_text(json.dumps(record))
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def _merge_same_label_space(tasks: list[TextDataset]) -> list[TextDataset]:
    merged: list[TextDataset] = []
    for t in tasks:
        same = next((m for m in merged if m.label_names == t.label_names and m.token_level == t.token_level), None)
        if same is None:
            merged.append(t)
        else:
            merged[merged.index(same)] = TextDataset(
                f"{same.name}+{t.name}",
                same.texts + t.texts,
                same.labels + t.labels,
                same.label_names,
                token_level=same.token_level,
            )
    return merged
