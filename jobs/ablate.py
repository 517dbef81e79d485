"""The seed study's experiment table as a Ray job. Same flags as `emotions ablate`.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/ablate.py --preset bert-base --budget full --output /mnt/shared/ablation
"""

import sys

from emotions.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
