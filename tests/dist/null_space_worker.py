"""2-rank worker: the Trainer with ``omoe.projection="null_space"`` (ep 2), measured from the outside.

Launched by tests/omoe/test_null_space.py under torchrun with a run config and a
DeepSpeed config (ZeRO 0 or 2). Per orthogonal step it measures, on this rank's
local experts, the applied change of each reconstructed W_up against the
protected basis OMoE uses, and whether the central tensor stayed put. At the
end it compares every projected parameter with the optimizer's fp32 master
copy (``safe_get_full_fp32_param``, collective under ZeRO): they must agree,
or the next step would undo the correction. Under bf16 the applied change is
also measured on W_up reconstructed from those fp32 master copies (what the
optimizer steps; the bf16 parameters are its rounding).
"""

from __future__ import annotations

import json

import torch
from deepspeed.utils import safe_get_full_fp32_param
from trainer_cli import trainer_from_args

from mpomoe_ds import parallel
from mpomoe_ds.moe.layer import moe_layers
from mpomoe_ds.mpo.reconstruction import reconstruct_shared
from mpomoe_ds.omoe.null_space import leak


def fp32(param: torch.nn.Parameter) -> torch.Tensor:
    master = safe_get_full_fp32_param(param)
    return param.detach().float() if master is None else master.view_as(param).float()


def master_up(layer) -> torch.Tensor:
    """(L, I, O) W_up of the local experts from the fp32 master copies (collective under ZeRO / bf16)."""
    cores = zip(*(e.aux_cores("up") for e in layer.experts.deepspeed_experts))
    aux = [torch.stack([fp32(c) for c in core]) for core in cores]
    return reconstruct_shared(aux, fp32(layer.central["up"]), layer.experts.central_index)


def main() -> None:
    trainer, out = trainer_from_args(resume=False)
    config = trainer.config
    trainer.engine.module.train()
    batches = iter(trainer.batches)
    layers = dict(moe_layers(trainer.model))
    leaks, master_leaks, central_moves, phases = [], [], [], []
    for step in range(config.train.max_steps):
        before = {n: (l.expert_weights()["up"].detach().clone(), l.central["up"].detach().clone())
                  for n, l in layers.items()}
        with torch.no_grad():
            master_before = {n: master_up(l) for n, l in layers.items()}
        trainer.train_step(step, batches)
        phases.append(trainer.omoe.phase)
        if trainer.omoe.phase != "orthogonal":
            continue
        for name, layer in layers.items():
            state = trainer.omoe._by_experts[id(layer.experts)]
            delta = layer.expert_weights()["up"].detach() - before[name][0]
            leaks.append(leak(delta, state.basis["up"]).max().item())
            with torch.no_grad():
                master_delta = master_up(layer) - master_before[name]
            master_leaks.append(leak(master_delta, state.basis["up"]).max().item())
            central_moves.append((layer.central["up"].detach() - before[name][1]).abs().max().item())
    master_gap = 0.0
    for layer in layers.values():
        params = [layer.central["up"]] + [c for e in layer.experts.deepspeed_experts for c in e.aux_cores("up")]
        for p in params:
            master = safe_get_full_fp32_param(p)
            if master is not None:
                master_gap = max(master_gap, (master.view_as(p) - p.detach().float()).abs().max().item())
    metrics = {"phases": phases, "leaks": leaks, "master_leaks": master_leaks,
               "dtype": str(next(iter(layers.values())).central["up"].dtype), "central_moves": central_moves, "master_gap": master_gap,
               "has_master": safe_get_full_fp32_param(next(iter(layers.values())).central["up"]) is not None,
               "stats": trainer.omoe.stats()}
    with open(f"{out}.rank{trainer.rank}.json", "w") as fh:
        json.dump(metrics, fh)


if __name__ == "__main__":
    main()
    parallel.shutdown()
