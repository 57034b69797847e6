"""The ``optim`` and ``train`` sections: optimizer, schedule and the training loop (no torch needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from mpomoe_ds.config import check_choice, fail

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class OptimConfig:
    """Optimizer and LR schedule, used when the ds_config has no "optimizer" / "scheduler" block.

    lr: peak learning rate of AdamW. weight_decay: decoupled decay (not on biases/norms).
    betas / eps: AdamW's. warmup_steps: linear warm-up from 0 to lr.
    schedule: after warm-up, "linear" decay to 0 at train.max_steps, "cosine", or "constant".
    central_lr_mult / aux_lr_mult: per-kind learning-rate multipliers
        (:func:`mpomoe_ds.moe.params.parameter_kind`): MPO central tensors
        train at central_lr_mult * lr, expert parameters (auxiliary cores and
        expert biases) at aux_lr_mult * lr, in their own optimizer groups
        (the schedule scales every group alike; weight decay, lr * wd in
        AdamW, follows). central_lr_mult 0 = frozen central (the MPOE
        reference code's mode). The ds_config's own optimizer lr is the base
        when it has an "optimizer" block; a ds_config "scheduler" block
        would overwrite every group's lr, so it is refused unless both are 1.
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 20
    schedule: str = "linear"
    central_lr_mult: float = 1.0
    aux_lr_mult: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr > 0:
            fail("optim", "lr", self.lr, "use a positive learning rate")
        if self.weight_decay < 0:
            fail("optim", "weight_decay", self.weight_decay, "use weight_decay >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            fail("optim", "betas", self.betas, "give two values in [0, 1), e.g. [0.9, 0.999]")
        if self.warmup_steps < 0:
            fail("optim", "warmup_steps", self.warmup_steps, "use warmup_steps >= 0")
        check_choice("optim", "schedule", self.schedule, SCHEDULES)
        for name in ("central_lr_mult", "aux_lr_mult"):
            if not getattr(self, name) >= 0:
                fail("optim", name, getattr(self, name), "use a multiplier >= 0 (1 = the base lr, 0 = frozen)")

    @property
    def lr_mults(self) -> dict[str, float]:
        """Parameter kind -> learning-rate multiplier (dense parameters always 1)."""
        return {"dense": 1.0, "central": self.central_lr_mult, "expert": self.aux_lr_mult}


@dataclass
class TrainConfig:
    """The training loop.

    max_steps: optimizer steps to train. log_every: a log line and TensorBoard
    scalars every N steps. eval_every: evaluate every N steps (0 = only at the
    end); eval_at_start: also evaluate the untrained model (the baseline the
    final metrics are compared with). save_every: checkpoint every N steps
    (0 = only at the end); keep_last: checkpoints kept. output_dir: where
    checkpoints, TensorBoard events, metrics.json and the resolved configs go.
    max_nonfinite_steps: stop with an error after this many consecutive
    steps whose loss or gradient norm is not finite (their updates are
    skipped). inject_nonfinite_steps: fault injection for testing the guard:
    at these steps (numbered from 1, as logged) the last rank's loss is made NaN (leave empty).
    seed: model/dropout seed. diversity_tokens: tokens per layer used for the
    expert-similarity metrics at eval (0 = off). max_eval_batches: cap per task
    (None = the whole validation split). progress_bar / tensorboard: rank-0 output.
    activation_checkpointing: recompute each transformer block's activations
    in the backward pass (Hugging Face ``gradient_checkpointing_enable`` with
    torch's non-reentrant checkpoint); MoE layers stay exact and keep the
    per-step reconstruction, see :mod:`mpomoe_ds.moe.experts`.
    peak_tflops: the peak dense TFLOP/s of one rank's device in the training
    precision (e.g. 989 for an H100 SXM in bf16); with it the log shows the
    model FLOPs utilisation ``train/mfu`` (null: achieved TFLOP/s only).
    reshardable_checkpoints: every checkpoint also holds each parameter with
    its Adam moments keyed by global name (``<tag>/global/``,
    :mod:`mpomoe_ds.training.reshard`), so ``--resume`` works at another world
    size and ``moe.ep_size``; costs about one more copy of the weights and
    optimizer state per checkpoint. false: resume only at the saved layout.
    """

    max_steps: int = 150
    log_every: int = 20
    eval_every: int = 0
    eval_at_start: bool = True
    save_every: int = 0
    keep_last: int = 2
    output_dir: str = "runs/default"
    seed: int = 42
    diversity_tokens: int = 256
    max_eval_batches: Optional[int] = None
    progress_bar: bool = True
    tensorboard: bool = True
    activation_checkpointing: bool = False
    peak_tflops: Optional[float] = None
    max_nonfinite_steps: int = 3
    inject_nonfinite_steps: list[int] = field(default_factory=list)
    reshardable_checkpoints: bool = True

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_every", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                fail("train", name, getattr(self, name), "use a value >= 1")
        for name in ("eval_every", "save_every", "diversity_tokens"):
            if getattr(self, name) < 0:
                fail("train", name, getattr(self, name), "use a value >= 0 (0 = off / only at the end)")
        if self.keep_last < 1:
            fail("train", "keep_last", self.keep_last, "keep at least 1 checkpoint")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            fail("train", "peak_tflops", self.peak_tflops, "give the device's peak TFLOP/s (> 0), or null")
        if self.max_eval_batches is not None and self.max_eval_batches < 1:
            fail("train", "max_eval_batches", self.max_eval_batches, "use null (all) or a positive count")
