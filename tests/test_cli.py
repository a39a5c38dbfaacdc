"""The console script: top-level help, every command's --help, unknown commands."""
import pytest

from retrieval.cli import COMMANDS, main as cli


def test_top_level_help_lists_every_command(capsys):
    assert cli(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_every_command_explains_itself(name, capsys):
    with pytest.raises(SystemExit) as done:
        cli([name, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert f"retrieval {name}" in out and len(out.splitlines()) > 3


def test_unknown_command_lists_valid_ones(capsys):
    assert cli(["trian"]) == 2
    assert "choose one of: demo-catalog" in capsys.readouterr().err
