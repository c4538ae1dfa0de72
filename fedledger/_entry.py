"""The ``fedledger`` entry point: ``fedledger agent run`` without the rest of the command line.

A device runs one command for as long as it is up, and pays for every module it loads the
whole time: typer, click and rich (and ``fedledger.cli`` with all its commands) cost several
MB of a Pi Zero 2 W's 512. So a well-formed ``agent run`` command line starts the agent here,
importing only ``edge_agent``; anything else (other commands, ``--help``, a command line
this parser does not accept) goes to the typer application, so its help and its error
messages stay the only ones. ``fedledger bench agent`` measures the difference.
"""

from __future__ import annotations

import logging
import os
import sys

_LOG_LEVELS = ("debug", "info", "warning", "error")


def _parse_agent_run(args: list[str]) -> tuple[str, str, str | None] | None:
    """``(config, log_level, broker)`` of ``agent run [--config|-c PATH] [--log-level LEVEL]
    [--broker HOST:PORT]``, or ``None`` for anything the typer command should see (and
    explain) instead."""
    if args[:2] != ["agent", "run"]:
        return None
    options = {"--config": None, "-c": None, "--log-level": None, "--broker": None}
    rest = args[2:]
    while rest:
        name, sep, value = rest.pop(0).partition("=")
        if name not in options or (sep and name == "-c"):
            return None
        if not sep:
            if not rest:
                return None
            value = rest.pop(0)
        options["--config" if name == "-c" else name] = value
    config, level = options["--config"], options["--log-level"] or "info"
    if not config or config.startswith("-") or level.lower() not in _LOG_LEVELS:
        return None
    broker = options["--broker"]
    if broker is not None and (not broker or broker.startswith("-")):
        return None
    return config, level, broker


def main() -> None:
    parsed = _parse_agent_run(sys.argv[1:])
    if parsed is None:
        from fedledger.cli import main as cli_main

        cli_main()
        return
    config, log_level, broker = parsed
    # Training runs on one BLAS thread anyway (EdgeAgent limits it); without this, OpenBLAS
    # starts a thread per core, each with its buffers, when NumPy is imported. Only a default.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        handlers=[logging.StreamHandler(sys.stderr)],
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    try:
        from edge_agent import run_agent

        run_agent(config, broker)
    except BaseException as exc:  # every error becomes one line
        if isinstance(exc, SystemExit):
            raise
        from ._errors import report

        sys.exit(report(exc))
