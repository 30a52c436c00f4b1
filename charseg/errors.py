"""One error type for problems the user can fix, and the wrapper every stage's `main` runs under."""
from __future__ import annotations

import errno
import os
import signal
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


# What the user can do about the filesystem errors they can cause: one hint per errno.
OS_ERROR_HINTS = {
    errno.ENOSPC: "disk full? free some space or write elsewhere",
    errno.EDQUOT: "disk quota exceeded? free some space or write elsewhere",
    errno.EFBIG: "file size limit reached (ulimit -f, or the filesystem's maximum): write elsewhere",
    errno.EROFS: "read-only filesystem: choose a writable location",
    errno.EACCES: "no permission: check the folder's permissions or choose another location",
    errno.EPERM: "not permitted: check the permissions or choose another location",
    errno.ENAMETOOLONG: "the name is too long for the filesystem: choose a shorter one",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.EISDIR: "a folder is in the way: remove it or choose another path",
    errno.EIO: "input/output error: the disk or network share may be failing",
}


def os_error_message(err: OSError, path: object = None) -> str:
    """`<path>: <cause> (<hint>)` for an OSError, naming `path` (default: the error's own file name)."""
    path = path if path is not None else (err.filename if err.filename is not None else err.filename2)
    cause = err.strerror or (os.strerror(err.errno) if err.errno else None) or str(err) or type(err).__name__
    hint = OS_ERROR_HINTS.get(err.errno)
    text = f"{cause} ({hint})" if hint else cause
    return f"{os.fsdecode(path)}: {text}" if path is not None else text


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Run a stage's main; user errors become one clear line on stderr and exit code 2, not a traceback.

    User errors are CharsegError and every OSError (a read-only or full disk, a missing permission, a
    name too long for the filesystem...): `error: <path>: <cause> (<hint>)`. The process-wide library
    settings (charseg.environment) are applied first.
    """
    from charseg import environment

    environment.configure()
    try:
        main(argv)
    except CharsegError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        # A second Ctrl-C from here on would escape as an uncaught KeyboardInterrupt (exit -2, a traceback)
        # while the message is written or the interpreter shuts down; the stage is already unwound.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        print("interrupted: no partial output was kept", file=sys.stderr)
        sys.exit(130)
