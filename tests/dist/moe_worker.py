"""Multi-rank worker: expert-parallel MPOE training vs a single-process reference.

Run under ``torchrun --nproc_per_node 2`` (or 4 with ``--ep-size 2``; DS_ACCELERATOR=cpu).
Every rank trains the expert-parallel model through a DeepSpeed engine on its
share of each global batch (``--accumulation`` micro-batches per step, with the
MoE layer told where each sits, so MPO experts rebuild once per step), while an
identical ep_size=1 reference model (plain PyTorch, no engine) trains
in-process on every rank's micro-batches. ``--dispatch`` picks ``moe.dispatch``.
The worker measures differences and
writes them as JSON (``--out``); the pytest side asserts on them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from torch import nn

from mpomoe_ds import parallel
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import MPOEMoE
from mpomoe_ds.moe.params import optimizer_param_groups, parameter_report
from mpomoe_ds.mpo.config import MPOConfig
from mpomoe_ds.training.engine import global_grad_norm, initialize

HIDDEN, FFN, BATCH, SEQ, LR = 32, 64, 4, 6, 0.05
# SGD, not Adam: Adam's g / (|g| + eps) turns roundoff in near-zero gradients into
# full-size updates, so two exact implementations drift apart within a few steps.


class TinyMoEModel(nn.Module):
    """proj -> MoE (residual) -> head; MSE regression loss plus the balance loss."""

    def __init__(self, moe: MoEConfig, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.proj = nn.Linear(HIDDEN, HIDDEN)
        self.moe = MPOEMoE(HIDDEN, FFN, moe, MPOConfig(), layer_id=0)
        self.head = nn.Linear(HIDDEN, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        out, aux, _ = self.moe(h)
        pred = self.head(h + out).squeeze(-1)
        return nn.functional.mse_loss(pred, y) + self.moe.config.aux_loss_coef * aux


def global_batch(step: int, micro_batches: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """``micro_batches`` micro-batches of BATCH rows (world size x accumulation); the first two as before."""
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(micro_batches * BATCH, SEQ, HIDDEN, generator=gen)
    return x, torch.randn(micro_batches * BATCH, SEQ, generator=gen)


def reference_name(name: str, rank: int, num_local: int) -> str:
    """Map an expert parameter's local index on ``rank`` to its global index in the reference."""
    marker = "deepspeed_experts."
    if marker not in name:
        return name
    head, tail = name.split(marker)
    local, rest = tail.split(".", 1)
    return f"{head}{marker}{rank * num_local + int(local)}.{rest}"


def as_held(name: str, ref: torch.Tensor, model: TinyMoEModel) -> torch.Tensor:
    """A reference tensor as this rank holds it: its shard when the central tensors are sharded."""
    central = model.moe.central
    if central.sharded and name.startswith("moe.central."):
        return central.local_slice(ref)
    return ref


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())


def ds_config(zero: int, clip: float = 0.0, accumulation: int = 1) -> dict:
    # gradient_clipping defaults to 1.0 in DeepSpeed 0.19 and its fp32/ZeRO-0 clip
    # mis-computes the norm with experts (the trainer clips itself there); ZeRO 1/2 clip right.
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": accumulation,
            "gradient_clipping": clip, "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": zero}, "steps_per_print": 10**9}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--keep-prob", type=float, default=1.0)
    parser.add_argument("--shard-central", action="store_true")
    parser.add_argument("--clip", type=float, default=0.0, help="DeepSpeed gradient_clipping (ZeRO 1/2)")
    parser.add_argument("--aux-keep-prob", type=float, default=1.0, help="moe.aux_grad_keep_prob")
    parser.add_argument("--dispatch", default="tokens", help="moe.dispatch")
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--ep-size", type=int, default=0, help="expert-parallel size (0: the world size)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ep_size, accumulation = args.ep_size or world, args.accumulation
    moe_cfg = MoEConfig(num_experts=4, ep_size=ep_size, k=2, dispatch=args.dispatch, dropless=True,
                        expert_init="perturb", init_noise=0.2, aux_loss_coef=0.05,
                        central_grad_keep_prob=args.keep_prob, aux_grad_keep_prob=args.aux_keep_prob,
                        shard_central=args.shard_central, layers="all")
    model = TinyMoEModel(moe_cfg, seed=0)
    reference = TinyMoEModel(dataclasses.replace(moe_cfg, ep_size=1), seed=0)
    num_local = model.moe.num_local_experts
    ref_params = dict(reference.named_parameters())

    engine = initialize(model, ds_config(args.zero, args.clip, accumulation),
                        optimizer=torch.optim.SGD(optimizer_param_groups(model), lr=LR))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)

    result = {"rank": rank, "loss_diff": [], "grad_diff": [], "mask_violations": 0, "mask_kept_nonzero": []}
    # aux_gather's all-gather per step: every expert's cores and biases once ((P-1)/P of the group's leaves the rank)
    local_bytes = sum(p.numel() * p.element_size() for p in model.moe.experts.parameters())
    result["expected_gather_bytes"] = (ep_size - 1) * local_bytes
    for step in range(args.steps):
        chunks = world * accumulation  # micro-batch (rank r, index i) is chunk i * world + r
        x, y = global_batch(step, chunks)
        model.moe.begin_step(step)
        reference.moe.begin_step(step)

        parallel.reset_traffic()
        loss = 0.0
        for index in range(accumulation):
            mine = slice((index * world + rank) * BATCH, (index * world + rank + 1) * BATCH)
            model.moe.begin_micro_batch(index, is_last=index == accumulation - 1)
            micro_loss = engine(x[mine], y[mine])
            engine.backward(micro_loss)
            loss = loss + micro_loss.detach() / accumulation
            if index < accumulation - 1:
                engine.step()  # not a boundary: DeepSpeed only accumulates
        result.setdefault("traffic", []).append(parallel.traffic())
        grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}

        ref_loss = sum(reference(x[c * BATCH:(c + 1) * BATCH], y[c * BATCH:(c + 1) * BATCH])
                       for c in range(chunks)) / chunks
        ref_loss.backward()
        ref_grads = [p.grad for p in reference.parameters() if p.grad is not None]
        ref_norm = float(torch.nn.utils.get_total_norm(ref_grads))
        result.setdefault("ref_grad_norm", []).append(ref_norm)

        if args.zero == 0:  # ZeRO 0 leaves reduced gradients in param.grad
            norm = float(global_grad_norm(engine.module, engine.module.moe.ep_group))
            result.setdefault("grad_norm_rel_diff", []).append(abs(norm - ref_norm) / ref_norm)

        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        result["loss_diff"].append(abs(float(mean_loss) / world - float(ref_loss.detach())))
        ep_rank = rank % ep_size
        result["grad_diff"].append(max(max_diff(g, as_held(n, ref_params[reference_name(n, ep_rank, num_local)].grad,
                                                            model))
                                       for n, g in grads.items()))
        if engine.module.moe.central_mask is not None:
            mask = engine.module.moe.central_mask
            for index, matrix in enumerate(("up", "down")):
                grad = grads[f"moe.central.{matrix}"]
                full_shape = engine.module.moe.central.full_shapes[matrix]
                keep = as_held(f"moe.central.{matrix}", mask.mask(index, full_shape, grad.device), model)
                result["mask_violations"] += int((grad[~keep] != 0).sum())
                result["mask_kept_nonzero"].append(float((grad[keep] != 0).float().mean()))
                result.setdefault("mask_zero_fraction", []).append(float((~keep).float().mean()))
                gathered = [torch.empty_like(keep) for _ in range(world)]
                dist.all_gather(gathered, keep)
                result.setdefault("mask_equal_across_ranks", []).append(all(torch.equal(g, keep) for g in gathered))

        engine.step()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), args.clip)
        ref_opt.step()
        ref_opt.zero_grad()
        model.moe.end_step()
        reference.moe.end_step()

    # Parameters after training: vs the reference, and replicated tensors across ranks.
    result["param_diff"] = max(max_diff(p, as_held(n, ref_params[reference_name(n, ep_rank, num_local)], model))
                               for n, p in engine.module.named_parameters())
    initial = TinyMoEModel(moe_cfg, seed=0)
    central, initial_central = engine.module.moe.central, initial.moe.central
    result["central_moved"] = max(max_diff(central.gather_detached(m), initial_central.gather_detached(m))
                                  for m in ("up", "down"))
    result["central_sharded"] = central.sharded
    result["central_local_numel"] = sum(p.numel() for p in central.values())
    result["central_full_numels"] = [shape.numel() for shape in central.full_shapes.values()]
    report, ref_report = parameter_report(engine.module), parameter_report(reference)
    result["report_expert_side_global"] = [report.expert_side_global, ref_report.expert_side_global]
    state = engine.module.state_dict()  # collective when sharded: full central tensors
    result["state_dict_central_diff"] = max(max_diff(state[f"moe.central.{m}"], reference.moe.central[m])
                                            for m in ("up", "down"))
    result["aux_moved"] = max(max_diff(p, q) for (n, p), (_, q) in zip(engine.module.moe.experts.named_parameters(),
                                                                     initial.moe.experts.named_parameters())
                              if "aux" in n)
    replicated = {n: p for n, p in engine.module.named_parameters()
                  if "deepspeed_experts" not in n and not (central.sharded and n.startswith("moe.central."))}
    identical = True
    for name, p in replicated.items():
        gathered = [torch.empty_like(p.data) for _ in range(world)]
        dist.all_gather(gathered, p.data.contiguous())
        identical &= all(torch.equal(g, gathered[0]) for g in gathered)
    result["replicated_bit_identical"] = bool(identical)
    result["replicated_names"] = sorted(replicated)
    owned = torch.tensor(engine.module.moe.global_expert_ids)
    all_owned = [torch.empty_like(owned) for _ in range(world)]
    dist.all_gather(all_owned, owned)
    result["expert_owners"] = [t.tolist() for t in all_owned]

    # Checkpoint round trip: a differently initialised model loads it exactly.
    ckpt_dir = os.path.join(os.path.dirname(args.out), "ckpt")
    engine.save_checkpoint(ckpt_dir, tag="t5")
    saved = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    fresh = TinyMoEModel(dataclasses.replace(moe_cfg, seed=99), seed=7)
    engine2 = initialize(fresh, ds_config(args.zero, args.clip, accumulation),
                         optimizer=torch.optim.SGD(optimizer_param_groups(fresh), lr=LR))
    before = max(max_diff(p, saved[n]) for n, p in engine2.module.named_parameters())
    engine2.load_checkpoint(ckpt_dir, tag="t5")
    result["checkpoint_diff_before_load"] = before
    result["checkpoint_diff_after_load"] = max(max_diff(p, saved[n]) for n, p in engine2.module.named_parameters())
    result["checkpoint_files"] = sorted(os.listdir(os.path.join(ckpt_dir, "t5")))

    with open(f"{args.out}.rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
    parallel.shutdown()
