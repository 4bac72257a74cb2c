"""The `transnormer-hf` command line: a dispatcher; each subcommand lives in the module that does its job.

A subcommand module exposes `register(subparsers)`, which adds its parser and sets `handler` (a function
taking the parsed arguments and returning an exit code). Expected failures raise `CLIError` or a
ValueError/OSError and are printed as one line, without a traceback (set TRANSNORMER_HF_DEBUG=1 for one).
What subcommands share lives in `cli_common.py`: the dispatcher imports them, nothing imports the dispatcher.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .cli_common import CLIError


def _command_modules() -> list:
    # Imported here so `transnormer-hf --help` stays quick and the package import has no CLI cost.
    from . import generation_cli, quickstart, training
    from .conversion import cli as conversion_cli

    return [quickstart, generation_cli, training, conversion_cli]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transnormer-hf",
        description="TransNormerLLM (Lightning Attention) for Hugging Face transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in _command_modules():
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (CLIError, ValueError, OSError, RuntimeError) as error:
        if os.environ.get("TRANSNORMER_HF_DEBUG") == "1":
            raise
        print(f"transnormer-hf {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
