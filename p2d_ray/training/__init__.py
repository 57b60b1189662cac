"""Stage 3: sparse head adaptation (and LoRA / full baselines) on Ray Train + DeepSpeed, and its export.

- ``deltas``: ``HeadDelta`` per projection: trainable rows/columns of the selected heads; merge.
- ``adaptation``: heads | lora | full -> which parameters require grad.
- ``loop``: plain-torch step pieces: row encoding, THE training step (``train_step``), step counting.
- ``worker``: the Ray Train ``train_func`` in named steps: setup / restore / step / save (DeepSpeed).
- ``tracking``: TensorBoard (+ MLflow / W&B), the progress line, loss.png.
- ``trainer``: ``run_train`` (``p2d-ray train``), ``fit`` (also the AER's timed full steps),
  ``time_train_steps`` (in-process, for benchmarks), ``load_adapted_model``.
- ``export``: head deltas as safetensors, the same update as a PEFT LoRA adapter, merged model.
"""
