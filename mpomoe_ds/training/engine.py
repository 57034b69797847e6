"""DeepSpeed engine setup for models with MPOE layers.

Owns: validating a ds_config against the model before DeepSpeed sees it (with
errors that name the fix), and ``deepspeed.initialize`` with the MoE-aware
parameter groups from :mod:`mpomoe_ds.moe.params`, and MoE-correct gradient clipping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from mpomoe_ds import parallel
from mpomoe_ds.moe.layer import moe_layers
from mpomoe_ds.moe.params import optimizer_param_groups
from mpomoe_ds.training.config import OptimConfig


class DeepSpeedConfigError(ValueError):
    """The ds_config cannot work with this model; the message names the fix."""


def load_ds_config(config: Union[str, Path, dict]) -> dict[str, Any]:
    if isinstance(config, dict):
        return dict(config)
    path = Path(config)
    if not path.is_file():
        raise DeepSpeedConfigError(f"DeepSpeed config {path} does not exist; see ds_configs/ for ready ones")
    return json.loads(path.read_text())


def check_zero_for_moe(ds_config: dict[str, Any]) -> None:
    """ZeRO settings DeepSpeed's native MoE cannot run (needs no model: called before anything is built)."""
    zero = ds_config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage == 3:
        raise DeepSpeedConfigError(
            "ZeRO stage 3 is not supported with MoE layers: DeepSpeed's engine refuses native MoE under "
            "ZeRO-3 (expert parameters cannot be partitioned that way). Use zero_optimization.stage 1 or 2 "
            "(e.g. ds_configs/zero2_bf16.json): stage 1/2 partition the optimizer state of both the dense "
            "and the expert parameters.")
    offload = zero.get("offload_optimizer") or {}
    if stage == 2 and offload.get("device", "none") not in (None, "none"):
        raise DeepSpeedConfigError(
            "ZeRO-2 optimizer offload with MoE layers crashes in DeepSpeed 0.19 (DeepSpeedCPUAdam with expert "
            "parameter groups); remove zero_optimization.offload_optimizer or use stage 1")


def validate_ds_config(ds_config: dict[str, Any], model: nn.Module) -> None:
    """Refuse settings DeepSpeed's native MoE or this machine cannot run, before the engine does."""
    _check_precision_supported(ds_config)
    layers = list(moe_layers(model))
    if not layers:
        return
    check_zero_for_moe(ds_config)
    for name, layer in layers:
        parallel.check_ep_size(layer.ep_size, layer.num_experts)


def _check_precision_supported(ds_config: dict[str, Any]) -> None:
    """fp16 where the accelerator has no fp16 (DeepSpeed's CPU accelerator) fails here, naming the fix."""
    if not (ds_config.get("fp16") or {}).get("enabled", False):
        return
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if torch.float16 not in accelerator.supported_dtypes():
        raise DeepSpeedConfigError(
            f"fp16.enabled is true but DeepSpeed's {accelerator.device_name()} accelerator supports only "
            f"{[str(d).replace('torch.', '') for d in accelerator.supported_dtypes()]}: set fp16.enabled false and "
            f"bf16.enabled true (e.g. ds_configs/zero2_bf16.json), or run the fp16 config on a GPU")


def initialize(model: nn.Module, ds_config: Union[str, Path, dict], *, optim: Optional[OptimConfig] = None,
               optimizer: Optional[torch.optim.Optimizer] = None, lr_scheduler: Any = None) -> Any:
    """``deepspeed.initialize`` with validation and MoE parameter groups; returns the engine.

    With ``optim.central_lr_mult`` / ``optim.aux_lr_mult`` not 1 the groups
    carry their own lr (:func:`optimizer_param_groups`), the base being the
    ds_config optimizer's lr if it has one, else ``optim.lr``. The optimizer is ``optimizer`` if given (build it over
    :func:`optimizer_param_groups`), else the ds_config's "optimizer" block,
    else torch's AdamW built from ``optim`` (default :class:`OptimConfig`: lr,
    betas, eps, weight decay, no decay on biases and norms). ``lr_scheduler``
    is passed to DeepSpeed as is.
    """
    import deepspeed

    config = load_ds_config(ds_config)
    validate_ds_config(config, model)
    optim = optim or OptimConfig()
    check_lr_mults(config, optim)
    groups = optimizer_param_groups(model, optim.weight_decay, lr=_base_lr(config, optim), lr_mults=optim.lr_mults)
    if optimizer is None and "optimizer" not in config:
        optimizer = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                                      weight_decay=optim.weight_decay)
    engine, _, _, _ = deepspeed.initialize(model=model,
                                           model_parameters=groups if optimizer is None else None,
                                           optimizer=optimizer,
                                           lr_scheduler=lr_scheduler,
                                           config=config)
    return engine


def check_lr_mults(ds_config: dict[str, Any], optim: OptimConfig) -> None:
    """Refuse a ds_config scheduler with lr multipliers: DeepSpeed's schedulers set every group's lr alike."""
    if "scheduler" in ds_config and (optim.central_lr_mult, optim.aux_lr_mult) != (1.0, 1.0):
        raise DeepSpeedConfigError(
            f"optim.central_lr_mult={optim.central_lr_mult} / optim.aux_lr_mult={optim.aux_lr_mult} need per-group "
            f"learning rates, but the ds_config's \"scheduler\" block ({ds_config['scheduler'].get('type')}) sets "
            f"every parameter group to the same lr; remove the scheduler block (the run then uses optim.schedule, "
            f"which scales each group's lr) or set both multipliers to 1")


def _base_lr(ds_config: dict[str, Any], optim: OptimConfig) -> float:
    """The lr the multipliers scale: the ds_config optimizer's, else ``optim.lr``."""
    params = (ds_config.get("optimizer") or {}).get("params") or {}
    return float(params.get("lr", optim.lr))


def global_grad_norm(model: nn.Module, ep_group: Optional[parallel.ProcessGroup]) -> torch.Tensor:
    """The true L2 norm of all gradients, as one process holding every expert would compute it.

    Assumes dense gradients are already averaged over data parallelism (they
    are identical on every rank) and expert parameters' gradients (experts and
    sharded central tensors) over the expert-data-parallel group. Each such
    parameter then lives on exactly one rank of the expert-parallel group, so
    its squared norm is summed over that group once. DeepSpeed 0.19's fp32
    ZeRO-0 clip instead averages per-rank norms.

    The squares stay on the gradients' device (no host sync per parameter) and
    the expert part crosses the group in one all-reduce; returns a float64
    scalar on that device.
    """
    from deepspeed.moe.utils import is_moe_param

    grads = [p for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    dense_sq = _sum_of_squares([p.grad for p in grads if not is_moe_param(p)], grads[0].grad.device)
    expert_sq = _sum_of_squares([p.grad for p in grads if is_moe_param(p)], grads[0].grad.device)
    if ep_group is not None:
        expert_sq = parallel.all_reduce(expert_sq, ep_group)
    return (dense_sq + expert_sq).sqrt()


def _sum_of_squares(grads: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """sum_p ||g_p||^2 in float64, computed where the gradients are."""
    if not grads:
        return torch.zeros((), dtype=torch.float64, device=device)
    return torch.stack([g.detach().double().pow(2).sum().to(device) for g in grads]).sum()


def clip_grad_norm_(model: nn.Module, max_norm: float, ep_group: Optional[parallel.ProcessGroup]) -> float:
    """Scale gradients in place so their global norm is at most ``max_norm``; returns the norm before."""
    norm = float(global_grad_norm(model, ep_group))
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.detach().mul_(coef)
    return norm
