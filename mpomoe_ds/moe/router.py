"""Top-k routing: which experts see each token, with what weight, at what balance cost.

Shape legend: T tokens, D hidden, E experts (global), K experts per token.

Naming conventions (after Megatron's TopKRouter):
    logits   the router's raw scores ``x @ wg^T``, (T, E), fp32
    probs    ``softmax(logits)``, (T, E)
    experts  the chosen global expert ids per token, (T, K), best first
    weights  the combine weights applied to the chosen experts' outputs, (T, K)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpomoe_ds.moe.config import MoEConfig


@dataclass
class Routing:
    """What the router decided for a batch of tokens (returned, never stashed)."""

    probs_TE: torch.Tensor
    experts_TK: torch.Tensor
    weights_TK: torch.Tensor
    aux_loss: torch.Tensor


def load_balancing_loss(probs_TE: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer balance loss ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of the T*K routes assigned to expert e (before any
    capacity drop) and ``P_e`` the mean router probability of e. It equals 1 at
    perfect balance. Computed on the local tokens of each rank; DeepSpeed then
    averages gradients across data-parallel ranks, so the optimised quantity
    is the mean of per-rank losses (not the loss of the concatenated batch).
    """
    num_tokens, num_experts = probs_TE.shape
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
    fraction_E = counts_E / max(experts_TK.numel(), 1)
    return num_experts * torch.sum(fraction_E * probs_TE.mean(dim=0))


class TopKRouter(nn.Module):
    """Linear router with top-k selection, optional noise and three weightings.

    The parameter is named ``wg`` so DeepSpeed's checkpoint code (which keeps
    keys matching ``moe.gate.wg.weight`` out of the expert files) treats it as
    an ordinary replicated parameter.
    """

    def __init__(self, hidden_size: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.wg = nn.Linear(hidden_size, config.num_experts, bias=False)

    def forward(self, x_TD: torch.Tensor) -> Routing:
        cfg = self.config
        x_TD = x_TD.float()
        if self.training and cfg.noisy_gate == "jitter":
            eps = 1e-2
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        logits_TE = F.linear(x_TD, self.wg.weight.float())
        probs_TE = torch.softmax(logits_TE, dim=-1)
        if self.training and cfg.noisy_gate == "rsample":
            gumbel = -torch.log(-torch.log(torch.rand_like(logits_TE).clamp_min(1e-20)).clamp_min(1e-20))
            experts_TK = torch.topk(logits_TE + gumbel, cfg.k, dim=-1).indices
        else:
            experts_TK = torch.topk(probs_TE, cfg.k, dim=-1).indices
        chosen_TK = probs_TE.gather(1, experts_TK)
        weights_TK = self._combine_weights(chosen_TK)
        return Routing(probs_TE, experts_TK, weights_TK, load_balancing_loss(probs_TE, experts_TK))

    def _combine_weights(self, chosen_TK: torch.Tensor) -> torch.Tensor:
        mode = self.config.gate_weighting
        if mode == "softmax":
            return chosen_TK
        total_T1 = chosen_TK.sum(dim=-1, keepdim=True)
        if mode == "straight_through":
            # Value: normalised top-k probs (1.0 for k=1); gradient: d p / sum(p).
            return chosen_TK / total_T1.detach()
        return chosen_TK / total_T1
