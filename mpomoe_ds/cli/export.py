"""``mpomoe-export`` / ``python -m mpomoe_ds.cli.export``: a DeepSpeed MPOE checkpoint (any ep_size) -> a model folder.

Thin: parse, read the MoE / MPO configs the checkpoint was trained with, call
:func:`mpomoe_ds.models.export.export_deepspeed_checkpoint`, print.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from mpomoe_ds.config import from_dict, load_mapping
from mpomoe_ds.models.export import MODES, config_model_builder, export_deepspeed_checkpoint, resolve_tag
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.mpo.config import MPOConfig

PathLike = Union[str, Path]


def read_moe_configs(moe_path: PathLike, mpo_path: Optional[PathLike] = None) -> tuple[MoEConfig, MPOConfig]:
    """MoE / MPO configs from files: a run config with "moe" (and "mpo") sections, or a bare MoE mapping."""
    data = load_mapping(moe_path)
    if "moe" in data:
        moe_data, mpo_data = data["moe"], data.get("mpo", {})
    else:
        moe_data, mpo_data = data, {}
    if mpo_path is not None:
        mpo_data = load_mapping(mpo_path)
    return from_dict(MoEConfig, moe_data, "moe"), from_dict(MPOConfig, mpo_data or {}, "mpo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpomoe-export",
        description="Export a DeepSpeed MPOE checkpoint (any ep_size) to a folder that "
                    "mpomoe_ds.models.export.load_converted turns back into a transformers model.",
        epilog="Example: mpomoe-export --checkpoint runs/ckpt --tag global_step100 "
               "--model ./bert-config --task sequence-classification --moe-config run.yaml --out exported "
               "--mode merged")
    parser.add_argument("--checkpoint", required=True, help="folder given to engine.save_checkpoint")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one in CHECKPOINT/latest)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--mode", choices=MODES, default="merged",
                        help="merged: dense per-expert matrices (no reconstruction at inference); "
                             "mpo: the MPO cores as trained (default: merged)")
    parser.add_argument("--model", required=True,
                        help="folder or hub name with the base model's config.json (weights are not read); "
                             "'minilm': the packaged all-MiniLM-L6-v2")
    parser.add_argument("--task", default=None,
                        help="model head: base, causal-lm, masked-lm, sequence-classification "
                             "(default: the config's architectures[0])")
    parser.add_argument("--moe-config", required=True,
                        help="JSON/YAML with the training MoE config: a run config with 'moe' and 'mpo' "
                             "sections, or the MoE fields alone (ep_size is ignored)")
    parser.add_argument("--mpo-config", default=None, help="JSON/YAML with the MPO fields (default: from "
                                                           "--moe-config's 'mpo' section, else defaults)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    moe, mpo = read_moe_configs(args.moe_config, args.mpo_config)
    builder = config_model_builder(args.model, moe, mpo, args.task)
    out = export_deepspeed_checkpoint(args.checkpoint, args.tag, builder, args.out, args.mode)
    print(f"exported {args.checkpoint} ({resolve_tag(args.checkpoint, args.tag)}) to {out} ({args.mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
