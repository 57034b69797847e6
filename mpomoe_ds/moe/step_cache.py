"""Per-step reconstruction: MPO expert weights rebuilt once per optimizer step, gradients exact.

This module owns the cache an MPO expert container uses under gradient
accumulation (:class:`StepReconstruction`) and the two gradient hooks that
make it exact. The container decides when to use it, from the micro-batch
position the MoE step protocol (:mod:`mpomoe_ds.moe.step`) hands it.
"""

from __future__ import annotations

import functools

import torch


def _collect_grad(sums: dict[str, torch.Tensor], matrix: str, leaf: torch.Tensor) -> None:
    """Post-accumulate hook of a cached weight: move its gradient into the fp32 step sum."""
    grad, leaf.grad = leaf.grad, None
    if matrix in sums:
        sums[matrix].add_(grad)
    else:
        sums[matrix] = grad.to(torch.float32, copy=grad.dtype != torch.float32)


def _add_step_grad(sums: dict[str, torch.Tensor], matrix: str, grad: torch.Tensor) -> torch.Tensor:
    """Hook on the graph weight in the last micro-batch: dL/dW of the whole step."""
    earlier = sums.pop(matrix, None)
    if earlier is None:
        return grad
    return earlier.add_(grad).to(grad.dtype)


class StepReconstruction:
    """Expert weights rebuilt once per optimizer step, with exact gradients.

    ``weights`` maps names to any differentiable functions of the parameters
    the step shares: the reconstructed matrices, and the expert container's
    bias stacks (aux_gather's gathered copies; local stacks otherwise).

    Plain gradient accumulation rebuilds W = f(cores) in every micro-batch and
    back-propagates each micro-batch's dW_i through f, so the cores get
    ``sum_i J^T dW_i``. Here:

    * first micro-batch: ``W = f(cores)`` is built once with its autograd graph
      (the graph is kept, not traversed);
    * every micro-batch but the last computes with a detached copy of W (a leaf);
      autograd leaves dW_i on it and a post-accumulate hook adds it to an fp32
      sum and frees it, so no gradient reaches the cores yet;
    * last micro-batch: computes with the graph W; a hook on it adds the
      earlier micro-batches' sum, so the cores get ``J^T (sum_i dW_i)`` inside
      the last backward, where DeepSpeed's gradient hooks (ZeRO-2 included)
      see one ordinary gradient per parameter. By linearity this equals the
      plain sum up to fp32 roundoff.

    Cost per step: one forward and one backward reconstruction instead of one
    per micro-batch. Memory: W, the graph's one W-sized intermediate and the
    fp32 gradient sum, per matrix, held across the step's micro-batches.
    """

    def __init__(self, weights: dict[str, torch.Tensor]) -> None:
        self.graph = weights
        self.sums: dict[str, torch.Tensor] = {}
        self.leaves = {}
        for m, w in weights.items():
            leaf = w.detach().requires_grad_(w.requires_grad)
            if leaf.requires_grad:
                leaf.register_post_accumulate_grad_hook(functools.partial(_collect_grad, self.sums, m))
            self.leaves[m] = leaf
        self.pending = 0  # micro-batches whose forward used the cache

    def accumulating_weights(self) -> dict[str, torch.Tensor]:
        """Weights for a micro-batch before the last: fresh views of the detached leaves."""
        self.pending += 1
        return {m: leaf.view_as(leaf) for m, leaf in self.leaves.items()}

    def final_weights(self) -> dict[str, torch.Tensor]:
        """Weights for the last micro-batch: connected to the cores, carrying the step's gradient."""
        out = {}
        for m, w in self.graph.items():
            if w.requires_grad:
                w.register_hook(functools.partial(_add_step_grad, self.sums, m))
            out[m] = w.view_as(w)  # a distinct tensor: hooks on it see only this micro-batch
        return out
