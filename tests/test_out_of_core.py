"""Out-of-core merging: sharded inputs and outputs, atomic output, the plan's memory estimate."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import transformers as tf
from conftest import ALL_SITES, save_model
from safetensors.torch import load_file
from test_merge import EXAMPLES, make_models, write_config
from typer.testing import CliRunner

import regmean
from regmean.cli import app
from regmean.measure import measure
from regmean.merge.journal import JOURNAL
from regmean.stats import save

runner = CliRunner()


def read_all(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    out = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        out.update(load_file(folder / shard))
    return out


def test_sharded_inputs_and_outputs_equal_the_single_file_merge(tmp_path):
    models = make_models(tmp_path / "single", "llama", "LlamaForCausalLM")
    sharded = []
    for k, m in enumerate(models):  # the same weights saved in many small shards
        model = tf.LlamaForCausalLM.from_pretrained(m["path"])
        path = tmp_path / "sharded" / f"ft{k}"
        model.save_pretrained(path, max_shard_size="200KB")
        assert (path / "model.safetensors.index.json").exists()
        for f in Path(m["path"]).glob("tokenizer*"):
            (path / f.name).write_bytes(f.read_bytes())
        sharded.append({"path": str(path), "statistics": m["statistics"]})
    one = regmean.merge(regmean.MergeConfig(models=models), tmp_path / "one", progress=False)
    many = regmean.merge(regmean.MergeConfig(models=sharded), tmp_path / "many", progress=False, shard_size="2KB")
    a, b = read_all(tmp_path / "one"), read_all(tmp_path / "many")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert one.summary() == many.summary()
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 3 and all((tmp_path / "many" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    model = tf.LlamaForCausalLM.from_pretrained(tmp_path / "many")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize("method", ["average", "task_arithmetic"])
def test_large_tensors_merged_in_row_blocks_equal_the_whole_tensor_merge(tmp_path, monkeypatch, method):
    from regmean.methods import base as plan

    models = make_models(tmp_path / "m", "llama", "LlamaForCausalLM")
    base = models[0]["path"] if method == "task_arithmetic" else None
    config = regmean.MergeConfig(method=method, models=[{"path": m["path"]} for m in models[1:]], base_model=base)
    regmean.merge(config, tmp_path / "whole", progress=False)
    monkeypatch.setattr(plan, "BLOCK_BYTES", 1000)  # every matrix in blocks of a few rows
    assert plan.row_blocks((64, 32), 4) is not None
    regmean.merge(config, tmp_path / "blocks", progress=False, shard_size="3KB")
    a, b = read_all(tmp_path / "whole"), read_all(tmp_path / "blocks")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_failure_mid_merge_leaves_nothing(tmp_path, monkeypatch):
    from regmean.methods.regmean import RegMean

    models = make_models(tmp_path, "bert", "BertForSequenceClassification")
    calls = {"n": 0}
    original = RegMean.compute

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(RegMean, "compute", failing)
    with pytest.raises(RuntimeError):
        regmean.merge(regmean.MergeConfig(models=models), tmp_path / "out", progress=False, shard_size="50KB")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_killed_merge_leaves_no_complete_looking_folder(tmp_path):
    models = make_models(tmp_path, "bert", "BertForSequenceClassification")
    config = write_config(tmp_path, method="regmean", models=models)
    code = (
        "import importlib, time\n"
        "from regmean.methods.regmean import RegMean\n"
        "e = importlib.import_module('regmean.merge.engine')\n"
        "orig = RegMean.compute\n"
        "def slow(*a, **k):\n    time.sleep(0.5)\n    return orig(*a, **k)\n"
        "RegMean.compute = slow\n"
        f"e.merge({str(config)!r}, {str(tmp_path / 'out')!r}, progress=False, shard_size='20KB')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 120
    while time.time() < deadline and not _finished_a_step(tmp_path):  # (a kill before that leaves nothing to resume)
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list(tmp_path.glob(".out.partial-*")), "the merge had started writing"
    assert not (tmp_path / "out").exists()  # only a hidden, visibly partial folder remains
    assert not list(tmp_path.glob(".out.partial-*/model*.safetensors"))
    # the next run into that output takes up the staging folder the killed run left (its journal says which steps
    # it finished), and says so
    result = runner.invoke(app, ["merge", str(config), str(tmp_path / "out"), "--shard-size", "20KB"])
    assert result.exit_code == 0 and "resuming the merge interrupted in" in result.output, result.output
    assert not list(tmp_path.glob(".out.*"))
    # SIGTERM (kill): the run cleans up after itself, one line, exit 143
    sigterm = code.replace("e.merge(", "import sys\nsys.argv = ['regmean', 'merge', '--force', ").replace(
        ", progress=False, shard_size='20KB')", ", '--shard-size', '20KB']\nfrom regmean.cli import main\nmain()"
    )
    proc = subprocess.Popen([sys.executable, "-c", sigterm], stderr=subprocess.PIPE, text=True)
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*/.shard-*")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    code, err = proc.wait(), proc.stderr.read()
    assert code == 143, err
    assert err.splitlines()[-1] == "error: terminated; nothing was written"
    left = list(tmp_path.glob(".out.*"))  # a staging folder with finished steps is kept for a rerun, none else
    assert all((p / JOURNAL).read_text().count("\n") > 1 for p in left), left
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # the earlier output, untouched


def _finished_a_step(tmp_path) -> bool:
    """Whether the merge staged beside `tmp_path / "out"` has journaled a finished step."""
    journals = tmp_path.glob(f".out.partial-*/{JOURNAL}")
    return any(j.read_text().count("\n") > 1 for j in journals)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    models = make_models(tmp_path, "bert", "BertForSequenceClassification")
    config = write_config(tmp_path, method="regmean", models=models)
    result = runner.invoke(app, ["merge", str(config), str(tmp_path / "out"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "plan:" in result.output and "peak memory" in result.output
    assert not (tmp_path / "out").exists()
    refused = runner.invoke(app, ["merge", str(config), str(tmp_path / "out"), "--max-memory", "10MB"])
    assert refused.exit_code != 0 and "exceeds --max-memory" in refused.output
    assert not (tmp_path / "out").exists()


# VmHWM: this address space's peak resident memory (getrusage's ru_maxrss is inherited from the parent on Linux)
CHILD = """
import json, re, sys, regmean
plan = regmean.merge(sys.argv[1], sys.argv[2], dry_run=True, progress=False)
if sys.argv[3] == "run":
    regmean.merge(sys.argv[1], sys.argv[2], progress=False, shard_size="100MB")
peak = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
print(json.dumps({"estimate": plan.peak_bytes, "peak": peak}))
"""


def test_dry_run_estimate_is_within_2x_of_the_measured_peak(tmp_path):
    config = tf.BertConfig(
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=2,
        num_attention_heads=6,
        intermediate_size=3072,
        num_labels=3,
    )
    models = []
    for k in range(3):
        torch.manual_seed(k)
        path = save_model(tf.BertForSequenceClassification(config), tmp_path / f"m{k}")
        save(measure(path, EXAMPLES, batch_size=4, progress=False, protection=ALL_SITES), tmp_path / f"s{k}")
        models.append({"path": str(path), "statistics": str(tmp_path / f"s{k}")})
    recipe = write_config(tmp_path, method="regmean", models=models)
    runs = {}
    for mode in ("dry", "run"):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(recipe), str(tmp_path / "out"), mode],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        runs[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    merge_peak = runs["run"]["peak"]
    estimate = runs["run"]["estimate"]
    assert merge_peak / 2 <= estimate <= 2 * merge_peak, (estimate, merge_peak, runs["dry"])
    assert merge_peak > runs["dry"]["peak"] + 100e6  # the merge itself needed real memory: the test measures it
