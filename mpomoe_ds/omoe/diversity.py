"""Expert-diversity metrics: how alike are the experts of a layer?

This module owns the similarity metrics between experts: all E experts are run
densely on the *same* tokens (routing ignored) and their outputs (before the
residual and the layer norm) compared two ways:

* mean pairwise cosine: for experts e != f, ``cos(y_e[n], y_f[n])`` per token n,
  averaged over tokens and over the E(E-1)/2 pairs. 1: identical outputs.
* linear CKA (Kornblith et al. 2019) between the (N, D) output matrices of two
  experts, with outputs centred over tokens::

      CKA(X, Y) = ||X^T Y||_F^2 / (||X^T X||_F ||Y^T Y||_F)
                = <K_X, K_Y>_F / (||K_X||_F ||K_Y||_F),   K_X = X X^T (tokens' Gram)

  1 for outputs equal up to an orthogonal transform and an isotropic scale, 0
  when the centred outputs span orthogonal subspaces. Averaged over pairs.

Specialisation metrics (similarity can be low while the experts still share
most of their output, and says nothing about routing):

* expert-specific energy: the share of the experts' output energy on the same
  tokens that is not common to all of them::

      1 - sum_n ||mean_e y_e[n]||^2 / mean_e sum_n ||y_e[n]||^2

  0 for identical experts, 1 - 1/E for experts with mutually orthogonal outputs
  (1 when their mean is zero).
* router entropy: mean over tokens of H(p_t) = -sum_e p_te log p_te (nats) of
  the router probabilities; 0 for one-hot routing, log E for uniform.
* task-expert mutual information: I(task; expert) of the routes (every one of
  a token's k choices), tasks weighted equally::

      I = H(mean_t q_t) - mean_t H(q_t),   q_t(e) = routes of task t to e / routes of task t

  0 when every task routes alike, log(#tasks) when each task has experts of its own.

Functions work on any tensor of expert outputs (E, N, D) (:func:`expert_similarity`),
on one MoE layer plus tokens (:func:`layer_expert_similarity`; under expert
parallelism the tokens and the outputs are gathered over the expert-parallel
group, so every rank returns the same numbers for all E experts), and on a
whole model (:func:`model_expert_similarity`, one entry per MoE layer).

Shape legend: E experts (global), L local experts, N tokens, D hidden, P ranks of the ep group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from mpomoe_ds import parallel


@dataclass
class ExpertSimilarity:
    """Similarity of a layer's experts on the same tokens.

    cosine / cka: mean over expert pairs e < f (what gets logged).
    cosine_EE / cka_EE: the full symmetric matrices (diagonal 1).
    num_tokens: N, the tokens every expert saw.
    """

    cosine: float
    cka: float
    cosine_EE: torch.Tensor
    cka_EE: torch.Tensor
    num_tokens: int

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}expert_cosine": self.cosine, f"{prefix}expert_cka": self.cka}


def mean_off_diagonal(matrix_EE: torch.Tensor) -> float:
    """Mean of the entries above the diagonal (the E(E-1)/2 distinct pairs)."""
    num = matrix_EE.shape[0]
    if num < 2:
        return float("nan")
    rows, cols = torch.triu_indices(num, num, offset=1)
    return float(matrix_EE[rows, cols].mean())


def pairwise_cosine(outputs_END: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(E, E): per-token cosine similarity between experts' outputs, averaged over tokens."""
    y = outputs_END.double()
    unit_END = y / y.norm(dim=-1, keepdim=True).clamp_min(eps)
    return torch.einsum("end,fnd->ef", unit_END, unit_END) / y.shape[1]


def linear_cka(x_ND: torch.Tensor, y_ND: torch.Tensor) -> float:
    """Linear CKA between two sets of N representations (features centred over N)."""
    return float(pairwise_cka(torch.stack([x_ND, y_ND]))[0, 1])


def pairwise_cka(outputs_END: torch.Tensor, eps: float = 1e-30) -> torch.Tensor:
    """(E, E) linear CKA between every pair of experts' (N, D) outputs.

    Computed in float64 through whichever is cheaper: the tokens' Gram
    matrices (E N^2 D) or the features' cross-covariances (E^2 D^2 N).
    """
    num_experts, num_tokens, dim = outputs_END.shape
    y = outputs_END.double()
    y = y - y.mean(dim=1, keepdim=True)
    if num_tokens * num_tokens * (dim + num_experts) <= num_experts * dim * dim * num_tokens:
        gram_ENN = torch.bmm(y, y.transpose(1, 2))
        hsic_EE = torch.einsum("enm,fnm->ef", gram_ENN, gram_ENN)
    else:
        cross_EFDD = torch.einsum("end,fnc->efdc", y, y)
        hsic_EE = cross_EFDD.square().sum((-1, -2))
    norm_E = torch.sqrt(torch.diagonal(hsic_EE).clamp_min(eps))
    return hsic_EE / (norm_E.unsqueeze(0) * norm_E.unsqueeze(1))


def expert_similarity(outputs_END: torch.Tensor) -> ExpertSimilarity:
    """Both metrics for a tensor of expert outputs (E, N, D) on the same N tokens."""
    if outputs_END.dim() != 3:
        raise ValueError(f"expected expert outputs of shape (E, N, D), got {tuple(outputs_END.shape)}")
    cos_EE = pairwise_cosine(outputs_END)
    cka_EE = pairwise_cka(outputs_END)
    return ExpertSimilarity(cosine=mean_off_diagonal(cos_EE), cka=mean_off_diagonal(cka_EE),
                            cosine_EE=cos_EE.float(), cka_EE=cka_EE.float(), num_tokens=outputs_END.shape[1])


def expert_specific_energy(outputs_END: torch.Tensor) -> float:
    """``1 - sum_n ||mean_e y_e[n]||^2 / mean_e sum_n ||y_e[n]||^2`` (see the module docstring); float64."""
    y = outputs_END.double()
    total = float(y.square().sum((1, 2)).mean())
    if total == 0.0:
        return 0.0
    return 1.0 - float(y.mean(0).square().sum()) / total


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) over the last dim, with 0 log 0 = 0."""
    p = probs.double()
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def router_entropy(probs_TE: torch.Tensor) -> float:
    """Mean over tokens of the router probabilities' entropy (nats)."""
    return float(_entropy(probs_TE).mean())


def task_expert_mutual_information(routes_XE: torch.Tensor) -> float:
    """I(task; expert) in nats from route counts per task (rows) and expert, tasks weighted equally.

    Tasks without routes are left out; fewer than two tasks give 0.
    """
    counts = routes_XE.double()
    counts = counts[counts.sum(1) > 0]
    if counts.shape[0] < 2:
        return 0.0
    q_XE = counts / counts.sum(1, keepdim=True)
    return float(_entropy(q_XE.mean(0)) - _entropy(q_XE).mean())


# --------------------------------------------------------------------------- layers


def _gather_rows(x_ND: torch.Tensor, group: Any) -> torch.Tensor:
    """Concatenate every rank's rows (counts may differ) in group-rank order."""
    counts = parallel.all_gather(torch.tensor([x_ND.shape[0]]), group)
    most = int(max(int(c) for c in counts))
    padded = torch.cat([x_ND, x_ND.new_zeros(most - x_ND.shape[0], *x_ND.shape[1:])])
    parts = parallel.all_gather(padded, group)
    return torch.cat([p[:int(c)] for p, c in zip(parts, counts)])


@torch.no_grad()
def dense_expert_outputs(layer: nn.Module, tokens_ND: torch.Tensor) -> torch.Tensor:
    """(E, N_all, D) outputs of every expert of an ``MPOEMoE`` layer on the same tokens.

    ``tokens_ND`` are the layer's inputs (the normalised hidden states the
    router sees). With expert parallelism (``layer.ep_group`` not None) every
    rank of the group must call this: the tokens of all ranks are gathered
    (N_all = their total), each rank runs its local experts on all of them,
    and the outputs are gathered, global expert ids in order
    (g = ep_rank * L + l). No routing, no capacity, no OMoE recording.
    """
    experts = layer.deepspeed_moe.experts
    group = layer.ep_group
    tokens_ND = tokens_ND.reshape(-1, tokens_ND.shape[-1])
    if parallel.group_size(group) > 1:
        tokens_ND = _gather_rows(tokens_ND, group)
    x_LND = tokens_ND.unsqueeze(0).expand(experts.num_local_experts, -1, -1)
    y_LND = experts(x_LND, layer.central_tensors(), None).float()
    if parallel.group_size(group) == 1:
        return y_LND
    return torch.cat(parallel.all_gather(y_LND, group))


def layer_expert_similarity(layer: nn.Module, tokens_ND: torch.Tensor) -> ExpertSimilarity:
    """:func:`expert_similarity` of an MoE layer's experts on ``tokens_ND`` (see :func:`dense_expert_outputs`)."""
    return expert_similarity(dense_expert_outputs(layer, tokens_ND))


def model_expert_similarity(model: nn.Module, run_forward: Callable[[], Any],
                            max_tokens: Optional[int] = 1024) -> dict[str, ExpertSimilarity]:
    """Per MoE layer of ``model``: the similarity of its experts on the tokens it receives.

    ``run_forward()`` runs one forward of the model (e.g. ``lambda: model(batch)``);
    each ``MPOEMoE`` layer's input is captured and, after the forward, every
    layer's experts are run densely on (the first ``max_tokens`` of) it. Runs
    under no_grad; call on every rank of the expert-parallel group.
    """
    from mpomoe_ds.moe.layer import moe_layers

    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name, layer in moe_layers(model):
        def capture(module: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0].detach()
            captured[name] = x.reshape(-1, x.shape[-1])
        handles.append(layer.register_forward_pre_hook(capture))
    try:
        with torch.no_grad():
            run_forward()
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, layer in moe_layers(model):
        if name not in captured:  # a layer this forward did not reach
            continue
        tokens = captured[name]
        if max_tokens is not None:
            tokens = tokens[:max_tokens]
        out[name] = layer_expert_similarity(layer, tokens)
    return out
