"""``emotions report``: the report of a tagged output: label shares, flags, top_score, and drift
against baseline outputs."""

from __future__ import annotations

import argparse

HELP = "report of a tagged output: shares, flags, top_score, drift against baselines"


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tagged", metavar="TAGGED_DIR", help="a committed `emotions tag` output folder (or URI)")
    parser.add_argument(
        "--baseline",
        nargs="+",
        default=[],
        metavar="DIR",
        help="earlier committed outputs to compare with (pooled) for drift per label",
    )
    parser.add_argument(
        "--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)"
    )


def run_report(args: argparse.Namespace) -> int:
    from emotions.tagging.report import write_tagging_report

    summary = write_tagging_report(args.tagged, args.baseline, ray_address=args.ray_address)
    print(summary.line())
    print(f"report: {summary.report}")
    print(summary.called_out_line())
    return 0
