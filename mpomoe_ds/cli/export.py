"""``mpomoe-export`` / ``python -m mpomoe_ds.cli.export``: a DeepSpeed MPOE checkpoint (any ep_size) -> a model folder.

Thin: parse, read the MoE / MPO configs the checkpoint was trained with (and,
from a training run's ``run_config.json``, the model and its head), call
:func:`mpomoe_ds.models.export.export_deepspeed_checkpoint`, print.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

from mpomoe_ds.config import from_dict, load_mapping
from mpomoe_ds.data.config import DataConfig, resolve_task
from mpomoe_ds.models.config import ModelConfig
from mpomoe_ds.models.export import MODES, config_model_builder, export_deepspeed_checkpoint, resolve_tag
from mpomoe_ds.models.hf import backbone_task
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


def run_model(run_config_path: PathLike) -> tuple[ModelConfig, Optional[str]]:
    """The model section of a training run's config and the head the run loaded the backbone with."""
    data = load_mapping(run_config_path)
    if "model" not in data:
        raise SystemExit(f"mpomoe-export: {run_config_path} has no 'model' section (it is not a training run's "
                         f"run_config.json); pass --model with the base model's config folder")
    model = from_dict(ModelConfig, data["model"], "model")
    data_config = from_dict(DataConfig, data.get("data", {}), "data")
    has_lm = bool(data_config.corpora) or any(resolve_task(t).kind == "lm" for t in data_config.tasks)
    return model, backbone_task(model.objective, has_lm, data_config.span_corruption is not None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpomoe-export",
        description="Export a DeepSpeed MPOE checkpoint (any ep_size) to a folder that "
                    "mpomoe_ds.models.export.load_converted turns back into a transformers model "
                    "(mpo / merged), or that plain transformers loads (merged for Llama / Mistral / Qwen "
                    "causal LMs; remote with trust_remote_code=True for the other families).",
        epilog="Examples: mpomoe-export --checkpoint runs/llama/checkpoints --moe-config "
               "runs/llama/run_config.json --out exported (a training run: model and head from its config); "
               "mpomoe-export --checkpoint runs/ckpt --tag global_step100 "
               "--model ./bert-config --task sequence-classification --moe-config run.yaml --out exported "
               "--mode merged")
    parser.add_argument("--checkpoint", required=True, help="folder given to engine.save_checkpoint")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the one in CHECKPOINT/latest)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--mode", choices=MODES, default="merged",
                        help="merged: dense per-expert matrices (no reconstruction at inference; Llama / "
                             "Mistral / Qwen causal LMs as transformers' Mixtral / Qwen-MoE); mpo: the MPO cores "
                             "as trained; remote: merged, with a trust_remote_code modeling file (BERT, GPT-2, "
                             "DistilBERT, T5) that plain transformers loads (default: merged)")
    parser.add_argument("--model", default=None,
                        help="folder or hub name with the base model's config.json (weights are not read); "
                             "'minilm': the packaged all-MiniLM-L6-v2 (default: the model section of "
                             "--moe-config when it is a training run's run_config.json, random-init "
                             "architectures and config_overrides included)")
    parser.add_argument("--task", default=None,
                        help="model head: base, causal-lm, seq2seq-lm, masked-lm, sequence-classification "
                             "(default: the head the run trained, from run_config.json, else the config's "
                             "architectures[0])")
    parser.add_argument("--moe-config", required=True,
                        help="JSON/YAML with the training MoE config: a training run's run_config.json (or any "
                             "run config with 'moe' and 'mpo' sections), or the MoE fields alone "
                             "(ep_size is ignored)")
    parser.add_argument("--mpo-config", default=None, help="JSON/YAML with the MPO fields (default: from "
                                                           "--moe-config's 'mpo' section, else defaults)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    moe, mpo = read_moe_configs(args.moe_config, args.mpo_config)
    if args.model is None:
        model, trained_head = run_model(args.moe_config)
        builder = config_model_builder(model.name_or_path, moe, mpo, args.task or trained_head or "base",
                                       config_overrides=model.config_overrides if model.random_init else None)
    else:
        builder = config_model_builder(args.model, moe, mpo, args.task)
    out = export_deepspeed_checkpoint(args.checkpoint, args.tag, builder, args.out, args.mode)
    print(f"exported {args.checkpoint} ({resolve_tag(args.checkpoint, args.tag)}) to {out} ({args.mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
