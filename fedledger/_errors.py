"""One line on stderr for every error the command line meets, and exit code 2.

Shared by the lean ``agent run`` path (fedledger._entry) and the typer application, so it
imports nothing heavy: a library's exception types are looked up only when that library is
already loaded (an exception of a module never imported cannot be raised).
"""

from __future__ import annotations

import logging
import os
import sys

USAGE = 2
INTERRUPTED = 130

#: Set to print the traceback of an unexpected error (for a bug report).
DEBUG_ENV = "FEDLEDGER_DEBUG"

# (module, class name) of errors a user can cause with a bad file or value.
_KNOWN = (
    ("sqlite3", "Error"),
    ("zipfile", "BadZipFile"),
    ("pickle", "UnpicklingError"),
    ("cryptography.exceptions", "UnsupportedAlgorithm"),
    ("cryptography.exceptions", "InvalidSignature"),
)


def one_line(text: str) -> str:
    """``text`` on one line: pydantic and others write several."""
    return "; ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _loaded(module: str, name: str) -> type | None:
    value = getattr(sys.modules.get(module), name, None)
    return value if isinstance(value, type) else None


def describe(exc: BaseException) -> str | None:
    """The message for an error a user can cause, or ``None`` for a bug."""
    from fedcore import FedledgerError

    if isinstance(exc, FedledgerError):
        return str(exc)
    if isinstance(exc, OSError):
        what = exc.strerror or str(exc) or type(exc).__name__
        what = what[:1].lower() + what[1:]
        return f"{exc.filename}: {what}" if exc.filename else what
    json_error = _loaded("json", "JSONDecodeError")
    if json_error is not None and isinstance(exc, json_error):
        return f"not valid JSON: {exc}"
    if isinstance(exc, (ValueError, UnicodeError)):
        return str(exc) or type(exc).__name__
    for module, name in _KNOWN:
        cls = _loaded(module, name)
        if cls is not None and isinstance(exc, cls):
            return f"{module.split('.')[0]}: {exc}" if str(exc) else f"{module}.{name}"
    return None


def _write(line: str) -> None:
    prefix = "error:"
    if sys.stderr.isatty() and not os.environ.get("NO_COLOR"):
        prefix = "\x1b[31merror:\x1b[0m"
    sys.stderr.write(f"{prefix} {one_line(line)}\n")
    sys.stderr.flush()


def report(exc: BaseException) -> int:
    """Print ``exc`` as one ``error:`` line; the exit code to end with."""
    if isinstance(exc, KeyboardInterrupt):
        _write("interrupted")
        return INTERRUPTED
    message = describe(exc)
    if message is None:
        logging.getLogger("fedledger").debug("unexpected error", exc_info=exc)
        if os.environ.get(DEBUG_ENV):
            import traceback

            traceback.print_exception(exc, file=sys.stderr)
        detail = f": {exc}" if str(exc) else ""
        message = (
            f"unexpected {type(exc).__name__}{detail}"
            f" (run with {DEBUG_ENV}=1 for the traceback, and please report it)"
        )
    _write(message)
    return USAGE


def usage(message: str, command_path: str | None) -> int:
    """A command line typer refused: one ``error:`` line and where the help is."""
    text = one_line(message)
    _write(text[:1].lower() + text[1:])
    if command_path:
        sys.stderr.write(f"try '{command_path} --help'\n")
    return USAGE
