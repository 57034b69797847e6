"""Worker: ``--resume`` a run through the Trainer's start-up only, then dump what every rank holds by global name.

Launched by tests under torchrun at any world size. After ``Trainer.setup()``
(which places the checkpoint), each rank writes ``{out}.rank{r}.pt``: its
entries of :func:`mpomoe_ds.training.reshard.global_state` (the parameters it
owns at full size, with their Adam moments) and the engine's step counters,
so a test can compare them, name by name, with the files saved at another
world size.
"""

from __future__ import annotations

import torch
from trainer_cli import trainer_from_args

from mpomoe_ds import parallel
from mpomoe_ds.training import reshard


def main() -> None:
    trainer, out = trainer_from_args(resume=True)
    engine = trainer.engine
    entries = reshard.global_state(engine, trainer.config.moe.ep_size)
    torch.save({"entries": entries, "global_steps": engine.global_steps, "start_step": trainer.start_step,
                "lr": [g["lr"] for g in engine.optimizer.param_groups], "data_step": trainer.batches.step},
               f"{out}.rank{trainer.rank}.pt")


if __name__ == "__main__":
    main()
    parallel.shutdown()
