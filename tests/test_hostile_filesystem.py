"""A hostile file system: a disk that fills up (before or while writing) and symbolic link loops given as paths are
one line naming the file and the fix, exit 2, and leave no output, staging folder or lock behind."""

import errno
import importlib
import inspect
import os
from collections import namedtuple
from pathlib import Path

import pytest
from conftest import TEXTS, build_model, save_model, write_jsonl
from test_bad_input import cli_fails
from test_hostile_adapters import OPTIONS, make_adapter
from test_merge import make_models, write_config

from regmean.errors import RegmeanError
from regmean.io.outputs import no_room
from regmean.io.untrusted import resolve_user_path
from regmean.measure import measure
from regmean.stats import BlockWriter

OUTPUT = importlib.import_module("regmean.merge.output")  # (functions named like their packages hide these)
PIPELINE = importlib.import_module("regmean.measure.pipeline")
FULL = "free space or choose another output"
Usage = namedtuple("Usage", "total used free")


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("filesystem")
    return root, make_models(root / "in", "bert", "BertForSequenceClassification")


def raising(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


def oserror(code: int):
    return raising(OSError(code, os.strerror(code), "the disk"))


def nothing_left(folder: Path, *kept: str) -> None:
    """Only what the test itself put in `folder`: no output, no staging folder, no hidden file, no lock."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(kept)


def small_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr("regmean.io.outputs.shutil.disk_usage", lambda _: Usage(10**12, 10**12 - free, free))


def test_a_disk_full_while_a_merge_writes_names_the_output_and_the_space(trio, tmp_path, monkeypatch):
    _, models = trio
    config = write_config(tmp_path, method="average", models=models)
    monkeypatch.setattr("regmean.io.tensorfile.PlannedFile.write", oserror(errno.ENOSPC))  # the shards' data
    out = tmp_path / "out"
    cli_fails(["merge", config, out], f"{out}: the disk is full (2.0 MB needed, ", " free); " + FULL)
    nothing_left(tmp_path, "merge.yaml")
    monkeypatch.setattr("regmean.io.tensorfile.os.pwrite", oserror(errno.ENOSPC))  # their headers too
    cli_fails(["merge", config, out], f"{out}: the disk is full (", FULL)
    nothing_left(tmp_path, "merge.yaml")


def test_a_disk_full_while_a_merge_writes_its_small_files_leaves_nothing(trio, tmp_path, monkeypatch):
    _, models = trio
    config = write_config(tmp_path, method="average", models=models)
    monkeypatch.setattr(OUTPUT.shutil, "copy2", oserror(errno.ENOSPC))
    cli_fails(["merge", config, tmp_path / "deep" / "out"], "the disk is full", FULL)
    nothing_left(tmp_path, "merge.yaml")


@pytest.mark.parametrize(
    ("failure", "says"),
    [
        (oserror(errno.ENOSPC), "the disk is full"),
        (oserror(errno.EDQUOT), "the disk quota is exceeded"),
    ],
)
def test_a_disk_full_while_measure_writes_names_the_file(trio, tmp_path, monkeypatch, failure, says):
    _, models = trio
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:2], ["a", "b"])
    monkeypatch.setattr("regmean.io.tensorfile.os.pwrite", failure)  # where every safetensors file is written
    out = tmp_path / "stats"
    (line,) = cli_fails(["measure", models[0]["path"], "--data", data, "--out", out], says, FULL)
    assert line.startswith(f"error: {out / 'statistics.safetensors'}: ")
    nothing_left(tmp_path, "d.jsonl")


def test_a_disk_full_on_a_later_file_removes_the_staged_ones(trio, tmp_path, monkeypatch):
    _, models = trio
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:2], ["a", "b"])
    real = Path.write_text

    def card_fails(self, *args, **kwargs):  # the statistics file is staged; the card beside it finds the disk full
        if self.name.startswith(".partial-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", card_fails)
    cli_fails(["measure", models[0]["path"], "--data", data, "--out", tmp_path / "stats"], "the disk is full", FULL)
    nothing_left(tmp_path, "d.jsonl")
    monkeypatch.setattr("regmean.io.tensorfile.os.pwrite", oserror(errno.ENOSPC))
    cli_fails(["stats", "combine", models[0]["statistics"], "--out", tmp_path / "comb"], "the disk is full", FULL)
    nothing_left(tmp_path, "d.jsonl")


def test_a_merge_larger_than_the_free_space_is_refused_before_the_work(trio, tmp_path, monkeypatch):
    _, models = trio
    config = write_config(tmp_path, method="average", models=models)
    small_disk(monkeypatch, 1000)
    monkeypatch.setattr(OUTPUT, "ShardedWriter", None)  # the work would start here
    cli_fails(["merge", config, tmp_path / "out"], "the merged model needs", "the disk has 1.0 KB free", FULL)
    nothing_left(tmp_path, "merge.yaml")


def test_statistics_larger_than_the_free_space_are_refused_before_writing(trio, tmp_path, monkeypatch):
    _, models = trio
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:2], ["a", "b"])
    small_disk(monkeypatch, 1000)
    saved = []
    monkeypatch.setattr("regmean.io.tensorfile.os.pwrite", lambda *args: saved.append(args))
    out = tmp_path / "stats"
    cli_fails(["measure", models[0]["path"], "--data", data, "--out", out], f"{out / 'statistics.safetensors'}: ", FULL)
    assert not saved  # nothing was written, not even in part
    nothing_left(tmp_path, "d.jsonl")


def test_reserve_refuses_what_the_plan_will_write(tmp_path, monkeypatch):
    small_disk(monkeypatch, 10**9)
    says = r"statistics.safetensors: the statistics file needs 2.0 GB, the disk has 1.0 GB free"
    with pytest.raises(RegmeanError, match=says), BlockWriter(tmp_path / "stats") as writer:
        writer.reserve(2 * 10**9)
    nothing_left(tmp_path)


@pytest.mark.skipif("on_plan" not in inspect.signature(measure).parameters, reason="measure has no on_plan hook yet")
def test_measure_checks_the_free_space_before_the_work(trio, tmp_path, monkeypatch):
    _, models = trio
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:2], ["a", "b"])
    small_disk(monkeypatch, 1000)
    monkeypatch.setattr(PIPELINE, "Accumulator", None)  # the work would start here
    says = "statistics.safetensors: the statistics file needs"
    cli_fails(["measure", models[0]["path"], "--data", data, "--out", tmp_path / "stats"], says, FULL)
    nothing_left(tmp_path, "d.jsonl")


def test_what_counts_as_a_full_disk():
    assert no_room(OSError(errno.ENOSPC, "x")) == "the disk is full"
    assert no_room(OSError(errno.EDQUOT, "x")) == "the disk quota is exceeded"
    assert no_room(OSError(errno.EACCES, "x")) is None
    assert no_room(ValueError("No space left on device")) is None


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return make_adapter(OPTIONS, 10, tmp_path_factory.mktemp("adapter") / "adapter")


@pytest.fixture
def loops(tmp_path) -> tuple[Path, Path]:
    """A link to itself, and two links to each other."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    return tmp_path / "loop", tmp_path / "a"


def test_a_symlink_loop_as_base_model_is_one_line(trio, adapter, tmp_path, loops):
    _, models = trio
    for loop in loops:
        for entries in (models, [{"path": str(adapter)}, models[0]]):
            config = write_config(tmp_path, method="task_arithmetic", models=entries, base_model=str(loop))
            cli_fails(["merge", config, tmp_path / "out"], f"{loop}: a symbolic link loop (the base model)")
    config = write_config(tmp_path, method="average", models=[*models[:2], {"path": str(loops[1] / "x")}])
    cli_fails(["merge", config, tmp_path / "out"], "a symbolic link loop (the model)")
    nothing_left(tmp_path, "merge.yaml", "loop", "a", "b")


def test_a_symlink_loop_as_measure_base_is_one_line(adapter, tmp_path, loops):
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:2], ["a", "b"])
    for loop in loops:
        args = ["measure", adapter, "--data", data, "--out", tmp_path / "s", "--base", loop]
        cli_fails(args, f"{loop}: a symbolic link loop (the base model); give a real folder")
    nothing_left(tmp_path, "d.jsonl", "loop", "a", "b")


def test_a_symlink_loop_above_the_output_is_one_line(trio, tmp_path, loops):
    _, models = trio
    config = write_config(tmp_path, method="average", models=models)
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:2], ["a", "b"])
    for loop in loops:
        out = loop / "deeper" / "out"
        says = f"{out}: a symbolic link loop (the output); give a real folder"
        cli_fails(["merge", config, out], says)
        cli_fails(["measure", models[0]["path"], "--data", data, "--out", out], says)
        cli_fails(["stats", "combine", models[0]["statistics"], "--out", out], says)
    nothing_left(tmp_path, "merge.yaml", "d.jsonl", "loop", "a", "b")
    assert resolve_user_path(tmp_path / "new" / "x", "output") == tmp_path.resolve() / "new" / "x"


def test_a_full_disk_anywhere_else_is_still_named_as_such(tmp_path, monkeypatch):
    """The last resort for operating-system errors (e.g. a rank of --nproc writing its part) says the disk is full."""

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "part"))

    import importlib

    # (`regmean.evaluate` is the API's function; the CLI calls the module's)
    monkeypatch.setattr(importlib.import_module("regmean.evaluate"), "evaluate", full)
    model = save_model(build_model("bert", "BertForSequenceClassification", 1), tmp_path / "m")
    data = write_jsonl(tmp_path / "d.jsonl")
    cli_fails(["evaluate", model, "--data", data], f"{tmp_path / 'part'}: the disk is full; free space or choose")


def test_a_folder_in_the_lock_files_place_is_named(tmp_path):
    """Sweep finding F10: was "<parent>: cannot write here (Is a directory)"."""
    from regmean.io.outputs import output_lock

    (tmp_path / ".out.regmean-lock").mkdir()
    says = "out.regmean-lock: a folder where the output's lock file goes; remove it"
    with pytest.raises(RegmeanError, match=says), output_lock(tmp_path / "out"):
        pass
