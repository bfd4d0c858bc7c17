"""Nothing outside the output is ever written or deleted: outputs never overlap inputs, --force replaces only what
regmean wrote, one writer per output, staging of killed runs removed, writability checked before any work."""

import errno
import importlib
import os
from pathlib import Path

import pytest
import yaml
from conftest import TEXTS, write_jsonl
from test_bad_input import cli_fails as refused
from test_bad_input import snapshot
from test_merge import make_models, write_config
from typer.testing import CliRunner

from regmean.cli import app
from regmean.errors import RegmeanError
from regmean.io.outputs import check_output_path, output_lock
from regmean.merge.files import STAGING_MARK
from regmean.merge.output import output_names
from regmean.merge.staging import SET_ASIDE_MARK

runner = CliRunner()


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    return root, make_models(root / "in", "bert", "BertForSequenceClassification")


def test_merge_into_the_current_folder_holding_the_models(trio, monkeypatch):
    root, models = trio
    config = write_config(root, method="average", models=models)
    before = snapshot(root)
    monkeypatch.chdir(root / "in")
    refused(["merge", config, ".", "--force"], ".: the output contains the model")
    monkeypatch.chdir(root)
    refused(["merge", config, "in", "--force"], "contains the model")  # the folder holding the inputs
    refused(["merge", config, root / "in" / "ft0" / "merged"], "lies inside the model")
    refused(["merge", config, root / "in" / "stats1", "--force"], "is the statistics")
    refused(["merge", config, root, "--force"], "contains the recipe")
    assert snapshot(root) == before


def test_protected_folders_are_never_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "work").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "home" / "work")
    for path, says in ((Path("/"), "root folder"), (tmp_path / "home", "home folder"), (Path("."), "current folder")):
        with pytest.raises(RegmeanError, match=says):
            check_output_path(path, [])
    with pytest.raises(RegmeanError, match="contains the current folder"):
        check_output_path(tmp_path, [])


def test_force_replaces_only_what_a_merge_wrote(trio, tmp_path):
    root, models = trio
    config = write_config(tmp_path, method="average", models=models)
    out = tmp_path / "out"
    assert runner.invoke(app, ["merge", str(config), str(out)]).exit_code == 0
    (out / "notes.md").write_text("mine")
    (out / "sub").mkdir()
    errors = refused(["merge", config, out, "--force"], "notes.md, sub/", "nothing was deleted")
    assert len(errors) == 1
    assert (out / "notes.md").read_text() == "mine"
    (out / "notes.md").unlink()
    (out / "sub").rmdir()
    assert runner.invoke(app, ["merge", str(config), str(out), "--force"]).exit_code == 0
    # a folder regmean did not write at all (no merge_report.json)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors").write_bytes(b"not ours")
    refused(["merge", config, other, "--force"], "model.safetensors", "nothing was deleted")
    assert (other / "model.safetensors").read_bytes() == b"not ours"
    # a merge report claiming a file a merge never writes is not believed
    (other / "thesis.tex").write_text("years of work")
    (other / "merge_report.json").write_text('{"files": ["thesis.tex", "model.safetensors", "merge_report.json"]}')
    refused(["merge", config, other, "--force"], "thesis.tex", "nothing was deleted")
    assert (other / "thesis.tex").read_text() == "years of work"


def test_heads_keep_folder_names_stay_inside_the_output(trio, tmp_path):
    """A model at `path: ..` once made the per-model folder resolve outside the output and overwrite files there."""
    root, models = trio
    recipes = Path(models[0]["path"]) / "recipes"
    recipes.mkdir(exist_ok=True)
    entries = [{"path": ".."}, *models[1:]]
    (recipes / "r.yaml").write_text(yaml.safe_dump({"method": "average", "models": entries, "heads": "keep"}))
    (tmp_path / "README.md").write_text("the user's own")
    before = snapshot(root)
    result = runner.invoke(app, ["merge", str(recipes / "r.yaml"), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["ft0", "ft1", "ft2"]
    assert (tmp_path / "README.md").read_text() == "the user's own"
    assert snapshot(root) == before
    (recipes / "r.yaml").unlink()
    recipes.rmdir()


def test_output_names_are_plain_and_distinct():
    names = output_names([Path(".."), Path("/a/b/.."), Path("x/A"), Path("y/a"), Path("/"), Path("m/README.md")])
    assert all(n and "/" not in n and not n.startswith(".") for n in names)
    assert len({n.lower() for n in names}) == len(names)
    assert "README.md" not in names


def test_a_second_writer_is_refused(trio, tmp_path):
    root, models = trio
    config = write_config(tmp_path, method="average", models=models)
    out = tmp_path / "out"
    with output_lock(out / "sub" / ".."):  # another run holds this output (the lock is on the real path)
        refused(["merge", config, out], "another regmean process is writing this output")
    data = write_jsonl(tmp_path / "d.jsonl")
    stats = tmp_path / "stats"
    stats.mkdir()
    with output_lock(stats / "statistics.safetensors"):  # e.g. a `stats combine --out stats/statistics.safetensors`
        refused(["measure", models[0]["path"], "--data", data, "--out", stats], "another regmean process")
        refused(["stats", "combine", models[0]["statistics"], "--out", stats], "another regmean process")
    assert not out.exists() and not any(stats.iterdir())
    assert runner.invoke(app, ["merge", str(config), str(out)]).exit_code == 0


def test_staging_left_by_a_killed_run_is_removed_and_said(trio, tmp_path):
    root, models = trio
    config = write_config(tmp_path, method="average", models=models)
    stale = tmp_path / ".out.partial-killed"
    stale.mkdir()
    (stale / STAGING_MARK).touch()
    (stale / "model.safetensors").write_bytes(b"half")
    foreign = tmp_path / ".out.partial-not-ours"  # no staging mark and not empty: not ours, left alone
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    (tmp_path / ".out.partial-unmarked").mkdir()  # killed between making the folder and marking it: empty
    result = runner.invoke(app, ["merge", str(config), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "left by an interrupted merge" in result.output and not stale.exists() and foreign.is_dir()
    assert not (tmp_path / ".out.partial-unmarked").exists()
    # measure: hidden blocks of a killed measure are removed and said
    stats = tmp_path / "stats"
    stats.mkdir()
    (stats / ".partial-statistics.safetensors").write_bytes(b"half")
    data = write_jsonl(tmp_path / "d.jsonl")
    result = runner.invoke(app, ["measure", models[0]["path"], "--data", str(data), "--out", str(stats)])
    assert result.exit_code == 0, result.output
    assert "left by an interrupted run" in result.output
    assert sorted(p.name for p in stats.iterdir()) == ["README.md", "statistics.safetensors"]


def test_measure_never_overwrites_model_weights(trio):
    root, models = trio
    model = Path(models[0]["path"])
    data = write_jsonl(root / "d.jsonl")
    before = snapshot(model)
    refused(
        ["measure", model, "--data", data, "--out", model / "model.safetensors", "--force"], "lies inside the model"
    )
    refused(["measure", model, "--data", data, "--out", root / "d.jsonl", "--force"], "is the data file")
    assert snapshot(model) == before
    # a safetensors file that is not statistics is never replaced, --force or not
    elsewhere = root / "copy.safetensors"
    elsewhere.write_bytes((model / "model.safetensors").read_bytes())
    refused(["measure", model, "--data", data, "--out", elsewhere, "--force"], "not a regmean.gram file")
    assert elsewhere.read_bytes() == (model / "model.safetensors").read_bytes()
    elsewhere.unlink()


def test_unwritable_outputs_are_refused_before_any_work(trio, tmp_path):
    root, models = trio
    config = write_config(tmp_path, method="average", models=models)
    (tmp_path / "file.txt").write_text("x")
    refused(["merge", config, tmp_path / "file.txt"], "not a folder")
    refused(["merge", config, tmp_path / "file.txt" / "out"], "file.txt is a file")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    refused(["merge", config, tmp_path / "dangling"], "symbolic link")
    data = write_jsonl(tmp_path / "d.jsonl")
    refused(["measure", models[0]["path"], "--data", data, "--out", tmp_path / "file.txt"], "is a file")
    refused(["measure", models[0]["path"], "--data", data, "--out", tmp_path / "dangling"], "symbolic link")
    refused(["stats", "combine", models[0]["statistics"], "--out", tmp_path / "file.txt" / "s"], "is a file")
    assert not (tmp_path / "nowhere").exists()


def test_a_full_disk_is_one_line_and_leaves_nothing(trio, tmp_path, monkeypatch):
    root, models = trio
    config = write_config(tmp_path, method="average", models=models)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "the disk")

    monkeypatch.setattr("regmean.io.tensorfile.os.pwrite", full)
    refused(["merge", config, tmp_path / "out" / "merged"], "the disk is full")
    data = write_jsonl(tmp_path / "d.jsonl", TEXTS[:2], ["a", "b"])
    refused(["measure", models[0]["path"], "--data", data, "--out", tmp_path / "stats"], "the disk is full")
    refused(["stats", "combine", models[0]["statistics"], "--out", tmp_path / "comb"], "the disk is full")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "merge.yaml"]


def test_cleanup_touches_only_this_outputs_own_files(trio, tmp_path):
    root, models = trio
    data = write_jsonl(tmp_path / "d.jsonl")
    shared = tmp_path / "shared"
    shared.mkdir()
    neighbours = [".data.tmp-keep", ".partial-abc.safetensors", "..partial-abc.safetensors.tmp-x", "notes.txt"]
    for name in neighbours:
        (shared / name).write_text("someone else's")
    (shared / "statistics-00001-of-00002.safetensors").write_text("blocks of another measure")
    before = snapshot(shared)
    (shared / ".partial-a.safetensors").write_text("left by a killed run into a.safetensors")
    (shared / "a.safetensors").write_text("not statistics")
    refused(
        ["measure", models[0]["path"], "--data", data, "--out", shared / "a.safetensors", "--force"], "not a regmean"
    )
    assert (shared / ".partial-a.safetensors").exists()  # a refused run deletes nothing, not even leftovers
    (shared / "a.safetensors").unlink()
    result = runner.invoke(
        app, ["measure", models[0]["path"], "--data", str(data), "--out", str(shared / "a.safetensors")]
    )
    assert result.exit_code == 0, result.output
    assert "left by an interrupted run" in result.output and not (shared / ".partial-a.safetensors").exists()
    comb = ["stats", "combine", str(shared / "a.safetensors"), "--out", str(shared / "b.safetensors"), "--force"]
    assert runner.invoke(app, comb).exit_code == 0
    for name, digest in before.items():  # the neighbours, the other measure's block included, are untouched
        assert snapshot(shared)[name] == digest


def test_killed_replacements_are_recovered_never_a_users_folder(trio, tmp_path, monkeypatch):
    root, models = trio
    config = write_config(tmp_path, method="average", models=models)
    out = tmp_path / "merged"
    assert runner.invoke(app, ["merge", str(config), str(out)]).exit_code == 0
    first = snapshot(out)
    backup = tmp_path / ".merged.old-2024" / "merged"  # the user's own backup, named like a set-aside output
    backup.mkdir(parents=True)
    (backup / "notes.txt").write_text("mine")
    # a run killed after setting the old output aside, before the new one took its place
    aside = tmp_path / ".merged.old-killed"
    aside.mkdir()
    (aside / SET_ASIDE_MARK).touch()
    out.rename(aside / "merged")
    result = runner.invoke(app, ["merge", str(config), str(out), "--force"])
    assert result.exit_code == 0, result.output
    assert "put back" in result.output and not aside.exists()
    assert (backup / "notes.txt").read_text() == "mine"
    assert snapshot(out).keys() == first.keys()
    # the replaced output cannot be deleted: the merge is complete, so a warning, not a failure
    staging = importlib.import_module("regmean.merge.staging")
    real_rmtree = staging.shutil.rmtree

    def stubborn(path, *args, **kwargs):
        if ".old-" in str(path):
            raise OSError(errno.EPERM, "Operation not permitted", str(path))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(staging.shutil, "rmtree", stubborn)
    result = runner.invoke(app, ["merge", str(config), str(out), "--force"])
    assert result.exit_code == 0 and "warning: could not delete the replaced output" in result.output, result.output


def test_other_spellings_of_an_input_are_the_input(trio, tmp_path):
    root, models = trio
    config = write_config(tmp_path, method="average", models=models)
    link = tmp_path / "link"
    link.symlink_to(root / "in")
    refused(["merge", config, link / "ft0" / "merged"], "lies inside the model")
    refused(["merge", config, link / "ft0" / ".." / "ft1" / "x"], "lies inside the model")
    refused(["merge", config, f"{root / 'in' / 'stats0'}/"], "is the statistics")


def test_heads_keep_names_follow_the_paths_as_written(trio, tmp_path):
    root, models = trio
    (tmp_path / "sst2").symlink_to(models[0]["path"])
    entries = [{"path": str(tmp_path / "sst2")}, *({"path": m["path"]} for m in models[1:])]
    config = write_config(tmp_path, method="average", models=entries, heads="keep")
    assert runner.invoke(app, ["merge", str(config), str(tmp_path / "out")]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.is_dir()) == ["ft1", "ft2", "sst2"]


def test_no_free_inodes_is_said_as_such(tmp_path, monkeypatch):
    """Sweep 4 F9: ENOSPC with bytes to spare was 'the disk is full (10.5 MB free); free space'."""
    import os

    from regmean.io.outputs import room_error

    real = os.statvfs(tmp_path)
    fields = {name: getattr(real, name) for name in dir(real) if name.startswith("f_")}
    no_inodes = type("Stat", (), {**fields, "f_files": 1000, "f_favail": 0})()
    monkeypatch.setattr(os, "statvfs", lambda _path: no_inodes)
    assert "no free inodes" in str(room_error(tmp_path / "out", 10))
    monkeypatch.setattr(os, "statvfs", lambda _path: real)
    assert "the disk is full" in str(room_error(tmp_path / "out", 10))


def test_a_merged_folder_has_the_permissions_of_any_new_folder(trio):
    """Sweep 8 F04: the merged folder, staged with mkdtemp, kept its 0700 when renamed into place."""
    tmp_path, models = trio
    old = os.umask(0o022)
    try:
        recipe = write_config(tmp_path, method="average", models=models)
        result = runner.invoke(app, ["merge", str(recipe), str(tmp_path / "out-mode")])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out-mode").stat().st_mode & 0o777 == 0o755


def test_a_link_planted_where_the_lock_goes_is_never_followed(trio):
    """Sweep 8 F03: the lock file was opened through a symbolic link planted at its path, creating a file inside an
    input folder."""
    tmp_path, models = trio
    target = Path(models[0]["path"]) / "planted"
    (tmp_path / ".out-lock.regmean-lock").symlink_to(target)
    before = snapshot(tmp_path / "in")
    recipe = write_config(tmp_path, method="average", models=models)
    refused(["merge", recipe, tmp_path / "out-lock"], "a symbolic link")
    assert snapshot(tmp_path / "in") == before and not target.exists()
