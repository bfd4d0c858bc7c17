"""Merges resume: a merge interrupted at a random step (Ctrl-C or SIGTERM) keeps its finished steps in its staging
folder, and a rerun with the same inputs continues from there to an output byte-identical to an uninterrupted one;
changed inputs start over."""

import random

import pytest
from conftest import ALL_SITES
from test_merge import EXAMPLES, make_models, write_config
from test_recipes import same_folders

from regmean.merge.engine import merge
from regmean.merge.journal import JOURNAL
from regmean.methods import METHODS


class Stop(KeyboardInterrupt):
    """The interrupt a test sends at a chosen step."""


def interrupt_at(monkeypatch, method: str, at: int) -> None:
    """Ctrl-C as the merge computes its `at`-th step."""
    cls, calls = METHODS[method], []
    original = cls.compute

    def compute(self, step, data):
        calls.append(step)
        if len(calls) == at:
            raise Stop
        return original(self, step, data)

    monkeypatch.setattr(cls, "compute", compute)


def interrupted(monkeypatch, config, out, method: str, at: int):
    """Merge `config` into `out`, interrupted (Ctrl-C) at its `at`-th step; the staging folder it keeps."""
    with monkeypatch.context() as patch:
        interrupt_at(patch, method, at)
        with pytest.raises(Stop):
            merge(config, out, progress=False)
    (staged,) = out.parent.glob(f".{out.name}.partial-*")
    return staged


def recipe(tmp_path, method: str) -> dict:
    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification", stats=method == "regmean")
    if method == "regmean_plusplus":
        data = tmp_path / "in" / "data.jsonl"
        data.write_text("".join(f'{{"text": "{e.text}"}}\n' for e in EXAMPLES))
        models = [{**m, "data": {"file": str(data), "max_length": 32}} for m in models]
    return {"method": method, "models": models}


@pytest.mark.parametrize("method", ["regmean", "regmean_plusplus"])
def test_an_interrupted_merge_resumes_to_the_same_bytes(tmp_path, monkeypatch, method):
    config = write_config(tmp_path, **recipe(tmp_path, method))
    merge(config, tmp_path / "whole", progress=False)
    steps = merge(config, tmp_path / "plan", dry_run=True).steps
    at = random.Random(method).randrange(2, steps)  # a random step, the same at every run
    staged = interrupted(monkeypatch, config, tmp_path / "out", method, at)
    assert not (tmp_path / "out").exists()
    assert len((staged / JOURNAL).read_text().splitlines()) == at  # the key, then at - 1 finished steps
    said = []
    merge(config, tmp_path / "out", progress=False, log=said.append)
    assert any(f"resuming the merge interrupted in {staged}" in line for line in said)
    assert not list(tmp_path.glob(".out.*"))
    same_folders(tmp_path / "whole", tmp_path / "out")


def test_changed_inputs_start_over(tmp_path, monkeypatch):
    config = write_config(tmp_path, **recipe(tmp_path, "regmean"))
    staged = interrupted(monkeypatch, config, tmp_path / "out", "regmean", 3)
    config.write_text(config.read_text().replace("method: regmean", "method: regmean\noptions: {alpha: 0.5}"))
    said = []
    merge(config, tmp_path / "out", progress=False, log=said.append)
    assert any(f"removed {staged}" in line for line in said) and not staged.exists()
    merge(config, tmp_path / "again", progress=False)
    same_folders(tmp_path / "again", tmp_path / "out")


def test_a_journal_keeps_the_steps_before_a_line_cut_short(tmp_path):
    """A kill mid-write leaves a last line that does not parse (or is not a step): the steps before it count, the
    journal is rewritten without it, and another key starts it afresh."""
    import json

    from regmean.merge.journal import Journal

    lines = [{"key": "k"}, {"step": 0, "layers": [], "base_missing": [], "written": []}]
    for tail in ('{"step": 1, "lay', '{"x": 1}', "[]"):
        (tmp_path / JOURNAL).write_text("".join(json.dumps(line) + "\n" for line in lines) + tail + "\n")
        journal = Journal(tmp_path, "k")
        journal.close()
        assert list(journal.done) == [0]
        assert (tmp_path / JOURNAL).read_text().splitlines()[-1].startswith('{"step": 0')
    journal = Journal(tmp_path, "other")
    journal.close()
    assert journal.done == {} and (tmp_path / JOURNAL).read_text() == '{"key": "other"}\n'


def test_an_interrupted_adapter_output_resumes_to_the_same_bytes(tmp_path, monkeypatch):
    """output.lora journals its steps too (each weight factored whole within its step)."""
    raw = recipe(tmp_path, "regmean")
    config = write_config(tmp_path, **raw, base_model=raw["models"][0]["path"], output={"lora": {"rank": 2}})
    merge(config, tmp_path / "whole", progress=False)
    plan = merge(config, tmp_path / "plan", dry_run=True)
    assert "LoRA adapter of rank 2" in plan.note
    at = random.Random("lora").randrange(2, plan.steps)
    with monkeypatch.context() as patch:
        interrupt_at(patch, "regmean", at)
        with pytest.raises(Stop):
            merge(config, tmp_path / "out", progress=False)
    said = []
    merge(config, tmp_path / "out", progress=False, log=said.append)
    assert any("resuming the merge interrupted" in line for line in said)
    same_folders(tmp_path / "whole", tmp_path / "out")
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def swapped_keeping_size_and_time(tmp_path, monkeypatch, config, method: str, old, new, how: str = "cp -p") -> None:
    """Interrupt a merge, then put `new`'s bytes into input `old` keeping its size and modification time: copied
    over it (cp -p), renamed over it (rsync -a: a new inode), or only the middle bytes written in place (a fine-tune
    that changed part of one tensor). The rerun starts over (the staging folder removed, said) and equals a fresh
    merge of the same files."""
    import os
    import shutil

    staged = interrupted(monkeypatch, config, tmp_path / "out", method, 3)
    assert old.stat().st_size == new.stat().st_size and old.read_bytes() != new.read_bytes()
    times = (old.stat().st_atime_ns, old.stat().st_mtime_ns)
    if how == "cp -p":
        shutil.copyfile(new, old)
    elif how == "rsync -a":
        shutil.copyfile(new, old.with_name(".incoming"))
        os.replace(old.with_name(".incoming"), old)
    else:
        data, size = bytearray(old.read_bytes()), old.stat().st_size
        data[size // 2 : size // 2 + 64] = new.read_bytes()[size // 2 : size // 2 + 64]
        assert data != old.read_bytes()
        with open(old, "r+b") as f:
            f.write(data)
    os.utime(old, ns=times)
    said = []
    merge(config, tmp_path / "out", progress=False, log=said.append)
    assert any(f"removed {staged}" in line for line in said), said
    merge(config, tmp_path / "again", progress=False)
    same_folders(tmp_path / "again", tmp_path / "out")


def test_statistics_replaced_with_the_same_size_and_time_start_over(tmp_path, monkeypatch):
    """Sweep 5 F04: a statistics file swapped for another of the same size and modification time (cp -p, rsync -a)
    was resumed over, mixing steps of both files; the key holds each input's change time and inode."""
    from test_merge import K

    from regmean.measure import measure
    from regmean.stats import save

    setup = recipe(tmp_path, "regmean")
    config = write_config(tmp_path, **setup)
    other = measure(setup["models"][K - 1]["path"], EXAMPLES[:4], batch_size=2, progress=False, protection=ALL_SITES)
    other = save(other, tmp_path / "other")  # the same sites: the same size
    old = tmp_path / "in" / f"stats{K - 1}" / "statistics.safetensors"
    swapped_keeping_size_and_time(tmp_path, monkeypatch, config, "regmean", old, other)


@pytest.mark.parametrize("how", ["cp -p", "rsync -a", "middle bytes"])
def test_model_weights_replaced_with_the_same_size_and_time_start_over(tmp_path, monkeypatch, how):
    """Sweep 6 E2 and sweep 7 R01: a model fine-tuned again (same architecture: same header and size) put over the
    old one with its time kept was resumed over by a data-free merge, mixing steps of both (the key read sampled
    bytes, which an edit in the middle of a tensor escaped); the key now holds each input's change time and inode."""
    models = make_models(tmp_path / "in", "bert", "BertForSequenceClassification", stats=False)
    config = write_config(tmp_path, method="average", models=models)
    old = tmp_path / "in" / "ft1" / "model.safetensors"
    new = tmp_path / "in" / "ft0" / "model.safetensors"  # another fine-tune of the same architecture
    swapped_keeping_size_and_time(tmp_path, monkeypatch, config, "average", old, new, how)


def test_a_staged_shard_deleted_since_starts_the_merge_over(tmp_path, monkeypatch):
    """Sweep 7 R17: the interrupted merge's staged shard deleted (space freed), its journal left: the rerun said it
    resumed, then failed advising to delete a file that was not there; now it starts over, said, in the same run."""
    config = write_config(tmp_path, **recipe(tmp_path, "regmean"))
    staged = interrupted(monkeypatch, config, tmp_path / "out", "regmean", 4)
    for shard in staged.glob(".shard-*"):
        shard.unlink()
    said = []
    merge(config, tmp_path / "out", progress=False, log=said.append)
    assert any("missing, or not laid out as this merge plans it: starting the merge over" in s for s in said), said
    merge(config, tmp_path / "whole", progress=False)
    same_folders(tmp_path / "whole", tmp_path / "out")


def test_a_journal_line_altered_since_ends_the_finished_steps(tmp_path, monkeypatch):
    """Sweep 8 F01: a journal line edited after the interruption (a layer record of unknown fields) made the rerun
    say "resuming", then fail with an internal error; the steps before it count, the rest are computed again."""
    import json

    config = write_config(tmp_path, **recipe(tmp_path, "regmean"))
    merge(config, tmp_path / "whole", progress=False)
    staged = interrupted(monkeypatch, config, tmp_path / "out", "regmean", 6)
    lines = (staged / JOURNAL).read_text().splitlines()
    solved = 3  # the third step's line
    altered = json.loads(lines[solved])
    altered["layers"] = [{"bogus": 1}]
    lines[solved] = json.dumps(altered)
    (staged / JOURNAL).write_text("\n".join(lines) + "\n")
    said = []
    merge(config, tmp_path / "out", progress=False, log=said.append)
    assert any(f"({solved - 1} steps were finished)" in line for line in said), said  # those before it
    same_folders(tmp_path / "whole", tmp_path / "out")
