"""Nightly tagging of date-partitioned comment dumps as a Ray job. Same flags as `emotions nightly`
(every `emotions tag` flag, with {date} in --input and --output, plus --date, --max-dates, --since,
--until, --dry-run, --lease-ttl, --lease-settle, --ready-marker, --min-age, --set-aside-after and
--set-aside-retry-days; see `emotions nightly --help` and emotions.nightly).

Submit to a cluster that runs the project's image (the RayCronJob in
cluster/kuberay/raycronjob-tag-nightly.yaml does this every night):

    ray job submit --address http://HEAD:8265 -- \
        python /home/ray/app/jobs/tag_nightly.py --model s3://BUCKET/emotions/bundles/bert-base-v1 \
        --input 's3://BUCKET/emotions/dumps/dt={date}/' --output 's3://BUCKET/emotions/tagged/dt={date}/'

Every date whose dump is complete and has no committed output (or whose dump changed since its
commit) is tagged, oldest first, up to --max-dates; re-running is always safe. --dry-run lists the
dates a run would tag and the `emotions tag` command each amounts to.
Exit status: 0 when no date failed (nothing to do and waiting dates included), 1 when a date
failed (the others are still tagged), 2 with a one-line reason when the run cannot start.
"""

import sys

from emotions.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
