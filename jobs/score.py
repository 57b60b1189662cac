"""Ray job: Stage 2, scoring the corpus on the actor pool, and selecting the subset.

    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/score.py --config jobs/configs/qwen2.5-7b-gsm8k.yaml [key=value ...]

Scoring needs the task heads: localize runs first unless <run_dir>/heads.json is already there for this
config (it is skipped then). Ends with <run_dir>/subset/, the input of jobs/train.py.
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main(("localize", "score", "select"), __doc__))
