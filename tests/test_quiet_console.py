"""A quiet console (issue 26, item 7): without --verbose, forwarded worker output keeps only our own progress
lines, plain (no Ray prefix, no colour codes); DeepSpeed's op-build line, library warnings and Ray Train's
chatter stay in Ray's session logs. Measured on the demo: see BENCHMARKS.md / the issue report."""

from __future__ import annotations

import pytest

from p2d_ray.runtime import console_line, console_worker_output


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ("train: 40/125 steps (32%) 1.9 steps/s ETA 45s loss 1.234", True),
        ("\x1b[36mtrain: 1/2 steps (50%) loss 2.000\x1b[0m", True),
        ("[p2d-ray] stage score: start", True),
        ("deepspeed_shm_comm_op built successfully", False),
        (
            "/x/transformers/modeling_utils.py:3303: FutureWarning: `is_gradient_checkpointing` is deprecated",
            False,
        ),
        (
            "\x1b[33m(RayTrainWorker pid=123)\x1b[0m [W socket.cpp:200] The hostname could not be resolved",
            False,
        ),
        ("Setting up process group for: env:// [rank=0, world_size=2]", False),
    ],
)
def test_console_keeps_our_progress_lines_only_and_plain(line, shown):
    out = console_line(line)
    assert (out is not None) == shown
    if shown:
        assert "\x1b" not in out and out.startswith(("train: ", "[p2d-ray]"))


def test_worker_lines_through_rays_dispatcher_reach_the_console_filtered(capsys):
    """Ray's own dispatcher (what ray.init(log_to_driver=True) feeds with every forwarded worker line): after
    console_worker_output its printer is replaced, and a batch of worker lines prints our progress line only."""
    from ray._private import worker as ray_worker

    dispatcher = ray_worker.global_worker_stdstream_dispatcher
    before = list(dispatcher.handlers)
    printed = []
    try:
        dispatcher.handlers = [("ray_print_logs", printed.append)]  # where ray.init puts its printer
        console_worker_output()
        console_worker_output()  # idempotent
        assert [n for n, _ in dispatcher.handlers] == ["p2d_console"]
        lines = ["deepspeed_shm_comm_op built successfully", "\x1b[36mtrain: 1/2 steps (50%)\x1b[0m"]
        dispatcher.emit({"lines": lines, "pid": 7, "ip": "127.0.0.1", "is_err": True, "actor_name": "W"})
    finally:
        dispatcher.handlers = before
    assert printed == [] and capsys.readouterr().err == "train: 1/2 steps (50%)\n"
