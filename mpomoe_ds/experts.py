"""Expert modules and the batched expert computation.

Shape legend: L local experts (A: the active subset of them), S slots per
expert (tokens incl. padding), D hidden size, F FFN size; R bond dims; I, O
rows / columns of one expert matrix. Expert matrices are in ``x @ W``
orientation: ``W_up`` is (D, F), ``W_down`` is (F, D).

Naming conventions:
    central tensor    the middle MPO core of a matrix position ("up"/"down"),
                      one per MoE layer, shared by every expert; a dense,
                      data-parallel parameter owned by the MoE layer, passed
                      into :meth:`MoEExperts.forward` (never stored here, so
                      DeepSpeed's per-expert deep copy cannot duplicate it)
    auxiliary tensors the other cores, owned per expert (expert parameters)
    global expert id  0..E-1 across the expert-parallel group
    local expert id   0..L-1 on this rank; global = ep_rank * L + local
    active expert     a local expert that received at least one token (from
                      any rank of the expert-parallel group) in this forward

One expert module per expert (``MPOExpert`` or ``FFNExpert``) keeps DeepSpeed's
native per-expert checkpoint files working; the container computes all local
experts together: one batched reconstruction, then batched matmuls.

Where reconstruction happens (MPO experts; SPEC section 2 puts it at ~1.4 GMAC
per 3072x768 matrix, the cost of ~600 tokens):

* Only active experts are rebuilt. An idle expert's slots are all padding, so
  its output is discarded and its weight gradient is exactly zero; its rows of
  the weight are zero placeholders and its parameters still get (zero)
  gradients, as in the plain computation.
* Under gradient accumulation the weights are rebuilt once per optimizer step
  (:meth:`MoEExperts.set_micro_batch`): see :class:`StepReconstruction`.
* :func:`reconstruct_shared` contracts in the cheapest order with large GEMMs
  and one blocked permutation; it runs in the cores' dtype (bf16 when the
  engine holds bf16 parameters) and follows ``torch.autocast``.
"""

from __future__ import annotations

import functools
from typing import Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from torch import nn

from .mpo import reconstruct, reconstruction_macs

MATRICES = ("up", "down")

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class ExpertHooks(Protocol):
    """What an expert-update transformer (e.g. the orthogonal optimizer) implements.

    An implementation may also define a bool ``observing`` attribute: when it is
    False the layer does not compute ``valid_LS`` (saving one small all-to-all)
    and does not call :meth:`observe_inputs`. It must be equal on every rank.
    """

    def transform_weight(self, experts: "MoEExperts", matrix: str, weight_LIO: torch.Tensor) -> torch.Tensor:
        """Return the weight to use (e.g. with a gradient-projecting hook registered).

        ``weight_LIO`` holds every local expert; rows of experts that got no
        token in this forward are zero placeholders (their gradient is zero).
        Under gradient accumulation with :meth:`MoEExperts.set_micro_batch`,
        every micro-batch passes a fresh tensor whose gradient is that
        micro-batch's dL/dW only, so a linear hook (a projection) sees each
        micro-batch once and the sum over the step is transformed exactly once.
        """

    def observe_inputs(self, experts: "MoEExperts", matrix: str, inputs_LSI: torch.Tensor,
                       valid_LS: torch.Tensor) -> None:
        """See the inputs of a matrix in a training forward; ``valid_LS`` marks real tokens."""


# --------------------------------------------------------------------------- reconstruction


def _merge_split(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """(L, a, I1, J1, m) x (L, m, I2, J2, b) -> (L, a, I1*I2, J1*J2, b): small cores, rows stay split."""
    num, a, i1, j1, m = left.shape
    _, _, i2, j2, b = right.shape
    out = torch.bmm(left.reshape(num, a * i1 * j1, m), right.reshape(num, m, i2 * j2 * b))
    out = out.view(num, a, i1, j1, i2, j2, b).permute(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(num, a, i1 * i2, j1 * j2, b)


def shared_plan_macs(core_shapes: Sequence[Sequence[int]], central_index: int) -> int:
    """MACs of :func:`reconstruct_shared`'s order for one expert (cores as (d, i, j, d'))."""
    shapes = [tuple(int(d) for d in s[-4:]) for s in core_shapes]
    c = central_index
    total = 0
    rows = shapes[0][1] * shapes[0][2]  # left aux block, merged left to right: (1, rows, bond)
    for d0, i, j, d1 in shapes[1:c]:
        total += rows * d0 * i * j * d1
        rows *= i * j
    cols = shapes[-1][1] * shapes[-1][2]  # right aux block, merged right to left: (bond, cols, 1)
    for d0, i, j, d1 in reversed(shapes[c + 1:-1]):
        total += d0 * i * j * d1 * cols
        cols *= i * j
    d0, i, j, d1 = shapes[c]
    total += rows * d0 * i * j * d1  # (left block) x central
    total += rows * i * j * d1 * cols  # x (right block)
    return total


def reconstruct_shared(aux_cores: Sequence[torch.Tensor], central: torch.Tensor, central_index: int) -> torch.Tensor:
    """Contract a shared central core with a batch of auxiliary cores into (L, I, J) weights.

    Same result as :func:`mpomoe_ds.mpo.reconstruct` on the same cores, built for
    speed with a shared central tensor:

    1. left block: cores ``0..c-1`` per expert (small), rows ordered (i's, j's);
       right block: cores ``c+1..n-1`` (small), likewise;
    2. (left block) x central: one GEMM with the experts folded into the rows,
       so the unbatched central tensor is never expanded or copied, and its
       gradient is one GEMM with the experts in the reduction dim;
    3. x (right block): one batched GEMM, the big one (``|W| * d_{c+1}`` per expert);
    4. one permutation into (I, J) whose inner runs are the right block's j
       factors (not single j factors).

    For lossless MPOs of balanced factors this order costs the matrix-chain
    optimum ``|W| * (d_c + d_{c+1})`` per expert (checked against
    :func:`mpomoe_ds.mpo.reconstruction_macs`); where the DP finds a clearly
    cheaper order (unusual truncations, a central core at an end) this falls
    back to :func:`mpomoe_ds.mpo.reconstruct`.

    Args:
        aux_cores: the n-1 auxiliary cores in core order without the central
            one, each (L, d, i, j, d').
        central: the central core (d_c, i_c, j_c, d_{c+1}), no batch dim.
        central_index: its position c among the n cores.
    """
    c = central_index
    before, after = list(aux_cores[:c]), list(aux_cores[c:])
    shapes = [tuple(t.shape[-4:]) for t in before] + [tuple(central.shape)] + [tuple(t.shape[-4:]) for t in after]
    if not before or not after or shared_plan_macs(shapes, c) > 1.05 * reconstruction_macs(shapes):
        return reconstruct(before + [central] + after)
    num = before[0].shape[0]
    left = before[0]
    for core in before[1:]:
        left = _merge_split(left, core)  # (L, 1, IL, JL, d_c)
    right = after[-1]
    for core in reversed(after[:-1]):
        right = _merge_split(core, right)  # (L, d_{c+1}, IR, JR, 1)
    _, _, il, jl, dc = left.shape
    _, ic, jc, dn = central.shape
    _, _, ir, jr, _ = right.shape
    lc = torch.mm(left.reshape(num * il * jl, dc), central.reshape(dc, ic * jc * dn))
    full = torch.bmm(lc.view(num, il * jl * ic * jc, dn), right.reshape(num, dn, ir * jr))
    full = full.view(num, il, jl, ic, jc, ir, jr).permute(0, 1, 3, 5, 2, 4, 6)
    return full.reshape(num, il * ic * ir, jl * jc * jr)


# --------------------------------------------------------------------------- step cache


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


# --------------------------------------------------------------------------- modules


class MPOExpert(nn.Module):
    """One expert's own tensors: the auxiliary cores of each matrix, and biases.

    ``up_aux[m]`` is core ``aux_core_indices[m]`` of the up-projection MPO.
    """

    def __init__(self, up_aux: list[torch.Tensor], down_aux: list[torch.Tensor], up_bias: torch.Tensor,
                 down_bias: torch.Tensor) -> None:
        super().__init__()
        self.up_aux = nn.ParameterList([nn.Parameter(c.detach().clone().contiguous()) for c in up_aux])
        self.down_aux = nn.ParameterList([nn.Parameter(c.detach().clone().contiguous()) for c in down_aux])
        self.up_bias = nn.Parameter(up_bias.detach().clone())
        self.down_bias = nn.Parameter(down_bias.detach().clone())

    def aux_cores(self, matrix: str) -> nn.ParameterList:
        return self.up_aux if matrix == "up" else self.down_aux


class FFNExpert(nn.Module):
    """A plain dense expert (the standard-MoE baseline), weights in x @ W orientation."""

    def __init__(self, up_weight: torch.Tensor, up_bias: torch.Tensor, down_weight: torch.Tensor,
                 down_bias: torch.Tensor) -> None:
        super().__init__()
        self.up_weight = nn.Parameter(up_weight.detach().clone())
        self.up_bias = nn.Parameter(up_bias.detach().clone())
        self.down_weight = nn.Parameter(down_weight.detach().clone())
        self.down_bias = nn.Parameter(down_bias.detach().clone())


class MoEExperts(Experts):
    """All local experts of one MoE layer, computed as a batch.

    DeepSpeed's ``Experts`` deep-copies the template per local expert and marks
    every parameter ``allreduce=False`` / ``group_name``; we keep that contract
    and replace its Python loop with batched matmuls.
    """

    def __init__(self, template: nn.Module, num_local_experts: int, group_name: str, num_experts: int,
                 activation: str, central_index: Optional[int] = None) -> None:
        super().__init__(template, num_local_experts, group_name)
        self.num_experts = num_experts
        self.activation = activation
        self.central_index = central_index
        self.global_expert_ids = list(range(num_local_experts))
        self.hooks: Optional[ExpertHooks] = None
        self._micro_batch: Optional[tuple[int, bool]] = None
        self._step: Optional[StepReconstruction] = None

    @property
    def is_mpo(self) -> bool:
        return isinstance(self.deepspeed_experts[0], MPOExpert)

    def set_micro_batch(self, index: Optional[int], is_last: bool = True) -> None:
        """Position of the next forward in gradient accumulation; enables per-step reconstruction.

        Call before each training micro-batch's forward with its index in the
        optimizer step (0-based) and whether it is the step's last (the one
        after which the optimizer steps). With a DeepSpeed engine::

            index = engine.micro_steps % engine.gradient_accumulation_steps()
            is_last = engine.is_gradient_accumulation_boundary()

        MPO experts then rebuild their weights once per step
        (:class:`StepReconstruction`); gradients stay exact. Requirements: one
        training forward and backward per micro-batch, in order, on every rank
        alike (no activation checkpointing that re-runs this layer's forward).
        ``index=None`` returns to rebuilding in every forward. A forward
        outside training or under ``torch.no_grad()`` ignores the setting.

        Raises:
            RuntimeError: index 0 while an earlier step's accumulated weight
                gradient was never handed to a last micro-batch (it would be lost).
        """
        if index is None:
            self._step = None
        elif index == 0 and self._step is not None:
            pending, self._step = self._step.pending, None
            if pending:
                raise RuntimeError(
                    f"set_micro_batch(0): the previous optimizer step ran {pending} micro-batch(es) with a cached "
                    f"expert reconstruction but no last one (is_last=True), so their expert gradients are lost. "
                    f"Mark each step's last micro-batch with is_last=True (with DeepSpeed: "
                    f"engine.is_gradient_accumulation_boundary()), or call set_micro_batch(None) to start over")
        self._micro_batch = None if index is None else (int(index), bool(is_last))

    def _cache_in_use(self) -> bool:
        """Whether the next forward takes its weights from a per-step reconstruction (same on every rank)."""
        if self._micro_batch is None or not self.is_mpo or not self.training or not torch.is_grad_enabled():
            return False
        return self._step is not None or not self._micro_batch[1]

    def needs_activity(self) -> bool:
        """Whether the next forward can use ``active_L`` (MPO experts rebuilt in this forward)."""
        return self.is_mpo and not self._cache_in_use()

    def _mpo_cores(self, matrix: str, central: dict[str, torch.Tensor],
                   active_A: Optional[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
        aux = [torch.stack(list(cores)) for cores in zip(*(e.aux_cores(matrix) for e in self.deepspeed_experts))]
        if active_A is not None:
            aux = [a.index_select(0, active_A) for a in aux]
        return aux, central[matrix]

    def expert_weights(self, central: Optional[dict[str, torch.Tensor]] = None,
                       active_L: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """{"up": (L, D, F), "down": (L, F, D)} for every local expert.

        MPO experts: one batched reconstruction per matrix
        (:func:`reconstruct_shared`). With ``active_L`` (bool, (L,)) only those
        experts are rebuilt; the other rows are zero.
        """
        experts = self.deepspeed_experts
        if not self.is_mpo:
            return {m: torch.stack([getattr(e, f"{m}_weight") for e in experts]) for m in MATRICES}
        if central is None:
            raise ValueError("MPO experts need the layer's central tensors to reconstruct their weights")
        active_A = None if active_L is None else torch.nonzero(active_L).flatten()
        weights = {}
        for m in MATRICES:
            aux, core = self._mpo_cores(m, central, active_A)
            w = reconstruct_shared(aux, core, self.central_index)
            if active_A is not None:
                w = w.new_zeros(len(experts), *w.shape[1:]).index_copy(0, active_A, w)
            weights[m] = w
        return weights

    def _training_weights(self, central: Optional[dict[str, torch.Tensor]],
                          active_L: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
        """The weights of this forward: from the per-step reconstruction, or rebuilt now."""
        if not self._cache_in_use():
            return self.expert_weights(central, active_L)
        if self._step is None:
            self._step = StepReconstruction(self.expert_weights(central))
        if not self._micro_batch[1]:
            return self._step.accumulating_weights()
        step, self._step, self._micro_batch = self._step, None, None
        return step.final_weights()

    def biases(self) -> dict[str, torch.Tensor]:
        return {m: torch.stack([getattr(e, f"{m}_bias") for e in self.deepspeed_experts]) for m in MATRICES}

    def forward(self, x_LSD: torch.Tensor, central: Optional[dict[str, torch.Tensor]] = None,
                valid_LS: Optional[torch.Tensor] = None, active_L: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Batched expert FFNs on dispatched slots.

        ``active_L`` (bool, (L,)): local experts that received a token; MPO
        experts outside it are not rebuilt (their slots are padding, whose
        outputs the combine step discards). None: all experts are rebuilt.
        """
        weights = self._training_weights(central, active_L)
        biases = self.biases()
        if self.hooks is not None:
            weights = {m: self.hooks.transform_weight(self, m, w) for m, w in weights.items()}
        x_LSD = x_LSD.to(weights["up"].dtype)
        h_LSF = ACTIVATIONS[self.activation](torch.baddbmm(biases["up"].unsqueeze(1), x_LSD, weights["up"]))
        if self.hooks is not None and self.training and valid_LS is not None:
            self.hooks.observe_inputs(self, "up", x_LSD.detach(), valid_LS)
            self.hooks.observe_inputs(self, "down", h_LSF.detach(), valid_LS)
        return torch.baddbmm(biases["down"].unsqueeze(1), h_LSF, weights["down"])
