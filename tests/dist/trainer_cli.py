"""Shared start of the Trainer workers: parse ``--run_config --ds_config --out`` and set a Trainer up.

Workers run as scripts under torchrun, so this sibling module is importable by
name (the script's folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse

from mpomoe_ds.training.build import resolve_ds_config
from mpomoe_ds.training.run_config import load_run_config
from mpomoe_ds.training.trainer import Trainer


def trainer_from_args(resume: bool) -> tuple[Trainer, str]:
    """A set-up Trainer for the command line's run config and ds_config, and the ``--out`` prefix."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--run_config", required=True)
    parser.add_argument("--ds_config", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    trainer = Trainer(load_run_config(args.run_config), resolve_ds_config(args.ds_config), resume=resume)
    trainer.setup()
    return trainer, args.out
