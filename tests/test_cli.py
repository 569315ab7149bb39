"""The `videollm` console script: instant help, every subcommand wired, clear errors."""

import importlib.util
import subprocess
import sys

import pytest

from videollm.cli import COMMANDS, main


def test_help_does_not_import_torch():
    code = ("import sys; from videollm.cli import main; rc = main(['--help']); "
            "assert rc == 0; assert 'torch' not in sys.modules, 'help imported torch'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "bench scan" in out.stdout and "inspect" in out.stdout


@pytest.mark.parametrize("words, module", [(c[0], c[1]) for c in COMMANDS], ids=lambda x: str(x))
def test_every_command_has_a_module_with_main(words, module):
    spec = importlib.util.find_spec(module)
    assert spec is not None, f"{' '.join(words)} → {module} does not exist"
    source = open(spec.origin).read()
    assert "def main(" in source and '__name__ == "__main__"' in source


def test_unknown_command_exits_2(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err
    assert main(["bench", "nothing"]) == 2
    assert "takes one of" in capsys.readouterr().err
