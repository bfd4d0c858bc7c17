"""Measures resume: a measure interrupted at a random batch keeps its progress beside its output, and a rerun with
the same inputs continues from there to a statistics file identical to an uninterrupted one's (sums continue in
the same order); changed inputs start over; an error leaves nothing behind."""

import random

import pytest
from conftest import TEXTS, build_model, save_model, write_jsonl
from safetensors import safe_open
from safetensors.torch import load_file
from test_merge import run

from regmean.measure import accumulate, checkpoint
from regmean.measure.accumulate import Accumulator


def interrupt_at(monkeypatch, at: int) -> None:
    """Ctrl-C as the measure runs its `at`-th batch; progress saved after every batch."""
    calls, original = [], Accumulator.run

    def stop_at(self, batch):
        calls.append(batch)
        if len(calls) == at:
            raise KeyboardInterrupt
        return original(self, batch)

    monkeypatch.setattr(Accumulator, "run", stop_at)
    monkeypatch.setattr(checkpoint, "CHECKPOINT_SECONDS", 0.0)


def measured(folder):
    path = folder / "statistics.safetensors"
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(path), {k: v for k, v in metadata.items() if k != "provenance"}


@pytest.mark.parametrize("blocks", [False, True])
def test_an_interrupted_measure_resumes_to_the_same_file(tmp_path, monkeypatch, blocks):
    model = save_model(build_model("gpt2", "GPT2LMHeadModel"), tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", [f"{a} {b}" for a in TEXTS for b in TEXTS[:5]], ["x"] * 50)
    args = ["measure", model, "--data", data, "--batch-size", 4, "--max-length", 24]
    args += ["--max-memory", "40KB"] if blocks else []  # several blocks of sites, one pass each
    whole = run(*args, "--out", tmp_path / "whole")
    assert whole.exit_code == 0, whole.output
    with monkeypatch.context() as patch:
        interrupt_at(patch, random.Random(blocks).randrange(3, 10 if not blocks else 30))
        stopped = run(*args, "--out", tmp_path / "out")
    assert stopped.exit_code != 0 and not (tmp_path / "out" / "statistics.safetensors").exists()
    assert (tmp_path / "out" / ".statistics.safetensors.checkpoint").is_dir()
    again = run(*args, "--out", tmp_path / "out")
    assert again.exit_code == 0, again.output
    assert "resuming the measure interrupted earlier" in again.output
    assert not (tmp_path / "out" / ".statistics.safetensors.checkpoint").exists()
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    for name in names:
        if name.endswith(".safetensors"):
            (want, want_meta), (got, got_meta) = measured(tmp_path / "whole"), measured(tmp_path / "out")
            assert got.keys() == want.keys() and got_meta == want_meta
            assert all(bool((got[k] == want[k]).all()) for k in want), name


def test_changed_data_starts_over_and_errors_leave_nothing(tmp_path, monkeypatch):
    model = save_model(build_model("gpt2", "GPT2LMHeadModel"), tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", [f"{a} {b}" for a in TEXTS for b in TEXTS[:5]], ["x"] * 50)
    args = ["measure", model, "--data", data, "--batch-size", 4, "--out", tmp_path / "out"]
    with monkeypatch.context() as patch:
        interrupt_at(patch, 4)
        assert run(*args).exit_code != 0
    write_jsonl(data, [f"{b} {a}" for a in TEXTS for b in TEXTS[:5]], ["x"] * 50)  # other data
    again = run(*args)
    assert again.exit_code == 0 and "resuming" not in again.output
    with monkeypatch.context() as patch:  # an error mid-pass: no checkpoint kept
        patch.setattr(accumulate, "add_gram", lambda *_: (_ for _ in ()).throw(ValueError("boom")))
        failed = run(*args[:-1], tmp_path / "failed")
    assert failed.exit_code != 0
    assert not (tmp_path / "failed" / ".statistics.safetensors.checkpoint").exists()


def test_a_dp_measure_keeps_no_checkpoint(tmp_path, monkeypatch):
    """A DP release draws its noisy counts once: an interrupted one starts over (and leaves no exact sums)."""
    model = save_model(build_model("gpt2", "GPT2LMHeadModel"), tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", [f"{a} {b}" for a in TEXTS for b in TEXTS[:5]], ["x"] * 50)
    args = ["measure", model, "--data", data, "--batch-size", 4, "--out", tmp_path / "out", "--dp-epsilon", 8]
    with monkeypatch.context() as patch:
        interrupt_at(patch, 4)
        assert run(*args).exit_code != 0
    assert not (tmp_path / "out" / ".statistics.safetensors.checkpoint").exists()
    again = run(*args)
    assert again.exit_code == 0 and "resuming" not in again.output
