"""Scale simulation: where token dispatch and aux-gather expert parallelism win, 8 to 512 GPUs.

Applies the dispatch cost model (:mod:`mpomoe_ds.moe.dispatch_cost`) to one
GPT-2-width MoE layer (D = 768, F = 3072, lossless MPO experts, k = 1,
8192 tokens per GPU per micro-batch, bf16) with one expert per GPU
(E = ep_size = GPUs, and E = 8 at 8 GPUs), at NVLink-, InfiniBand- and
Ethernet-class per-GPU bandwidths and a stated GPU FLOP rate, for gradient
accumulation 1 and 4, and writes ``benchmarks/results/scale_model.{json,md,png}``::

    python benchmarks/scale_model.py            # calibrates on this machine first
    python benchmarks/scale_model.py --no-calibrate

Calibration (this machine, CPU): the reconstruction FLOP rate (one batched
rebuild of 8 GPT-2-width experts, timed) and the gloo bandwidth between two
local ranks (an all-gather, timed). The same cost model, fed those two
numbers, predicts the 2-rank layer cells of ``aux_gather_layer.json``
(``benchmarks/layer.py``); the table puts the prediction next to the
measured step-time difference, so the model is checked where it can be.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

HIDDEN, FFN, TOKENS, K = 768, 3072, 8192, 1
GPUS = (8, 64, 512)
ACCUMULATION = (1, 4)
# Per-GPU, one direction, bytes/s: what a collective can sustain, not the marketing peak.
LINKS = {"NVLink-class (450 GB/s)": 450.0, "InfiniBand-class (50 GB/s, NDR 400 Gb/s)": 50.0,
         "Ethernet-class (12.5 GB/s, 100 GbE)": 12.5}
GPU_TFLOPS = 400.0  # bf16 reconstruction GEMMs: ~40% of an H100's 989 dense TFLOP/s
DTYPE_BYTES = 2  # bf16


def layer_shapes() -> dict[str, float]:
    """Auxiliary / bias values and reconstruction FLOPs of one GPT-2-width lossless MPO expert."""
    from mpomoe_ds.moe.config import MoEConfig
    from mpomoe_ds.moe.layer import MPOEMoE

    layer = MPOEMoE(HIDDEN, FFN, MoEConfig(num_experts=1, ep_size=1))
    workload = layer.dispatch_workload(TOKENS)
    return {"aux_per_expert": workload.aux_per_expert, "bias_per_expert": workload.bias_per_expert,
            "reconstruction_flops_per_expert": workload.reconstruction_flops_per_expert}


def measure_reconstruction_tflops(repeats: int = 3) -> float:
    """FLOP rate of the batched reconstruction of 8 GPT-2-width experts (forward), one thread."""
    import torch

    from mpomoe_ds.moe.config import MoEConfig
    from mpomoe_ds.moe.layer import MPOEMoE

    layer = MPOEMoE(HIDDEN, FFN, MoEConfig(num_experts=8, ep_size=1))
    flops = 2.0 * layer.reconstruction_macs()
    with torch.no_grad():
        layer.expert_weights()
        start = time.perf_counter()
        for _ in range(repeats):
            layer.expert_weights()
        seconds = (time.perf_counter() - start) / repeats
    return flops / seconds / 1e12


def _bandwidth_rank(rank: int, port: int, numel: int, repeats: int, out: Any) -> None:
    import torch
    import torch.distributed as dist

    from mpomoe_ds import parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shard = torch.ones(numel)
    parallel.all_gather_flat(shard, None)
    parallel.barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        parallel.all_gather_flat(shard, None)
    seconds = (time.perf_counter() - start) / repeats
    if rank == 0:
        out.put(shard.nbytes / seconds / 1e9)  # each rank sends its shard once per all-gather
    dist.destroy_process_group()


def measure_gloo_gbps(numel: int = 8 * 2**20, repeats: int = 5) -> float:
    """GB/s one rank sends in a 2-rank gloo all-gather of 32 MiB shards on this machine."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = common.free_port()
    procs = [ctx.Process(target=_bandwidth_rank, args=(r, port, numel, repeats, out)) for r in range(2)]
    for p in procs:
        p.start()
    gbps = out.get(timeout=600)
    for p in procs:
        p.join()
    return gbps


def workload(gpus: int, accumulation: int, link_gbps: float, tflops: float, shapes: dict[str, float],
             experts: Optional[int] = None, tokens: int = TOKENS, dtype_bytes: int = DTYPE_BYTES):
    from mpomoe_ds.moe.dispatch_cost import DispatchWorkload

    return DispatchWorkload(tokens_per_rank=tokens, hidden_size=HIDDEN, k=K, accumulation=accumulation,
                            dtype_bytes=dtype_bytes, aux_per_expert=int(shapes["aux_per_expert"]),
                            bias_per_expert=int(shapes["bias_per_expert"]), num_experts=experts or gpus,
                            ep_size=gpus, reconstruction_flops_per_expert=shapes["reconstruction_flops_per_expert"],
                            link_gbps=link_gbps, device_tflops=tflops)


def simulate(shapes: dict[str, float]) -> list[dict[str, Any]]:
    rows = []
    for gpus in GPUS:
        for link, gbps in LINKS.items():
            for accumulation in ACCUMULATION:
                w = workload(gpus, accumulation, gbps, GPU_TFLOPS, shapes)
                rows.append({"gpus": gpus, "link": link, **w.report()})
    return rows


def check_on_this_machine(shapes: dict[str, float], gbps: float, tflops: float) -> list[dict[str, Any]]:
    """The model's prediction for the measured 2-rank layer cells (fp32, CPU), next to the measurement."""
    path = common.RESULTS / "aux_gather_layer.json"
    if not path.exists():
        return []
    rows = []
    for run in common.read_json(path)["runs"]:
        for cell in run["cells"]:
            v = cell["variants"]
            if "mpoe" not in v or "mpoe_aux" not in v:
                continue
            w = workload(run["ranks"], run["grad_accum"], gbps, tflops, shapes, experts=cell["experts"],
                         tokens=cell["tokens_per_rank"], dtype_bytes=4)
            rows.append({"experts": cell["experts"], "grad_accum": run["grad_accum"],
                         "predicted_aux_minus_tokens_s": w.aux_seconds() - w.token_seconds(),
                         "measured_aux_minus_tokens_s": v["mpoe_aux"]["step_s_median"] - v["mpoe"]["step_s_median"],
                         "predicted_token_bytes": w.token_bytes(), "predicted_aux_bytes": w.aux_bytes(),
                         "measured_token_bytes": sum(v["mpoe"]["dispatch_bytes"].values()),
                         "measured_aux_bytes": sum(v["mpoe_aux"]["dispatch_bytes"].values())})
    return rows


# --------------------------------------------------------------------------- report


def tables(data: dict[str, Any]) -> str:
    cal, shapes = data["calibration"], data["shapes"]
    lines = [f"Machine: {common.machine_line(data['machine'])}.", "",
             f"One MoE layer, D = {HIDDEN}, F = {FFN}, lossless MPO experts ({shapes['aux_per_expert']:,} "
             f"auxiliary + {shapes['bias_per_expert']:,} bias values, "
             f"{shapes['reconstruction_flops_per_expert'] / 1e9:.2f} GFLOP per rebuild), k = {K}, "
             f"{TOKENS} tokens per GPU per micro-batch, bf16, one expert per GPU (E = GPUs), "
             f"{GPU_TFLOPS:.0f} TFLOP/s for reconstruction. Bytes: sent per GPU per optimizer step.", "",
             "| GPUs | link | GA | tokens MB | aux_gather MB | tokens ms | aux_gather ms (comm + rebuild) | wins |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        comm = r["aux_bytes"] / (r["link_gbps"] * 1e9) * 1e3
        rebuild = r["extra_reconstruction_flops"] / (r["device_tflops"] * 1e12) * 1e3
        lines.append(f"| {r['gpus']} | {r['link']} | {r['accumulation']} | {r['token_bytes'] / 1e6:.0f} | "
                     f"{r['aux_bytes'] / 1e6:.0f} | {r['token_seconds'] * 1e3:.2f} | "
                     f"{r['aux_seconds'] * 1e3:.2f} ({comm:.2f} + {rebuild:.2f}) | {r['choice']} |")
    lines += ["", f"Calibration on this machine: reconstruction {cal['reconstruction_tflops'] * 1e3:.1f} GFLOP/s "
                  f"(one thread, fp32), gloo {cal['gloo_gbps']:.2f} GB/s between two local ranks."]
    if data["check"]:
        lines += ["", "The model on this machine's measured 2-rank layer cells (fp32; "
                      "benchmarks/results/aux_gather_layer.json):", "",
                  "| E | GA | predicted tokens MB | measured | predicted aux_gather MB | measured | "
                  "predicted aux - tokens s | measured |", "|---|---|---|---|---|---|---|---|"]
        for c in data["check"]:
            lines.append(f"| {c['experts']} | {c['grad_accum']} | {c['predicted_token_bytes'] / 1e6:.1f} | "
                         f"{c['measured_token_bytes'] / 1e6:.1f} | {c['predicted_aux_bytes'] / 1e6:.1f} | "
                         f"{c['measured_aux_bytes'] / 1e6:.1f} | {c['predicted_aux_minus_tokens_s']:+.2f} | "
                         f"{c['measured_aux_minus_tokens_s']:+.2f} |")
    return "\n".join(lines) + "\n"


def plot(data: dict[str, Any], axes: Any) -> None:
    for ax, accumulation in zip(axes, ACCUMULATION):
        for link in LINKS:
            rows = [r for r in data["rows"] if r["link"] == link and r["accumulation"] == accumulation]
            ratio = [r["token_seconds"] / r["aux_seconds"] for r in rows]
            ax.plot([r["gpus"] for r in rows], ratio, marker="o", label=link)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("GPUs (= experts = ep_size)")
        ax.set_ylabel("token dispatch time / aux_gather time (>1: aux_gather wins)")
        ax.set_title(f"gradient accumulation {accumulation}")
        ax.legend(fontsize=7)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-calibrate", action="store_true", help="reuse the calibration in the existing JSON")
    parser.add_argument("--out", default=str(common.RESULTS / "scale_model.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch

    torch.set_num_threads(1)
    out = Path(args.out)
    shapes = layer_shapes()
    if args.no_calibrate and out.exists():
        calibration = common.read_json(out)["calibration"]
    else:
        calibration = {"reconstruction_tflops": measure_reconstruction_tflops(), "gloo_gbps": measure_gloo_gbps()}
    data = {"benchmark": "scale_model", "machine": common.machine_info(), "shapes": shapes,
            "calibration": calibration, "gpu_tflops": GPU_TFLOPS, "links_gbps": LINKS, "rows": simulate(shapes),
            "check": check_on_this_machine(shapes, calibration["gloo_gbps"], calibration["reconstruction_tflops"])}
    common.write_json(out, data)
    import report

    report.write_report(out, tables, plot, figsize=(12, 4.5))


if __name__ == "__main__":
    main()
