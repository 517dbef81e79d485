"""Nightly tagging of date-partitioned comment dumps as a Ray job: every date under the input
root whose dump is complete (--ready-marker, --min-age) and has no committed output, or whose dump
changed since its commit (re-opened), oldest first, up to --max-dates (the same flags as `emotions
tag`, with {date} in --input and --output; the logic is emotions.nightly.tag_nightly).

Submit to a cluster that runs the project's image (the RayCronJob in
cluster/kuberay/raycronjob-tag-nightly.yaml does this every night):

    ray job submit --address http://HEAD:8265 -- \
        python /home/ray/app/jobs/tag_nightly.py --model s3://BUCKET/emotions/bundles/bert-base-v1 \
        --input 's3://BUCKET/emotions/dumps/dt={date}/' --output 's3://BUCKET/emotions/tagged/dt={date}/'

Re-running is always safe: a date already committed (its dump unchanged) is a success with
nothing to do, a date another run holds a lease on is skipped, a date a killed run left half done
is finished, a date whose dump has no _SUCCESS yet (the producer writes it last) is "waiting".
A committed date whose dump gained, lost or changed Parquet files is re-opened: its new and
changed files are tagged and the date committed again. A date that failed on --set-aside-after
runs in a row (default 3) is set aside (<output root>/_failures/DATE.json) and retried only every
--set-aside-retry-days (default 7), after the other dates, so it never blocks new nights.
--dry-run lists the dates a run would tag and the `emotions tag` command each amounts to.
--date YYYY-MM-DD tags that one date (with --overwrite: again, though it is committed).
Exit status: 0 when no date failed (nothing to do and waiting dates included), 1 when a date
failed (the others are still tagged), 2 with a one-line reason when the run cannot start.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from emotions.cli import add_tag_arguments
from emotions.nightly import (LEASE_TTL_S, MAX_DATES, READY_MARKER, SET_ASIDE_AFTER, SET_ASIDE_RETRY_S, SETTLE_S,
                              parse_date, yesterday_utc)  # fmt: skip

# Flags of this job that `emotions tag` does not have, and whether each takes a value.
NIGHTLY_FLAGS = {"--date": True, "--max-dates": True, "--since": True, "--until": True, "--dry-run": False,
                 "--lease-ttl": True, "--lease-settle": True, "--ready-marker": True, "--min-age": True,
                 "--set-aside-after": True, "--set-aside-retry-days": True}  # fmt: skip


def date_flag(text: str) -> str:
    date = parse_date(text)
    if date is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-11-25")
    return date


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds above 0")
    return value


def seconds_or_zero(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds, 0 or more")
    return value


def marker_name(text: str) -> str:
    if "/" in text:
        raise argparse.ArgumentTypeError(f"{text!r}: give a file name in the date's partition, e.g. _SUCCESS "
                                         "(or '' to tag without a marker)")  # fmt: skip
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tag_nightly.py", description=__doc__.splitlines()[0])
    add_tag_arguments(parser)
    parser.add_argument("--date", type=date_flag, default=None,
                        help="tag this one date, YYYY-MM-DD (default: every untagged date, see --max-dates)")
    parser.add_argument("--max-dates", type=positive_int, default=MAX_DATES,
                        help=f"dates tagged per run at most, oldest first (default: {MAX_DATES})")
    parser.add_argument("--since", type=date_flag, default=None, help="oldest date to look at (default: all)")
    parser.add_argument("--until", type=date_flag, default=None,
                        help="newest date to look at (default: yesterday, UTC: today's dump may be incomplete)")
    parser.add_argument("--dry-run", action="store_true", help="list the dates a run would tag; tag nothing")
    parser.add_argument("--lease-ttl", type=positive_seconds, default=LEASE_TTL_S, metavar="SECONDS",
                        help=f"a killed run's date is free again after this (default: {LEASE_TTL_S:.0f})")
    parser.add_argument("--lease-settle", type=positive_seconds, default=SETTLE_S, metavar="SECONDS",
                        help="wait between writing a lease and reading it back, only on storage without "
                             f"create-if-absent (default: {SETTLE_S:.0f}; local disks, S3 and GCS need none)")
    parser.add_argument("--ready-marker", type=marker_name, default=READY_MARKER, metavar="NAME",
                        help=f"tag a date only once its dump partition holds this file, written last by the "
                             f"producer (default: {READY_MARKER}, as Spark/Hadoop write; '' = no check)")
    parser.add_argument("--min-age", type=seconds_or_zero, default=0.0, metavar="SECONDS",
                        help="tag a date only once its newest input file is this old (default: 0)")
    parser.add_argument("--set-aside-after", type=positive_int, default=SET_ASIDE_AFTER, metavar="RUNS",
                        help="a date that failed on this many runs in a row is set aside: retried only every "
                             f"--set-aside-retry-days, after the other dates (default: {SET_ASIDE_AFTER})")
    parser.add_argument("--set-aside-retry-days", type=positive_seconds, default=SET_ASIDE_RETRY_S / 86400,
                        metavar="DAYS", help="retry a set-aside date this long after its last failure "
                                             f"(default: {SET_ASIDE_RETRY_S / 86400:g})")
    return parser


def fill_date(argv: list[str], date: str) -> list[str]:
    """The `emotions tag` arguments that tag ``date``: ``argv`` without this job's own flags,
    with every ``{date}`` filled in."""
    out, skip = [], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif name in NIGHTLY_FLAGS:
            skip = NIGHTLY_FLAGS[name] and "=" not in arg
        else:
            out.append(arg.replace("{date}", date))
    return out


def check_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse flag combinations that cannot mean what the user wants (exits 2, names the flag)."""
    if args.date and (args.since or args.until):
        parser.error("--since/--until bound the search for untagged dates; --date names one date: give one")
    if args.overwrite and not args.date:
        parser.error("--overwrite re-tags a committed date: name it with --date")
    missing = [flag for flag, value in (("--output", args.output), *(("--input", i) for i in args.input))
               if "{date}" not in value]  # fmt: skip
    if missing:
        parser.error(f"{' and '.join(sorted(set(missing)))} must contain {{date}}, e.g. "
                     "--input 's3://b/dumps/dt={date}/' --output 's3://b/tagged/dt={date}/'")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)  # --help, and bad flags exit 2 here
    check_flags(args, parser)

    from emotions.environment import setup_logging
    from emotions.nightly import NightlyError, tag_nightly
    from emotions.storage import StorageError
    from emotions.tagging import TaggingError

    setup_logging()
    if args.ray_address:  # tag_corpus starts or joins Ray itself, once a date's inputs are checked
        os.environ["RAY_ADDRESS"] = args.ray_address
    try:
        report = tag_nightly(
            args.model, args.input, args.output, date=args.date, max_dates=args.max_dates,
            since=args.since, until=args.until, overwrite=args.overwrite, dry_run=args.dry_run,
            lease_ttl_s=args.lease_ttl, settle_s=args.lease_settle, ready_marker=args.ready_marker,
            min_age_s=args.min_age, set_aside_after=args.set_aside_after,
            set_aside_retry_s=args.set_aside_retry_days * 86400,
            text_column=args.text_column, id_column=args.id_column,
            keep_columns=[c.strip() for c in args.keep_columns.split(",") if c.strip()],
            probabilities=args.probabilities, num_actors=args.actors, batch_size=args.batch_size,
            cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor,
            precision=args.precision, int8=args.int8, on_bad_file="skip" if args.skip_bad_files else "fail",
            report=not args.no_report, baselines=args.baseline,
        )  # fmt: skip
    except (NightlyError, TaggingError, StorageError, FileNotFoundError) as exc:  # a bad model fails per date
        print(f"tag_nightly: error: {exc}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    for date in report.planned:
        print(f"  emotions tag {shlex.join(fill_date(argv, date))}")
    if args.until is None and not args.date:
        print(f"(dates up to {yesterday_utc()}, yesterday in UTC)")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
