"""Data-parallel measuring: 2 Gloo processes (spawned by torchrun) equal one process; a dying rank fails cleanly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ALL_SITES, TEXTS, build_model, save_model, write_jsonl

from regmean.io.data import Example
from regmean.measure import measure
from regmean.stats import StatisticsFile

pytestmark = pytest.mark.slow  # several processes per test: the slow tier (make test-slow, run by CI)

HELPERS = Path(__file__).parent / "helpers"
COMMON = ["--stats-dtype", "float64", "--model-dtype", "float64", "--batch-size", "2", "--expose-token-counts"]
CHECKPOINT = ".statistics.safetensors.checkpoint"
"""What a stopped measure may keep in its output folder, hidden, for a rerun to continue."""


def torchrun(*args, nproc=2, module=("-m", "regmean"), env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *module]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=300, env=env)


def assert_same(stats_dir: Path, reference) -> None:
    got = StatisticsFile(stats_dir)
    assert got.examples == reference.examples and got.tokens == reference.tokens
    assert got.modules == reference.modules
    for name, ref in reference.sites.items():
        site = got.site(name)
        assert site.count == ref.count
        scale = ref.gram.abs().max()
        assert (site.gram - ref.gram).abs().max() <= 1e-6 * scale
        assert (site.sum - ref.sum).abs().max() <= 1e-6 * ref.sum.abs().max()


def test_two_processes_equal_one(tmp_path):
    model = save_model(build_model("t5", "T5ForSequenceClassification", 1), tmp_path / "m")
    texts = TEXTS + ["one more example makes eleven"]  # 11 examples: uneven shards over 2 ranks
    data = write_jsonl(tmp_path / "d.jsonl", texts, ["x"] * len(texts))
    reference = measure(
        model,
        [Example(t) for t in texts],
        batch_size=4,
        stats_dtype="float64",
        model_dtype="float64",
        progress=False,
        protection=ALL_SITES,
    )
    result = torchrun("measure", model, "--data", data, "--out", tmp_path / "s", *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(tmp_path / "s", reference)
    assert StatisticsFile(tmp_path / "s").provenance[0]["processes"] == 2
    # the convenience flag runs torchrun itself
    cmd = [sys.executable, "-m", "regmean", "measure", str(model), "--data", str(data), "--out", str(tmp_path / "n")]
    result = subprocess.run(cmd + COMMON + ["--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same(tmp_path / "n", reference)
    assert result.stderr.count("wrote ") == 1  # reported once, by rank 0
    # in blocks of sites (one pass over each rank's shard per block), reduced and written block by block
    result = torchrun("measure", model, "--data", data, "--out", tmp_path / "b", *COMMON, "--max-memory", "20KB")
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(list((tmp_path / "b").glob("statistics-*-of-*.safetensors"))) > 1
    assert_same(tmp_path / "b", reference)


def test_a_dying_rank_fails_the_run_and_writes_nothing(tmp_path):
    model = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl")
    dying = (str(HELPERS / "dying_rank.py"),)
    result = torchrun("measure", model, "--data", data, "--out", tmp_path / "s", *COMMON, module=dying)
    assert result.returncode != 0 and "exitcode  : 17" in result.stderr, result.stderr[-3000:]  # rank 1 died
    assert not (tmp_path / "s").exists() or [p.name for p in (tmp_path / "s").iterdir()] in ([], [CHECKPOINT])
    # measured in blocks, over older statistics (--force): rank 1 dies in block 2, after rank 0 wrote block 1
    old = tmp_path / "old"
    assert torchrun("measure", model, "--data", data, "--out", old, *COMMON).returncode == 0
    before = (old / "statistics.safetensors").read_bytes()
    args = ["measure", model, "--data", data, "--out", old, *COMMON, "--max-memory", "5KB", "--force"]
    env = {**os.environ, "DIE_IN_BLOCK": "2"}
    result = torchrun(*args, module=dying, env=env)
    assert result.returncode != 0 and "exitcode  : 17" in result.stderr, result.stderr[-3000:]
    kept = sorted(p.name for p in old.iterdir())  # no block, no partial (at most the hidden progress)
    assert [n for n in kept if n != CHECKPOINT] == ["README.md", "statistics.safetensors"]
    assert (old / "statistics.safetensors").read_bytes() == before  # --force replaces only on success


def test_too_few_examples_for_the_processes(tmp_path):
    model = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:1], ["x"])
    result = torchrun("measure", model, "--data", data, "--out", tmp_path / "s")
    assert result.returncode != 0 and "cannot be shared among 2 processes" in result.stderr
    assert not (tmp_path / "s").exists()  # refused before any output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "m"]


def test_fisher_two_processes_equal_one(tmp_path):
    from regmean.io.labelled import TextDataset
    from regmean.measure.fisher import FisherFile, measure_fisher

    model = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    texts = TEXTS[:7]  # uneven over 2 ranks
    data = write_jsonl(tmp_path / "d.jsonl", texts, ["x"] * len(texts))
    result = torchrun("fisher", model, "--data", data, "--out", tmp_path / "f")
    assert result.returncode == 0, result.stderr[-3000:]
    reference = measure_fisher(model, TextDataset("d", texts, [0] * len(texts), ["a", "b", "c"]), max_length=128)
    got = FisherFile(tmp_path / "f")
    assert got.examples == len(texts)
    for name, ref in reference.items():
        torch.testing.assert_close(got.get(name), ref, rtol=1e-5, atol=1e-12)


def merge_inputs(tmp_path, family="llama", cls="LlamaForCausalLM", num_labels=3):
    """Three tiny fine-tunes with statistics, and a recipe merging them by RegMean."""
    import yaml

    data = write_jsonl(tmp_path / "d.jsonl")
    models = []
    for k in range(3):
        path = save_model(build_model(family, cls, k + 1, num_labels=num_labels), tmp_path / f"ft{k}")
        models.append({"path": str(path), "statistics": str(tmp_path / f"s{k}")})
        measure_cmd = [sys.executable, "-m", "regmean", "measure", str(path), "--data", str(data)]
        subprocess.run([*measure_cmd, "--out", models[-1]["statistics"]], check=True, capture_output=True)
    recipe = tmp_path / "merge.yaml"
    recipe.write_text(yaml.safe_dump({"method": "regmean", "models": models}))
    return recipe


def files_of(folder: Path) -> dict[str, bytes]:
    """Every weight file and the index, by path inside the folder."""
    found = [*folder.rglob("*.safetensors"), *folder.rglob("*.index.json")]
    return {str(p.relative_to(folder)): p.read_bytes() for p in found}


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
"""Byte-identical at the same torch thread count (as the README says): torchrun gives each rank one thread."""


def test_merge_on_two_processes_writes_the_same_bytes_as_one(tmp_path):
    recipe = merge_inputs(tmp_path)
    one = subprocess.run(
        [sys.executable, "-m", "regmean", "merge", str(recipe), str(tmp_path / "one"), "--shard-size", "8KB"],
        capture_output=True,
        text=True,
        env=ONE_THREAD,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun("merge", recipe, tmp_path / "two", "--shard-size", "8KB", env=ONE_THREAD)
    assert two.returncode == 0, two.stderr[-3000:]
    reference = files_of(tmp_path / "one")
    assert len(reference) > 3 and files_of(tmp_path / "two") == reference  # several shards, byte for byte
    assert two.stderr.count("wrote ") == 1 and two.stderr.count("plan: ") == 1  # said once, by rank 0
    reports = [json.loads((tmp_path / d / "merge_report.json").read_text()) for d in ("one", "two")]
    for report in reports:
        for layer in report["layers"]:
            layer.pop("diagnostics_seconds")
    assert reports[0]["layers"] == reports[1]["layers"] and reports[0]["summary"]["solved_layers"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging left


def test_merge_with_nproc_and_heads_keep(tmp_path):
    recipe = merge_inputs(tmp_path, "bert", "BertForTokenClassification", num_labels=5)
    text = recipe.read_text() + "heads: keep\n"
    recipe.write_text(text)
    cmd = [sys.executable, "-m", "regmean", "merge", str(recipe), str(tmp_path / "one")]
    one = subprocess.run(cmd, capture_output=True, text=True, env=ONE_THREAD)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = [sys.executable, "-m", "regmean", "merge", str(recipe), str(tmp_path / "two"), "--nproc", "2"]
    two = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert two.returncode == 0, two.stderr[-3000:]
    reference = files_of(tmp_path / "one")
    assert len(reference) == 3 and files_of(tmp_path / "two") == reference  # one folder per model, same bytes


def test_a_dying_merge_rank_leaves_no_output(tmp_path):
    """No output appears; what is left is a hidden staging folder (kept when its journals record finished steps,
    for a rerun to continue), and the next merge into that output continues or cleans up, and completes."""
    recipe = merge_inputs(tmp_path)
    dying = (str(HELPERS / "dying_merge_rank.py"),)
    for rank in ("1", "0"):
        env, out = {**os.environ, "DIE_RANK": rank}, tmp_path / f"out{rank}"
        result = torchrun("merge", recipe, out, module=dying, env=env)
        assert result.returncode != 0 and "exitcode  : 17" in result.stderr, result.stderr[-3000:]
        assert not out.exists()
        left = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.") and "lock" not in p.name]
        assert all(n.startswith(f".{out.name}.partial-") for n in left)
        assert all((tmp_path / n / ".regmean-staging").is_file() for n in left)
        result = torchrun("merge", recipe, out)
        assert result.returncode == 0, result.stderr[-3000:]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{out.name}.partial-")]


def test_regmean_plusplus_is_refused_on_several_processes(tmp_path):
    import yaml

    recipe = yaml.safe_load(merge_inputs(tmp_path).read_text())
    for model in recipe["models"]:
        model["data"] = {"file": str(tmp_path / "d.jsonl")}
        del model["statistics"]
    (tmp_path / "pp.yaml").write_text(yaml.safe_dump({**recipe, "method": "regmean_plusplus"}))
    result = torchrun("merge", tmp_path / "pp.yaml", tmp_path / "out")
    assert result.returncode != 0 and "runs in one process" in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


def test_steps_are_divided_by_cost_with_rank_0s_heads_counted():
    """Greedy, largest first, to the least loaded rank; a tensor's row blocks stay together; rank 0 starts with
    the heads it copies. Checked against loads written out by hand."""
    from regmean.merge.parallel import SECONDS_PER_BYTE, divide
    from regmean.methods.base import Cost, Step

    def step(name: str, megabytes: float, rows=None) -> Step:
        return Step(outputs=(name,), cost=Cost(read_bytes=int(megabytes * 1e6), working_bytes=0), rows=rows)

    steps = [step("a", 5), step("b", 4), step("c", 3), step("d", 2, (0, 1)), step("d", 2, (1, 2)), step("e", 1)]
    # costs a 5, b 4, d 4 (two blocks), c 3, e 1: a -> 0, b -> 1, d -> 1 (4 < 5), c -> 0 (5 < 8), e -> 0 (8 = 8)
    assert divide(steps, 2) == [[0, 2, 5], [1, 3, 4]]
    # rank 0 reading 6 MB of heads first, loads (6, 0): a -> 1 (6, 5), b -> 1 (6, 9), d -> 0 (10, 9),
    # c -> 1 (10, 12), e -> 0 (11, 12)
    assert divide(steps, 2, rank0_bytes=6_000_000) == [[3, 4, 5], [0, 1, 2]]
    assert SECONDS_PER_BYTE > 0 and divide(steps, 1) == [[0, 1, 2, 3, 4, 5]]


def test_the_plan_counts_every_process_on_this_host(tmp_path, monkeypatch):
    """Under torchrun with N processes on one host, the host's estimate is N times one process's, and
    --max-memory applies to that total."""
    from regmean import distributed
    from regmean.errors import RegmeanError
    from regmean.merge.plan import MergePlan, check_memory

    assert distributed.local_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")

    assert distributed.local_world_size() == 4
    plan = MergePlan(1, 1, "", 0, 0.0, 0, working_bytes=900, prefetch_bytes=100, runtime_bytes=50, processes=4)
    assert (plan.peak_bytes, plan.host_bytes) == (1050, 4200)
    assert "per process, 4.2 KB for the 4 on this host" in plan.describe()
    check_memory(plan, 4200)
    with pytest.raises(RegmeanError, match="4.2 KB for 4 processes on this host exceeds --max-memory"):
        check_memory(plan, 4199)


def test_dp_noise_is_added_once_after_the_reduction(tmp_path, monkeypatch):
    """Two ranks' DP file: each example clipped on its own rank as one process clips it, and the noise of the
    recorded std added once on rank 0 (per-rank noise would be sqrt(2) times larger)."""
    from test_privacy import noise_in_bounds

    from regmean.measure.protect import Protection
    from regmean.privacy import dp

    model = save_model(build_model("llama", "LlamaForCausalLM", 1), tmp_path / "m")
    texts = TEXTS + ["one more example makes eleven"]
    data = write_jsonl(tmp_path / "d.jsonl", texts, ["x"] * len(texts))
    result = torchrun("measure", model, "--data", data, "--out", tmp_path / "s", *COMMON, "--dp-epsilon", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    noisy = StatisticsFile(tmp_path / "s")
    monkeypatch.setattr(dp, "calibrate", lambda epsilon, delta: 0.0)  # the same clipping, no noise
    asked = Protection(withhold=False, epsilon=1.0)
    exact = measure(
        model,
        [Example(t) for t in texts],
        stats_dtype="float64",
        model_dtype="float64",
        progress=False,
        protection=asked,
    )
    assert float(noise_in_bounds(noisy, exact).std()) == pytest.approx(1.0, rel=0.15)
