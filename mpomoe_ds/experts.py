"""Expert modules and the batched expert computation.

Shape legend: L local experts, S slots per expert (tokens incl. padding),
D hidden size, F FFN size; R bond dims. Expert matrices are in ``x @ W``
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

One expert module per expert (``MPOExpert`` or ``FFNExpert``) keeps DeepSpeed's
native per-expert checkpoint files working; the container computes all local
experts together: one batched reconstruction, then batched matmuls.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from torch import nn

from .mpo import reconstruct

MATRICES = ("up", "down")

ACTIVATIONS = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}


class ExpertHooks(Protocol):
    """What an expert-update transformer (e.g. the orthogonal optimizer) implements."""

    def transform_weight(self, experts: "MoEExperts", matrix: str, weight_LIO: torch.Tensor) -> torch.Tensor:
        """Return the weight to use (e.g. with a gradient-projecting hook registered)."""

    def observe_inputs(self, experts: "MoEExperts", matrix: str, inputs_LSI: torch.Tensor,
                       valid_LS: torch.Tensor) -> None:
        """See the inputs of a matrix in a training forward; ``valid_LS`` marks real tokens."""


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

    @property
    def is_mpo(self) -> bool:
        return isinstance(self.deepspeed_experts[0], MPOExpert)

    def expert_weights(self, central: Optional[dict[str, torch.Tensor]] = None) -> dict[str, torch.Tensor]:
        """{"up": (L, D, F), "down": (L, F, D)} for every local expert.

        MPO experts: one batched reconstruction per matrix, the central core
        broadcast over the stacked auxiliaries (cheapest contraction order).
        """
        experts = self.deepspeed_experts
        if not self.is_mpo:
            return {m: torch.stack([getattr(e, f"{m}_weight") for e in experts]) for m in MATRICES}
        if central is None:
            raise ValueError("MPO experts need the layer's central tensors to reconstruct their weights")
        weights = {}
        for m in MATRICES:
            stacked = [torch.stack(list(cores)) for cores in zip(*(e.aux_cores(m) for e in experts))]
            stacked.insert(self.central_index, central[m])
            weights[m] = reconstruct(stacked)
        return weights

    def biases(self) -> dict[str, torch.Tensor]:
        return {m: torch.stack([getattr(e, f"{m}_bias") for e in self.deepspeed_experts]) for m in MATRICES}

    def forward(self, x_LSD: torch.Tensor, central: Optional[dict[str, torch.Tensor]] = None,
                valid_LS: Optional[torch.Tensor] = None) -> torch.Tensor:
        weights = self.expert_weights(central)
        biases = self.biases()
        if self.hooks is not None:
            weights = {m: self.hooks.transform_weight(self, m, w) for m, w in weights.items()}
        x_LSD = x_LSD.to(weights["up"].dtype)
        h_LSF = ACTIVATIONS[self.activation](torch.baddbmm(biases["up"].unsqueeze(1), x_LSD, weights["up"]))
        if self.hooks is not None and self.training and valid_LS is not None:
            self.hooks.observe_inputs(self, "up", x_LSD.detach(), valid_LS)
            self.hooks.observe_inputs(self, "down", h_LSF.detach(), valid_LS)
        return torch.baddbmm(biases["down"].unsqueeze(1), h_LSF, weights["down"])
