"""Every script under scripts/ imports and answers --help: scripts no test runs end to end broke unseen
(experiment_audit.py imported a helper renamed since: ImportError at its first line)."""
import subprocess
import sys
from pathlib import Path

import pytest
from web_fixtures import script_module

SCRIPTS = sorted(p.stem for p in (Path(__file__).parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_answers_help(name, capsys):
    module = script_module(name)  # every import at its top
    if not hasattr(module, "main"):  # a module the others import (bench_scale_data / _run)
        return
    with pytest.raises(SystemExit) as done:
        module.main(["--help"]) if "argv" in module.main.__code__.co_varnames else _help(module)
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def _help(module):
    """A main() without an argument list reads sys.argv."""
    argv = sys.argv
    sys.argv = [module.__name__, "--help"]
    try:
        module.main()
    finally:
        sys.argv = argv


def test_shell_scripts_parse():
    for script in (Path(__file__).parents[1] / "scripts").glob("*.sh"):
        done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert done.returncode == 0, (script.name, done.stderr)
