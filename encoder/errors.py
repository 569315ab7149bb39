"""Error types shared by every layer, and how a command meets the user's terminal.

`UserError` is what bad input raises: a message that names the file or record and says what to
do. `run_cli` runs a subcommand: a `UserError` becomes a one-line ``error: …`` and exit status 2,
any other exception a one-line ``error: <type>: <message>`` and exit status 1 (the traceback
with ``--verbose``). Unless ``--verbose``, `quiet` keeps the libraries' warnings, info logs and
progress bars off the terminal; our own logs and notices stay.
"""

import logging
import os
import sys
import warnings

VERBOSE_FLAG = "--verbose"
# Libraries whose logs are info for their developers, not for our users.
LIBRARY_LOGGERS = ("transformers", "peft", "bitsandbytes", "accelerate", "deepspeed", "DeepSpeed", "torch",
                   "huggingface_hub", "datasets", "gradio", "httpx", "urllib3", "matplotlib", "PIL")


class UserError(Exception):
    """Bad input from the user (path, config value, data record). The message is shown as is."""


class VideoReadError(UserError):
    """A video that cannot be read: missing, empty, truncated, not a video, no decodable frames."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read video '{self.path}': {reason}")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def quiet() -> None:
    """Library warnings, info logs and progress bars off; errors still show. Works whether or not
    the libraries are imported yet (environment switches for later imports, their own switches
    for earlier ones)."""
    warnings.simplefilter("ignore")  # our code logs instead of warning, so these are the libraries'
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        if _errors_only not in logger.filters:  # DeepSpeed resets its level when it is imported
            logger.addFilter(_errors_only)
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def run_cli(main, argv=None) -> int:
    """Run a subcommand's ``main(argv)`` for a user: quiet unless ``--verbose`` is in argv (taken
    out before main sees it); a `UserError` is ``error: …`` and exit 2, another exception one line
    and exit 1 (with ``--verbose``, its traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = VERBOSE_FLAG in argv
    argv = [a for a in argv if a != VERBOSE_FLAG]
    if not verbose:
        quiet()
    try:
        return int(main(argv) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 — a bug, told in one line unless asked for more
        if verbose:
            raise
        message = (str(err).strip().splitlines() or [""])[0]
        print(f"error: {type(err).__name__}: {message} (run with {VERBOSE_FLAG} for the traceback)", file=sys.stderr)
        return 1
