"""The `gptlab` command line: a thin shell over the package's functions.

A mistake in what the user gave (a UserError, gptlab/errors.py) ends in one line on stderr and exit code
2; a failed download in one line and exit code 1. Anything else is a bug in gptlab: its traceback is
printed with a line asking for a report, exit code 1. GPTLAB_TRACEBACK=1 in the environment shows the
traceback of any error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from importlib.metadata import version

from ..errors import DownloadError, UserError
from .common import COMMANDS, add_command


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line. Only `command`'s module of gptlab.cli is imported and its options added; every
    other command is listed with its line of help. So `gptlab --help` imports no model code at all, and
    `gptlab X --help` only what X needs (tests/test_startup.py)."""
    parser = argparse.ArgumentParser(prog="gptlab", description="A GPT-2-style language model built from scratch.")
    parser.add_argument("--version", action="version", version=f"gptlab {version('gptlab')}")
    commands = parser.add_subparsers(dest="command", required=True)
    chosen = COMMANDS[command][0] if command in COMMANDS else None
    for module in dict.fromkeys(module for module, _ in COMMANDS.values()):  # in the order of COMMANDS
        if module == chosen:
            importlib.import_module(f"{__name__}.{module}").add_parsers(commands)
        else:
            for name in (name for name, (where, _) in COMMANDS.items() if where == module):
                add_command(commands, name)
    return parser


TRACEBACK_VARIABLE = "GPTLAB_TRACEBACK"  # set (to anything but 0) to see the traceback of any error


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)  # gptlab's own options take no value
    args = build_parser(command).parse_args(argv)
    show_traceback = os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0")
    try:
        args.run(args)
    except (UserError, DownloadError) as error:
        if show_traceback:
            raise
        print(f"gptlab {args.command}: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, UserError) else 1  # a download failed: not the user's mistake
    except Exception:
        traceback.print_exc()
        print(
            f"gptlab {args.command}: internal error: this is a bug in gptlab {version('gptlab')}, not in what you "
            f"gave it; please report it with the traceback above",
            file=sys.stderr,
        )
        return 1
    return 0
