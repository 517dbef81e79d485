"""Ray Tune sweep as a Ray job. Same flags as `emotions tune`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/tune.py --preset minilm --output /mnt/shared/sweeps/minilm \
        tune.num_samples=32 scaling.use_gpu=true

Re-submitting with the same --output resumes the sweep (finished trials are kept).
`--from-bundle BUNDLE` sweeps only stage-2 (head) settings over that bundle's encoder, on features
encoded once and cached (see docs/tuning.md).
"""

import sys

from emotions.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
