"""User-facing errors: one clear line on stderr and exit code 2, never a traceback."""
from __future__ import annotations

import errno
import sys
from typing import Callable, Sequence


# Errors of the file system that the user fixes (rights, read-only mounts, a full disk or quota).
_FOLDER_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}
_FULL_ERRORS = {errno.ENOSPC, errno.EDQUOT}  # of those, the full disk or quota


class UserError(Exception):
    """A mistake the user can fix (bad flag, missing file, wrong data layout)."""


def run_cli(main: Callable, argv: Sequence[str] | None = None, parse: Callable | None = None) -> int:
    """Run ``main(argv)``, or ``main(parse(argv))`` for a stage script (``parse`` turns the command
    line into the arguments its ``main`` takes); turn UserError into ``error: ...`` plus exit code 2."""
    try:
        main(argv if parse is None else parse(argv))
    except UserError as err:
        print(f"error: {_last_line(str(err))}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as err:  # torch.save's RuntimeError chains the OSError of the write
        failure = folder_error(err)
        if failure is None:
            raise
        print(f"error: {_folder_message(failure)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: everything written so far is kept; rerun the same command to resume",
              file=sys.stderr)
        return 130
    return 0


def folder_error(err: BaseException) -> OSError | None:
    """The file-system error the user fixes (rights, a read-only mount, a full disk or quota) that
    ``err`` is, or that it was raised from or while handling (its ``__cause__``/``__context__``
    chain, as a library's error chains the OSError of a failed write); None when there is none."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FOLDER_ERRORS:
            return err
        err = err.__cause__ or err.__context__
    return None


def _folder_message(err: OSError) -> str:
    name = err.filename or "an output file"
    if err.errno in _FULL_ERRORS:
        return (f"{name}: no space left on device ({errno.errorcode[err.errno]}: {err.strerror}); free some "
                "space or write elsewhere with --output_dir, then rerun: earlier results are kept")
    return f"{name}: {err.strerror}; fix its permissions or free space, or write elsewhere with --output_dir"


def first_line(err: BaseException) -> str:
    """An exception's first message line (its class name when the message is empty), for a
    UserError that quotes what a library said."""
    text = str(err).strip()
    return text.splitlines()[0] if text else err.__class__.__name__


def _last_line(message: str) -> str:
    # A UserError raised in a DataLoader worker comes back with the worker's traceback in
    # its message; the user needs only the final line.
    lines = [line for line in message.strip().splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in message:
        return lines[-1].split("UserError: ", 1)[-1]
    return message


def network_errors() -> tuple[type[BaseException], ...]:
    """The errors of a connection that failed on the way to the Hub: OSError (requests' errors
    derive from it) and the transport errors of the HTTP client huggingface_hub uses (httpx, or
    httpx2 in its 2.x releases), whichever are installed."""
    import importlib

    errors: list[type[BaseException]] = [OSError]
    for name in ("httpx", "httpx2"):
        try:
            errors.append(importlib.import_module(name).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)
