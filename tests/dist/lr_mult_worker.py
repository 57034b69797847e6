"""Worker: one optimizer step through the Trainer; how far each parameter kind moved, and the optimizer's groups.

Launched by tests under torchrun. ``--run_config`` is a run-config YAML,
``--ds_config`` a ds_config JSON. Writes per rank the largest absolute change
of any entry per kind (dense / central / expert, :func:`parameter_kind`)
after the first step, and each optimizer param group's name, lr and size.
"""

from __future__ import annotations

import json

from trainer_cli import trainer_from_args

from mpomoe_ds import parallel
from mpomoe_ds.moe.params import parameter_kind


def main() -> None:
    trainer, out = trainer_from_args(resume=False)
    model = trainer.engine.module
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train_step(0, iter(trainer.batches))
    moved: dict[str, float] = {"dense": 0.0, "central": 0.0, "expert": 0.0}
    for name, p in model.named_parameters():
        kind = parameter_kind(p)
        moved[kind] = max(moved[kind], float((p.detach() - before[name]).abs().max()))
    optimizer = trainer.engine.optimizer
    groups = [{"name": g.get("name"), "lr": g["lr"], "moe": bool(g.get("moe", False)),
               "numel": sum(p.numel() for p in g["params"])} for g in optimizer.param_groups]
    result = {"moved": moved, "groups": groups, "rank": trainer.rank, "zero_stage": trainer.engine.zero_optimization_stage()}
    with open(f"{out}.rank{trainer.rank}.json", "w") as fh:
        json.dump(result, fh)


if __name__ == "__main__":
    main()
    parallel.shutdown()
