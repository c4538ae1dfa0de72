"""Running the typer application: tidy help, and errors as one line (fedledger._errors).

The click command is built once from the typer app and adjusted before it runs, so every
command, including ones added later, gets the same treatment without touching its code.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from . import _errors

PROG = "fedledger"


def _paragraphs(text: str | None) -> str | None:
    """A docstring as paragraphs of one line each: rich keeps single newlines, so a
    docstring wrapped at 90 columns renders raggedly at 80. ``\\b`` blocks stay verbatim."""
    if not text:
        return text
    body, sep, rest = inspect.cleandoc(text).partition("\f")
    paragraphs = [
        p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
        for p in body.split("\n\n")
    ]
    return "\n\n".join(paragraphs) + sep + rest


def _no_flag_metavar(command: Any) -> None:
    """Flags take no value, so their help shows no type (typer prints ``<bool>``)."""
    for param in command.params:
        if getattr(param, "is_flag", False):
            param.metavar = ""
    make_help_option = command.get_help_option

    def get_help_option(ctx):
        option = make_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = get_help_option


def commands(command: Any, path: tuple[str, ...] = ()):
    """``(path, command)`` of every command and group under ``command``, itself first."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if not getattr(sub, "hidden", False):
            yield from commands(sub, (*path, name))


def build(app: Any) -> Any:
    """The click command of ``app``, with help texts and flag metavars tidied."""
    import typer.main

    root = typer.main.get_command(app)
    for _path, command in commands(root):
        command.help = _paragraphs(command.help)
        _no_flag_metavar(command)
    return root


def run(app: Any, args: list[str] | None = None) -> int:
    """Run ``app`` on ``args``; the exit code. Nothing but one ``error:`` line reaches the
    user for a refused command line or a failed command (never a traceback)."""
    import typer

    root = build(app)
    try:
        code = root.main(args, prog_name=PROG, standalone_mode=False)
    except typer.TyperException as exc:
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            sys.stderr.write(ctx.get_help() + "\n")
            return _errors.USAGE
        if ctx is not None or hasattr(exc, "param"):
            return _errors.usage(exc.format_message(), ctx.command_path if ctx else None)
        return _errors.report(ValueError(exc.format_message()))
    except typer.Abort:
        return _errors.report(KeyboardInterrupt())
    except BaseException as exc:  # every error becomes one line
        if isinstance(exc, SystemExit):
            raise
        return _errors.report(exc)
    if code == _errors.INTERRUPTED:  # typer turns Ctrl-C into Exit(130), silently
        return _errors.report(KeyboardInterrupt())
    return code if isinstance(code, int) else 0
