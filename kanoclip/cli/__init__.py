"""The ``kanoclip`` command: ``detect``, ``train``, ``eval``, ``kb`` and ``export``.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds
its parser and sets ``func`` to a handler ``(args) -> int`` (the exit status).
Errors a user can cause (:class:`~kanoclip.errors.KAnoCLIPError`) are printed as one
line on stderr, never as a traceback, naming the command's flags (``--backbone``) where
the library's message names an API argument (``backbone=``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kanoclip.errors import KAnoCLIPError

SUBCOMMANDS = ("detect", "train", "eval", "kb", "references", "export")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, with every available subcommand registered."""
    import importlib

    parser = argparse.ArgumentParser(
        prog="kanoclip",
        description="KAnoCLIP: zero-shot anomaly detection with CLIP and knowledge-driven prompts.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"kanoclip.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kanoclip`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KAnoCLIPError as exc:
        print(f"kanoclip {args.command}: error: {exc.message(flags=True)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"kanoclip {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
