"""Error types shared by every layer, and how a command meets the user's terminal: `run_cli` turns
a `UserError` into ``error: …`` and exit 2, any other exception into one line and exit 1 (the
traceback with ``--verbose``); unless ``--verbose``, `quiet` keeps library chatter off the terminal.
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
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read video '{self.path}': {reason}")


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


_quiet = False


def is_quiet() -> bool:
    """Whether `quiet` ran in this process (so worker processes a command starts can do the same)."""
    return _quiet


def quiet() -> None:
    """Library warnings, info logs and progress bars off (errors still show), now and for later imports."""
    global _quiet
    _quiet = True
    warnings.simplefilter("ignore")  # our code logs instead of warning, so these are the libraries'
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        logger.setLevel(logging.ERROR)
        if _errors_only not in logger.filters:  # DeepSpeed resets its level when it is imported
            logger.addFilter(_errors_only)
    if (hf_logging := sys.modules.get("transformers.utils.logging")) is not None:  # imported with transformers
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def run_cli(main, argv=None) -> int:
    """Run a subcommand's ``main(argv)`` for a user (see the module docstring), ``--verbose`` taken out."""
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
