"""``emotions ablate``: re-run the seed study's experiment table (``emotions.ablation.ROWS``)."""

from __future__ import annotations

import argparse

from emotions import cluster
from emotions.config import ConfigError, build_config, preset_names

HELP = "re-run the seed study's experiment table"


def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quickstart", help=f"training preset the rows start from {preset_names()}")
    parser.add_argument(
        "--budget",
        default="laptop",
        choices=["tiny", "laptop", "full"],
        help="laptop: 10,000 examples, 1+6 epochs per row (~35 min on 2 cores); full: all data, "
        "3+10 epochs; tiny: 300 examples (tests)",
    )
    parser.add_argument(
        "--output", required=True, help="folder or URI (s3://...) for ablation.md/.json and the row bundles"
    )
    parser.add_argument(
        "--rows",
        type=row_numbers,
        default=None,
        metavar="N[,N...]",
        help="run only these rows, comma-separated (1-based, as numbered in emotions.ablation.ROWS); default: all",
    )
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="applied to every row")


def row_numbers(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give row numbers separated by commas, e.g. 11,12") from None


def run_ablate(args: argparse.Namespace) -> int:
    from emotions import storage
    from emotions.ablation import ROWS, run_ablation

    build_config(args.preset, None, args.overrides)  # refuse bad keys (and rows) before Ray starts
    unknown = sorted(set(args.rows or ()) - set(range(1, len(ROWS) + 1)))
    if unknown:
        raise ConfigError(f"--rows {unknown}: the table has rows 1 to {len(ROWS)}")
    cluster.connect(args.ray_address)
    run_ablation(args.preset, args.output, args.budget, args.overrides, rows=args.rows)
    print(storage.Folder.from_uri(args.output).read_text("ablation.md"))
    return 0
