"""The ``emotions`` command, the one entry point of the project (the files in ``jobs/`` call it):

    emotions train        two-stage fine-tune on Ray Train; writes a model bundle
    emotions evaluate     metrics of a bundle on labelled data
    emotions tag          tag Parquet comment dumps with a bundle on Ray Data
    emotions nightly      tag every untagged (or changed) date of date-partitioned dumps
    emotions report       report of a tagged output: shares, flags, drift against baselines
    emotions tune         Ray Tune sweep over the two-stage fine-tune (ASHA)
    emotions ablate       re-run the seed study's experiment table
    emotions quickstart   train on the embedded MiniLM, evaluate, tag a sample (minutes)

Each subcommand is a module of ``emotions.commands``: a parser plus a thin function that calls the
library; errors a user can fix are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from emotions.commands import COMMANDS
from emotions.commands.errors import user_error


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotions", description="GoEmotions tagging on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: --help stays fast

    from emotions.environment import setup_logging

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return COMMANDS[args.command][2](args)
    except Exception as exc:
        message = user_error(exc)
        if message is None:
            raise
        print(f"emotions {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
