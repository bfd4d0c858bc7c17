"""`--nproc N` under failure: every mistake, a killed rank and a signal to the launcher end in one line, the exit
code one process gives, no traceback, nothing written and no process left behind (issue 25, class 2)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_distributed import merge_inputs

from regmean.errors import RegmeanError
from regmean.launch import RankLogs, report, without_nproc

pytestmark = pytest.mark.slow  # several processes per test: the slow tier (make test-slow, run by CI)

NOISE = ("Traceback", "ChildFailedError", "exitcode", "*****", "OMP_NUM_THREADS", "torch/distributed")
SLOW_RANKS = """
import os
if "LOCAL_RANK" in os.environ and os.environ.get("SLOW_STEP_SECONDS"):
    import time
    from regmean.methods.regmean import RegMean
    original = RegMean.compute
    def slow(self, step, data):
        time.sleep(float(os.environ["SLOW_STEP_SECONDS"]))
        return original(self, step, data)
    RegMean.compute = slow
"""
"""A sitecustomize that makes each rank's RegMean steps slow, so that a test can act while the ranks work."""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory) -> Path:
    return merge_inputs(tmp_path_factory.mktemp("inputs"))


KEPT_SAID = "the finished steps are kept: run the same command again to continue"
"""What the launcher says when rank 0 kept an interrupted merge's finished steps (hidden) for the rerun."""


def regmean(*args, env=None, nproc=2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "regmean", *map(str, args), "--nproc", str(nproc)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def assert_one_line(result, code: int, *phrases: str) -> str:
    """One `error:` line holding every phrase, the exit code, and nothing of torchrun's or Python's."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == code and len(errors) == 1, result.stderr[-3000:]
    assert not any(n in result.stderr for n in NOISE), result.stderr[-3000:]
    assert all(p in errors[0] for p in phrases), errors[0]
    return errors[0]


def slow_env(tmp_path: Path, seconds: float) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_RANKS)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "SLOW_STEP_SECONDS": str(seconds)}


def processes_of(tmp_path: Path) -> dict[int, str]:
    """Every live process whose command line names this test's folder, with its environment."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(tmp_path) in (entry / "cmdline").read_text():
                found[int(entry.name)] = (entry / "environ").read_text()
        except OSError:  # gone meanwhile
            continue
    return found


def wait_for(condition, seconds: float = 120):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_mistakes_every_rank_would_make_are_refused_before_the_ranks_start(tmp_path, recipe):
    bad = yaml.safe_load(recipe.read_text())
    bad["models"][0]["statistics"] = str(tmp_path / "missing")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    result = regmean("merge", tmp_path / "bad.yaml", tmp_path / "out")
    assert_one_line(result, 2, str(tmp_path / "missing"), "not found")
    plusplus = yaml.safe_load(recipe.read_text())
    for model in plusplus["models"]:
        model["data"] = {"file": str(recipe.parent / "d.jsonl")}
        del model["statistics"]
    (tmp_path / "pp.yaml").write_text(yaml.safe_dump({**plusplus, "method": "regmean_plusplus"}))
    assert_one_line(regmean("merge", tmp_path / "pp.yaml", tmp_path / "out"), 2, "runs in one process")
    model = recipe.parent / "ft0"
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{not json\n')
    result = regmean("measure", model, "--data", tmp_path / "bad.jsonl", "--out", tmp_path / "s")
    assert_one_line(result, 2, "bad.jsonl: line 2 is not JSON")
    env = {**os.environ, "REGMEAN_DIST_TIMEOUT": "abc"}
    result = regmean("measure", model, "--data", recipe.parent / "d.jsonl", "--out", tmp_path / "s", env=env)
    line = assert_one_line(result, 2, "REGMEAN_DIST_TIMEOUT")
    assert "rank" not in line  # said by the launcher: no rank was started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "bad.yaml", "pp.yaml"]


def test_a_mistake_found_on_the_ranks_is_one_line_naming_them(tmp_path, recipe):
    """What only the ranks find (a model that is not a classifier, a missing column): each rank's one line, said
    once with the ranks that said it, exit 2 as in one process."""
    model, data = recipe.parent / "ft0", recipe.parent / "d.jsonl"
    result = regmean("fisher", model, "--data", data, "--out", tmp_path / "f")
    line = assert_one_line(result, 2, "is not a classifier")
    assert line.startswith(("error: rank 0: ", "error: rank 1: ", "error: ranks 0 and 1: "))
    result = regmean("measure", model, "--data", data, "--out", tmp_path / "s", "--text-field", "nope")
    assert_one_line(result, 2, "no column 'nope'")
    assert list(tmp_path.iterdir()) == []


def test_bad_statistics_found_by_a_rank_leave_nothing_to_resume(tmp_path, recipe):
    """Sweep 5 F03: a NaN in a statistics file that a rank reads mid-merge was reported as an interruption (finished
    steps kept, 'run the same command again') and the rerun failed the same way: bad input keeps nothing."""
    import shutil

    import yaml
    from safetensors import safe_open
    from safetensors.torch import save_file

    spec = yaml.safe_load(recipe.read_text())
    bad = tmp_path / "bad-stats"
    shutil.copytree(spec["models"][2]["statistics"], bad)
    file = bad / "statistics.safetensors"
    with safe_open(file, "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    last = sorted(k for k in tensors if k.endswith(("::gram", "::gram_upper")))[-1]
    tensors[last][0] = float("nan")
    save_file(tensors, file, metadata=metadata)
    spec["models"][2]["statistics"] = str(bad)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(spec))
    result = regmean("merge", tmp_path / "bad.yaml", tmp_path / "out")
    line = assert_one_line(result, 2, "has NaN or Inf values")
    assert KEPT_SAID not in line and "kept" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad-stats", "bad.yaml"]


@pytest.mark.parametrize(
    ("sent", "says"),
    [
        (signal.SIGKILL, "rank 1 was killed (signal 9); nothing was written"),
        (signal.SIGTERM, "rank 1 was terminated (signal 15); nothing was written"),
    ],
    ids=["SIGKILL", "SIGTERM"],
)
def test_a_killed_rank_is_one_line_and_leaves_nothing(tmp_path, recipe, sent, says):
    """Sweep finding F21 for SIGTERM: the signalled rank's own words, not a traceback from each rank."""
    cmd = [sys.executable, "-m", "regmean", "merge", str(recipe), str(tmp_path / "out"), "--nproc", "2"]
    run = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=slow_env(tmp_path, 1.0))
    try:
        rank1 = wait_for(lambda: [p for p, env in processes_of(tmp_path).items() if "\0RANK=1\0" in f"\0{env}"])
        wait_for(lambda: list(tmp_path.glob(".out.partial-*")))  # the ranks are merging
        os.kill(rank1[0], sent)
        stderr = run.communicate(timeout=120)[1]
    finally:
        run.kill()
    result = subprocess.CompletedProcess(cmd, run.returncode, "", stderr)
    line = assert_one_line(result, 128 + sent, says.removesuffix("; nothing was written"), "nothing was written")
    wait_for(lambda: not processes_of(tmp_path), 10)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name not in (".out.regmean-lock", "site"))
    assert not left or (len(left) == 1 and left[0].startswith(".out.partial-") and KEPT_SAID in line), left


def test_sigterm_to_the_launcher_stops_its_ranks_and_reveals_nothing(tmp_path, recipe):
    """Sent once the staging folder exists: exit 143 with one line, and within seconds no process of the run is
    left and no output appears (before, the orphaned ranks finished and revealed the merge)."""
    cmd = [sys.executable, "-m", "regmean", "merge", str(recipe), str(tmp_path / "out"), "--nproc", "2"]
    run = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=slow_env(tmp_path, 1.0))
    try:
        wait_for(lambda: list(tmp_path.glob(".out.partial-*")))
        run.send_signal(signal.SIGTERM)
        stderr = run.communicate(timeout=60)[1]
    finally:
        run.kill()
    result = subprocess.CompletedProcess(cmd, run.returncode, "", stderr)
    assert_one_line(result, 143, "terminated; nothing was written")
    wait_for(lambda: not processes_of(tmp_path), 5)
    time.sleep(1)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".out.regmean-lock") == ["site"]


def logs(errors: dict[int, list[str]], wrote: bool = False) -> RankLogs:
    return RankLogs(Path("unused"), errors=errors, wrote=wrote)


PEER = "another process of the run failed or was stopped (see its error); nothing was written (Connection reset)"


@pytest.mark.parametrize(
    ("failures", "errors", "lines", "code"),
    [
        # the same mistake on every rank: said once, naming both
        ({0: 2, 1: 2}, {0: ["d.jsonl: bad"], 1: ["d.jsonl: bad"]}, ["ranks 0 and 1: d.jsonl: bad"], 2),
        # rank 1 failed; rank 0 was stopped by torchrun, and said so: only the cause is reported
        ({0: 143, 1: 2}, {0: ["terminated; nothing was written"], 1: ["x: bad"]}, ["rank 1: x: bad"], 2),
        # rank 1 was killed; rank 0's broken collective is its consequence, not a second problem
        ({0: 2, 1: -9}, {0: [PEER]}, ["rank 1 was killed (signal 9); nothing was written"], 137),
        ({0: -15, 1: -9}, {}, ["rank 1 was killed (signal 9); nothing was written"], 137),
        # a defect of ours stays exit 3
        (
            {0: 3, 1: 2},
            {0: ["internal error (KeyError: 'a')"], 1: [PEER]},
            ["rank 0: internal error (KeyError: 'a')"],
            3,
        ),
        ({1: 17, 0: -15}, {}, ["rank 1 exited with code 17; nothing was written"], 17),
        # stopped from outside, with no other cause
        ({0: -15, 1: -15}, {}, ["ranks 0 and 1 were terminated (signal 15); nothing was written"], 143),
        # rank 1 SIGTERMed from outside (exit 143 through Python), rank 0's collective broke: rank 1 is the cause
        ({1: 143, 0: 2}, {0: [PEER]}, ["rank 1 was terminated (signal 15); nothing was written"], 143),
    ],
)
def test_the_report_names_the_cause_once(failures, errors, lines, code):
    assert report(1, None, failures, logs(errors), "") == (lines, code)


def test_the_report_of_a_stopped_or_broken_run():
    assert report(0, None, {}, logs({}), "") == ([], 0)
    assert report(143, signal.SIGTERM, {}, logs({}), "") == (["terminated; nothing was written"], 143)
    assert report(130, signal.SIGINT, {}, logs({}), "") == (["interrupted; nothing was written"], 130)
    assert report(143, signal.SIGTERM, {}, logs({}, wrote=True), "")[0] == ["terminated; the output was written"]
    lines, code = report(1, None, {}, logs({}), "RuntimeError: no port")
    assert code == 3 and "RuntimeError: no port" in lines[0]
    lines, code = report(1, None, {1: -9}, logs({}, wrote=True), "")
    assert lines == ["rank 1 was killed (signal 9); the output was written"]


def test_the_command_line_loses_only_its_nproc():
    assert without_nproc(["merge", "r.yaml", "out", "--nproc", "2", "--force"]) == ["merge", "r.yaml", "out", "--force"]
    assert without_nproc(["measure", "m", "--nproc=4"]) == ["measure", "m"]


def test_the_rank_timeout_is_checked(monkeypatch):
    from regmean.distributed import timeout

    assert timeout().total_seconds() == 1800
    monkeypatch.setenv("REGMEAN_DIST_TIMEOUT", "2.5")
    assert timeout().total_seconds() == 2.5
    for bad in ("abc", "0", "-1", "nan", "inf", "1e400", ""):
        monkeypatch.setenv("REGMEAN_DIST_TIMEOUT", bad)
        with pytest.raises(RegmeanError, match="REGMEAN_DIST_TIMEOUT="):
            timeout()


def test_rank_logs_pass_progress_through_and_keep_errors(tmp_path, capsys):
    folder = tmp_path / "run_x" / "attempt_0"
    for rank, text in ((0, "plan: 3 steps\nwrote out\nerror: a: bad\npart"), (1, "error: a: bad\n")):
        (folder / str(rank)).mkdir(parents=True)
        (folder / str(rank) / "stderr.log").write_text(text)
    ranks = RankLogs(tmp_path)
    ranks.follow()
    with open(folder / "0" / "stderr.log", "a") as f:
        f.write("ial line\n")
    ranks.follow()
    assert capsys.readouterr().err == "plan: 3 steps\nwrote out\npartial line\n"
    assert ranks.errors == {0: ["a: bad"], 1: ["a: bad"]} and ranks.wrote


STOP_RANK_1 = """
import os
if os.environ.get("RANK") == "1" and os.environ.get("STOP_AT_STEP"):
    from regmean.methods.regmean import RegMean
    original, calls = RegMean.compute, []
    def stop(self, step, data):
        calls.append(step)
        if len(calls) == int(os.environ["STOP_AT_STEP"]):
            raise KeyboardInterrupt
        return original(self, step, data)
    RegMean.compute = stop
"""
"""A sitecustomize that interrupts rank 1 as it computes its N-th step."""


def test_an_interrupted_merge_on_two_processes_resumes_to_the_same_bytes(tmp_path, recipe):
    """Rank 1 stopped mid-share: both ranks' finished steps are kept, the launcher says so in one line, and the same
    command continues after them to the bytes of an uninterrupted run."""
    from test_distributed import ONE_THREAD, files_of

    whole = regmean("merge", recipe, tmp_path / "whole", "--shard-size", "8KB", env=ONE_THREAD)
    assert whole.returncode == 0, whole.stderr[-3000:]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STOP_RANK_1)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    stopping = {**ONE_THREAD, "PYTHONPATH": path, "STOP_AT_STEP": "4"}
    stopped = regmean("merge", recipe, tmp_path / "out", "--shard-size", "8KB", env=stopping)
    assert stopped.returncode != 0 and not (tmp_path / "out").exists()
    assert KEPT_SAID in stopped.stderr, stopped.stderr
    (staged,) = tmp_path.glob(".out.partial-*")
    assert (staged / ".regmean-journal-rank1.jsonl").read_text().count("\n") == 4  # the key, then 3 steps
    again = regmean("merge", recipe, tmp_path / "out", "--shard-size", "8KB", env=ONE_THREAD)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the merge interrupted in" in again.stderr, (again.stderr, sorted(os.listdir(staged.parent)))
    assert files_of(tmp_path / "out") == files_of(tmp_path / "whole")
    assert not list(tmp_path.glob(".out.partial-*"))


STOP_MEASURE_RANK_1 = """
import os
if os.environ.get("STOP_AT_BATCH"):
    from regmean.measure import checkpoint
    from regmean.measure.accumulate import Accumulator
    checkpoint.CHECKPOINT_SECONDS = 0.0  # progress saved after every batch
    original, calls = Accumulator.run, []
    def stop(self, batch):
        calls.append(batch)
        if os.environ.get("RANK") == "1" and len(calls) == int(os.environ["STOP_AT_BATCH"]):
            raise KeyboardInterrupt
        return original(self, batch)
    Accumulator.run = stop
"""
"""A sitecustomize that saves every batch's progress and interrupts rank 1 at its N-th batch."""


@pytest.mark.parametrize("blocks", [False, True])
def test_an_interrupted_measure_on_two_processes_resumes_to_the_same_file(tmp_path, blocks):
    from conftest import TEXTS, build_model, save_model, write_jsonl
    from test_measure_resume import measured

    model = save_model(build_model("gpt2", "GPT2LMHeadModel"), tmp_path / "model")
    data = write_jsonl(tmp_path / "data.jsonl", [f"{a} {b}" for a in TEXTS for b in TEXTS[:5]], ["x"] * 50)
    args = ["measure", model, "--data", data, "--batch-size", 4, *(["--max-memory", "40KB"] if blocks else [])]
    whole = regmean(*args, "--out", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(STOP_MEASURE_RANK_1)
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    stopped = regmean(*args, "--out", tmp_path / "out", env={**os.environ, "PYTHONPATH": path, "STOP_AT_BATCH": "5"})
    assert stopped.returncode != 0 and not (tmp_path / "out" / "statistics.safetensors").exists()
    kept = tmp_path / "out" / ".statistics.safetensors.checkpoint"
    assert (kept / "pass-rank1.safetensors").is_file() or list(kept.glob("block-*")), sorted(kept.iterdir())
    again = regmean(*args, "--out", tmp_path / "out")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming the measure interrupted earlier" in again.stderr and not kept.exists()
    names = sorted(p.name for p in (tmp_path / "whole").iterdir())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == names
    if not blocks:
        (want, want_meta), (got, got_meta) = measured(tmp_path / "whole"), measured(tmp_path / "out")
        assert got.keys() == want.keys() and got_meta == want_meta
        assert all(bool((got[k] == want[k]).all()) for k in want)
    for name in names:  # every file (the blocks too) byte for byte but the provenance's timings
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            got, want = load_file(tmp_path / "out" / name), load_file(tmp_path / "whole" / name)
            assert got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want), name
