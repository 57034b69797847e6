"""Model FLOPs per token and the model FLOPs utilisation (MFU) estimate the trainer logs.

The count is the usual dense-transformer estimate (Kaplan et al.; PaLM's MFU
appendix), adapted to MoE: a training token costs

    6 * N_active  +  6 * n_layer * L * d          (forward + backward)

where N_active is every parameter a token passes through except the input
embeddings (a lookup; a vocabulary projection tied to them is counted):
dense parameters, and in each MoE layer the router plus ``k``
experts' *dense* matrices (an MPO expert computes with its reconstructed
weight, so it costs what a dense expert costs), and the second term is
attention's score and value products (n_layer blocks, sequence length L,
width d). MPO reconstruction is not model FLOPs (it is overhead the method
adds, once per step); it is not counted, so the MFU of MPOE and of plain
experts is comparable.

MFU = tokens/s * FLOPs per token / (peak FLOP/s per rank * ranks), with the
peak given in ``train.peak_tflops`` (hardware-specific, so never guessed).
"""

from __future__ import annotations

from torch import nn

from mpomoe_ds.moe.layer import moe_layers
from mpomoe_ds.moe.params import parameter_kind


def _embedding_params(model: nn.Module) -> int:
    """Token/position embedding parameters, less a vocabulary projection tied to one (that one is computed)."""
    embeddings = {id(p): p.numel() for m in model.modules() if isinstance(m, nn.Embedding)
                  for p in m.parameters(recurse=False)}
    for module in model.modules():
        output = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
        if output is not None and id(output.weight) in embeddings:
            embeddings.pop(id(output.weight))  # a tied LM head: the logits matmul costs 2 V d per token
    return sum(embeddings.values())


def active_params_per_token(model: nn.Module) -> int:
    """Non-embedding parameters one token passes through (MoE layers: router + k dense-equivalent experts)."""
    dense = sum(p.numel() for p in model.parameters() if parameter_kind(p) == "dense")
    total = dense - _embedding_params(model)
    for _, layer in moe_layers(model):
        matrices = 3 if layer.config.gated else 2  # gated FFNs have gate, up and down
        biases = (matrices - 1) * layer.ffn_size + layer.hidden_size  # (gate,) up: F each; down: D
        total += layer.config.k * (matrices * layer.hidden_size * layer.ffn_size + biases)
    return total


def training_flops_per_token(model: nn.Module, num_layers: int, seq_len: int, hidden_size: int) -> float:
    """``6 * N_active + 6 * n_layer * L * d`` (see the module docstring)."""
    return 6.0 * active_params_per_token(model) + 6.0 * num_layers * seq_len * hidden_size


def mfu(tokens_per_s: float, flops_per_token: float, peak_tflops_per_rank: float, ranks: int) -> float:
    """Achieved model FLOP/s over the peak of ``ranks`` devices."""
    return tokens_per_s * flops_per_token / (peak_tflops_per_rank * 1e12 * ranks)
