"""``emotions quickstart``: train on the embedded MiniLM, evaluate, tag a sample (minutes)."""

from __future__ import annotations

import argparse
from pathlib import Path

from emotions import cluster
from emotions.config import build_config

HELP = "train on the embedded MiniLM, evaluate, tag a sample (minutes)"


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="emotions-quickstart", help="folder for the bundle and report")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def run_quickstart(args: argparse.Namespace) -> int:
    """Train the quickstart preset on the embedded MiniLM, evaluate it on GoEmotions dev, then tag
    a 2,000-row sample dump with it."""
    from emotions.bundle import check_output_folder
    from emotions.evaluation import evaluate_bundle
    from emotions.evaluation_report import format_summary
    from emotions.training import train

    out = Path(args.output)
    config = build_config("quickstart", None, args.overrides)
    check_output_folder(out / "model")
    cluster.connect(None)
    bundle = train(config, out / "model")
    report = evaluate_bundle(bundle, "goemotions:dev", out / "report")
    print("\nGoEmotions dev (all 5,426 examples):")
    print(format_summary(report))
    print(f"bundle: {bundle}\nreport: {out / 'report' / 'report.md'}")
    tag_sample(bundle, out)
    return 0


def tag_sample(bundle: Path, out: Path) -> None:
    """Write the sample corpus and tag it; print a few tagged and flagged rows."""
    import pyarrow.dataset

    from emotions.corpus import sample_corpus
    from emotions.tagging import tag_corpus

    sample_corpus(out / "sample-corpus")
    summary = tag_corpus(bundle, out / "sample-corpus", out / "sample-tagged", keep_columns=["body"], overwrite=True)
    rows = pyarrow.dataset.dataset(summary.output, format="parquet").to_table().slice(0, 400).to_pylist()
    shown = [r for r in rows if r["error"] is None][:4] + [r for r in rows if r["error"]][:2]
    print(f"\nsample corpus tagged ({summary.line()}):")
    for r in shown:
        body = "null" if r["body"] is None else repr(r["body"][:50])
        print(f"  {r['id']}  {body:54}  {str(r['emotions']):28} top={r['top_emotion']}  error={r['error']}")
