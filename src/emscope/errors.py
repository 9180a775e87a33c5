"""The one exception type for user-facing problems.

An :class:`EmscopeError` carries a single line that names the file, line or module at fault.
The command line prints it without a traceback; library users can catch it.
"""

from __future__ import annotations

from pathlib import Path


class EmscopeError(Exception):
    """A problem with the user's input (a file, a config, a model) rather than a bug."""


def os_error(exc: OSError, path: str | Path | None = None, doing: str = "") -> EmscopeError:
    """The one line for an :class:`OSError` the user can act on (a read-only or missing dir,
    a full disk, a quota): the path, what failed and the system's reason, e.g.
    ``run/config.json: cannot write (No space left on device)``."""
    where = path if path is not None else exc.filename
    lines = str(exc).strip().splitlines()
    reason = exc.strerror or (lines[0] if lines else type(exc).__name__)
    text = f"{doing} ({reason})" if doing else reason
    return EmscopeError(f"{where}: {text}" if where is not None else text)
