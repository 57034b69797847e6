"""Merged export into transformers' own MoE classes: Llama / Mistral -> Mixtral, Qwen2 / Qwen3 -> their MoE.

The folder this writes is a plain ``save_pretrained`` folder of the target
class (``config.json`` + ``model.safetensors``): ``AutoModelForCausalLM`` and
servers that read those classes load it without mpomoe_ds. Every expert's
dense matrices are reconstructed once from its MPO cores (or taken as they are
for plain experts) and fused as the target stores them:
``experts.gate_up_proj`` (E, 2F, D) = [W_gate^T ; W_up^T], ``experts.down_proj``
(E, D, F) = W_down^T; the router weight becomes ``mlp.gate.weight`` (E, D).

Router semantics, checked against transformers 5.x (``MixtralTopKRouter``,
``Qwen3MoeTopKRouter``): fp32 softmax over all E experts, top-k, then
Mixtral always renormalises the top-k probabilities; Qwen3-MoE does when
``norm_topk_prob``. Ours (:class:`mpomoe_ds.moe.router.TopKRouter`, eval mode)
is the same softmax and top-k; the combine weights of ``gate_weighting``
"straight_through" / "normalized" equal the renormalised top-k
probabilities, "softmax" the raw ones. So the export is exact when:

    target      gate_weighting                   layers           experts
    Mixtral     straight_through or normalized   all              dropless, zero biases
    Qwen2/3-MoE any (norm_topk_prob follows it)  any (the others  dropless, zero biases
                                                 go to mlp_only_layers)

Qwen2-MoE always adds a sigmoid-gated shared expert: it is written with
width 0 (``shared_expert_intermediate_size: 0``), so it adds exactly zero.

Anything else is refused with the reason (no approximate export). Capacity
limits are refused because the targets never drop tokens; expert biases must
be zero (``moe.expert_bias: false``, which conversion sets for these families)
because the targets' experts have none.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Union

import torch
from torch import nn

from mpomoe_ds.models.convert import ConversionSpec
from mpomoe_ds.models.wrappers import moe_wrappers

# source config.model_type -> (transformers config class, model class)
NATIVE_TARGETS = {"llama": ("MixtralConfig", "MixtralForCausalLM"),
                  "mistral": ("MixtralConfig", "MixtralForCausalLM"),
                  "qwen2": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
                  "qwen3": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM")}


def has_native_target(model: nn.Module) -> bool:
    """Whether :func:`save_native_moe` can write ``model`` (a converted *ForCausalLM of a mapped family)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return model_type in NATIVE_TARGETS and type(model).__name__.endswith("ForCausalLM")


def save_native_moe(model: nn.Module, out_dir: Union[str, Path]) -> Path:
    """Write a converted Llama / Mistral / Qwen3 causal LM as a transformers Mixtral / Qwen3-MoE folder.

    Raises:
        ValueError: no native target for this model, or its MoE layers use
            settings the target cannot compute exactly (the message says which
            and the fix).
    """
    import transformers

    if not has_native_target(model):
        raise ValueError(f"{type(model).__name__} ({getattr(model.config, 'model_type', None)}) has no native "
                         f"transformers MoE target; native export covers *ForCausalLM of {sorted(NATIVE_TARGETS)}. "
                         f"Use mode 'mpo' and mpomoe_ds.models.export.load_converted")
    spec = ConversionSpec.of(model)
    config_name, model_name = NATIVE_TARGETS[model.config.model_type]
    _check_exact(model, spec, model_name)
    config = getattr(transformers, config_name)(**_target_config(model.config, spec, config_name))
    target = getattr(transformers, model_name)(config)
    target.load_state_dict(_with_empty_shared_experts(_target_state(model), target), strict=True)
    out = Path(out_dir)
    target.save_pretrained(out)
    return out


def _check_exact(model: nn.Module, spec: ConversionSpec, target: str) -> None:
    moe, blocks = spec.moe, spec.blocks
    problems = []
    if not moe.dropless:
        problems.append("moe.dropless is false (capacity drops tokens; the target never does): train dropless")
    if target.startswith("Mixtral") and moe.gate_weighting == "softmax":
        problems.append("moe.gate_weighting 'softmax' uses raw top-k probabilities, Mixtral renormalises them: "
                        "use 'straight_through' or 'normalized'")
    if target.startswith("Mixtral") and len(blocks) != model.config.num_hidden_layers:
        problems.append(f"MoE in blocks {list(blocks)} only; Mixtral has MoE in every block: convert with "
                        f"moe.layers: all")
    if getattr(model.config, "attention_bias", False) and target.startswith("Mixtral"):
        problems.append("config.attention_bias is true; Mixtral's attention has no biases")
    for _, wrapper in moe_wrappers(model):
        layer = wrapper.moe
        if layer.ep_size != 1:
            problems.append(f"{wrapper.block_name} holds {layer.num_local_experts} of {layer.num_experts} experts; "
                            f"export from one process (export_deepspeed_checkpoint gathers them)")
        biases = [p for n, p in layer.experts.named_parameters() if n.endswith("bias")]
        if any(bool(b.detach().any()) for b in biases):
            problems.append(f"{wrapper.block_name}: expert biases are nonzero; the target's experts have none "
                            f"(train with moe.expert_bias: false)")
    if problems:
        raise ValueError(f"cannot export {type(model).__name__} exactly as {target}: " + "; ".join(problems))


def _target_config(source: Any, spec: ConversionSpec, config_name: str) -> dict[str, Any]:
    """The target config: the source's shared fields plus the MoE ones."""
    import transformers

    accepted = set(inspect.signature(getattr(transformers, config_name).__init__).parameters)
    fields = {k: v for k, v in copy.deepcopy(source.to_dict()).items()
              if k in accepted and k not in ("architectures", "transformers_version")}
    fields["head_dim"] = getattr(source, "head_dim", None) or source.hidden_size // source.num_attention_heads
    moe, ffn = spec.moe, source.intermediate_size
    if config_name == "MixtralConfig":
        return {**fields, "num_local_experts": moe.num_experts, "num_experts_per_tok": moe.k,
                "intermediate_size": ffn, "router_jitter_noise": 0.0,
                "sliding_window": getattr(source, "sliding_window", None)}
    if config_name == "Qwen2MoeConfig":  # Qwen2's attention has q/k/v biases; no shared expert (size 0)
        fields.update(qkv_bias=True, shared_expert_intermediate_size=0)
    return {**fields, "num_experts": moe.num_experts, "num_experts_per_tok": moe.k, "moe_intermediate_size": ffn,
            "intermediate_size": ffn, "decoder_sparse_step": 1, "norm_topk_prob": moe.gate_weighting != "softmax",
            "mlp_only_layers": [i for i in range(source.num_hidden_layers) if i not in spec.blocks]}


def _with_empty_shared_experts(state: dict[str, torch.Tensor], target: nn.Module) -> dict[str, torch.Tensor]:
    """Qwen2-MoE always adds a gated shared expert; ours has none, so it gets width 0 (output exactly 0)."""
    for key, value in target.state_dict().items():
        if key not in state and ".shared_expert" in key:
            state[key] = torch.zeros_like(value)
    return state


def _target_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with each MoE wrapper's tensors in the target's fused layout."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    for path, wrapper in moe_wrappers(model):
        for key in [k for k in state if k.startswith(f"{path}.")]:
            del state[key]
        with torch.no_grad():
            weights = wrapper.moe.expert_weights()  # x @ W orientation: gate/up (E, D, F), down (E, F, D)
        state[f"{path}.gate.weight"] = wrapper.moe.deepspeed_moe.gate.wg.weight.detach()
        state[f"{path}.experts.gate_up_proj"] = torch.cat([weights["gate"], weights["up"]], dim=2).transpose(1, 2)
        state[f"{path}.experts.down_proj"] = weights["down"].transpose(1, 2)
    return {k: v.contiguous() for k, v in state.items()}
