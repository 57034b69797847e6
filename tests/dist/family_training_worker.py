"""2-rank worker: expert-parallel training of a converted Llama / T5 vs one process on the same global batch.

Run under ``torchrun --nproc_per_node 2`` (DS_ACCELERATOR=cpu). Both ranks
build the same random model of ``--case`` (:mod:`family_zoo`), convert it with
4 MPO experts over 2 ranks (top-2, perturbed experts, central-gradient mask
p=0.5), and train through a DeepSpeed engine (ZeRO 0, SGD) with 2 gradient
accumulation micro-batches per step, each rank on its half of the global
batch. An ep_size=1 reference converted the same way trains in-process on the
whole global batch (4 micro-batches, loss averaged). The MoE step protocol
(:class:`mpomoe_ds.moe.step.MoEStep`) drives both, so masks and per-step
reconstruction run as in the trainer. Each rank records the per-step loss
difference and, after training, the largest parameter difference (experts
compared by global id; with ``--shard-central`` the expert-parallel model
holds 1/2 of each central tensor per rank, compared through the full tensors
of its state_dict).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import deepspeed
import family_zoo
import torch
import torch.distributed as dist
from moe_worker import reference_name  # local expert index on a rank -> global index

from mpomoe_ds import parallel
from mpomoe_ds.models.convert import convert_model
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.params import optimizer_param_groups
from mpomoe_ds.moe.step import MoEStep
from mpomoe_ds.training.engine import initialize

MICRO, GA, LR = 2, 2, 0.05


def micro_batch(case: str, step: int, index: int) -> dict[str, torch.Tensor]:
    """Global micro-batch ``index`` (0..2*GA-1) of a step: full-length rows, so every one has the same token count."""
    batch = family_zoo.inputs(case, seed=100 * step + index, batch=MICRO)
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    batch["labels"] = batch.get("decoder_input_ids", batch["input_ids"]).clone()
    batch.pop("decoder_input_ids", None)  # T5 shifts the labels into decoder inputs itself
    return batch


def loss_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    loss = model(**batch).loss + model.moe_aux.total_aux_loss()
    model.moe_aux.pop()
    return loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shard-central", action="store_true", help="the expert-parallel model shards central tensors")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    moe = MoEConfig(num_experts=4, ep_size=world, k=2, expert_init="perturb", init_noise=0.2, aux_loss_coef=0.05,
                    central_grad_keep_prob=0.5, layers="all")
    model, reference = family_zoo.build(args.case), family_zoo.build(args.case)
    for m in (model, reference):
        m.train()  # dropout off (modules, and T5 attention's float rate), so both runs compute the same function
        for module in m.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            elif isinstance(getattr(module, "dropout", None), float):
                module.dropout = 0.0
    convert_model(model, dataclasses.replace(moe, shard_central=args.shard_central))
    convert_model(reference, dataclasses.replace(moe, ep_size=1))
    num_local = moe.num_experts // world
    ds = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GA, "gradient_clipping": 0.0,
          "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}
    engine = initialize(model, ds, optimizer=torch.optim.SGD(optimizer_param_groups(model), lr=LR))
    ref_opt = torch.optim.SGD(reference.parameters(), lr=LR)
    moe_step, ref_step = MoEStep(model), MoEStep(reference)

    result = {"rank": rank, "loss_diff": [], "losses": []}
    for step in range(args.steps):
        moe_step.begin_step(step)
        ref_step.begin_step(step)
        local_loss = 0.0
        for index in range(GA):
            moe_step.begin_micro_batch(index, index == GA - 1)
            loss = loss_of(engine.module, micro_batch(args.case, step, rank * GA + index))
            engine.backward(loss)
            engine.step()
            local_loss += float(loss.detach()) / GA
        ref_loss = 0.0
        for index in range(world * GA):  # the reference sees the same 4 micro-batches in one process
            ref_step.begin_micro_batch(index, index == world * GA - 1)
            loss = loss_of(reference, micro_batch(args.case, step, index)) / (world * GA)
            loss.backward()
            ref_loss += float(loss.detach())
        ref_opt.step()
        ref_opt.zero_grad()
        moe_step.end_step(step)
        ref_step.end_step(step)
        mean = torch.tensor(local_loss)
        dist.all_reduce(mean)
        result["loss_diff"].append(abs(float(mean) / world - ref_loss))
        result["losses"].append(ref_loss)

    # state_dict() holds full central tensors in either layout (collective when sharded).
    state, ref_state = engine.module.state_dict(), reference.state_dict()
    result["param_diff"] = max(float((t.float() - ref_state[reference_name(n, rank, num_local)].float()).abs().max())
                               for n, t in state.items() if t.is_floating_point())
    initial = family_zoo.build(args.case)
    convert_model(initial, dataclasses.replace(moe, ep_size=1))
    start = initial.state_dict()
    result["central_moved"] = max(float((t - start[n]).abs().max()) for n, t in ref_state.items() if ".central." in n)
    result["gated"] = any(".central.gate" in n for n in ref_state)
    result["central_sharded"] = any(getattr(m, "sharded", False) for m in engine.module.modules()
                                    if type(m).__name__ == "CentralTensors")
    with open(f"{args.out}.rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
    parallel.shutdown()
