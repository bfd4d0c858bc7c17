"""The merge: every output tensor from the K inputs (and their statistics), one site or one tensor at a time."""

from __future__ import annotations

from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from regmean.architecture import LinearLayer, is_head_key
from regmean.errors import RegmeanError
from regmean.io.outputs import check_free_space
from regmean.io.tensorfile import DTYPES as TENSOR_DTYPES
from regmean.io.writer import DEFAULT_SHARD_BYTES, Layout, ShardedWriter
from regmean.merge.config import MergeConfig
from regmean.merge.inputs import MergeInputs, base_key, open_inputs
from regmean.merge.output import finish_folders, output_folders
from regmean.merge.plan import MergePlan, check_memory, make_plan, row_blocks
from regmean.merge.staging import staged_output
from regmean.methods import METHODS
from regmean.methods.regmean import RegMeanOptions, affine_gram, reconstruction_error, regmean_solve
from regmean.units import parse_size

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MergeReport:
    method: str
    layers: list[dict] = field(default_factory=list)
    """Per RegMean-merged linear layer: module, site, ridge, relative reconstruction error per model."""
    averaged_linears: list[str] = field(default_factory=list)
    """Linear layers without statistics, merged by the method's plain rule."""
    base_missing: list[str] = field(default_factory=list)
    """task_arithmetic: tensors the base model lacks (averaged)."""

    def summary(self) -> dict:
        errs = [e for row in self.layers for e in row["relative_error"]]
        ridged = [row["module"] for row in self.layers if row["ridge"] > 0]
        return {
            "regmean_layers": len(self.layers),
            "ridge_layers": len(ridged),
            "mean_relative_error": sum(errs) / len(errs) if errs else None,
            "max_relative_error": max(errs) if errs else None,
        }

    def to_dict(self) -> dict:
        return {"method": self.method, "summary": self.summary(), **self.__dict__}


def merge(
    config: MergeConfig | str | Path,
    out_dir: str | Path,
    *,
    force: bool = False,
    progress: bool = True,
    dry_run: bool = False,
    shard_size: int | str = DEFAULT_SHARD_BYTES,
    max_memory: int | str | None = None,
    log=None,
) -> MergeReport | MergePlan:
    """Merge the models of `config` (a MergeConfig or a YAML path) into `out_dir`.

    With heads: merge, `out_dir` is one model folder; with heads: keep, it holds one folder per input model (the
    merged body plus that model's own head). The plan (bytes, peak memory estimate) is computed first and passed to
    `log`; `dry_run` returns it without merging; `max_memory` refuses a merge whose estimate exceeds it. Tensors are
    read one at a time and written in shards of `shard_size`; nothing is left in `out_dir` unless the merge completes.
    """
    sources: list[tuple[str, Path]] = []
    if not isinstance(config, MergeConfig):
        sources.append(("recipe", Path(config)))
        config = MergeConfig.from_file(config)
    sources += config.input_paths()
    out_dir = Path(out_dir)
    shard_bytes = parse_size(shard_size, "--shard-size")
    memory_limit = None if max_memory is None else parse_size(max_memory, "--max-memory")
    if dry_run:
        return _planned(open_inputs(config), log, memory_limit)[0]
    with staged_output(out_dir, force, sources, log) as staged:
        inputs = open_inputs(config)
        plan, groups, layouts = _planned(inputs, log, memory_limit)
        check_free_space(staged, plan.write_bytes, "the merged model")
        folders = output_folders(inputs, staged)
        writers = [ShardedWriter(f, layout, shard_bytes) for f, layout in zip(folders, layouts, strict=True)]
        report = merge_into(inputs, groups, writers, progress)
        for w in writers:
            w.finish()
        finish_folders(inputs, folders, staged, report)
    return report


def _planned(inputs: MergeInputs, log, memory_limit: int | None) -> tuple[MergePlan, dict, list[Layout]]:
    """The plan (said to `log`, checked against the memory limit), the RegMean site groups and output layouts."""
    groups = _site_groups(inputs) if METHODS[inputs.config.method].statistics == "gram" else {}
    layouts = output_layouts(inputs)
    plan = make_plan(inputs, groups, layouts)
    if log is not None:
        log(plan.describe())
    check_memory(plan, memory_limit)
    return plan, groups, layouts


def output_layouts(inputs: MergeInputs) -> list[Layout]:
    """Names, dtypes and shapes of every output folder's tensors, known before any tensor is read."""
    config, first = inputs.config, inputs.models[0]

    def entry(model, key: str, merged: bool) -> tuple[torch.dtype, tuple[int, ...]]:
        dtype = TENSOR_DTYPES[model.dtype(key)]
        if merged and dtype.is_floating_point:
            dtype = _out_dtype(config, dtype)
        return dtype, model.shapes[key]

    body = {key: entry(first, key, True) for key in inputs.body_keys()}
    outputs = inputs.models if config.heads == "keep" else inputs.models[:1]
    return [{**body, **{key: entry(m, key, False) for key in inputs.head_keys()}} for m in outputs]


def merge_into(inputs: MergeInputs, groups: dict, writers: list[ShardedWriter], progress: bool = True) -> MergeReport:
    """Compute every output tensor, one site group or one tensor at a time, straight into the writers.

    Body tensors go to every writer; with heads: keep, writer k also gets model k's own head tensors. A reader
    thread loads the next step's tensors (and statistics) while this one computes, so I/O overlaps the solves.
    """
    config = inputs.config
    method = METHODS[config.method]
    options = config.method_options()
    weights = torch.tensor([m.weight for m in config.models], dtype=torch.float64)
    report = MergeReport(config.method)
    keys = inputs.body_keys()
    group_of = {}
    for site, layers in groups.items():
        for layer in layers:
            group_of[layer.weight_key] = site
            if layer.bias_key and options.bias == "joint":
                group_of[layer.bias_key] = site
    steps: list[tuple[str, object]] = []
    seen: set = set()
    first = inputs.models[0]
    for key in keys:
        if key in group_of:
            step = ("site", group_of[key])
        elif row_blocks(first.shapes[key], TENSOR_DTYPES[first.dtype(key)].itemsize) is not None:
            step = ("blocks", key)
        else:
            step = ("tensor", key)
        if step not in seen:
            seen.add(step)
            steps.append(step)

    def load(step):
        kind, what = step
        if kind == "site":
            return _load_site(inputs, what, groups[what], options)
        if kind == "tensor":
            return _load_plain(inputs, what, method)
        return None  # blocks are read in their step

    def compute(step, data) -> dict[str, torch.Tensor]:
        kind, what = step
        if kind == "site":
            return _regmean_site(inputs, what, groups[what], data, options, weights, report)
        if kind == "tensor":
            return {what: _plain_tensor(inputs, what, data, weights, options, method, report)}
        for rows in row_blocks(first.shapes[what], TENSOR_DTYPES[first.dtype(what)].itemsize):
            block = _plain_tensor(
                inputs, what, _load_plain(inputs, what, method, rows), weights, options, method, report
            )
            for w in writers:
                w.add(what, block, rows[0])
        return {}

    columns = [TextColumn("merging"), BarColumn(), MofNCompleteColumn(), TextColumn("tensors"), TimeElapsedColumn()]
    with Progress(*columns, disable=not progress) as bar, ThreadPoolExecutor(1, "regmean-reader") as reader:
        task = bar.add_task("merge", total=len(keys))
        pending = reader.submit(load, steps[0]) if steps else None
        for i, step in enumerate(steps):
            data = pending.result()
            pending = reader.submit(load, steps[i + 1]) if i + 1 < len(steps) else None
            solved = compute(step, data)
            del data
            for name, tensor in solved.items():
                for w in writers:
                    w.add(name, tensor)
            bar.advance(task, len(solved) or 1)
        for key in inputs.head_keys():
            for model, w in zip(inputs.models, writers, strict=True):
                w.add(key, model.get(key))
    measured = {layer.module for group in groups.values() for layer in group}
    body = set(keys)
    report.averaged_linears = (
        sorted(n for n, layer in inputs.linears.items() if n not in measured and layer.weight_key in body)
        if method.statistics == "gram"
        else []
    )
    return report


def _load_plain(inputs: MergeInputs, key: str, method, rows: tuple[int, int] | None = None) -> dict:
    """The K input tensors of `key` (or their `rows`), the base model's (None where it lacks it) and the Fisher
    diagonals."""
    data: dict = {"tensors": [m.get(key, rows) for m in inputs.models], "base": None, "base_missing": False}
    if inputs.base is not None and (method.needs_base or _from_base(inputs, key)):
        bkey = base_key(inputs.base, key, inputs.skeleton)
        data["base_missing"] = bkey is None and (rows is None or rows[0] == 0)  # reported once per tensor
        data["base"] = None if bkey is None else inputs.base.get(bkey, rows)
    if method.statistics == "fisher":
        fisher = [f.get(key, rows) for f in inputs.stats]
        data["fisher"] = torch.stack(fisher) if all(f is not None for f in fisher) else None
    return data


def _from_base(inputs: MergeInputs, key: str) -> bool:
    """Whether `key` is taken from the base model (embeddings: base, or lm_head: base)."""
    config = inputs.config
    return (config.embeddings == "base" and is_head_key(key, inputs.embeddings)) or bool(
        config.lm_head == "base" and inputs.lm_head and is_head_key(key, [inputs.lm_head])
    )


def _plain_tensor(inputs: MergeInputs, key, data: dict, weights, options, method, report) -> torch.Tensor:
    tensors = data["tensors"]
    if not tensors[0].is_floating_point():  # integer buffers (position ids): identical across fine-tunes
        return tensors[0]
    config = inputs.config
    out_dtype = _out_dtype(config, tensors[0].dtype)
    if data["base_missing"]:
        report.base_missing.append(key)
    if data["base"] is not None and _from_base(inputs, key):
        return data["base"].to(out_dtype)
    extra = {"fisher": data["fisher"]} if method.statistics == "fisher" else {}
    base = data["base"] if method.needs_base else None
    merged = method.merge_tensor(tensors, weights, base, options, **extra)
    return merged.to(out_dtype)


def _out_dtype(config: MergeConfig, dtype: torch.dtype) -> torch.dtype:
    return dtype if config.dtype == "auto" else DTYPES[config.dtype]


def _site_groups(inputs: MergeInputs) -> dict[tuple[str, ...], list[LinearLayer]]:
    """Measured body linear layers grouped by their site in every model: one factorisation serves a group."""
    groups: dict[tuple[str, ...], list[LinearLayer]] = defaultdict(list)
    keep = inputs.config.heads == "keep"
    for name, layer in inputs.linears.items():
        if name not in inputs.stats[0].modules or (keep and is_head_key(layer.weight_key, inputs.heads)):
            continue
        if name == inputs.lm_head and inputs.config.lm_head != "regmean":
            continue
        groups[tuple(st.modules[name] for st in inputs.stats)].append(layer)
    return groups


def _weight(tensor: torch.Tensor, layer: LinearLayer) -> torch.Tensor:
    """As [d_out, d_in] whatever the storage (Conv1D stores [d_in, d_out])."""
    return tensor.T if layer.transposed else tensor


def _load_site(inputs: MergeInputs, sites: tuple[str, ...], layers: list[LinearLayer], options) -> dict:
    """Each model's statistics of the site and the weights (and biases, for joint) of the layers reading it."""
    stats = [st.site(name) for st, name in zip(inputs.stats, sites, strict=True)]
    params = {}
    for model in inputs.models:
        for layer in layers:
            params[model.path, layer.weight_key] = model.get(layer.weight_key)
            if layer.bias_key and options.bias == "joint":
                params[model.path, layer.bias_key] = model.get(layer.bias_key)
    return {"stats": stats, "params": params}


def _regmean_site(
    inputs: MergeInputs,
    sites: tuple[str, ...],
    layers: list[LinearLayer],
    data: dict,
    options: RegMeanOptions,
    weights: torch.Tensor,
    report: MergeReport,
) -> dict[str, torch.Tensor]:
    stats, params = data["stats"], data["params"]
    d_in = stats[0].gram.shape[0]
    for layer in layers:
        if layer.d_in != d_in:
            raise RegmeanError(
                f"{inputs.stats[0].path}: site {sites[0]} is {d_in} wide, {layer.module} reads {layer.d_in}"
            )
    empty = [st.path for st, s in zip(inputs.stats, stats, strict=True) if s.count == 0]
    if empty:
        raise RegmeanError(f"{empty[0]}: site {sites[0]} has zero rows; measure on non-empty data")
    counts = torch.tensor([s.count for s in stats], dtype=torch.float64)
    relative = weights / weights.max()  # the solution depends only on the ratios; this keeps Grams x weights finite
    scale = relative / counts if options.gram_weighting == "mean" else relative
    joint = options.bias == "joint"
    subgroups = [[la for la in layers if la.bias_key], [la for la in layers if not la.bias_key]] if joint else [layers]
    out: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for group in subgroups:
        if not group:
            continue
        affine = joint and group[0].bias_key is not None
        grams = [affine_gram(s.gram, s.sum, s.count) if affine else s.gram for s in stats]
        stacked = []
        for model in inputs.models:
            rows = []
            for layer in group:
                source = params[model.path, layer.weight_key]
                dtypes.setdefault(layer.module, _out_dtype(inputs.config, source.dtype))
                w = _weight(source, layer).to(torch.float64)
                if affine:
                    w = torch.cat([w, params[model.path, layer.bias_key].to(torch.float64)[:, None]], dim=1)
                rows.append(w)
            stacked.append(torch.cat(rows))
        stacked = torch.stack(stacked)
        try:
            merged, ridge = regmean_solve(stacked, grams, scale, weights, options.alpha)
        except FloatingPointError as exc:
            raise RegmeanError(f"site {sites[0]}: {exc}; check the statistics and the models' weights") from None
        start = 0
        for layer in group:
            part = merged[start : start + layer.d_out]
            errors = [
                reconstruction_error(part, stacked[k, start : start + layer.d_out], grams[k]) for k in range(len(stats))
            ]
            start += layer.d_out
            w = part[:, :d_in].to(dtypes[layer.module])
            out[layer.weight_key] = w.T.contiguous() if layer.transposed else w.contiguous()
            if affine:
                out[layer.bias_key] = part[:, d_in].to(dtypes[layer.module]).contiguous()
            report.layers.append(
                {
                    "module": layer.module,
                    "site": sites[0],
                    "ridge": ridge,
                    "relative_error": errors,
                    "bias": "joint" if affine else "average",
                }
            )
    return out
