"""The ``emotions`` command: ``train``, ``evaluate``, ``tag``, ``quickstart``.

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
from emotions import cluster

log = logging.getLogger("emotions")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="default", help=f"one of {preset_names()} (default: default)")
    parser.add_argument("--config", help="YAML or JSON file merged over the preset")
    parser.add_argument("--output", required=True, help="folder for the model bundle")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--fresh", action="store_true",
                        help="delete the checkpoints of an earlier run with this run.name and start over "
                             "(run.resume=false); without it, that run resumes if its config is unchanged")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. stage1.epochs=3 scaling.num_workers=4")


def run_train(args: argparse.Namespace) -> int:
    from emotions.bundle import check_output_folder
    from emotions.storage import is_uri
    from emotions.metrics import format_summary
    from emotions.training import load_training_data, prepare_run, train

    fresh = ["run.resume=false"] if args.fresh else []
    config = build_config(args.preset, args.config, [*args.overrides, *fresh])
    check_output_folder(args.output)  # a folder of the user's files is refused before anything is deleted;
    data = load_training_data(config)  # config and data are checked before Ray starts,
    if config.run.name:  # and so is a named run's earlier checkpoints' config (or they are deleted)
        prepare_run(config, config.run.name)
    cluster.connect(args.ray_address)
    path = train(config, args.output, data=data)
    if not is_uri(path):
        print(format_summary(json.loads((Path(path) / "metrics.json").read_text())))
    print(f"bundle: {path}")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model bundle folder")
    parser.add_argument("--data", default="goemotions:dev",
                        help="labelled data: a file (.tsv/.csv/.jsonl/.parquet), goemotions:dev, hf:NAME")
    parser.add_argument("--report", help="folder or URI (s3://...) for metrics.json, report.md and per_label_f1.png")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--labels-column", default="labels")
    parser.add_argument("--label-format", default="auto", choices=["auto", "names", "ids", "columns"])


def run_evaluate(args: argparse.Namespace) -> int:
    from emotions import storage
    from emotions.evaluation import evaluate_bundle
    from emotions.metrics import format_summary

    report = evaluate_bundle(args.model, args.data, args.report, text_column=args.text_column,
                             labels_column=args.labels_column, label_format=args.label_format)  # fmt: skip
    print(format_summary(report))
    if args.report:
        print(f"report: {storage.join(args.report, 'report.md')}")
    return 0


def add_tag_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model bundle folder (or URI)")
    parser.add_argument("--input", required=True, nargs="+", metavar="PATH",
                        help="Parquet files, folders or globs; local or URIs (s3://...)")
    parser.add_argument("--output", required=True, help="folder for the tagged Parquet files (or URI)")
    parser.add_argument("--text-column", default="body", help="column with the text (default: body)")
    parser.add_argument("--id-column", default="id", help="column that identifies a row (default: id)")
    parser.add_argument("--keep-columns", default="", metavar="A,B",
                        help="input columns to carry into the output, comma-separated")
    parser.add_argument("--probabilities", action="store_true", help="add the 28 p_<label> columns")
    parser.add_argument("--overwrite", action="store_true", help="replace a committed output")
    parser.add_argument("--actors", type=int, default=None,
                        help="actor pool size (default: one per --cpus-per-actor CPUs, or per GPU)")
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per actor call (default: 1024)")
    parser.add_argument("--cpus-per-actor", type=int, default=1, help="torch threads per actor (default: 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default: 0)")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "int8"], default=None,
                        help="auto (default): int8 on CPU when the bundle's recorded check rules out a "
                             "held-out macro-F1 loss over 0.01, else fp32; fp32 on GPU. bf16/int8 only "
                             "when that check passes (run before tagging if the bundle has none)")
    parser.add_argument("--int8", action="store_true", help="same as --precision int8")
    parser.add_argument("--skip-bad-files", action="store_true",
                        help="skip unreadable input files (listed in _manifest.json) instead of failing")
    parser.add_argument("--baseline", action="append", default=[], metavar="DIR",
                        help="an earlier committed output to compare label shares with in the report "
                             "(repeatable)")
    parser.add_argument("--no-report", action="store_true",
                        help="do not write _report.md / _report.json / _report/*.png into the output")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")


def run_tag(args: argparse.Namespace) -> int:
    from emotions.tagging import tag_corpus

    summary = tag_corpus(
        args.model, args.input, args.output, text_column=args.text_column, id_column=args.id_column,
        keep_columns=[c.strip() for c in args.keep_columns.split(",") if c.strip()],
        probabilities=args.probabilities, overwrite=args.overwrite, num_actors=args.actors,
        batch_size=args.batch_size, cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor, precision=args.precision, int8=args.int8,
        on_bad_file="skip" if args.skip_bad_files else "fail", report=not args.no_report,
        baselines=args.baseline, ray_address=args.ray_address,
    )  # fmt: skip
    print(summary.line())
    print(f"manifest: {summary.manifest}")
    if summary.report:
        print(f"report: {summary.report}")
    return 0


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", default="emotions-quickstart", help="folder for the bundle and report")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE")


def run_quickstart(args: argparse.Namespace) -> int:
    """Train the quickstart preset on the embedded MiniLM, evaluate it on GoEmotions dev, then tag
    a 2,000-row sample dump with it."""
    from emotions.evaluation import evaluate_bundle
    from emotions.metrics import format_summary
    from emotions.training import train

    from emotions.bundle import check_output_folder

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
    summary = tag_corpus(bundle, out / "sample-corpus", out / "sample-tagged", keep_columns=["body"],
                         overwrite=True)  # fmt: skip
    rows = pyarrow.dataset.dataset(summary.output, format="parquet").to_table().slice(0, 400).to_pylist()
    shown = [r for r in rows if r["error"] is None][:4] + [r for r in rows if r["error"]][:2]
    print(f"\nsample corpus tagged ({summary.line()}):")
    for r in shown:
        body = "null" if r["body"] is None else repr(r["body"][:50])
        print(f"  {r['id']}  {body:54}  {str(r['emotions']):28} top={r['top_emotion']}  error={r['error']}")


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    from importlib import resources

    names = sorted(p.name[:-5] for p in (resources.files("emotions") / "presets" / "tune").iterdir()
                   if p.name.endswith(".yaml"))  # fmt: skip
    parser.add_argument("--preset", default=None,
                        help=f"tune preset, one of {names} (default: minilm; heads with --from-bundle)")
    parser.add_argument("--config", help="YAML or JSON file merged over the preset (may hold a tune: section)")
    parser.add_argument("--from-bundle", metavar="BUNDLE", default=None,
                        help="head-only sweep: stage-2 settings over this bundle's encoder, which runs once "
                             "(cached features); the bundle's config is the base")
    parser.add_argument("--output", required=True,
                        help="folder or URI (s3://...) for the sweep, results, plot and the best bundle")
    parser.add_argument("--ray-address", default=None)
    parser.add_argument("--no-resume", action="store_true", help="start over even if the sweep exists")
    parser.add_argument("--max-concurrent-trials", type=int, default=None, metavar="N",
                        help="trials at once (default: tune.max_concurrent_trials, else as many as the "
                             "cluster fits at the autoscaler's maximum size)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="e.g. tune.num_samples=4 stage1.epochs=1")


def run_tune(args: argparse.Namespace) -> int:
    from emotions import storage
    from emotions.bundle import check_output_folder
    from emotions.tuning import build_sweep_config, run_sweep, split_tune_settings
    from emotions.config import from_dict

    if args.max_concurrent_trials is not None and args.max_concurrent_trials < 1:
        raise ConfigError(f"--max-concurrent-trials {args.max_concurrent_trials}: give 1 or more")
    if args.max_concurrent_trials:
        args.overrides = [*args.overrides, f"tune.max_concurrent_trials={args.max_concurrent_trials}"]
    if args.from_bundle:
        from emotions.bundle import load_bundle
        from emotions.head_sweep import build_head_sweep_config, run_head_sweep

        source = load_bundle(args.from_bundle)  # once: checked here, swept over below
        raw = build_head_sweep_config(source, args.preset or "heads", args.config, args.overrides)
    else:
        raw = build_sweep_config(args.preset or "minilm", args.config, args.overrides)
    from_dict(split_tune_settings(raw)[0])  # refuse bad keys before Ray starts
    check_output_folder(storage.join(args.output, "best_bundle"))  # and an output where the best bundle cannot go
    cluster.connect(args.ray_address)
    if args.from_bundle:
        summary = run_head_sweep(source, raw, args.output, resume=not args.no_resume)
    else:
        summary = run_sweep(raw, args.output, resume=not args.no_resume)
    print(json.dumps(summary, indent=2))
    print(f"results: {storage.join(args.output, 'results.md')}")
    return 0


def add_ablate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="quickstart", help=f"training preset the rows start from {preset_names()}")
    parser.add_argument("--budget", default="laptop", choices=["tiny", "laptop", "full"],
                        help="laptop: 10,000 examples, 1+6 epochs per row (~35 min on 2 cores); full: all data, "
                             "3+10 epochs; tiny: 300 examples (tests)")
    parser.add_argument("--output", required=True,
                        help="folder or URI (s3://...) for ablation.md/.json and the row bundles")
    parser.add_argument("--rows", type=row_numbers, default=None, metavar="N[,N...]",
                        help="run only these rows, comma-separated (1-based, as numbered in emotions.ablation.ROWS); "
                             "default: all")
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


def add_report_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("tagged", metavar="TAGGED_DIR", help="a committed `emotions tag` output folder (or URI)")
    parser.add_argument("--baseline", nargs="+", default=[], metavar="DIR",
                        help="earlier committed outputs to compare with (pooled) for drift per label")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")


def run_report(args: argparse.Namespace) -> int:
    from emotions.report import write_report

    summary = write_report(args.tagged, args.baseline, ray_address=args.ray_address)
    print(summary.line())
    print(f"report: {summary.report}")
    print(summary.called_out_line())
    return 0


COMMANDS = {
    "ablate": ("re-run the seed study's experiment table", add_ablate_arguments, run_ablate),
    "tune": ("Ray Tune sweep over the two-stage fine-tune (ASHA)", add_tune_arguments, run_tune),
    "train": ("two-stage fine-tune on Ray Train; writes a model bundle", add_train_arguments, run_train),
    "evaluate": ("metrics of a bundle on labelled data", add_evaluate_arguments, run_evaluate),
    "tag": ("tag Parquet comment dumps with a bundle on Ray Data", add_tag_arguments, run_tag),
    "report": ("report of a tagged output: shares, flags, top_score, drift against baselines",
               add_report_arguments, run_report),
    "quickstart": ("train on the embedded MiniLM, evaluate, tag a sample (minutes)",
                   add_quickstart_arguments, run_quickstart),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emotions", description="GoEmotions tagging on Ray.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, _) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: --help stays fast

    from emotions.bundle import BundleError
    from emotions.data import DataError
    from emotions.environment import setup_logging
    from emotions.report import ReportError
    from emotions.storage import StorageError
    from emotions.tagging import TaggingError

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    try:
        return COMMANDS[args.command][2](args)
    except (ConfigError, DataError, BundleError, ReportError, StorageError, TaggingError,
            FileNotFoundError) as exc:
        print(f"emotions {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
