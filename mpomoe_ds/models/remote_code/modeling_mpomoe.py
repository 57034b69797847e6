"""Remote-code modeling file shipped inside merged BERT-family exports (``trust_remote_code=True``).

Copied verbatim into an export folder by :func:`mpomoe_ds.models.remote_export.save_remote_code`;
it imports only torch and transformers, so a machine without mpomoe_ds loads the folder with
``transformers.AutoModel.from_pretrained(folder, trust_remote_code=True)``.

The MoE layer computes what mpomoe_ds's layer computes in eval mode, dropless:
probs = softmax(x wg^T) in fp32, top-k experts, combine weights the top-k probabilities
renormalised ("straight_through" / "normalized") or raw ("softmax"); each expert
y = act(x W_up + b_up) W_down + b_down (gated: act(x W_gate + b_gate) * (x W_up + b_up)),
weights in x @ W orientation, stored under the same state-dict keys as mpomoe_ds's merged export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, BertModel

ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu, "silu": F.silu}


class MPOEBertConfig(BertConfig):
    """BertConfig plus ``mpomoe``: {blocks, num_experts, k, gate_weighting, activation, gated}."""

    model_type = "mpomoe_bert"

    def __init__(self, mpomoe: dict | None = None, **kwargs) -> None:
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
    def __init__(self, hidden: int, ffn: int, spec: dict) -> None:
        super().__init__()
        self.gate = Router(hidden, spec["num_experts"])
        self.experts = Experts(hidden, ffn, spec["num_experts"], spec["gated"])


class MoE(nn.Module):
    """Top-k routing over dense experts, no capacity limit."""

    def __init__(self, hidden: int, ffn: int, spec: dict) -> None:
        super().__init__()
        self.spec = spec
        self.deepspeed_moe = MoEBlock(hidden, ffn, spec)

    def expert(self, e: int, x_TD: torch.Tensor) -> torch.Tensor:
        ex = self.deepspeed_moe.experts.deepspeed_experts[e]
        act = ACTIVATIONS[self.spec["activation"]]
        h = x_TD @ ex.up_weight + ex.up_bias
        h = act(x_TD @ ex.gate_weight + ex.gate_bias) * h if self.spec["gated"] else act(h)
        return h @ ex.down_weight + ex.down_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        probs_TE = torch.softmax(F.linear(x_TD, self.deepspeed_moe.gate.wg.weight.float()), dim=-1)
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


class MoEOutput(nn.Module):
    """Takes a BERT layer's ``output``: LayerNorm(dropout(MoE(h)) + input); ``intermediate`` becomes identity."""

    def __init__(self, config: MPOEBertConfig, dropout: nn.Module, layer_norm: nn.Module) -> None:
        super().__init__()
        self.moe = MoE(config.hidden_size, config.intermediate_size, config.mpomoe)
        self.dropout = dropout
        self.LayerNorm = layer_norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.moe(hidden_states)) + input_tensor)


class MPOEBertModel(BertModel):
    """BertModel whose blocks ``config.mpomoe["blocks"]`` hold the exported MoE layers."""

    config_class = MPOEBertConfig

    def __init__(self, config: MPOEBertConfig, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        for index in config.mpomoe["blocks"]:
            layer = self.encoder.layer[index]
            layer.output = MoEOutput(config, layer.output.dropout, layer.output.LayerNorm)
            layer.intermediate = nn.Identity()
        self.post_init()
