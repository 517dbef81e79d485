"""``emotions tag``: tag Parquet comment dumps with a bundle on Ray Data. Its flags are also
``emotions nightly``'s (``add_tag_arguments``, ``tag_options``)."""

from __future__ import annotations

import argparse

HELP = "tag Parquet comment dumps with a bundle on Ray Data"


def comma_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def add_tag_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``emotions tag`` (and ``emotions nightly``). Every dest is a keyword of
    ``tagging.tag_corpus``, so ``tag_options`` passes a new flag on without a table."""
    from emotions.precision import RUNTIMES

    parser.add_argument("--model", required=True, help="model bundle folder (or URI)")
    parser.add_argument(
        "--input",
        dest="inputs",
        required=True,
        nargs="+",
        metavar="PATH",
        help="Parquet files, folders or globs; local or URIs (s3://...)",
    )
    parser.add_argument("--output", required=True, help="folder for the tagged Parquet files (or URI)")
    parser.add_argument("--text-column", default="body", help="column with the text (default: body)")
    parser.add_argument("--id-column", default="id", help="column that identifies a row (default: id)")
    parser.add_argument(
        "--keep-columns",
        type=comma_list,
        default=[],
        metavar="A,B",
        help="input columns to carry into the output, comma-separated",
    )
    parser.add_argument("--probabilities", action="store_true", help="add the 28 p_<label> columns")
    parser.add_argument("--overwrite", action="store_true", help="replace a committed output")
    parser.add_argument(
        "--actors",
        dest="num_actors",
        type=int,
        default=None,
        metavar="N",
        help="the most tagging actors (default: one per --cpus-per-actor CPUs, or per GPU, of the nodes the "
        "autoscaler can bring up, else of those up now); GPU actors are capped at the GPUs the autoscaler can bring",
    )
    parser.add_argument(
        "--min-actors",
        type=int,
        default=None,
        metavar="N",
        help="the fewest tagging actors (default: 1): the pool starts with what the nodes up now hold and grows "
        "as nodes join, and runs on what it gets rather than waiting for --actors",
    )
    parser.add_argument("--batch-size", type=int, default=1024, help="rows per actor call (default: 1024)")
    parser.add_argument("--cpus-per-actor", type=int, default=1, help="torch threads per actor (default: 1)")
    parser.add_argument("--gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default: 0)")
    parser.add_argument(
        "--precision",
        choices=["auto", *RUNTIMES],
        default=None,
        help="auto (default): on CPU the fastest of ONNX Runtime int8 and fp32, torch int8, and "
        "bf16 where the CPU computes it natively, among those whose check rules out a held-out "
        "macro-F1 loss over 0.01 (recorded in the bundle by training, or run once on this kind "
        "of CPU), else torch fp32; fp32 on GPU. Any other value: that runtime, only if its check passes",
    )
    parser.add_argument(
        "--skip-bad-files",
        dest="on_bad_file",
        action="store_const",
        const="skip",
        default="fail",
        help="skip unreadable input files (listed in _manifest.json) instead of failing",
    )
    parser.add_argument(
        "--baseline",
        dest="baselines",
        action="append",
        default=[],
        metavar="DIR",
        help="an earlier committed output to compare label shares with in the report (repeatable)",
    )
    parser.add_argument(
        "--no-report",
        dest="report",
        action="store_false",
        help="do not write _report.md / _report.json / _report/*.png into the output",
    )
    parser.add_argument(
        "--ray-address", default=None, help="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)"
    )


def tag_options(args: argparse.Namespace) -> dict:
    """The keywords of ``tagging.tag_corpus`` that ``add_tag_arguments`` defines, from ``args``."""
    probe = argparse.ArgumentParser(add_help=False)
    add_tag_arguments(probe)
    return {a.dest: getattr(args, a.dest) for a in probe._actions if a.dest != argparse.SUPPRESS}


def run_tag(args: argparse.Namespace) -> int:
    from emotions.tagging import tag_corpus

    summary = tag_corpus(**tag_options(args))
    print(summary.line())
    print(f"manifest: {summary.manifest}")
    if summary.report:
        print(f"report: {summary.report}")
    return 0
