"""Evaluation data: every validation example exactly once across ranks, and the gathered result.

Shape legend: B per-rank batch, G = B * W global batch, M eval rows on one
rank (padding included), N examples.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np
import torch

from mpomoe_ds import parallel
from mpomoe_ds.data.tasks import DataError
from mpomoe_ds.data.tokenize import TaskData, make_batch


def num_eval_batches(num_examples: int, batch_size: int, world_size: int) -> int:
    """Eval batches per rank: ceil(N / G), the same on every rank."""
    return -(-num_examples // (batch_size * world_size))


def eval_batches(task: TaskData, batch_size: int, *, rank: int = 0, world_size: int = 1
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Every validation example of ``task`` exactly once across ranks, in full (B, L) batches.

    Eval batch j covers examples [j G, (j+1) G); rank r takes its slice
    [j G + r B, j G + (r+1) B). Positions past N are filled with example 0 and
    marked ``eval_mask = False``, so all ranks run the same number of
    same-shape batches. Extra keys: ``example_index`` (B,) and ``eval_mask``
    (B,) bool. For lm tasks padded rows' labels are all -100, so the model's
    loss already ignores them. Gather results with ``gather_eval``.
    """
    if task.validation is None:
        raise DataError(f"task {task.spec.name!r} has no validation split; give validation_file or skip its eval")
    n, G = len(task.validation), batch_size * world_size
    for j in range(num_eval_batches(n, batch_size, world_size)):
        positions_B = j * G + rank * batch_size + np.arange(batch_size)
        mask_B = positions_B < n
        batch = make_batch(task, task.validation, np.where(mask_B, positions_B, 0))
        if task.spec.kind == "lm":
            batch["labels"][torch.from_numpy(~mask_B)] = -100
        batch["example_index"] = torch.from_numpy(positions_B)
        batch["eval_mask"] = torch.from_numpy(mask_B)
        yield batch


def merge_eval_shards(example_index_M: np.ndarray, predictions_M: np.ndarray, labels_M: np.ndarray,
                      mask_M: np.ndarray, num_examples: int) -> tuple[np.ndarray, np.ndarray]:
    """Drop padded rows, order by example index, and check each example appears exactly once.

    Inputs are the rows of every rank concatenated (any order). Returns
    (predictions, labels) for examples 0..N-1, ready for compute_metrics.
    """
    keep = np.asarray(mask_M).astype(bool)
    index = np.asarray(example_index_M)[keep]
    order = np.argsort(index, kind="stable")
    if len(index) != num_examples or not np.array_equal(index[order], np.arange(num_examples)):
        raise RuntimeError(f"eval shards hold {len(index)} rows covering {len(np.unique(index))} distinct of "
                           f"{num_examples} examples; every rank must run every batch of eval_batches with the "
                           f"same batch_size and world_size")
    return np.asarray(predictions_M)[keep][order], np.asarray(labels_M)[keep][order]


def gather_eval(example_index_M: torch.Tensor, predictions_M: torch.Tensor, labels_M: torch.Tensor,
                mask_M: torch.Tensor, num_examples: int, group: Optional[parallel.ProcessGroup] = None
                ) -> tuple[np.ndarray, np.ndarray]:
    """All-gather this rank's eval rows and merge them: every rank gets the full, ordered result.

    Pass the concatenation over this rank's eval batches of example_index,
    the model's predictions (logits (M, C) or scores (M,)), labels and
    eval_mask, padded rows included: every rank has the same M (same number
    of same-shape batches), so a plain tensor all_gather works, no pickling.
    Tensors may live on any device (parallel places them for the backend); results are numpy.
    """
    parts = [example_index_M.to(torch.int64), predictions_M.detach().float(), labels_M.detach(),
             mask_M.to(torch.int64)]
    parts = [torch.cat(parallel.all_gather(tensor, group)) for tensor in parts]
    return merge_eval_shards(*(t.cpu().numpy() for t in parts), num_examples=num_examples)
