"""2-rank worker: dropless dispatch without padding vs padded dropless vs a single-process reference.

Run under ``torchrun --nproc_per_node 2`` (DS_ACCELERATOR=cpu). Each rank
trains two expert-parallel models (ep 2) through DeepSpeed engines on its half
of every global micro-batch, one with ``moe.dropless_impl: padded`` and one
with ``segments``, with gradient accumulation and per-step reconstruction (the
MoE step protocol); an identical ep_size=1 reference model (plain PyTorch)
trains in-process on both halves. Writes the differences and the rows each
rank's experts computed as JSON (``--out``); the pytest side asserts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from moe_worker import BATCH, LR, TinyMoEModel, global_batch, max_diff, reference_name

from mpomoe_ds import parallel
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.params import optimizer_param_groups
from mpomoe_ds.moe.step import MoEStep
from mpomoe_ds.training.engine import initialize


def ds_config(zero: int, grad_accum: int) -> dict:
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": zero}, "steps_per_print": 10**9}


def count_rows(model: TinyMoEModel) -> list[int]:
    """Rows entering the experts in each forward (padded slots included)."""
    rows: list[int] = []
    model.moe.deepspeed_moe.experts.register_forward_pre_hook(
        lambda module, args: rows.append(args[0].reshape(-1, args[0].shape[-1]).shape[0]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--expert-type", default="mpo", choices=("mpo", "ffn"))
    parser.add_argument("--gated", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    padded_cfg = MoEConfig(num_experts=4, ep_size=world, k=2, dropless=True, expert_init="perturb", init_noise=0.2,
                           aux_loss_coef=0.05, layers="all", expert_type=args.expert_type, gated=args.gated,
                           activation="silu" if args.gated else "gelu")
    configs = {"padded": padded_cfg, "segments": dataclasses.replace(padded_cfg, dropless_impl="segments")}
    models = {impl: TinyMoEModel(cfg, seed=0) for impl, cfg in configs.items()}
    reference = TinyMoEModel(dataclasses.replace(padded_cfg, ep_size=1), seed=0)
    num_local = models["padded"].moe.num_local_experts
    ref_params = dict(reference.named_parameters())
    rows = {impl: count_rows(m) for impl, m in models.items()}
    engines = {impl: initialize(m, ds_config(args.zero, args.grad_accum),
                                optimizer=torch.optim.SGD(optimizer_param_groups(m), lr=LR))
               for impl, m in models.items()}
    steps = {impl: MoEStep(e.module) for impl, e in engines.items()}
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    ref_step = MoEStep(reference)  # two forwards per micro-batch: rebuilds in every forward (exact too)

    result: dict = {"rank": rank, "loss_diff": {impl: [] for impl in engines},
                    "grad_diff": {impl: [] for impl in engines}, "segments_vs_padded_grad": [], "routed_rows": []}
    half = slice(rank * BATCH, (rank + 1) * BATCH)
    for step in range(args.steps):
        for s in (*steps.values(), ref_step):
            s.begin_step(step)
        for micro in range(args.grad_accum):
            x, y = global_batch(step * args.grad_accum + micro)
            is_last = micro == args.grad_accum - 1
            ref_loss = 0.5 * (reference(x[:BATCH], y[:BATCH]) + reference(x[BATCH:], y[BATCH:]))
            (ref_loss / args.grad_accum).backward()
            grads = {}
            for impl, engine in engines.items():
                steps[impl].begin_micro_batch(micro, is_last)
                loss = engine(x[half], y[half])
                engine.backward(loss)
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                result["loss_diff"][impl].append(abs(float(mean_loss) / world - float(ref_loss)))
                if is_last:  # the step's accumulated, reduced gradients
                    grads[impl] = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters()
                                   if p.requires_grad}
                engine.step()
            # this rank's experts receive every route to them from both halves
            experts_of_rank = set(range(rank * num_local, (rank + 1) * num_local))
            with torch.no_grad():
                routes = reference.moe.deepspeed_moe.gate(reference.proj(x.reshape(-1, x.shape[-1]))).experts_TK
            result["routed_rows"].append(sum(int((routes == e).sum()) for e in experts_of_rank))
            if is_last:
                for impl, g in grads.items():
                    result["grad_diff"][impl].append(max(
                        max_diff(t, ref_params[reference_name(n, rank, num_local)].grad) for n, t in g.items()))
                result["segments_vs_padded_grad"].append(max(max_diff(grads["segments"][n], grads["padded"][n])
                                                             for n in grads["padded"]))
                result["num_grads"] = len(grads["segments"])
        ref_opt.step()
        ref_opt.zero_grad()
        for s in (*steps.values(), ref_step):
            s.end_step(step)

    result["param_diff"] = {impl: max(max_diff(p, ref_params[reference_name(n, rank, num_local)])
                                      for n, p in engine.module.named_parameters())
                            for impl, engine in engines.items()}
    initial = TinyMoEModel(padded_cfg, seed=0)
    result["params_moved"] = max(max_diff(p, q) for p, q in zip(engines["segments"].module.parameters(),
                                                                 initial.parameters()))
    result["rows"] = rows
    with open(f"{args.out}.rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
    parallel.shutdown()
