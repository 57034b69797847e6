"""``mpomoe-train`` / ``python -m mpomoe_ds.cli.train``: train an MPOE-MoE model with DeepSpeed.

Thin: parse the command line (one CLI path: argparse +
``deepspeed.add_config_arguments``, tolerant of the launcher's
``--local_rank``), load and validate the run config, and hand it to
:class:`mpomoe_ds.training.trainer.Trainer`. It runs unchanged under
``deepspeed``, ``torchrun``, ``mpirun`` (mpi4py discovery), SLURM or one plain
process; with no arguments it trains the embedded default (all-MiniLM-L6-v2
upcycled to MPOE-MoE on the built-in multi-task data set).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from mpomoe_ds.config import to_dict
from mpomoe_ds.training.run_config import load_run_config


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    import deepspeed

    parser = argparse.ArgumentParser(
        prog="mpomoe-train",
        description="Train an MPOE-MoE model with DeepSpeed. With no arguments: the embedded default run.",
        epilog="Overrides: section.key=value (values parse as YAML), e.g. moe.num_experts=8 train.max_steps=50")
    parser.add_argument("--config", help="run config file (YAML or JSON); default: the embedded default run")
    parser.add_argument("--output_dir", help="shortcut for train.output_dir=...")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--print_config", action="store_true", help="print the resolved run config and exit")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    deepspeed.add_config_arguments(parser)
    return parser.parse_args(argv)


def run(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Parse ``argv``, train, and return the final metrics (rank 0; {} elsewhere and for --print_config)."""
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    config = load_run_config(args.config, overrides)
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2))
        return {}
    from mpomoe_ds.training.build import resolve_ds_config
    from mpomoe_ds.training.trainer import Trainer

    ds_path = args.deepspeed_config or (args.deepspeed if isinstance(args.deepspeed, str) else None)
    return Trainer(config, resolve_ds_config(ds_path), resume=args.resume).run()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script: exit status 0 on success (failures raise with their message)."""
    from mpomoe_ds import parallel

    run(argv)
    parallel.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
