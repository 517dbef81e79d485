"""Nightly tagging of one day's comment dump as a Ray job. Same flags as `emotions tag`, plus
``--date YYYY-MM-DD`` (default: yesterday, UTC), which fills every ``{date}`` in --input/--output.

Submit to a cluster (from the repository root), e.g. from cron or a scheduler at 02:00 UTC:

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tag_nightly.py --model s3://BUCKET/emotions/bundles/default \
        --input 's3://BUCKET/dumps/dt={date}/' --output 's3://BUCKET/tagged/dt={date}/' \
        --keep-columns subreddit,created_utc

A day that is already committed is refused (exit 2); a run that died part-way is finished by
running the same command again (files already tagged are skipped). Backfill with --date.
Exits non-zero with a one-line reason on failure.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys

from emotions.cli import add_tag_arguments, main as emotions_main


def parse_date(text: str) -> str:
    try:
        return dt.date.fromisoformat(text).isoformat()
    except ValueError:
        raise argparse.ArgumentTypeError(f"--date {text!r} is not a date like 2026-11-25") from None


def yesterday_utc() -> str:
    return (dt.datetime.now(dt.timezone.utc).date() - dt.timedelta(days=1)).isoformat()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tag_nightly.py", description=__doc__.splitlines()[0])
    add_tag_arguments(parser)
    parser.add_argument("--date", type=parse_date, default=None,
                        help="day to tag, YYYY-MM-DD; fills {date} in --input/--output "
                             "(default: yesterday, UTC)")  # fmt: skip
    return parser


def fill_date(argv: list[str], date: str) -> list[str]:
    """``argv`` without --date, with every ``{date}`` replaced by ``date``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--date":
            skip = True
        elif not arg.startswith("--date="):
            out.append(arg.replace("{date}", date))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)  # --help, and bad flags exit 2 here
    date = args.date or yesterday_utc()
    if "{date}" not in args.output:
        print(f"tag_nightly: warning: --output {args.output} has no {{date}}: every night writes "
              "the same folder", file=sys.stderr)  # fmt: skip
    return emotions_main(["tag", *fill_date(argv, date)])


if __name__ == "__main__":
    sys.exit(main())
