"""2-rank worker: train a converted BERT with ep_size=2, checkpoint it, record its logits.

Run under ``torchrun --nproc_per_node 2`` (DS_ACCELERATOR=cpu). A tiny random
BertForSequenceClassification gets 4 MPO experts per FFN block split over 2
ranks (expert_init "perturb", so experts differ), trains 2 steps through
``mpomoe_ds.engine.initialize`` (ZeRO 0) on different data per rank, and is
saved with ``engine.save_checkpoint``. Then, in eval mode on fixed inputs that
both ranks share, it records those inputs and the logits the pytest side must
reproduce from the exported single-process model, plus per-expert parameter sums keyed by
global expert id (to check each rank's experts landed in the right place).
Rank 0 also writes the HF config folder and MoE config file the export CLI needs.
"""

from __future__ import annotations

import argparse
import json
import os

import deepspeed
import torch
import torch.distributed as dist
import transformers

from mpomoe_ds import parallel
from mpomoe_ds.config import to_dict
from mpomoe_ds.models.convert import convert_model
from mpomoe_ds.moe.config import MoEConfig
from mpomoe_ds.moe.layer import moe_layers
from mpomoe_ds.training.config import OptimConfig
from mpomoe_ds.training.engine import initialize

BATCH, SEQ, VOCAB, TAG = 4, 8, 100, "step2"

BERT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=32, num_labels=3)


def moe_config(ep_size: int, shard_central: bool = False) -> MoEConfig:
    return MoEConfig(num_experts=4, ep_size=ep_size, k=2, dropless=True, expert_init="perturb", init_noise=0.2,
                     aux_loss_coef=0.01, shard_central=shard_central, layers="all")


class TrainerLikeWrapper(torch.nn.Module):
    """The training CLI's layout: the transformers model under ``backbone``, other state beside it."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.moe_aux = backbone.moe_aux
        self.register_buffer("task_step", torch.zeros(()))  # not part of the exported model

    def forward(self, **batch: torch.Tensor):
        return self.backbone(**batch)


def fixed_inputs() -> dict[str, torch.Tensor]:
    """The evaluation batch: the same on both ranks and in the pytest process."""
    gen = torch.Generator().manual_seed(4321)
    ids = torch.randint(1, VOCAB, (3, SEQ), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}


def train_batch(step: int, rank: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 * step + rank)
    return {"input_ids": torch.randint(1, VOCAB, (BATCH, SEQ), generator=gen),
            "labels": torch.randint(0, BERT["num_labels"], (BATCH,), generator=gen)}


def ds_config() -> dict:
    # gradient_clipping defaults to 1.0 in DeepSpeed 0.19 and its fp32/ZeRO-0 clip mis-computes the norm with experts.
    return {"train_micro_batch_size_per_gpu": BATCH, "gradient_accumulation_steps": 1, "gradient_clipping": 0.0,
            "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9}


def expert_sums(model: torch.nn.Module) -> dict[str, float]:
    """{"<MoE layer order>.<global expert id>": sum of that expert's parameters}."""
    sums = {}
    for layer_id, (_, layer) in enumerate(moe_layers(model)):
        for expert, global_id in zip(layer.experts.deepspeed_experts, layer.global_expert_ids):
            sums[f"{layer_id}.{global_id}"] = float(sum(p.detach().double().sum() for p in expert.parameters()))
    return sums


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--shard-central", action="store_true")
    parser.add_argument("--trainer-layout", action="store_true", help="checkpoint a TrainerLikeWrapper")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    args = parser.parse_args()

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # identical dense weights on both ranks
    model = transformers.BertForSequenceClassification(transformers.BertConfig(**BERT))
    convert_model(model, moe_config(world, args.shard_central))
    initial_sums = expert_sums(model)
    engine = initialize(TrainerLikeWrapper(model) if args.trainer_layout else model, ds_config(),
                        optim=OptimConfig(lr=1e-2, weight_decay=0.0))

    losses = []
    for step in range(args.steps):
        out = engine(**train_batch(step, rank))
        loss = out.loss + engine.module.moe_aux.total_aux_loss()
        engine.module.moe_aux.pop()
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.detach()))

    out_dir = os.path.dirname(args.out)
    ckpt_dir = os.path.join(out_dir, "ckpt")
    engine.save_checkpoint(ckpt_dir, tag=TAG)

    engine.eval()
    with torch.no_grad():
        logits = engine(**fixed_inputs()).logits
    engine.module.moe_aux.pop()

    if rank == 0:
        config_dir = os.path.join(out_dir, "hf_config")
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(config_dir)
        with open(os.path.join(out_dir, "moe.json"), "w") as fh:
            json.dump({"moe": to_dict(moe_config(world, args.shard_central))}, fh)
    sums = expert_sums(engine.module)
    result = {"rank": rank, "losses": losses, "logits": logits.tolist(),
              "inputs": {k: v.tolist() for k, v in fixed_inputs().items()}, "checkpoint": ckpt_dir, "tag": TAG,
              "bert": BERT, "moe": to_dict(moe_config(world)), "expert_sums": sums,
              "expert_moved": max(abs(sums[k] - initial_sums[k]) for k in sums),
              "checkpoint_files": sorted(os.listdir(os.path.join(ckpt_dir, TAG)))}
    with open(f"{args.out}.rank{rank}.json", "w") as fh:
        json.dump(result, fh)
    dist.barrier()


if __name__ == "__main__":
    main()
    parallel.shutdown()
