"""Two-stage fine-tune as a Ray job. Same flags as `emotions train`.

Submit to a cluster (from the repository root):

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/train.py --preset bert-base --output s3://BUCKET/emotions/bundles/bert-base \
        run.storage_path=s3://BUCKET/emotions/runs run.name=bert-base

Submitted again with the same run.name, it resumes from that run's latest checkpoint (refused,
before training, if the config changed: each changed key is named); add --fresh to delete the
run's checkpoints and start over.

Run by hand, it starts (or joins) a local Ray. Exits non-zero with a one-line reason on failure.
"""

import sys

from emotions.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
