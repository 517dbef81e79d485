"""``emotions evaluate``: the metrics of a bundle on labelled data."""

from __future__ import annotations

import argparse

HELP = "metrics of a bundle on labelled data"


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    from emotions.precision import RUNTIMES

    parser.add_argument("--model", required=True, help="model bundle folder")
    parser.add_argument(
        "--data",
        default="goemotions:dev",
        help="labelled data: a file (.tsv/.csv/.jsonl/.parquet), goemotions:dev, hf:NAME",
    )
    parser.add_argument("--report", help="folder or URI (s3://...) for metrics.json, report.md and per_label_f1.png")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--labels-column", default="labels")
    parser.add_argument("--label-format", default="auto", choices=["auto", "names", "ids", "columns"])
    parser.add_argument(
        "--precision",
        default="fp32",
        choices=list(RUNTIMES),
        help="runtime to score with (default fp32, torch): the numbers tagging at that precision gives",
    )


def run_evaluate(args: argparse.Namespace) -> int:
    from emotions import storage
    from emotions.evaluation import evaluate_bundle
    from emotions.evaluation_report import format_shares, format_summary

    report = evaluate_bundle(
        args.model,
        args.data,
        args.report,
        text_column=args.text_column,
        labels_column=args.labels_column,
        label_format=args.label_format,
        precision=args.precision,
    )
    print(format_summary(report))
    print(format_shares(report))
    if args.report:
        print(f"report: {storage.join(args.report, 'report.md')}")
    return 0
