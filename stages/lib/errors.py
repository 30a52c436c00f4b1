"""One error type for problems the user can fix, and the wrapper every stage's `main` runs under."""
from __future__ import annotations

import sys
from typing import Callable

from tqdm import tqdm


class CharsegError(Exception):
    """A problem with the user's input or setup. The message says what is wrong and what to do."""


def warn(message: str) -> None:
    """A problem the stage worked around: one stderr line, printed above any progress bar, not through it."""
    tqdm.write(f"warning: {message}", file=sys.stderr)


def require(condition: object, message: str) -> None:
    if not condition:
        raise CharsegError(message)


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a stage's main; user errors become one clear line on stderr and exit code 2, not a traceback."""
    try:
        main(argv)
    except CharsegError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: no partial output was kept", file=sys.stderr)
        sys.exit(130)
