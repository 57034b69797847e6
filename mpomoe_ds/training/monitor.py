"""What a run shows people: progress bar, log lines and TensorBoard, on rank 0 only.

Owns the rank-0 gate for output, and ``train_log.jsonl`` (the logged train
scalars, one line per logged step; truncated to the resumed step on resume,
as TensorBoard's events are purged past it). Every other rank gets a monitor whose
methods do nothing, so callers never branch on the rank.

TensorBoard tags:
    train/loss (token-weighted mean over all ranks), train/task_loss/<task> (rank 0's),
    train/nonfinite_steps (skipped updates so far), train/aux_loss (summed over MoE layers; 1.0 per layer is
    perfect balance), train/lr, train/tokens_per_s,
    train/grad_norm, moe/layer<i>/load (histogram of tokens per expert),
    moe/layer<i>/load_max_over_mean, moe/mask_keep_ratio,
    eval/<task>/<metric>, eval/<task>/loss, diversity/layer<i>/cosine, diversity/layer<i>/cka,
    omoe/phase
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Mapping, Optional

import torch

logger = logging.getLogger("mpomoe_ds")
HISTORY = "train_log.jsonl"  # one JSON line per logged step: the train/* scalars, for people and tests


def setup_logging(rank: int) -> None:
    """Rank 0 logs at INFO to stdout; other ranks only warnings (with their rank)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"[%(asctime)s rank{rank}] %(message)s", "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    logger.propagate = False


class Monitor:
    """Progress bar + TensorBoard writer for rank 0; a no-op elsewhere."""

    def __init__(self, rank: int, output_dir: Path, total_steps: int, start_step: int = 0,
                 tensorboard: bool = True, progress_bar: bool = True) -> None:
        self.active = rank == 0
        self.writer = None
        self.bar = None
        self.history = output_dir / HISTORY
        if not self.active:
            return
        self._truncate_history(start_step)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # After a resume, drop events past the resumed step so overlapping steps are not written twice.
            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None)
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stdout, mininterval=2.0)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

    def _truncate_history(self, start_step: int) -> None:
        """Keep only records up to ``start_step``: a resumed run rewrites what follows, never twice."""
        if not self.history.is_file():
            return
        kept = [line for line in self.history.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= start_step]
        self.history.write_text("".join(f"{line}\n" for line in kept))

    def record(self, values: Mapping[str, float], step: int) -> None:
        """Append one line ``{"step": ..., tag: value}`` to train_log.jsonl (non-finite values as null)."""
        if self.active:
            row = {"step": step, **{k: (float(v) if math.isfinite(float(v)) else None) for k, v in values.items()}}
            with open(self.history, "a") as fh:
                fh.write(json.dumps(row, sort_keys=True) + "\n")

    def expert_load(self, counts_LE: torch.Tensor, step: int) -> None:
        """Tokens per expert per MoE layer (summed over ranks by the caller)."""
        if self.writer is None:
            return
        for layer, counts in enumerate(counts_LE.float()):
            self.writer.add_histogram(f"moe/layer{layer}/load", counts, step, bins=counts.numel())
            self.writer.add_scalar(f"moe/layer{layer}/load_max_over_mean",
                                   float(counts.max() / counts.mean().clamp_min(1e-9)), step)

    def advance(self, steps: int, postfix: Optional[Mapping[str, float]] = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def log(self, message: str) -> None:
        if self.active:
            if self.bar is not None:
                self.bar.write(f"[mpomoe_ds] {message}")
            else:
                logger.info(message)

    def flush(self) -> None:
        """Put pending TensorBoard events on disk (at each checkpoint: a killed run keeps what it saved)."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
