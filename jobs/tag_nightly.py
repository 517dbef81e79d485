"""Nightly tagging of date-partitioned comment dumps as a Ray job. Same flags as `emotions nightly`
(every `emotions tag` flag, with {date} in --input and --output, plus --date, --max-dates, --since,
--until, --dry-run, --lease-ttl, --lease-settle, --ready-marker, --min-age, --set-aside-after,
--set-aside-retry-days, --stop-by and --stop-after; see `emotions nightly --help` and emotions.nightly).

Submit to a cluster that runs the project's image (the RayCronJob in
cluster/kuberay/raycronjob-tag-nightly.yaml does this every night):

    ray job submit --address http://HEAD:8265 -- \
        python /home/ray/app/jobs/tag_nightly.py --model s3://BUCKET/emotions/bundles/bert-base-v1 \
        --input 's3://BUCKET/emotions/dumps/dt={date}/' --output 's3://BUCKET/emotions/tagged/dt={date}/'

Every date whose dump is complete and has no committed output (or whose dump changed since its
commit) is tagged, oldest first, up to --max-dates; re-running is always safe. --dry-run lists the
dates a run would tag and the `emotions tag` command each amounts to.

A wall-clock stop: --stop-by TIME (HH:MM in UTC, read as the occurrence within 12 hours of the
start, or an ISO date-time such as 2026-12-08T06:00Z) and --stop-after DURATION (5h, 90m, 3600s
from the start; with both, the earlier wins). Once it has passed no date is started: the date in
hand is finished and committed, the rest are reported as "left for the next run, out of time"
with the stop named. --stop-by is the one that bounds a night under a RayJob: KubeRay restarts
activeDeadlineSeconds for every retry, but every attempt reads the same absolute --stop-by, and
one that starts after it tags nothing and exits 0 at once.

Exit status: 0 when no date failed (nothing to do, waiting dates and dates left out of time
included: a RayJob does not retry a run that only ran out of time), 1 when a date failed (the
others are still tagged; the failure is recorded in <output root>/_failures/ and the next night
tries the date again; a RayJob retries the run on a fresh cluster, which helps with a passing
fault and, under --stop-by, only works until the same stop), 2 with a one-line reason when the run
cannot start.
"""

import sys

from emotions.cli import main

if __name__ == "__main__":
    sys.exit(main(["nightly", *sys.argv[1:]]))
