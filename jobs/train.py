"""Ray job: Stage 3 only, training the selected heads on <run_dir>/subset/ (Ray Train + DeepSpeed).

    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train.py --config jobs/configs/qwen2.5-7b-gsm8k.yaml [key=value ...]

Run jobs/score.py (or the whole pipeline) first; add `--stages train,evaluate` to evaluate afterwards.
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main(("train",), __doc__))
