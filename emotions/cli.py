"""The ``emotions`` command: ``train``, ``evaluate``, ``quickstart``.

Each subcommand is a parser plus a thin function that calls the library; errors a user can fix
are printed as one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from emotions.config import ConfigError, build_config, preset_names

log = logging.getLogger("emotions")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default", help=f"one of {preset_names()} (default: default)")
    parser.add_argument("--config", help="YAML or JSON file merged over the preset")
    parser.add_argument("--output", required=True, help="folder for the model bundle")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. stage1.epochs=3 scaling.num_workers=4")


def run_train(args: argparse.Namespace) -> int:
    from emotions.metrics import format_summary
    from emotions.training import train

    config = build_config(args.preset, args.config, args.overrides)  # validated before Ray starts
    connect_ray(args.ray_address)
    path = train(config, args.output)
    report = json.loads((path / "metrics.json").read_text())
    print(format_summary(report))
    print(f"bundle: {path}")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model bundle folder")
    parser.add_argument("--data", default="goemotions:dev",
                        help="labelled data: a file (.tsv/.csv/.jsonl/.parquet), goemotions:dev, hf:NAME")
    parser.add_argument("--report", help="folder for metrics.json, report.md and per_label_f1.png")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--labels-column", default="labels")
    parser.add_argument("--label-format", default="auto", choices=["auto", "names", "ids", "columns"])


def run_evaluate(args: argparse.Namespace) -> int:
    from emotions.evaluation import evaluate_bundle
    from emotions.metrics import format_summary

    report = evaluate_bundle(args.model, args.data, args.report, text_column=args.text_column,
                             labels_column=args.labels_column, label_format=args.label_format)  # fmt: skip
    print(format_summary(report))
    if args.report:
        print(f"report: {args.report}")
    return 0


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="emotions-quickstart", help="folder for the bundle and report")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def run_quickstart(args: argparse.Namespace) -> int:
    """Train the quickstart preset on the embedded MiniLM, then evaluate it on GoEmotions dev."""
    from emotions.evaluation import evaluate_bundle
    from emotions.metrics import format_summary
    from emotions.training import train

    out = Path(args.output)
    config = build_config("quickstart", None, args.overrides)
    connect_ray(None)
    bundle = train(config, out / "model")
    report = evaluate_bundle(bundle, "goemotions:dev", out / "report")
    print("\nGoEmotions dev (all 5,426 examples):")
    print(format_summary(report))
    print(f"bundle: {bundle}\nreport: {out / 'report' / 'report.md'}")
    return 0


COMMANDS = {
    "train": ("two-stage fine-tune on Ray Train; writes a model bundle", add_train_arguments, run_train),
    "evaluate": ("metrics of a bundle on labelled data", add_evaluate_arguments, run_evaluate),
    "quickstart": ("train on the embedded MiniLM and evaluate (minutes)", add_quickstart_arguments,
                   run_quickstart),
}  # fmt: skip


def connect_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotions", description="GoEmotions tagging on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    from emotions.bundle import BundleError
    from emotions.data import DataError
    from emotions.environment import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return COMMANDS[args.command][2](args)
    except (ConfigError, DataError, BundleError, FileNotFoundError) as exc:
        print(f"emotions {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
