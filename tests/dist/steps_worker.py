"""Worker: N optimizer steps of a run config through the Trainer; per-step losses and gradient norms out.

Launched by tests under torchrun (any world size, any number of node agents)
or as one plain process. ``--run_config`` is a run-config YAML/JSON, ``--ds_config`` a
ds_config JSON. Per step it records the loss and, at each optimizer boundary,
the L2 norm of every parameter's gradient (averaged over data parallelism, as
the optimizer sees it) keyed by name; expert parameters are keyed by global
expert id so runs with different expert-parallel sizes compare.
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from mpomoe_ds import parallel
from mpomoe_ds.training.build import resolve_ds_config
from mpomoe_ds.training.run_config import load_run_config
from mpomoe_ds.training.trainer import Trainer


def global_name(name: str, ep_rank: int, local_experts: int) -> str:
    """Rename ``...deepspeed_experts.<local>...`` to the global expert id."""
    match = re.search(r"deepspeed_experts\.(\d+)\.", name)
    if match is None:
        return name
    return name.replace(match.group(0), f"deepspeed_experts.g{ep_rank * local_experts + int(match.group(1))}.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run_config", required=True)
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    trainer = Trainer(load_run_config(args.run_config), resolve_ds_config(args.ds_config), resume=False)
    trainer.setup()
    engine = trainer.engine
    engine.module.train()  # as Trainer.run does before its first step
    ep_size = trainer.config.moe.ep_size
    local = trainer.config.moe.num_experts // ep_size
    ep_rank = trainer.rank % ep_size
    grads: list[dict[str, float]] = []
    optimizer_step = engine.step

    def step_and_record() -> None:
        if engine.is_gradient_accumulation_boundary():
            grads.append({global_name(n, ep_rank, local): float(p.grad.detach().double().norm())
                          for n, p in engine.module.named_parameters() if p.grad is not None})
        optimizer_step()

    engine.step = step_and_record
    batches = iter(trainer.batches)
    losses = [trainer.train_step(step, batches)["loss"] for step in range(args.steps)]
    result = {"losses": losses, "grad_norms": grads, "rank": trainer.rank, "world": trainer.world,
              "device": str(engine.device), "dtype": str(next(p for p in engine.module.parameters()).dtype),
              "finite": all(torch.isfinite(torch.tensor(losses)).tolist()),
              "checkpointing": any(getattr(m, "gradient_checkpointing", False) for m in engine.module.modules())}
    with open(f"{args.out}.rank{trainer.rank}.json", "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
    parallel.shutdown()
