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
