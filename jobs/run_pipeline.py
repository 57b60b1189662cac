"""Ray job: the whole P2D pipeline (localize → score → select → train → evaluate) into one run directory.

    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/run_pipeline.py --config jobs/configs/qwen2.5-7b-gsm8k.yaml [key=value ...]

Stages already finished with the same config are skipped, so resubmitting resumes.
"""

import sys

from _entry import main

if __name__ == "__main__":
    sys.exit(main(("localize", "score", "select", "train", "evaluate"), __doc__))
