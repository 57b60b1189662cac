"""Ray job: the selector x adaptation x seed comparison (``p2d-ray compare``) on a cluster.

    RAY_AUTH_MODE=token ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/compare.py --config benchmarks/configs/compare_demo.yaml run_dir=/shared/runs/compare

Scoring, training and evaluation run on the cluster's actors and workers exactly as in ``run_pipeline.py``;
Stage 1 (a few seconds of probe gradients per scoring source) runs in this driver process. run_dir must be
on a filesystem every node shares. A resubmission resumes: finished sources, selections and cells are kept.
"""

import sys

from _entry import run_job


def main(argv: list[str] | None = None) -> int:
    import argparse

    from p2d_ray.compare import run_compare

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    def compare(cfg) -> None:
        run_compare(cfg)  # prints its own table; every cell is in <run_dir>/compare/results.json

    return run_job(args.config, args.overrides, compare)


if __name__ == "__main__":
    sys.exit(main())
