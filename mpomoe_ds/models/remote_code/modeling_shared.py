"""Shared part of the ``modeling_mpomoe.py`` shipped in remote-code exports (``trust_remote_code=True``).

:func:`mpomoe_ds.models.remote_export.save_remote_code` writes this file's text followed by a
small generated per-family part (the config and model classes, and where the FFN sits) into
the export folder as ``modeling_mpomoe.py``. It imports only torch and transformers, so a machine
without mpomoe_ds loads the folder with
``transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)`` (or the head's Auto class).

The MoE layer computes what mpomoe_ds's layer computes in eval mode, dropless:
probs = softmax(x wg^T) in fp32, top-k experts, combine weights the top-k probabilities
renormalised ("straight_through" / "normalized") or raw ("softmax"); each expert
y = act(x W_up + b_up) W_down + b_down (gated: act(x W_gate + b_gate) * (x W_up + b_up)),
weights in x @ W orientation, stored under the same state-dict keys as mpomoe_ds's merged export.

``config.mpomoe`` (written by the export): family, blocks (dotted module paths of the converted
blocks), num_experts, k, gate_weighting, activation, gated, hidden, ffn.

Legend: T tokens, D hidden, E experts, K chosen experts per token.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


class MPOEConfigMixin:
    """Adds ``mpomoe`` (see the module docstring) to a family's config class."""

    def __init__(self, mpomoe: Optional[dict] = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.mpomoe = mpomoe or {}


class Expert(nn.Module):
    def __init__(self, hidden: int, ffn: int, gated: bool) -> None:
        super().__init__()
        for m in (("gate", "up", "down") if gated else ("up", "down")):
            rows, cols = (ffn, hidden) if m == "down" else (hidden, ffn)
            setattr(self, f"{m}_weight", nn.Parameter(torch.zeros(rows, cols)))
            setattr(self, f"{m}_bias", nn.Parameter(torch.zeros(cols)))


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.wg = nn.Linear(hidden, num_experts, bias=False)


class Experts(nn.Module):
    def __init__(self, hidden: int, ffn: int, num_experts: int, gated: bool) -> None:
        super().__init__()
        self.deepspeed_experts = nn.ModuleList(Expert(hidden, ffn, gated) for _ in range(num_experts))


class MoEBlock(nn.Module):
    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.gate = Router(spec["hidden"], spec["num_experts"])
        self.experts = Experts(spec["hidden"], spec["ffn"], spec["num_experts"], spec["gated"])


class MoE(nn.Module):
    """Top-k routing over dense experts, no capacity limit."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.spec = spec
        self.deepspeed_moe = MoEBlock(spec)

    def expert(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        ex = self.deepspeed_moe.experts.deepspeed_experts[e]
        act = ACTIVATIONS[self.spec["activation"]]
        h = x_TD @ ex.up_weight + ex.up_bias
        h = act(x_TD @ ex.gate_weight + ex.gate_bias) * h if self.spec["gated"] else act(h)
        return h @ ex.down_weight + ex.down_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        probs_TE = torch.softmax(F.linear(x_TD.float(), self.deepspeed_moe.gate.wg.weight.float()), dim=-1)
        top_TK, experts_TK = probs_TE.topk(self.spec["k"], dim=-1)
        if self.spec["gate_weighting"] != "softmax":
            top_TK = top_TK / top_TK.sum(-1, keepdim=True)
        y_TD = torch.zeros_like(x_TD)
        for e in range(self.spec["num_experts"]):
            token_T, slot_T = torch.nonzero(experts_TK == e, as_tuple=True)
            if len(token_T):
                out = self.expert(e, x_TD[token_T]) * top_TK[token_T, slot_T, None].to(x_TD.dtype)
                y_TD.index_add_(0, token_T, out)
        return y_TD.reshape(x.shape)


class MoEMLP(nn.Module):
    """Takes a whole FFN module's place (GPT-2 ``mlp``, DistilBERT ``ffn``, T5 ``DenseReluDense``):
    MoE, then the FFN's own output dropout where the family keeps it."""

    def __init__(self, moe: MoE, dropout: Optional[nn.Module]) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout if dropout is not None else nn.Identity()

    @classmethod
    def replacing(cls, ffn: nn.Module, moe: MoE, keep_dropout: bool) -> "MoEMLP":
        return cls(moe, getattr(ffn, "dropout", None) if keep_dropout else None)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.moe(hidden_states))


class BertMoEOutput(nn.Module):
    """Takes a BERT layer's ``output``: LayerNorm(dropout(MoE(h)) + input); ``intermediate`` becomes identity."""

    def __init__(self, moe: MoE, dropout: nn.Module, layer_norm: nn.Module) -> None:
        super().__init__()
        self.moe = moe
        self.dropout = dropout
        self.LayerNorm = layer_norm

    @classmethod
    def replacing(cls, output: nn.Module, moe: MoE, keep_dropout: bool) -> "BertMoEOutput":
        return cls(moe, output.dropout, output.LayerNorm)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.moe(hidden_states)) + input_tensor)


class MPOEModelMixin:
    """Puts the MoE layers into a family's model class after it is built.

    The generated per-family class sets where the FFN sits: ``moe_ffn`` (the block attribute
    the wrapper replaces), ``moe_wrapper`` (:class:`MoEMLP` or :class:`BertMoEOutput`),
    ``moe_keep_dropout`` and ``moe_identities`` (block attributes that become identities).
    """

    moe_ffn: str
    moe_wrapper: type
    moe_keep_dropout: bool = False
    moe_identities: tuple[str, ...] = ()

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        for block_name in config.mpomoe["blocks"]:
            block = self.get_submodule(block_name)
            wrapper = self.moe_wrapper.replacing(getattr(block, self.moe_ffn), MoE(config.mpomoe),
                                                 self.moe_keep_dropout)
            setattr(block, self.moe_ffn, wrapper)
            for name in self.moe_identities:
                setattr(block, name, nn.Identity())
        self.post_init()
