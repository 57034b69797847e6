"""Model benchmark: a GPT-2-small-shaped LM with MoE in every other layer, E = 8.

    python benchmarks/model.py            # 2 ranks (ep_size 2) and 1 process, results/model.{json,md,png}

Training tokens per second, peak tensor memory, parameters and optimizer
state per rank for

    mpoe    our converted model (mpomoe_ds.models.convert.convert_model), MPO experts,
            lossless, per-step reconstruction under gradient accumulation
    mpoe_shard  the same with moe.shard_central (2+ ranks only)
    ffn     the same conversion with plain dense experts (our layer)
    ds      DeepSpeed's own MoE (deepspeed.moe.layer.MoE, expert
            nn.Sequential(Linear, GELU(tanh), Linear)) in the same blocks
    dense   the unconverted GPT-2

The model is GPT-2 small's shape (hidden 768, 12 heads, FFN 3072, vocabulary
50257, tied LM head) with fewer layers for CPU time (``--layers``, default 4:
MoE in blocks 1 and 3), randomly initialised (conversion is weight-agnostic),
dropout off. Each step is ``--grad-accum`` micro-batches of ``--micro-batch``
random sequences of ``--seq`` tokens per rank, through a DeepSpeed engine
(ZeRO-2, AdamW client optimizer, fp32); variants run interleaved and the
median step after warm-up is reported. Tokens/s counts every rank's tokens.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

VARIANTS = ("mpoe", "mpoe_shard", "ffn", "ds", "dense")
OUR_KINDS = ("mpoe", "mpoe_shard", "ffn")  # converted with mpomoe_ds.models.convert
PER_STEP_KINDS = ("mpoe", "mpoe_shard")  # MPO experts rebuilt once per optimizer step
LABELS = {"mpoe": "MPOE (ours)", "mpoe_shard": "MPOE, central sharded (moe.shard_central)",
          "ffn": "ours, plain FFN experts", "ds": "DeepSpeed MoE", "dense": "dense GPT-2"}
AUX_COEF = 0.01
LR = 1e-6


def build_model(kind: str, args, ep_size: int):
    import torch
    import transformers
    from torch import nn

    from mpomoe_ds.models.convert import convert_model
    from mpomoe_ds.models.hf import linear_weight_in_out
    from mpomoe_ds.moe.config import MoEConfig
    from mpomoe_ds.moe.grad_mask import mix_seed
    from mpomoe_ds.mpo.config import MPOConfig

    config = transformers.GPT2Config(n_layer=args.layers, n_embd=768, n_head=12, n_inner=3072, vocab_size=50257,
                                     n_positions=max(1024, args.seq), resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, use_cache=False)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    moe = MoEConfig(num_experts=args.experts, ep_size=ep_size, k=1, dropless=True, aux_loss_coef=AUX_COEF,
                    layers="every_other", expert_type="ffn" if kind == "ffn" else "mpo", expert_init="copy",
                    shard_central=kind == "mpoe_shard")
    sink: list = []
    if kind in OUR_KINDS:
        convert_model(model, moe, MPOConfig())
    elif kind == "ds":
        from deepspeed.moe.layer import MoE

        class DeepSpeedMoEMLP(nn.Module):
            """GPT-2 ``block.mlp`` replacement: DeepSpeed MoE -> dropout; l_aux goes to the sink."""

            def __init__(self, layer: nn.Module, dropout: nn.Module) -> None:
                super().__init__()
                self.moe = layer
                self.dropout = dropout

            def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
                out, l_aux, _ = self.moe(hidden_states)
                sink.append(l_aux)
                return self.dropout(out)

        for layer_id, index in enumerate(moe.moe_layer_indices(args.layers)):
            block = model.transformer.h[index]
            expert = nn.Sequential(nn.Linear(768, 3072), nn.GELU(approximate="tanh"), nn.Linear(3072, 768))
            with torch.no_grad():
                expert[0].weight.copy_(linear_weight_in_out(block.mlp.c_fc).T)
                expert[0].bias.copy_(block.mlp.c_fc.bias)
                expert[2].weight.copy_(linear_weight_in_out(block.mlp.c_proj).T)
                expert[2].bias.copy_(block.mlp.c_proj.bias)
            layer = MoE(hidden_size=768, expert=expert, num_experts=args.experts, ep_size=ep_size, k=1,
                        capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False,
                        use_rts=False)
            with torch.no_grad():  # our layer's router init, so the same tokens go to the same experts
                gen = torch.Generator().manual_seed(mix_seed(moe.seed, layer_id, 2))
                layer.deepspeed_moe.gate.wg.weight.copy_(torch.randn((args.experts, 768), generator=gen) * 0.02)
            block.mlp = DeepSpeedMoEMLP(layer, block.mlp.dropout)
    elif kind != "dense":
        raise ValueError(f"unknown variant {kind!r}")

    class LMWithAux(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lm = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            loss = self.lm(input_ids=input_ids, labels=input_ids).loss
            if kind in OUR_KINDS:
                loss = loss + self.lm.moe_aux.total_aux_loss()
                self.lm.moe_aux.pop()
            elif kind == "ds":
                loss = loss + AUX_COEF * torch.stack(sink).sum()
                sink.clear()
            return loss

    return LMWithAux()


def make_engine(module, grad_accum: int, zero: int):
    import deepspeed
    import torch

    from mpomoe_ds.moe.params import optimizer_param_groups

    config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": grad_accum,
              "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
              "zero_optimization": {"stage": zero, "reduce_bucket_size": 50_000_000,
                                    "allgather_bucket_size": 50_000_000}}
    optimizer = torch.optim.AdamW(optimizer_param_groups(module), lr=LR, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
    return engine


def accounting(engine, zero: int, world: int, ep_size: int) -> dict[str, Any]:
    """Parameters on this rank and their bytes + attributed optimizer state (see layer.py)."""
    from deepspeed.moe.utils import is_moe_param

    params, state = 0, 0.0
    for p in engine.module.parameters():
        params += p.numel()
        replicas = world // ep_size if is_moe_param(p) else world
        state += p.numel() * (4 + 12 / replicas if zero >= 1 else 12)
    return {"params": params, "state_bytes": int(state)}


def worker(args) -> None:
    import torch

    from mpomoe_ds.moe.step import MoEStep

    rank, world = common.init_worker()
    ep = world
    tokens = args.seq * args.micro_batch
    gen = torch.Generator().manual_seed(100 + rank)
    batches = [torch.randint(0, 50257, (args.micro_batch, args.seq), generator=gen) for _ in range(args.grad_accum)]
    kinds = [k for k in args.variants if k != "mpoe_shard" or world > 1]  # nothing to shard in one process
    engines = {k: make_engine(build_model(k, args, ep), args.grad_accum, args.zero) for k in kinds}
    run_steps = {k: functools.partial(common.train_step, engines[k], batches, MoEStep(engines[k].module),
                                      k in PER_STEP_KINDS) for k in kinds}
    times, _ = common.timed_rounds(rank, run_steps, args.warmup, args.steps)
    acct = {k: accounting(engines[k], args.zero, world, ep) for k in kinds}
    for engine in engines.values():
        engine.destroy()  # removes ZeRO's gradient hooks: without it the engine is never freed
    del engines, engine, run_steps
    gc.collect()
    peaks = {}
    for k in kinds:
        tracker = common.LiveTensorTracker()
        with tracker:
            engine = make_engine(build_model(k, args, ep), args.grad_accum, args.zero)
            moe_step = MoEStep(engine.module)
            common.train_step(engine, batches, moe_step, k in PER_STEP_KINDS)
            gc.collect()
            tracker.reset_peak()
            common.train_step(engine, batches, moe_step, k in PER_STEP_KINDS)
            peaks[k] = tracker.peak
        engine.destroy()
        del engine, moe_step
        gc.collect()
    step_tokens = tokens * args.grad_accum * world
    variants = {}
    for k in kinds:
        med = common.median(times[k])
        variants[k] = {"label": LABELS[k], "step_s_median": med, "step_s": times[k],
                       "tokens_per_s": step_tokens / med, "peak_bytes": peaks[k], **acct[k]}
    run = {"ranks": world, "ep_size": ep, "threads_per_rank": torch.get_num_threads(), "tokens_per_step": step_tokens,
           "variants": variants}
    if rank == 0:
        common.write_json(Path(args.out), {"machine": common.machine_info(), "run": run})
    common.barrier()


def parse_args(argv: Optional[list[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--out", default=str(common.RESULTS / "model.json"))
    parser.add_argument("--no-malloc-tuning", action="store_true")
    common.add_worker_args(parser)
    return parser.parse_args(argv)


def drive(args) -> None:
    """Launch the ranks for every run, then write the results and the report."""
    out = Path(args.out)
    runs = []
    forwarded = ["--layers", str(args.layers), "--experts", str(args.experts), "--seq", str(args.seq),
                 "--micro-batch", str(args.micro_batch), "--grad-accum", str(args.grad_accum),
                 "--variants", *args.variants, "--steps", str(args.steps), "--warmup", str(args.warmup),
                 "--zero", str(args.zero)]
    machine = None
    for ranks in args.ranks:
        part = out.with_name(f"{out.stem}.r{ranks}.json")
        common.launch(Path(__file__), ranks, forwarded + ["--out", str(part)],
                      malloc_tuning=not args.no_malloc_tuning, threads=args.threads)
        data = common.read_json(part)
        machine = machine or data["machine"]
        runs.append(data["run"])
        part.unlink()
    from mpomoe_ds.moe.config import MoEConfig

    config = {"layers": args.layers, "hidden": 768, "heads": 12, "ffn": 3072, "vocab": 50257, "experts": args.experts,
              "moe_layers": MoEConfig(num_experts=args.experts, layers="every_other").moe_layer_indices(args.layers),
              "seq_len": args.seq, "micro_batch": args.micro_batch, "grad_accum": args.grad_accum,
              "zero_stage": args.zero, "steps": args.steps, "warmup": args.warmup}
    machine["load_average_at_end"] = os.getloadavg()
    common.write_json(out, {"benchmark": "model", "machine": machine, "config": config, "runs": runs})
    import report

    report.write_model_report(out)


def main(argv: Optional[list[str]] = None) -> None:
    common.dispatch(parse_args(argv), worker, drive)


if __name__ == "__main__":
    main()
