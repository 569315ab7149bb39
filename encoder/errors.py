"""Error types shared by every layer.

`UserError` is what bad input raises: a message that names the file or record and says what to
do. The CLI turns it into a one-line ``error: …`` and exit status 2; anything else is a bug and
keeps its traceback.
"""


class UserError(Exception):
    """Bad input from the user (path, config value, data record). The message is shown as is."""


class VideoReadError(UserError):
    """A video that cannot be read: missing, empty, truncated, not a video, no decodable frames."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read video '{self.path}': {reason}")


def run_cli(main, argv=None) -> int:
    """Run a subcommand's ``main(argv)``; a `UserError` becomes ``error: …`` on stderr and exit 2."""
    import sys

    try:
        return int(main(sys.argv[1:] if argv is None else argv) or 0)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
