"""Parameter ownership: dense vs central vs expert, optimizer groups, parameter report.

One function classifies every parameter (:func:`parameter_kind`); everything
else (optimizer groups, the report, the gradient-mask and logging code) asks it.

    dense    replicated on every rank, all-reduced over data parallelism
             (attention, embeddings, norms, router)
    central  an MPO central tensor shared by the experts of one layer: also
             dense and replicated, but tagged so it can be reported and masked
    expert   a DeepSpeed expert parameter (``allreduce=False``): one expert's
             auxiliary cores / weights and biases, living on one rank of the
             expert-parallel group, reduced over the expert-data-parallel group
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable, Mapping, Optional

import torch
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

NO_DECAY_SUFFIXES = ("bias", "LayerNorm.weight", "layernorm.weight", "norm.weight", "ln_1.weight", "ln_2.weight",
                     "ln_f.weight")


def parameter_kind(param: torch.nn.Parameter) -> str:
    if getattr(param, "mpo_central", False):
        return "central"
    return "expert" if is_moe_param(param) else "dense"


def classify_parameters(model: nn.Module) -> dict[str, str]:
    """{parameter name: "dense" | "central" | "expert"} for every parameter."""
    return {name: parameter_kind(p) for name, p in model.named_parameters()}


KINDS = ("dense", "central", "expert")


def optimizer_param_groups(model: nn.Module, weight_decay: float = 0.0,
                           no_decay_suffixes: Iterable[str] = NO_DECAY_SUFFIXES, *, lr: Optional[float] = None,
                           lr_mults: Optional[Mapping[str, float]] = None) -> list[dict]:
    """Trainable parameters in the groups DeepSpeed MoE needs.

    Decay / no-decay first; with ``lr_mults`` ({kind: multiplier}, see
    :func:`parameter_kind`) not all 1, each of those is split further by kind
    and every group gets ``lr = lr * lr_mults[kind]`` (group names
    ``decay_central``, ``no_decay_expert``, ...; dense keeps ``decay`` /
    ``no_decay``). Then DeepSpeed's own splitter separates expert parameters
    into groups marked ``moe=True`` per expert-parallel group name, copying
    the other keys (lr included), and ZeRO 1/2 reduce and partition those
    over the expert-data-parallel group. All multipliers 1 (the default)
    gives exactly the two groups of a run without multipliers.
    """
    suffixes = tuple(no_decay_suffixes)
    scaled = lr_mults is not None and any(float(lr_mults.get(k, 1.0)) != 1.0 for k in KINDS)
    if scaled and lr is None:
        raise ValueError("lr_mults need the base lr to scale: pass lr=")
    buckets: dict[tuple[str, str], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = "no_decay" if name.endswith(suffixes) or p.dim() == 1 else "decay"
        buckets.setdefault((decay, parameter_kind(p) if scaled else "dense"), []).append(p)
    groups = []
    for decay in ("decay", "no_decay"):
        for kind in KINDS:
            params = buckets.get((decay, kind))
            if not params:
                continue
            group = {"name": decay if kind == "dense" else f"{decay}_{kind}", "params": params,
                     "weight_decay": weight_decay if decay == "decay" else 0.0}
            if scaled:
                group["lr"] = lr * float(lr_mults.get(kind, 1.0))
            groups.append(group)
    groups = split_params_into_different_moe_groups_for_optimizer(groups)
    # The splitter leaves an all-expert group empty; with kind groups that is every *_expert one.
    return [g for g in groups if g["params"]] if scaled else groups


@dataclass
class ParameterReport:
    """Parameter counts; ``*_local`` are what this rank holds."""

    total_local: int
    dense_local: int  # dense, central excluded
    central_local: int  # sharded central tensors (moe.shard_central): this rank's slices
    central_global: int  # every central tensor at full size
    expert_local: int
    expert_global: int  # every expert of every rank (expert_local * ep_size per layer)
    trainable_local: int

    @property
    def expert_side_global(self) -> int:
        """Parameters that exist because of the experts: central + all experts."""
        return self.central_global + self.expert_global

    @property
    def expert_side_local(self) -> int:
        return self.central_local + self.expert_local

    def as_dict(self) -> dict[str, int]:
        out = asdict(self)
        out.update(expert_side_global=self.expert_side_global, expert_side_local=self.expert_side_local)
        return out


def parameter_report(model: nn.Module) -> ParameterReport:
    from mpomoe_ds.moe.layer import moe_layers

    counts = {"dense": 0, "central": 0, "expert": 0}
    trainable = 0
    for p in model.parameters():
        counts[parameter_kind(p)] += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    expert_global = central_global = 0
    for _, layer in moe_layers(model):
        local = sum(p.numel() for p in layer.deepspeed_moe.experts.parameters())
        expert_global += local * layer.ep_size
        central_global += sum(shape.numel() for shape in layer.central.full_shapes.values())
    return ParameterReport(total_local=sum(counts.values()),
                           dense_local=counts["dense"],
                           central_local=counts["central"],
                           central_global=central_global,
                           expert_local=counts["expert"],
                           expert_global=expert_global,
                           trainable_local=trainable)


# --------------------------------------------------------------------------- budget from shapes alone


@dataclass(frozen=True)
class ExpertBudget:
    """Expert-side parameters of one MoE layer, counted from shapes (nothing allocated).

    ``mpo`` = sum over matrix positions of |central| + E * (|aux| + |bias|);
    ``plain`` = E * sum over positions of (|W| + |bias|), the standard-MoE
    baseline with the same widths. The router (D * E) is the same for both and
    left out.
    """

    hidden_size: int
    ffn_size: int
    num_experts: int
    gated: bool
    central: int
    auxiliary_per_expert: int
    bias_per_expert: int
    plain_per_expert: int

    @property
    def mpo(self) -> int:
        return self.central + self.num_experts * (self.auxiliary_per_expert + self.bias_per_expert)

    @property
    def plain(self) -> int:
        return self.num_experts * self.plain_per_expert

    @property
    def ratio(self) -> float:
        """How many times fewer parameters the MPO experts hold than plain experts."""
        return self.plain / self.mpo

    def as_dict(self) -> dict:
        return {**asdict(self), "mpo": self.mpo, "plain": self.plain, "ratio": self.ratio}


def expert_budget(hidden_size: int, ffn_size: int, num_experts: int, gated: bool = False,
                  num_cores: int = 5, max_bond: Optional[int] = None) -> ExpertBudget:
    """:class:`ExpertBudget` of a layer of E experts of width D -> F (gated: gate, up, down).

    Uses the same automatic factors and bond dims as conversion
    (:func:`mpomoe_ds.mpo.factorize`, :func:`mpomoe_ds.mpo.full_bond_dims`,
    bonds capped at ``max_bond``; None = lossless), so a Llama-7B layer
    (4096 / 11008) is costed without allocating its 135M-parameter matrices.
    """
    from mpomoe_ds.moe.config import ffn_matrices
    from mpomoe_ds.mpo import factorize, full_bond_dims

    shapes = {m: (ffn_size, hidden_size) if m == "down" else (hidden_size, ffn_size) for m in ffn_matrices(gated)}
    central = aux = 0
    for rows, cols in shapes.values():
        in_f, out_f = factorize(rows, num_cores), factorize(cols, num_cores)
        bonds = [min(b, max_bond) if max_bond else b for b in full_bond_dims(in_f, out_f)]
        sizes = [bonds[k] * in_f[k] * out_f[k] * bonds[k + 1] for k in range(num_cores)]
        central += sizes[num_cores // 2]
        aux += sum(sizes) - sizes[num_cores // 2]
    bias = sum(cols for _, cols in shapes.values())
    plain = sum(rows * cols for rows, cols in shapes.values()) + bias
    return ExpertBudget(hidden_size, ffn_size, num_experts, gated, central, aux, bias, plain)
