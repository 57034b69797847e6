"""Skewed-routing benchmark: dropless dispatch with and without padding, next to DeepSpeed's MoE.

The router sends expert loads along a Zipf(1.2) distribution over E = 16
experts: expert e (rank e + 1 in the Zipf order) gets a share proportional to
(e + 1)^-1.2 of every rank's tokens. Tokens are built for it: token t assigned
to expert e_t is ``noise + SKEW_SCALE * w_e / |w_e|`` with w_e the router's row
for e (the same router weights in every variant, layer.router_weight), so the
router's top-1 choice is e_t; the loads the layers actually route are counted
and stored. One command, 2 ranks (ep_size 2), writes
``benchmarks/results/skew.{json,md,png}``::

    python benchmarks/skew.py [--tokens 2048] [--steps 3]
    python benchmarks/skew.py --tokens 8192 --out benchmarks/results/skew_8192.json   # the issue's 8192 tokens per rank

Variants, at layer.py's widths (D = 768, F = 3072, GELU), k = 1, dropless:

    mpoe          our layer, MPO experts, moe.dropless_impl: padded (today's default)
    mpoe_segments the same with dropless_impl: segments (no padding)
    ffn           plain dense experts, padded
    ffn_segments  plain dense experts, segments
    ds            deepspeed.moe.layer.MoE, drop_tokens=False (pads to the largest load too)

Padded dropless gives every expert C = the group's largest per-expert load
slots per source rank, so each rank's experts compute L * P * C rows. Rows the
experts compute are counted with a forward pre-hook on the expert module
(ours and DeepSpeed's); padded slots = computed rows - routed tokens. Step
time (median, interleaved rounds, slowest rank), peak tensor memory and
collective bytes are measured as in benchmarks/layer.py (common.py).
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

import layer  # noqa: E402

import common  # noqa: E402

NUM_EXPERTS = 16
ZIPF_S = 1.2
SKEW_SCALE = 8.0  # router margin of the assigned expert: ~8 * |w| = 4.4 logits, against noise of std ~0.55
VARIANTS = ("mpoe", "mpoe_segments", "ffn", "ffn_segments", "ds")
LABELS = {
    "mpoe": "MPOE, padded dropless (default)",
    "mpoe_segments": "MPOE, dropless without padding",
    "ffn": "ours, plain FFN experts, padded",
    "ffn_segments": "ours, plain FFN experts, without padding",
    "ds": "DeepSpeed MoE (drop_tokens=False)",
}


def zipf_counts(tokens: int, num_experts: int, s: float = ZIPF_S) -> list[int]:
    """Tokens per expert proportional to (e + 1)^-s, rounded by largest remainder (they sum to ``tokens``)."""
    weights = [(e + 1) ** -s for e in range(num_experts)]
    exact = [tokens * w / sum(weights) for w in weights]
    counts = [int(x) for x in exact]
    for e in sorted(range(num_experts), key=lambda e: counts[e] - exact[e])[:tokens - sum(counts)]:
        counts[e] += 1
    return counts


def skewed_batch(tokens: int, num_experts: int, seed: int):
    """(tokens, D) inputs whose top-1 expert under layer.router_weight follows :func:`zipf_counts`."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    weight = layer.router_weight(num_experts)
    assigned = torch.repeat_interleave(torch.arange(num_experts), torch.tensor(zipf_counts(tokens, num_experts)))
    assigned = assigned[torch.randperm(tokens, generator=gen)]
    direction = weight / weight.norm(dim=1, keepdim=True)
    return torch.randn(tokens, layer.HIDDEN, generator=gen) + SKEW_SCALE * direction[assigned]


def build(kind: str, ep: int):
    base, _, impl = kind.partition("_")
    return layer.build_variant(base, NUM_EXPERTS, ep, dropless_impl=impl or "padded")


def expert_module(engine):
    """The module the experts' rows enter: ours (MoEExperts) or DeepSpeed's Experts."""
    return engine.module.layer.deepspeed_moe.experts


def count_rows(engine) -> list[int]:
    """Rows each forward hands to the experts (every dim but the hidden one), padding included."""
    rows: list[int] = []
    expert_module(engine).register_forward_pre_hook(lambda m, args: rows.append(args[0].numel() // layer.HIDDEN))
    return rows


def routed_loads(batches) -> list[int]:
    """Tokens per expert the router picks, summed over micro-batches and ranks."""
    import torch
    import torch.distributed as dist

    weight = layer.router_weight(NUM_EXPERTS)
    counts = sum(torch.bincount(torch.argmax(b.float() @ weight.T, -1), minlength=NUM_EXPERTS) for b in batches)
    dist.all_reduce(counts)
    return counts.tolist()


def all_ranks_sum(value: int) -> int:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value])
    dist.all_reduce(t)
    return int(t)


def run(rank: int, world: int, args) -> dict[str, Any]:
    import torch

    from mpomoe_ds.moe.step import MoEStep

    batches = [skewed_batch(args.tokens, NUM_EXPERTS, seed=100 * rank + i) for i in range(args.grad_accum)]
    loads = routed_loads(batches)
    engines = {k: layer.make_engine(build(k, world), args.grad_accum, args.zero, "fp32") for k in args.variants}
    rows = {k: count_rows(e) for k, e in engines.items()}
    per_step = {k: k.startswith("mpoe") for k in engines}
    run_steps = {k: functools.partial(common.train_step, e, batches, MoEStep(e.module), per_step[k])
                 for k, e in engines.items()}
    times, _ = common.timed_rounds(rank, run_steps, args.warmup, args.steps)
    computed = {k: all_ranks_sum(sum(r[:args.grad_accum])) for k, r in rows.items()}  # the first step's forwards
    for engine in engines.values():
        engine.destroy()
    del engines, run_steps
    gc.collect()

    extra = {}
    for k in args.variants:
        tracker = common.LiveTensorTracker()
        with tracker:
            engine = layer.make_engine(build(k, world), args.grad_accum, args.zero, "fp32")
            moe_step = MoEStep(engine.module)
            common.train_step(engine, batches, moe_step, per_step[k])
            gc.collect()
            tracker.reset_peak()
            with common.CommCounter() as comm:
                common.train_step(engine, batches, moe_step, per_step[k])
            peak = tracker.peak
        extra[k] = {"peak_bytes": peak, "comm_bytes": comm.bytes}
        engine.destroy()
        del engine, moe_step
        gc.collect()

    routed = world * args.tokens * args.grad_accum  # k = 1: one route per token
    variants = {k: {"label": LABELS[k], "step_s_median": common.median(times[k]), "step_s": times[k],
                    "computed_rows": computed[k], "routed_rows": routed, "padded_slots": computed[k] - routed,
                    **extra[k]} for k in args.variants}
    return {"experts": NUM_EXPERTS, "zipf_s": ZIPF_S, "tokens_per_rank": args.tokens, "ranks": world,
            "ep_size": world, "grad_accum": args.grad_accum, "zero_stage": args.zero, "steps": args.steps,
            "warmup": args.warmup, "threads_per_rank": torch.get_num_threads(),
            "target_loads": [world * args.grad_accum * c for c in zipf_counts(args.tokens, NUM_EXPERTS)],
            "routed_loads": loads, "variants": variants}


def worker(args) -> None:
    rank, world = common.init_worker()
    common.log(rank, f"skew: ranks={world} E={NUM_EXPERTS} Zipf({ZIPF_S}) tokens/rank={args.tokens}")
    started = time.time()
    result = run(rank, world, args)
    result["wall_s"] = time.time() - started
    if rank == 0:
        common.write_json(Path(args.out), {"benchmark": "skew", "machine": common.machine_info(),
                                           "hidden": layer.HIDDEN, "ffn": layer.FFN, "run": result})
    common.barrier()


# --------------------------------------------------------------------------- report

MiB = 2**20


def tables(data: dict[str, Any]) -> str:
    import report

    r = data["run"]
    v = r["variants"]
    lines = [report.machine_md(data["machine"]), "",
             f"### Zipf({r['zipf_s']}) routing, E = {r['experts']}, {r['ranks']} ranks (ep_size {r['ep_size']}), "
             f"{r['tokens_per_rank']} tokens per rank, gradient accumulation {r['grad_accum']}, "
             f"ZeRO-{r['zero_stage']}, fp32, {r['threads_per_rank']} thread(s) per rank; median of {r['steps']} "
             f"steps after {r['warmup']} warm-up", "",
             f"Routed loads (all ranks and micro-batches, expert 0..{r['experts'] - 1}): "
             f"{r['routed_loads']} (Zipf target {r['target_loads']}).", "",
             "| variant | computed rows | routed tokens | padded slots | step (s) | vs DeepSpeed | vs padded "
             "| peak memory (MiB) | all-to-all (MB, per rank) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for k, x in v.items():
        padded_twin = v.get(k.replace("_segments", ""))
        vs_ds = report.paired_ratio(x, v["ds"]) if "ds" in v else None
        vs_padded = report.paired_ratio(x, padded_twin) if padded_twin and padded_twin is not x else None
        lines.append(f"| {x['label']} | {x['computed_rows']} | {x['routed_rows']} | {x['padded_slots']} | "
                     f"{x['step_s_median']:.2f} | {report._fmt(vs_ds)} | {report._fmt(vs_padded)} | "
                     f"{x['peak_bytes'] / MiB:.0f} | {x['comm_bytes'].get('all_to_all', 0) / 1e6:.1f} |")
    lines += ["", "Ratios are medians of per-round ratios (variants interleaved, seconds apart).", ""]
    return "\n".join(lines)


def plot(data: dict[str, Any], axes: Any) -> None:
    v = data["run"]["variants"]
    names = list(v)
    axes[0].bar(names, [v[k]["step_s_median"] for k in names])
    axes[0].set_ylabel("step time (s)")
    axes[1].bar(names, [v[k]["peak_bytes"] / MiB for k in names])
    axes[1].set_ylabel("peak tensor memory (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=30, labelsize=7)


def drive(args) -> None:
    import report

    out = Path(args.out)
    part = out.with_name(f"{out.stem}.part.json")
    common.launch(Path(__file__), args.ranks,
                  ["--tokens", str(args.tokens), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--grad-accum", str(args.grad_accum), "--zero", str(args.zero), "--variants", *args.variants,
                   "--out", str(part)], threads=args.threads)
    data = common.read_json(part)
    data["machine"]["load_average_at_end"] = os.getloadavg()
    common.write_json(out, data)
    part.unlink()
    report.write_report(out, tables, plot, figsize=(10, 4))


def parse_args(argv: Optional[list[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2, help="processes (ep_size = ranks)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens per rank per micro-batch")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="measured rounds")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--zero", type=int, default=2, choices=(0, 1, 2))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    parser.add_argument("--out", default=str(common.RESULTS / "skew.json"))
    common.add_worker_args(parser)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> None:
    common.dispatch(parse_args(argv), worker, drive)


if __name__ == "__main__":
    main()
