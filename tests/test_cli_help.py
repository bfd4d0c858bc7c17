"""The CLI reads at 80 columns: every command's help shows every option name whole; `--version` answers."""

import pytest
from typer.testing import CliRunner

from regmean import __version__
from regmean.cli import app

COMMANDS = [[], ["measure"], ["merge"], ["evaluate"], ["fisher"], ["bench"], ["stats"]]
COMMANDS += [["stats", name] for name in ("show", "audit", "combine")]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "regmean")
def test_help_at_80_columns_cuts_no_option_name(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in result.output, [line for line in lines if "…" in line]


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"regmean {__version__}"


def test_bench_without_the_harness_says_how_to_install_it():
    """`bench` comes from the harness's entry point; where the harness does not import, asking for it is one line
    naming the fix (the other commands work as before)."""
    import subprocess
    import sys

    code = "import sys\nsys.modules['regmean_bench'] = None\nfrom regmean.cli import main\nmain()"
    done = subprocess.run([sys.executable, "-c", code, "bench", "demo"], capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "regmean bench: its package regmean_bench.command does not load" in done.stderr
    assert "pip install -e benchmarks/" in done.stderr
    helped = subprocess.run([sys.executable, "-c", code, "merge", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "Merge fine-tuned models" in helped.stdout


def test_a_broken_plugin_breaks_no_command(tmp_path):
    """Sweep 6 R6: an installed package whose `regmean.commands` entry point names something missing made every
    regmean command a traceback; now regmean's own commands work and the broken one is not offered."""
    import os
    import subprocess
    import sys

    info = tmp_path / "fakeplug-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplug\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[regmean.commands]\nfake = json:register\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    run = [sys.executable, "-m", "regmean"]
    helped = subprocess.run([*run, "merge", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "Merge fine-tuned models" in helped.stdout, helped.stderr
    asked = subprocess.run([*run, "fake"], capture_output=True, text=True, env=env)
    assert asked.returncode == 2 and len(asked.stderr.splitlines()) == 1, asked.stderr
