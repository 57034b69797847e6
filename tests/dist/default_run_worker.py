"""2-rank worker: a few optimizer steps of the default run config through the Trainer, per-step losses out.

Launched by tests/training/test_default_run.py under torchrun. Variants (the
same as tests/fixtures/default_run_losses.json): ``default`` (the embedded
defaults) and ``accum_mask_omoe`` (gradient accumulation 2, central-gradient
mask 0.5, OMoE with 2/2-step phases).
"""

from __future__ import annotations

import argparse
import json

from mpomoe_ds import parallel
from mpomoe_ds.training.build import DEFAULT_DS_CONFIG
from mpomoe_ds.training.run_config import load_run_config
from mpomoe_ds.training.trainer import Trainer

VARIANTS = {
    "default": ([], {}, 4),
    "accum_mask_omoe": (["moe.central_grad_keep_prob=0.5", "omoe.enabled=true", "omoe.acc_steps=2",
                         "omoe.orth_steps=2"],
                        {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}, 5),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    overrides, ds_overrides, steps = VARIANTS[args.variant]
    config = load_run_config(None, [f"train.max_steps={steps}", "train.progress_bar=false", "train.tensorboard=false",
                                    f"train.output_dir={args.output_dir}", *overrides])
    trainer = Trainer(config, {**DEFAULT_DS_CONFIG, **ds_overrides}, resume=False)
    trainer.setup()
    trainer.engine.module.train()  # as Trainer.run does before its first step
    batches = iter(trainer.batches)
    rows = []
    for step in range(steps):
        stats = trainer.train_step(step, batches)
        rows.append({"loss": stats["loss"], "aux_loss": stats["aux_loss"], "task_losses": stats["task_losses"]})
    with open(f"{args.out}.rank{trainer.rank}.json", "w") as fh:
        json.dump(rows, fh)


if __name__ == "__main__":
    main()
    parallel.shutdown()
