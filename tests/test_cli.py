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


QUIET_SCRIPT = """
import logging, sys, warnings
from encoder.errors import run_cli

def main(argv):
    warnings.warn("a library's FutureWarning", FutureWarning)
    logging.getLogger("transformers.modeling_utils").warning("a library's log line")
    logging.getLogger("DeepSpeed").warning("[WARNING] Setting accelerator to CPU")
    logging.getLogger("videollm.llm").warning("our own notice")
    print("args", argv)
    if "boom" in argv:
        raise RuntimeError("it broke\\nsecond line")
    return 0

sys.exit(run_cli(main))
"""


def _run(*args):
    return subprocess.run([sys.executable, "-c", QUIET_SCRIPT, *args], capture_output=True, text=True)


def test_quiet_by_default_our_notices_stay():
    out = _run("x")
    assert out.returncode == 0 and out.stdout.strip() == "args ['x']"
    assert out.stderr.strip() == "our own notice"


def test_verbose_shows_library_warnings_and_is_not_passed_on():
    out = _run("x", "--verbose")
    assert out.returncode == 0 and out.stdout.strip() == "args ['x']"
    for text in ("FutureWarning", "a library's log line", "Setting accelerator to CPU", "our own notice"):
        assert text in out.stderr


def test_a_bug_is_one_line_unless_verbose():
    out = _run("boom")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == \
        "error: RuntimeError: it broke (run with --verbose for the traceback)"
    assert "Traceback" not in out.stderr
    out = _run("boom", "--verbose")
    assert out.returncode == 1 and "Traceback" in out.stderr and "it broke" in out.stderr


def test_global_verbose_flag_reaches_the_subcommand(monkeypatch):
    seen = {}
    monkeypatch.setattr("videollm.cli.run_cli", lambda fn, argv: seen.setdefault("argv", argv) and 0)
    main(["--verbose", "inspect", "clip.mp4"])
    assert seen["argv"] == ["clip.mp4", "--verbose"]
