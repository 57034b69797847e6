"""What a run shows people: progress bar, log lines and TensorBoard, on rank 0 only.

Owns the rank-0 gate for output. Every other rank gets a monitor whose
methods do nothing, so callers never branch on the rank.

TensorBoard tags:
    train/loss, train/task_loss/<task>, train/aux_loss (summed over MoE layers; 1.0 per layer is
    perfect balance), train/lr, train/tokens_per_s,
    train/grad_norm, moe/layer<i>/load (histogram of tokens per expert),
    moe/layer<i>/load_max_over_mean, moe/mask_keep_ratio,
    eval/<task>/<metric>, eval/<task>/loss, diversity/layer<i>/cosine, diversity/layer<i>/cka,
    omoe/phase
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Mapping, Optional

import torch

logger = logging.getLogger("mpomoe_ds")


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
        if not self.active:
            return
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stdout, mininterval=2.0)

    def scalars(self, values: Mapping[str, float], step: int) -> None:
        if self.writer is not None:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)

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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
