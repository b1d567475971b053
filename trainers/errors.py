"""User errors at the command line: one line on stderr, exit code 2, no traceback.

    from trainers.errors import run_cli
    if __name__ == "__main__":
        run_cli(main)

The project's user-facing errors are `ValueError` subclasses that name the file, row, flag
or size (`DataError`, `FactoryError`, `IndexExistsError`, `ResumeMismatchError`,
`EncoderMismatchError`, `IndexFileError`, ...), plus a missing file (`FileNotFoundError`),
an unknown document id (`UnknownIdError`) and a locked index folder (`IndexLockedError`).
Anything else is a bug and keeps its traceback. `RAG_MM_TRACEBACK=1` re-raises user errors
too, for debugging.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

USAGE_EXIT_CODE = 2  # argparse's code for a bad command line


class UserExit(SystemExit):
    """Exit code 2; `str()` is the one-line message (already printed on stderr)."""

    def __init__(self, message: str):
        super().__init__(USAGE_EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


def user_error_types() -> tuple[type[BaseException], ...]:
    from retrieval_index import IndexLockedError, UnknownIdError

    return (ValueError, FileNotFoundError, NotADirectoryError, IndexLockedError, UnknownIdError)


def one_line(err: BaseException) -> str:
    """The error's message on one line (KeyError's repr quotes are dropped)."""
    text = str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(text.split()) or type(err).__name__


def run_cli(main: Callable, argv=None, *, prog: str | None = None):
    """Call `main(argv)`; a user error prints `PROG: error: MESSAGE` on stderr and raises
    `UserExit` (a `SystemExit` with code 2)."""
    prog = prog or Path(sys.argv[0]).name
    try:
        return main(argv)
    except user_error_types() as err:
        if os.environ.get("RAG_MM_TRACEBACK"):
            raise
        message = f"{prog}: error: {one_line(err)}"
        print(message, file=sys.stderr, flush=True)
        raise UserExit(message) from None
