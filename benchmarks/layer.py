"""Layer benchmark: MPOE vs DeepSpeed's own MoE vs a dense FFN, one training step at a time.

One command runs the suite the README reports (1 process and 2 ranks,
E in {4, 8, 16}, 2048 and 8192 tokens per rank, 32768 for E = 4 in one
process, and the gradient-accumulation cell: 2 ranks, E = 8, 8192 tokens,
4 micro-batches) and writes ``benchmarks/results/layer.{json,md,png}``::

    python benchmarks/layer.py

A custom grid runs only that grid (any grid flag given)::

    python benchmarks/layer.py --ranks 2 --experts 8 --tokens 8192 --grad-accum 4 --out /tmp/ga4.json

Variants, all at the same widths (D = 768, F = 3072, GELU), k = 1, dropless
routing with the same router weights (so the same tokens go to the same
experts and every MoE variant pads to the same capacity):

    mpoe        our layer, MPO experts (lossless), per-step reconstruction under accumulation
    mpoe_shard  the same with moe.shard_central: each rank holds 1/ep_size of the
                central tensors (only with 2+ ranks)
    mpoe_plain  the same as mpoe, rebuilding in every micro-batch (only with --grad-accum > 1)
    mpoe_aux    the same as mpoe with moe.dispatch aux_gather: auxiliary tensors all-gathered once per
                step, every expert rebuilt on every rank, no token all-to-all (only with 2+ ranks)
    ffn         our layer with plain dense experts: same dispatch, no reconstruction
    ds          deepspeed.moe.layer.MoE, expert nn.Sequential(Linear, GELU, Linear)
    dense       nn.Sequential(Linear, GELU, Linear) on every token

A step is forward + backward + optimizer step of every micro-batch of one
optimizer step, through a DeepSpeed engine (ZeRO-2 by default, torch AdamW as
a client optimizer, fp32), timed on the slowest rank. Variants run
interleaved (round robin, rotating order) so load on the machine hits them
alike; reported times are medians over the measured rounds after warm-up.
A separate pass per variant measures peak tensor memory, FLOPs (torch's
FlopCounterMode) and collective bytes of one step: every collective's input
buffers (``comm_bytes``, gradient reductions included) and, apart, the bytes
the layer's own collectives send (``dispatch_bytes``: mpomoe_ds.parallel's
counters, (P-1)/P of an all-to-all's input; token all-to-alls, or aux_gather's
all-gather and its gradient all-reduce).

Aux-gather cells (the issue #15 comparison: E = 8 and 16, 8192 tokens, GA 1 and 4)::

    python benchmarks/layer.py --ranks 2 --cells 8x8192 16x8192 --grad-accum 1 \
        --variants mpoe mpoe_aux ds --out benchmarks/results/aux_gather_layer.json

Analytical floor of the MPOE / standard step-time ratio: 1 + R / T with R the
reconstruction FLOPs per step (forward + backward = 3x the contraction, per
local expert, per rebuild) and T the standard MoE's expert-matmul FLOPs per
step (3x forward, over the padded slots both layers compute).
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

HIDDEN, FFN = 768, 3072
AUX_COEF = 0.01
LR = 1e-6  # small: routing stays put over the run, the optimizer still does all its work
VARIANTS = ("mpoe", "mpoe_shard", "mpoe_plain", "mpoe_aux", "ffn", "ds", "dense")
MPOE_KINDS = ("mpoe", "mpoe_shard", "mpoe_plain", "mpoe_aux")  # variants whose experts are rebuilt from MPO cores
PER_STEP_KINDS = ("mpoe", "mpoe_shard", "mpoe_aux")  # variants that rebuild once per optimizer step
LABELS = {
    "mpoe": "MPOE (ours)",
    "mpoe_shard": "MPOE, central tensors sharded over expert parallelism",
    "mpoe_plain": "MPOE, rebuild per micro-batch",
    "mpoe_aux": "MPOE, aux_gather dispatch",
    "ffn": "ours, plain FFN experts",
    "ds": "DeepSpeed MoE",
    "dense": "dense FFN",
}

# The suite behind the README table: (ranks, grad_accum, [(experts, tokens per rank), ...]).
SUITE = [
    (2, 4, [(8, 8192)]),
    (2, 1, [(4, 2048), (4, 8192), (8, 2048), (8, 8192), (16, 2048), (16, 8192)]),
    (1, 1, [(4, 2048), (4, 8192), (4, 32768), (8, 2048), (8, 8192), (16, 2048), (16, 8192)]),
]


# --------------------------------------------------------------------------- variants


def router_weight(num_experts: int):
    """The router init of our layer (layer_id 0, default seed), given to DeepSpeed's gate too."""
    import torch

    from mpomoe_ds.moe.config import MoEConfig
    from mpomoe_ds.moe.grad_mask import mix_seed

    gen = torch.Generator().manual_seed(mix_seed(MoEConfig().seed, 0, 2))
    return torch.randn((num_experts, HIDDEN), generator=gen) * 0.02


def build_variant(kind: str, num_experts: int, ep_size: int, dropless_impl: str = "padded"):
    """The module a variant trains: the layer plus loss = mean(y^2) + AUX_COEF * l_aux.

    ``dropless_impl`` is our layers' ``moe.dropless_impl`` (benchmarks/skew.py compares both).
    """
    import torch
    from torch import nn

    from mpomoe_ds.moe.config import MoEConfig
    from mpomoe_ds.moe.layer import DenseFFN, MPOEMoE
    from mpomoe_ds.mpo.config import MPOConfig

    dense = DenseFFN.random(HIDDEN, FFN, seed=0)
    moe_cfg = MoEConfig(num_experts=num_experts, ep_size=ep_size, k=1, dropless=True, aux_loss_coef=AUX_COEF,
                        expert_type="ffn" if kind == "ffn" else "mpo", activation="gelu", expert_init="copy",
                        shard_central=kind == "mpoe_shard", dropless_impl=dropless_impl,
                        dispatch="aux_gather" if kind == "mpoe_aux" else "tokens")

    class Wrapped(nn.Module):
        def __init__(self, layer: nn.Module, has_aux: bool) -> None:
            super().__init__()
            self.layer = layer
            self.has_aux = has_aux

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.detach().requires_grad_()  # inside a model the layer's input needs a gradient too
            if not self.has_aux:
                return self.layer(x).float().pow(2).mean()
            out, aux, _ = self.layer(x)
            return out.float().pow(2).mean() + AUX_COEF * aux

    if kind in MPOE_KINDS + ("ffn",):
        layer = MPOEMoE.from_dense(dense, moe_cfg, MPOConfig())
        if not torch.equal(layer.deepspeed_moe.gate.wg.weight, router_weight(num_experts)):
            raise RuntimeError("router_weight() no longer matches MPOEMoE's router init; update it")
        return Wrapped(layer, True)
    if kind == "ds":
        from deepspeed.moe.layer import MoE

        expert = nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))
        with torch.no_grad():
            expert[0].weight.copy_(dense.up_weight.T)
            expert[2].weight.copy_(dense.down_weight.T)
        layer = MoE(hidden_size=HIDDEN, expert=expert, num_experts=num_experts, ep_size=ep_size, k=1,
                    capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=0, drop_tokens=False, use_rts=False)
        with torch.no_grad():
            layer.deepspeed_moe.gate.wg.weight.copy_(router_weight(num_experts))
        return Wrapped(layer, True)
    if kind == "dense":
        ffn = nn.Sequential(nn.Linear(HIDDEN, FFN), nn.GELU(), nn.Linear(FFN, HIDDEN))
        return Wrapped(ffn, False)
    raise ValueError(f"unknown variant {kind!r}; choose from {VARIANTS}")


def ds_config(grad_accum: int, zero: int, dtype: str) -> dict[str, Any]:
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": 0.0,  # DeepSpeed 0.19 defaults to 1.0
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": zero, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
        "steps_per_print": 10**9,
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def make_engine(module, grad_accum: int, zero: int, dtype: str):
    import deepspeed
    import torch

    from mpomoe_ds.moe.params import optimizer_param_groups

    groups = optimizer_param_groups(module)
    optimizer = torch.optim.AdamW(groups, lr=LR, weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=ds_config(grad_accum, zero, dtype))
    return engine


# --------------------------------------------------------------------------- accounting


def param_kind(p) -> str:
    from mpomoe_ds.moe.params import parameter_kind

    return parameter_kind(p)


def parameter_accounting(engine, kind: str, zero: int, world: int, ep_size: int) -> dict[str, Any]:
    """Parameters and optimizer state on this rank: counted from the engine, and attributed per kind.

    Attribution (AdamW, fp32): a parameter costs its own bytes plus, as
    optimizer state, the fp32 master copy ZeRO keeps (stage >= 1) and Adam's
    two moments, all partitioned over the group that replicates it: the
    data-parallel group (world) for dense and central tensors, the
    expert-data-parallel group (world / ep_size) for experts.
    """
    import torch
    from deepspeed.moe.utils import is_moe_param

    module = engine.module
    counts = {"dense": 0, "central": 0, "expert": 0}
    param_bytes = {"dense": 0, "central": 0, "expert": 0}
    state_bytes = {"dense": 0.0, "central": 0.0, "expert": 0.0}
    for name, p in module.named_parameters():
        k = param_kind(p)
        if kind == "dense":
            k = "expert"  # the dense FFN is all "expert side": it is what the experts replace
        elif "gate" in name:
            k = "dense"
        counts[k] += p.numel()
        param_bytes[k] += p.numel() * p.element_size()
        if p.requires_grad:
            replicas = world // ep_size if is_moe_param(p) else world
            per_elem = (4 + 8) if zero >= 1 else 8
            state_bytes[k] += p.numel() * per_elem / (replicas if zero >= 1 else 1)
    opt = engine.optimizer
    measured = 0
    for t in getattr(opt, "single_partition_of_fp32_groups", []) or []:
        measured += t.numel() * t.element_size()
    inner = getattr(opt, "optimizer", opt)
    for state in getattr(inner, "state", {}).values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                measured += v.numel() * v.element_size()
    expert_side = ("central", "expert")
    return {
        "params": counts,
        "param_bytes": param_bytes,
        "optimizer_state_bytes_attributed": {k: int(v) for k, v in state_bytes.items()},
        "optimizer_state_bytes_measured": int(measured),
        "expert_side_params": sum(counts[k] for k in expert_side),
        "expert_side_bytes": int(sum(param_bytes[k] + state_bytes[k] for k in expert_side)),
    }


def reconstruction_macs_per_rebuild(engine) -> int:
    """MACs of one rebuild of every local expert's matrices (0 for non-MPO variants)."""
    from mpomoe_ds.moe.layer import moe_layers

    return sum(layer.reconstruction_macs() for _, layer in moe_layers(engine.module))


def capacities(batches, num_experts: int) -> list[int]:
    """Dropless capacity (largest per-expert load over the expert-parallel group) of each micro-batch."""
    import torch
    import torch.distributed as dist

    weight = router_weight(num_experts)
    out = []
    for x in batches:
        chosen = torch.argmax(x.float() @ weight.T, dim=-1)
        counts = torch.bincount(chosen, minlength=num_experts).max().reshape(1)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        out.append(int(counts))
    return out


# --------------------------------------------------------------------------- worker


def run_cell(rank: int, world: int, args, num_experts: int, tokens: int, kinds: list[str]) -> dict[str, Any]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mpomoe_ds import parallel
    from mpomoe_ds.moe.step import MoEStep

    ep = world  # expert parallelism over every rank: ep_size = world
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(1000 * rank + tokens + num_experts)
    batches = [torch.randn(tokens, HIDDEN, generator=gen).to(dtype) for _ in range(args.grad_accum)]
    caps = capacities(batches, num_experts)
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().current_device_name())
    batches = [b.to(device) for b in batches]
    local = num_experts // ep
    slots = [local * ep * c for c in caps]  # rows each rank's expert matmuls process per micro-batch
    token_macs = sum(s * 2 * HIDDEN * FFN for s in slots) * 3

    # ---- timing: every variant alive, round robin
    engines = {k: make_engine(build_variant(k, num_experts, ep), args.grad_accum, args.zero, args.dtype)
               for k in kinds}
    recon = {k: reconstruction_macs_per_rebuild(engines[k]) for k in kinds}
    run_steps = {k: functools.partial(common.train_step, engines[k], batches, MoEStep(engines[k].module),
                                      k in PER_STEP_KINDS) for k in kinds}
    if args.bytes_only:  # no timed rounds: only the counting pass below
        times, phases = {k: [float("nan")] for k in kinds}, {k: [{}] for k in kinds}
    else:
        times, phases = common.timed_rounds(rank, run_steps, args.warmup, args.steps)
    accounting = {k: parameter_accounting(engines[k], k, args.zero, world, ep) for k in kinds}
    for engine in engines.values():
        engine.destroy()  # removes ZeRO's gradient hooks: without it the engine is never freed
    del engines, engine, run_steps
    gc.collect()

    # ---- memory, FLOPs, communication: one variant at a time, built inside the tracker
    extra: dict[str, dict[str, Any]] = {}
    for k in kinds:
        tracker = common.LiveTensorTracker()
        with tracker:
            engine = make_engine(build_variant(k, num_experts, ep), args.grad_accum, args.zero,
                                 args.dtype)
            moe_step = MoEStep(engine.module)
            if not args.bytes_only:  # optimizer state exists from here (bytes do not depend on it)
                common.train_step(engine, batches, moe_step, k in PER_STEP_KINDS)
            gc.collect()
            tracker.reset_peak()
            resting = tracker.live
            parallel.reset_traffic()
            with common.CommCounter() as comm, FlopCounterMode(display=False) as flops:
                common.train_step(engine, batches, moe_step, k in PER_STEP_KINDS)
            peak = tracker.peak
        extra[k] = {"peak_bytes": peak, "resting_bytes": resting, "flops": flops.get_total_flops(),
                    "comm_bytes": comm.bytes, "comm_calls": comm.calls, "dispatch_bytes": parallel.traffic()}
        engine.destroy()
        del engine, moe_step
        gc.collect()

    # ---- summary
    results = {}
    for k in kinds:
        rebuilds = 0 if not recon[k] else (1 if (k in PER_STEP_KINDS or args.grad_accum == 1) else args.grad_accum)
        if k == "mpoe_aux":
            rebuilds *= ep  # every rank rebuilds all E experts, not its E / ep
        results[k] = {
            "label": LABELS[k],
            "step_s_median": common.median(times[k]),
            "step_s": times[k],
            "phase_s_median": {p: common.median([ph.get(p, 0.0) for ph in phases[k]]) for p in phases[k][0]},
            "reconstruction_flops": 2 * 3 * recon[k] * rebuilds,
            **accounting[k],
            **extra[k],
        }
    cell: dict[str, Any] = {"experts": num_experts, "tokens_per_rank": tokens, "local_experts": local,
                            "capacity": caps, "token_flops": 2 * token_macs, "variants": results}
    if "ds" in results:
        std = results["ds"]
        for k in kinds:
            results[k]["time_vs_ds"] = results[k]["step_s_median"] / std["step_s_median"]
            results[k]["flops_vs_ds"] = results[k]["flops"] / std["flops"] if std["flops"] else None
            results[k]["expert_side_bytes_ds_over_this"] = std["expert_side_bytes"] / max(results[k][
                "expert_side_bytes"], 1)
        for k in MPOE_KINDS:
            if k in results:
                floor = 1.0 + results[k]["reconstruction_flops"] / cell["token_flops"]
                results[k]["analytic_floor"] = floor
                results[k]["time_over_floor"] = results[k]["time_vs_ds"] / floor
    return cell


def worker(args) -> None:
    import torch

    rank, world = common.init_worker()
    cells = [tuple(int(v) for v in c.split("x")) for c in args.cells]
    kinds = [k for k in args.variants
             if (k != "mpoe_plain" or args.grad_accum > 1) and (k not in ("mpoe_shard", "mpoe_aux") or world > 1)]
    run = {"ranks": world, "ep_size": world, "grad_accum": args.grad_accum, "zero_stage": args.zero,
           "dtype": args.dtype, "threads_per_rank": torch.get_num_threads(), "warmup": args.warmup,
           "steps": args.steps, "cells": []}
    for num_experts, tokens in cells:
        common.log(rank, f"ranks={world} grad_accum={args.grad_accum} E={num_experts} tokens/rank={tokens}")
        started = time.time()
        cell = run_cell(rank, world, args, num_experts, tokens, kinds)
        cell["wall_s"] = time.time() - started
        cell["load_average_at_end"] = os.getloadavg()
        run["cells"].append(cell)
        if rank == 0:  # written after every cell: a long suite keeps what it measured
            common.write_json(Path(args.out), {"machine": common.machine_info(), "run": run})
    common.barrier()


# --------------------------------------------------------------------------- driver


def parse_args(argv: Optional[list[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", help="process counts (ep_size = ranks)")
    parser.add_argument("--experts", type=int, nargs="+", help="E values")
    parser.add_argument("--tokens", type=int, nargs="+", help="tokens per rank per micro-batch")
    parser.add_argument("--cells", nargs="+", help="explicit ExT cells, e.g. 4x32768 (instead of experts x tokens)")
    parser.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=5, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up rounds")
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="cuda: DeepSpeed's CUDA accelerator (NCCL), one GPU per rank")
    parser.add_argument("--out", default=str(common.RESULTS / "layer.json"))
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads per rank (default 1: on a small shared machine, multi-threaded small "
                             "ops wait for descheduled threads; see benchmarks/README.md)")
    parser.add_argument("--no-malloc-tuning", action="store_true", help="glibc malloc defaults (see common.py)")
    parser.add_argument("--bytes-only", action="store_true",
                        help="skip the timed rounds and the warm-up step of the counting pass: bytes, FLOPs and "
                             "memory of one step only (step times are NaN)")
    parser.add_argument("--merge", action="store_true",
                        help="update --out in place: replace the cells run now, keep every other cell")
    common.add_worker_args(parser)
    return parser.parse_args(argv)


def grids(args) -> list[tuple[int, int, list[tuple[int, int]]]]:
    custom = any(v is not None for v in (args.ranks, args.experts, args.tokens, args.cells, args.grad_accum))
    if not custom:
        return SUITE
    if args.cells:
        cells = [tuple(int(v) for v in c.split("x")) for c in args.cells]
    else:
        cells = [(e, t) for e in (args.experts or [8]) for t in (args.tokens or [2048])]
    return [(r, args.grad_accum or 1, cells) for r in (args.ranks or [1])]


def merge_runs(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``old`` with the cells of ``new`` put in (same run settings and cell: replaced)."""
    def key(run: dict[str, Any]) -> tuple:
        return run["ranks"], run["grad_accum"], run["zero_stage"], run["dtype"], run["threads_per_rank"]

    runs = {key(r): r for r in old["runs"]}
    for run in new["runs"]:
        if key(run) not in runs:
            runs[key(run)] = run
            continue
        cells = {(c["experts"], c["tokens_per_rank"]): c for c in runs[key(run)]["cells"]}
        for cell in run["cells"]:
            cell["rerun"] = True
            cells[(cell["experts"], cell["tokens_per_rank"])] = cell
        runs[key(run)]["cells"] = [cells[k] for k in sorted(cells)]
    merged = dict(old)
    merged["runs"] = list(runs.values())
    merged.setdefault("reruns", []).append({"machine": new["machine"],
                                            "cells": [[key(r), [(c["experts"], c["tokens_per_rank"])
                                                                for c in r["cells"]]] for r in new["runs"]]})
    return merged


def report_name(variants: list[str]) -> str:
    """Which report the results get: the aux_gather table (bytes vs token dispatch) when mpoe_aux is measured."""
    return "aux_gather_layer" if "mpoe_aux" in variants else "layer"


def drive(args) -> None:
    """Launch the ranks for every run, then write the results and the report."""
    out = Path(args.out)
    runs, machine = [], None
    name, command = report_name(args.variants), "python benchmarks/layer.py " + " ".join(sys.argv[1:])
    for ranks, accum, cells in grids(args):
        run = None
        for num_experts, tokens in cells:  # a fresh process per cell: a clean heap for every measurement
            part = out.with_name(f"{out.stem}.r{ranks}.ga{accum}.{num_experts}x{tokens}.json")
            common.launch(Path(__file__), ranks,
                          ["--grad-accum", str(accum), "--cells", f"{num_experts}x{tokens}",
                           "--variants", *args.variants, "--steps", str(args.steps), "--warmup", str(args.warmup),
                           "--zero", str(args.zero), "--dtype", args.dtype, "--out", str(part)]
                          + (["--bytes-only"] if args.bytes_only else []),
                          malloc_tuning=not args.no_malloc_tuning, threads=args.threads, device=args.device)
            result = common.read_json(part)
            machine = machine or result["machine"]
            if run is None:
                run = result["run"]
            else:
                run["cells"] += result["run"]["cells"]
            part.unlink()
            partial = {"benchmark": name, "machine": machine, "hidden": HIDDEN, "ffn": FFN, "runs": runs + [run]}
            common.write_json(out.with_name(f"{out.stem}.partial.json"), partial)  # survives an interrupted suite
        runs.append(run)
    data = {"benchmark": name, "command": command, "machine": machine, "hidden": HIDDEN, "ffn": FFN, "runs": runs}
    data["machine"]["load_average_at_end"] = os.getloadavg()
    if args.merge and out.exists():
        data = merge_runs(common.read_json(out), data)
        data["reruns"][-1]["command"] = command
    common.write_json(out, data)
    out.with_name(f"{out.stem}.partial.json").unlink(missing_ok=True)
    import report

    report.main([str(out)])  # picks the report from data["benchmark"]


def main(argv: Optional[list[str]] = None) -> None:
    common.dispatch(parse_args(argv), worker, drive)


if __name__ == "__main__":
    main()
