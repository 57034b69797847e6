"""Merged expert weights: each MPO layer's cores rebuilt into per-expert dense matrices, and writing them.

Shared by the export formats that store dense experts (:mod:`mpomoe_ds.models.export`'s
``merged`` mode and :mod:`mpomoe_ds.models.remote_export`): the keys are those of
:class:`mpomoe_ds.moe.experts.FFNExpert`, so a model converted with plain experts
loads them as they are.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mpomoe_ds.moe.layer import moe_layers

EXPERTS_PREFIX = "deepspeed_moe.experts.deepspeed_experts"


def merge_expert_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each MPO layer's cores replaced by per-expert dense matrices.

    Drops ``<layer>.central.*`` and every expert's ``*_aux.*`` cores, adds
    ``<layer>.deepspeed_moe.experts.deepspeed_experts.<e>.{gate,up,down}_weight``
    (the names of :class:`mpomoe_ds.moe.experts.FFNExpert`). Layers that already
    have plain experts are left as they are.
    """
    state = dict(state)
    for name, layer in moe_layers(model):
        if not layer.central:
            continue
        with torch.no_grad():
            weights = layer.expert_weights()
        for key in [k for k in state if k.startswith(f"{name}.central.")]:
            del state[key]
        for e, expert in enumerate(layer.experts.deepspeed_experts):
            prefix = f"{name}.{EXPERTS_PREFIX}.{e}"
            for pname in dict(expert.named_parameters()):
                if "_aux." in pname:
                    del state[f"{prefix}.{pname}"]
            for m, weight_LIO in weights.items():
                state[f"{prefix}.{m}_weight"] = weight_LIO[e]
    return state


def save_tensors(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write ``state`` as a safetensors file (CPU copies)."""
    from safetensors.torch import save_file

    # safetensors refuses tensors that share storage (tied embeddings, views): save copies.
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path),
              metadata={"format": "pt"})
