"""Ray job: every stage the config lists.

    ray job submit --address http://HEAD:8265 --working-dir . \
        --runtime-env ray_jobs/runtime_env.yaml -- \
        python ray_jobs/pipeline.py --config configs/arms/cluster/palign.yaml
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("run"))
