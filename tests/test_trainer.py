"""Ray Train + DeepSpeed on CPU with 2 workers, end to end on a tiny Llama and a tiny subset Parquet.

Few, combined runs (each Ray Train start costs ~30 s here): the heads run also injects one worker-group
failure (FailureConfig + resume from the latest checkpoint) and checks export, PEFT logits and the
untouched base; then LoRA runs through the same trainer, and its run is where tracking (TensorBoard
scalars, loss.png) is checked.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from helpers import assert_only_heads_moved, read_scalars, write_parts
from peft import PeftModel

from p2d_ray.config import build_config
from p2d_ray.heads.headset import HeadSet
from p2d_ray.models.geometry import attention_geometry
from p2d_ray.models.loading import load_model
from p2d_ray.rundir import RunDir
from p2d_ray.training.trainer import TrainInputs, load_adapted_model, run_train, time_train_steps

pytestmark = pytest.mark.ray

HEADS = ((0, 0), (0, 1), (1, 3))  # heads 0 and 1 of layer 0 share kv group 0


def _make_run(tmp_path: Path, model_path: str, n_rows: int = 48) -> str:
    """A run dir holding heads.json and a two-shard subset Parquet of a few repeated task patterns."""
    run = tmp_path / "run"
    (run / "subset").mkdir(parents=True)
    rows = [
        {
            "id": i,
            "prompt": f"Q: what is {i % 4} plus {i % 4}?\nA:",
            "response": f" {2 * (i % 4)} done.",
            "score": 1.0,
        }
        for i in range(n_rows)
    ]
    write_parts(run / "subset", pa.Table.from_pylist(rows), 2)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "corpus.parquet")
    model = load_model(build_config({"model": {"name_or_path": model_path}}).model)
    HeadSet(HEADS, attention_geometry(model)).save(run / "heads.json")
    return str(run)


def _cfg(run: str, model_path: str, *overrides: str):
    base = ["train.num_workers=2", "train.batch_size=4", "train.lr=0.02", "train.checkpoint_every=2"]
    return build_config(
        {
            "run_dir": run,
            "model": {"name_or_path": model_path},
            "data": {"corpus_path": str(Path(run).parent / "corpus.parquet")},
        },
        base + list(overrides),
    )


def test_heads_zero2_two_workers_failure_resume_export(tmp_path, tiny_llama, ray_local, monkeypatch):
    run = _make_run(tmp_path, tiny_llama)
    # 48 rows / (4 rows x 2 workers) = 6 steps; checkpoints at 2 and 4; a worker is lost at step 5.
    cfg = _cfg(run, tiny_llama, "train.zero_stage=2", "train.max_failures=1")
    with pytest.raises(ValueError, match="fewer than train.num_workers"):
        TrainInputs(_cfg(run, tiny_llama, "train.num_workers=64"))

    import p2d_ray.training.trainer as trainer

    # The last rank's process is killed at step 5 (after the step-4 checkpoint), as a lost node takes it;
    # FailureConfig(max_failures=1) restarts the worker group, which must resume from the NEWEST checkpoint
    # (Ray's own record can lag behind the storage: before, such a restart went back to an older one).
    monkeypatch.setattr(trainer, "fit", functools.partial(trainer.fit, fail_at_step=5, fail_kill=True))
    summary = run_train(cfg)

    assert summary["steps"] == 6 and len(summary["loss_curve"]) == 6
    assert summary["resumed_from_step"] == 4, (
        "the restarted worker group must resume from the step-4 checkpoint"
    )
    assert [r["from_step"] for r in summary["resumes"]] == [4], summary["resumes"]
    assert summary["world_size"] == 2 and summary["ranks_identical"] is True
    assert summary["rows_seen"] == 6 * 8 and summary["skipped_rows"] == {}
    assert summary["loss_curve"][-1] < summary["loss_curve"][0] - 0.2, summary["loss_curve"]
    assert summary["trainable_params"] == (3 + 2 + 2 + 3) * 16 * 64  # 3 q/o heads, 2 shared-once kv groups
    assert json.loads(Path(run, "train_summary.json").read_text())["steps"] == 6
    assert RunDir(run).stage_record("train") is not None
    ckpt = Path(summary["checkpoint"])
    assert sorted(p.name for p in ckpt.glob("step6/zero_pp_rank_*")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]

    # Outside the selected heads every parameter is bitwise the base; inside, every slice moved.
    base = load_model(cfg.model)
    adapted = load_adapted_model(cfg)
    assert_only_heads_moved(adapted, base, HeadSet.load(Path(run) / "heads.json"))

    # The PEFT export of the trained deltas reproduces the adapted model (fp32).
    x = torch.randint(5, 250, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = adapted(input_ids=x).logits
        peft_model = PeftModel.from_pretrained(
            load_model(cfg.model), str(Path(run, "adapter", "peft"))
        ).eval()
        assert (peft_model(input_ids=x).logits - ours).abs().max().item() <= 1e-4
        assert (base(input_ids=x).logits - ours).abs().max().item() > 1e-3
    assert summary["adapter"]["heads_bytes"] < 1_000_000
    # The manifest names the trained weights (compare's evaluation cache is keyed on it: a retrained cell,
    # same sizes and parameter counts, must not reuse the old cell's held-out numbers).
    from p2d_ray.training.export import weights_sha256

    digest = summary["adapter"]["weights_sha256"]
    assert (
        digest
        == weights_sha256(Path(run, "adapter", "heads"))
        != weights_sha256(Path(run, "adapter", "peft"))
    )

    # The in-process step timer (benchmarks/training.py): same adaptation and trained parameters.
    timed = time_train_steps(cfg, "heads", 2)
    assert timed["step_seconds"] > 0 and timed["rows_per_step"] == 4 and len(timed["step_times"]) == 2
    assert timed["trainable_params"] == summary["trainable_params"]


def test_lora_zero1_through_the_same_trainer(tmp_path, tiny_llama, ray_local):
    run = _make_run(tmp_path, tiny_llama, n_rows=16)
    # One worker (the heads run covers two), ZeRO-1: 16 rows / 4 = 4 steps.
    lora_cfg = _cfg(
        run,
        tiny_llama,
        "train.adaptation=lora",
        "train.lora_r=4",
        "train.zero_stage=1",
        "train.num_workers=1",
    )
    summary = run_train(lora_cfg)
    assert summary["steps"] == 4 and summary["world_size"] == 1
    # Tracking: TensorBoard scalars from the worker, one per step, equal to the summary's loss curve; loss.png.
    scalars = read_scalars(Path(run) / "tensorboard" / "train")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(scalars)
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3, 4]
    assert [v for _, v in scalars["train/loss"]] == pytest.approx(summary["loss_curve"])
    assert all(v == pytest.approx(lora_cfg.train.lr) for _, v in scalars["train/lr"])
    assert all(v > 0 for _, v in scalars["train/tokens_per_s"] + scalars["train/grad_norm"])
    assert summary["tensorboard_dir"] == str((Path(run) / "tensorboard" / "train").resolve())
    assert Path(summary["loss_png"]).read_bytes()[:4] == b"\x89PNG"
    manifest = json.loads(Path(run, "adapter", "manifest.json").read_text())
    assert manifest["adaptation"] == "lora"
    config = json.loads(Path(run, "adapter", "peft", "adapter_config.json").read_text())
    assert config["r"] == 4 and len(config["target_modules"]) == 8  # q/k/v/o x 2 layers
    adapted = load_adapted_model(lora_cfg)
    base_params = dict(load_model(lora_cfg.model).named_parameters())
    moved = [n for n, p in adapted.named_parameters() if not torch.equal(p, base_params[n])]
    assert moved and all("self_attn" in n for n in moved), moved

    # Full fine-tuning (timed in process here; the benchmark runs it through Ray Train): every weight trains.
    full = time_train_steps(lora_cfg, "full", 1)
    assert full["trainable_params"] == sum(p.numel() for p in base_params.values())


def test_a_new_selection_never_resumes_the_old_subsets_checkpoints(tmp_path, tiny_llama):
    """The run name (hence the checkpoint directory a rerun resumes from) follows the training rows, not
    only their path: a re-selection written to the same ``subset/`` starts fresh, an identical rewrite
    (the same selection again, or a preempted rerun) resumes. Found in a real run: ``compare`` with a
    changed ``select.rule`` re-selected 17 of 120 rows and then "resumed" at the old subset's final step."""
    run = _make_run(tmp_path, tiny_llama)
    cfg = _cfg(run, tiny_llama)
    subset = pq.read_table(Path(run) / "subset")
    first = TrainInputs(cfg).run_name(cfg)
    write_parts(Path(run) / "subset", subset, 2)  # the same rows rewritten
    assert TrainInputs(cfg).run_name(cfg) == first
    write_parts(Path(run) / "subset", subset.slice(1), 2)  # one row fewer: another selection
    assert TrainInputs(cfg).run_name(cfg) != first
    swapped = subset.set_column(2, "response", pa.array([" 7 done."] * subset.num_rows))
    write_parts(Path(run) / "subset", swapped, 2)  # same ids and size, other rows' content
    assert TrainInputs(cfg).run_name(cfg) != first


def test_train_seed_orders_the_rows_and_a_resume_replays_it(ray_local):
    """``train.seed`` decides each pass's row order (it once changed nothing: the rows came in Ray Data's
    streaming order, and a zero-initialised head delta never draws from torch's generator, so two seeds
    trained bitwise the same adapter). Each pass is a permutation of the rank's rows, passes differ, the
    same seed gives the same stream, and skipping k micro-batches (a resume) gives the same stream's tail."""
    import itertools

    import ray

    from p2d_ray.training.worker import seeded_passes

    shard = ray.data.from_items([{"id": i} for i in range(64)], override_num_blocks=4).iterator()

    def stream(seed: int, skip: int = 0, n: int = 16) -> list[list[int]]:
        tables = itertools.islice(seeded_passes(shard, 8, seed, rank=0, skip=skip), n)
        return [t.column("id").to_pylist() for t in tables]

    a, again, other = stream(0), stream(0), stream(1)
    passes = [sorted(itertools.chain(*a[:8])), sorted(itertools.chain(*a[8:]))]
    assert passes == [list(range(64))] * 2  # every row once per pass
    assert a[:8] != a[8:]  # a new order every pass
    assert a == again and a != other
    assert stream(0, skip=5, n=11) == a[5:]
