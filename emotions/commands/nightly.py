"""``emotions nightly``: tag every untagged (or changed) date of date-partitioned dumps. Every
``emotions tag`` flag (read from ``tag.add_tag_arguments`` when called, so a new one reaches
nightly without a table) plus the nightly run's own."""

from __future__ import annotations

import argparse
import shlex
import time

from emotions.commands import tag

HELP = (
    "tag every untagged (or changed) date of date-partitioned dumps ({date} in --input and "
    "--output); exit 0: no date failed (dates left for lack of time included), 1: a date failed, "
    "2: cannot start"
)


def add_nightly_arguments(parser: argparse.ArgumentParser) -> None:
    """``emotions tag``'s flags ({date} in --input and --output) and the nightly run's own."""
    from emotions.nightly import LEASE_TTL_S, MAX_DATES, READY_MARKER, SET_ASIDE_AFTER, SET_ASIDE_RETRY_S, SETTLE_S

    tag.add_tag_arguments(parser)
    parser.add_argument(
        "--date",
        type=date_flag,
        default=None,
        help="tag this one date, YYYY-MM-DD (default: every untagged date, see --max-dates)",
    )
    parser.add_argument(
        "--max-dates",
        type=positive_int,
        default=MAX_DATES,
        help=f"dates tagged per run at most, oldest first (default: {MAX_DATES})",
    )
    parser.add_argument("--since", type=date_flag, default=None, help="oldest date to look at (default: all)")
    parser.add_argument(
        "--until",
        type=date_flag,
        default=None,
        help="newest date to look at (default: yesterday, UTC: today's dump may be incomplete)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the dates a run would tag; tag nothing")
    parser.add_argument(
        "--lease-ttl",
        type=seconds(above_zero=True),
        default=LEASE_TTL_S,
        metavar="SECONDS",
        help=f"a killed run's date is free again after this (default: {LEASE_TTL_S:.0f})",
    )
    parser.add_argument(
        "--lease-settle",
        type=seconds(above_zero=True),
        default=SETTLE_S,
        metavar="SECONDS",
        help="wait between writing a lease and reading it back, only on storage without "
        f"create-if-absent (default: {SETTLE_S:.0f}; local disks, S3 and GCS need none)",
    )
    parser.add_argument(
        "--ready-marker",
        type=marker_name,
        default=READY_MARKER,
        metavar="NAME",
        help=f"tag a date only once its dump partition holds this file, written last by the "
        f"producer (default: {READY_MARKER}, as Spark/Hadoop write; '' = no check)",
    )
    parser.add_argument(
        "--min-age",
        type=seconds(above_zero=False),
        default=0.0,
        metavar="SECONDS",
        help="tag a date only once its newest input file is this old (default: 0)",
    )
    parser.add_argument(
        "--set-aside-after",
        type=positive_int,
        default=SET_ASIDE_AFTER,
        metavar="RUNS",
        help="a date that failed on this many runs in a row is set aside: retried only every "
        f"--set-aside-retry-days, after the other dates (default: {SET_ASIDE_AFTER})",
    )
    parser.add_argument(
        "--set-aside-retry-days",
        type=seconds(above_zero=True),
        default=SET_ASIDE_RETRY_S / 86400,
        metavar="DAYS",
        help=f"retry a set-aside date this long after its last failure (default: {SET_ASIDE_RETRY_S / 86400:g})",
    )
    parser.add_argument(
        "--stop-by",
        type=stop_by_flag,
        default=None,
        metavar="TIME",
        help="start no date after this wall-clock time, the same for every retry of a night: HH:MM in UTC "
        "(the one within 12 h of the start, ahead or already passed) or an ISO date-time, e.g. "
        "2026-12-08T06:00Z; the date in hand is finished, the others are left for the next run (exit 0)",
    )
    parser.add_argument(
        "--stop-after",
        type=duration_flag,
        default=None,
        metavar="DURATION",
        help="start no date once this long has passed since the start, e.g. 5h, 90m, 3600s (a retry "
        "starts counting again: --stop-by holds across retries); with --stop-by, the earlier wins",
    )


def date_flag(text: str) -> str:
    from emotions.nightly import parse_date

    date = parse_date(text)
    if date is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date like 2026-11-25")
    return date


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of 1 or more")
    return int(text)


def seconds(above_zero: bool):
    """An argparse type: a number above 0 (``above_zero``), else 0 or more."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if value < 0 or (above_zero and value == 0):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number {'above 0' if above_zero else '0 or more'}")
        return value

    return parse


def nightly_text(check):
    """An argparse type: the text as given, once ``check(run, text)`` accepts it (``run``:
    ``emotions.nightly.run``, imported when a flag is read); a ``NightlyError`` it raises is the message."""

    def parse(text: str) -> str:
        from emotions.nightly import NightlyError, run

        try:
            check(run, text)
        except NightlyError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return text

    return parse


# Read again, relative to the run's start, by run_nightly.
stop_by_flag = nightly_text(lambda run, text: run.parse_stop_by(text, time.time()))
duration_flag = nightly_text(lambda run, text: run.parse_duration(text))


def marker_name(text: str) -> str:
    if "/" in text:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give a file name in the date's partition, e.g. _SUCCESS (or '' to tag without a marker)"
        )
    return text


def run_nightly(args: argparse.Namespace) -> int:
    """Exit status: 0 when no date failed (nothing to do, waiting dates and dates left out of time
    by --stop-by/--stop-after included), 1 when a date failed (the others are still tagged), 2
    (from ``main``) when the run cannot start."""
    from emotions.nightly import tag_nightly, yesterday_utc
    from emotions.nightly.run import resolve_stop

    started = time.time()  # --stop-after counts from here, --stop-by HH:MM is read relative to it
    check_nightly_flags(args)
    stop = resolve_stop(args.stop_by, args.stop_after, started)
    options = tag.tag_options(args)
    model, inputs, output = options.pop("model"), options.pop("inputs"), options.pop("output")
    report = tag_nightly(
        model,
        inputs,
        output,
        date=args.date,
        max_dates=args.max_dates,
        since=args.since,
        until=args.until,
        dry_run=args.dry_run,
        lease_ttl_s=args.lease_ttl,
        settle_s=args.lease_settle,
        ready_marker=args.ready_marker,
        min_age_s=args.min_age,
        set_aside_after=args.set_aside_after,
        set_aside_retry_s=args.set_aside_retry_days * 86400,
        stop=stop,
        **options,
    )
    for line in report.lines():
        print(line)
    for date in report.planned:
        print(f"  emotions tag {shlex.join(tag_argv(args, date))}")
    if args.until is None and not args.date:
        print(f"(dates up to {yesterday_utc()}, yesterday in UTC)")
    return 0 if report.ok else 1


def check_nightly_flags(args: argparse.Namespace) -> None:
    """Refuse flag combinations that cannot mean what the user wants (NightlyError names the flag)."""
    from emotions.nightly import NightlyError

    if args.date and (args.since or args.until):
        raise NightlyError("--since/--until bound the search for untagged dates; --date names one date: give one")
    if args.overwrite and not args.date:
        raise NightlyError("--overwrite re-tags a committed date: name it with --date")
    flags = (("--output", args.output), *(("--input", i) for i in args.inputs))
    missing = [flag for flag, value in flags if "{date}" not in value]
    if missing:
        raise NightlyError(
            f"{' and '.join(sorted(set(missing)))} must contain {{date}}, e.g. "
            "--input 's3://b/dumps/dt={date}/' --output 's3://b/tagged/dt={date}/'"
        )


def tag_argv(args: argparse.Namespace, date: str) -> list[str]:
    """The ``emotions tag`` arguments that tag ``date`` as ``args`` would: every tag flag whose
    value is not its default, with ``{date}`` filled in."""
    probe = argparse.ArgumentParser(add_help=False)
    tag.add_tag_arguments(probe)
    out = []
    for action in probe._actions:
        value, flag = getattr(args, action.dest), max(action.option_strings, key=len)
        if value == action.default and not action.required:
            continue
        if action.nargs == 0:  # store_true/store_false/store_const: the flag alone
            out.append(flag)
        elif isinstance(value, list) and action.type is tag.comma_list:
            out += [flag, ",".join(value)]
        elif isinstance(value, list):
            values = [str(v).replace("{date}", date) for v in value]
            if isinstance(action, argparse._AppendAction):
                out += [item for v in values for item in (flag, v)]
            else:
                out += [flag, *values]
        else:
            out += [flag, str(value).replace("{date}", date)]
    return out
