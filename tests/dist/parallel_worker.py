"""2-rank worker: every collective of mpomoe_ds.parallel against its definition, with the device of each result.

Launched by tests/test_parallel.py under torchrun (gloo). ``--device`` is where
the caller's tensors live (``cpu``; ``cuda`` on a GPU machine, where gloo then
sends from the CPU and hands results back on the GPU). Writes one JSON per rank.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from mpomoe_ds import parallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo", verbose=False)  # parallel.all_to_all uses deepspeed.comm
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(args.device, rank % torch.cuda.device_count()) if args.device == "cuda" else torch.device("cpu")
    group = dist.new_group(list(range(world)))

    base = torch.arange(6, dtype=torch.float32, device=device).view(2, 3) + rank
    transposed = base.t()  # a non-contiguous input, as the pretrained weights were
    summed = parallel.all_reduce(transposed.clone(), group)
    maxed = parallel.all_reduce_max(group, torch.tensor([float(rank), 5.0 - rank], device=device))
    gathered = parallel.all_gather(transposed, group)
    flat = parallel.all_gather_flat(torch.full((2,), float(rank), device=device), group)
    parallel.reset_traffic()
    shard = parallel.reduce_scatter_flat(torch.arange(4, dtype=torch.float32, device=device) * (rank + 1), group)
    shard_traffic = parallel.traffic()
    objects = parallel.all_gather_object({"rank": rank}, group)
    routed = parallel.all_to_all(group, torch.tensor([[10.0 * rank], [10.0 * rank + 1]], device=device))
    parallel.barrier(group)

    results = {"summed": summed, "maxed": maxed, "gathered0": gathered[0], "gathered1": gathered[1], "flat": flat,
               "shard": shard, "routed": routed}
    out = {name: t.cpu().tolist() for name, t in results.items()}
    out["devices"] = sorted({str(t.device) for t in results.values()})
    out["caller_device"] = str(device)
    out["objects"] = objects
    out["shard_traffic"] = shard_traffic
    out["comm_device"] = str(parallel.communication_device(group))
    out["input_untouched"] = torch.equal(transposed, base.t())
    with open(f"{args.out}.rank{rank}.json", "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
    parallel.shutdown()
