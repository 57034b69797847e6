"""2-rank worker: every family's converted model with ep_size=2 gives the original logits.

Run under ``torchrun --nproc_per_node 2`` (DS_ACCELERATOR=cpu). For each case of
:mod:`family_zoo` (``--cases``), both ranks build the same random model, convert
it with 4 experts split over the 2 ranks (top-2, experts copied, lossless), and
run a batch that differs per rank, so tokens cross ranks in the all-to-all.
Each rank records the largest |converted - original| of its outputs per case.
"""

from __future__ import annotations

import argparse
import json

import deepspeed
import family_zoo
import torch
import torch.distributed as dist

from mpomoe_ds import parallel
from mpomoe_ds.models.convert import convert_model
from mpomoe_ds.moe.config import MoEConfig


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", required=True, help="comma-separated family_zoo case names")
    parser.add_argument("--expert-type", default="mpo")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    result = {"rank": rank, "max_abs_diff": {}, "local_experts": {}}
    for case in args.cases.split(","):
        model = family_zoo.build(case, seed=0)  # same weights on both ranks
        batch = family_zoo.inputs(case, seed=rank)
        reference = family_zoo.outputs(model, batch)
        report = convert_model(model, MoEConfig(num_experts=4, ep_size=2, k=2, expert_init="copy", layers="all",
                                                expert_type=args.expert_type))
        result["max_abs_diff"][case] = float((family_zoo.outputs(model, batch) - reference).abs().max())
        result["local_experts"][case] = report.params_after.expert_local
    with open(f"{args.out}.rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
    parallel.shutdown()
