"""Markdown tables and plots from the benchmark JSON files.

    python benchmarks/report.py benchmarks/results/layer.json benchmarks/results/model.json

writes ``<name>.md`` and ``<name>.png`` next to each JSON file (the layer and
model benchmarks call this themselves when they finish).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

MiB = 2**20
MB = 1e6


def _fmt(value: Optional[float], spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _grad_bytes(comm: dict[str, int]) -> int:
    return sum(comm.get(k, 0) for k in ("all_reduce", "reduce_scatter", "reduce"))


def _pair(a: int, b: int, ranks: int) -> str:
    return "- (1 process)" if ranks == 1 else f"{a / MB:.1f} / {b / MB:.1f}"


def paired_ratio(variant: dict[str, Any], baseline: dict[str, Any]) -> Optional[float]:
    """Median over rounds of the per-round ratio (both ran in the same round, seconds apart)."""
    pairs = [a / b for a, b in zip(variant["step_s"], baseline["step_s"]) if b > 0]
    return common.median(pairs) if pairs else None


def machine_md(machine: dict[str, Any]) -> str:
    load = machine.get("load_average_at_start")
    tail = f"; 1-min load average at start {load[0]:.1f}" if load else ""
    alloc = "; glibc malloc kept freed memory (see benchmarks/README.md)" if machine.get("malloc_tuning") else ""
    return f"Machine: {common.machine_line(machine)}{alloc}{tail}."


# --------------------------------------------------------------------------- layer


def layer_tables(data: dict[str, Any]) -> str:
    lines = [machine_md(data["machine"]), ""]
    for run in data["runs"]:
        ranks, accum = run["ranks"], run["grad_accum"]
        title = (f"### {ranks} process{'es' if ranks > 1 else ''} (ep_size {run['ep_size']}), "
                 f"gradient accumulation {accum}, ZeRO-{run['zero_stage']}, {run['dtype']}, "
                 f"{run['threads_per_rank']} thread(s) per rank; median of {run['steps']} steps after "
                 f"{run['warmup']} warm-up")
        lines += [title, ""]
        has_plain = any("mpoe_plain" in c["variants"] for c in run["cells"])
        has_shard = any("mpoe_shard" in c["variants"] for c in run["cells"])
        reruns = False
        head = ["E", "tokens/rank", "DeepSpeed MoE s/step", "MPOE s/step", "MPOE / DS", "paired", "floor",
                "MPOE/DS ÷ floor"]
        if has_plain:
            head += ["MPOE rebuild per micro-batch / DS"]
        if has_shard:
            head += ["MPOE sharded central / DS"]
        head += ["ours-FFN / DS", "dense / DS", "load"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cell in run["cells"]:
            v = cell["variants"]
            row = [str(cell["experts"]), str(cell["tokens_per_rank"]), _fmt(v["ds"]["step_s_median"], ".3f"),
                   _fmt(v["mpoe"]["step_s_median"], ".3f"), _fmt(v["mpoe"]["time_vs_ds"], ".3f"),
                   _fmt(paired_ratio(v["mpoe"], v["ds"]), ".3f"),
                   _fmt(v["mpoe"]["analytic_floor"], ".3f"), _fmt(v["mpoe"]["time_over_floor"], ".3f")]
            if has_plain:
                row += [_fmt(v["mpoe_plain"]["time_vs_ds"], ".3f") if "mpoe_plain" in v else "-"]
            if has_shard:
                row += [_fmt(v["mpoe_shard"]["time_vs_ds"], ".3f") if "mpoe_shard" in v else "-"]
            load = cell.get("load_average_at_end")
            row += [_fmt(v["ffn"]["time_vs_ds"], ".3f") if "ffn" in v else "-",
                    _fmt(v["dense"]["time_vs_ds"], ".3f") if "dense" in v else "-",
                    f"{load[0]:.1f}" if load else "-"]
            if cell.get("rerun"):
                row[0] += "*"
                reruns = True
            lines.append("| " + " | ".join(row) + " |")
        if reruns:
            lines += ["", "\\* re-run later with `--merge` (first run taken under heavier machine load)."]
        lines += ["", "MPOE / DS: ratio of the median step times; paired: median of the per-round ratios; "
                  "floor: 1 + reconstruction FLOPs / expert-matmul FLOPs; load: 1-minute load average of the "
                  "machine when the cell finished.", "",
                  "Memory and communication per rank and step (one step measured on its own):", ""]
        head = ["E", "tokens/rank", "peak MiB DS / MPOE / dense", "expert-side params DS / MPOE",
                "expert-side params+opt. state MiB DS / MPOE", "DS ÷ MPOE", "all-to-all MB DS / MPOE",
                "grad reduce MB DS / MPOE", "ZeRO param all-gather MB DS / MPOE"]
        if has_shard:
            head += ["sharded central: params+opt. state MiB", "DS ÷ MPOE sharded", "all-gather MB"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for cell in run["cells"]:
            v = cell["variants"]
            ds, mp = v["ds"], v["mpoe"]
            dense_peak = f" / {v['dense']['peak_bytes'] / MiB:.0f}" if "dense" in v else ""
            row = [str(cell["experts"]), str(cell["tokens_per_rank"]),
                   f"{ds['peak_bytes'] / MiB:.0f} / {mp['peak_bytes'] / MiB:.0f}{dense_peak}",
                   f"{ds['expert_side_params'] / 1e6:.2f}M / {mp['expert_side_params'] / 1e6:.2f}M",
                   f"{ds['expert_side_bytes'] / MiB:.0f} / {mp['expert_side_bytes'] / MiB:.0f}",
                   f"{mp['expert_side_bytes_ds_over_this']:.2f}x",
                   _pair(ds["comm_bytes"].get("all_to_all", 0), mp["comm_bytes"].get("all_to_all", 0), ranks),
                   _pair(_grad_bytes(ds["comm_bytes"]), _grad_bytes(mp["comm_bytes"]), ranks),
                   _pair(ds["comm_bytes"].get("all_gather", 0), mp["comm_bytes"].get("all_gather", 0), ranks)]
            if has_shard:
                sh = v.get("mpoe_shard")
                row += ([f"{sh['expert_side_bytes'] / MiB:.0f}", f"{sh['expert_side_bytes_ds_over_this']:.2f}x",
                         f"{sh['comm_bytes'].get('all_gather', 0) / MB:.1f}"] if sh else ["-", "-", "-"])
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_layer(data: dict[str, Any], axes: Any) -> None:
    runs = data["runs"]
    labels, measured, floors, plain, mem_ratio, shard_ratio = [], [], [], [], [], []
    for run in runs:
        for cell in run["cells"]:
            v = cell["variants"]
            tokens_k = cell["tokens_per_rank"] // 1024
            labels.append(f"{run['ranks']}r ga{run['grad_accum']}\nE{cell['experts']} {tokens_k}k")
            measured.append(v["mpoe"]["time_vs_ds"])
            floors.append(v["mpoe"]["analytic_floor"])
            plain.append(v["mpoe_plain"]["time_vs_ds"] if "mpoe_plain" in v else None)
            mem_ratio.append(v["mpoe"]["expert_side_bytes_ds_over_this"])
            shard_ratio.append(v["mpoe_shard"]["expert_side_bytes_ds_over_this"] if "mpoe_shard" in v else None)
    xs = range(len(labels))
    ax = axes[0]
    ax.bar(list(xs), measured, width=0.6, label="measured MPOE / DeepSpeed MoE step time")
    ax.scatter(list(xs), floors, color="tab:red", marker="_", s=400, linewidths=2, zorder=3,
               label="analytical floor 1 + R/T")
    ax.scatter(list(xs), [1.1 * f for f in floors], color="tab:red", marker="_", s=200, linewidths=1, zorder=3,
               label="floor + 10%")
    px = [x for x, p in zip(xs, plain) if p is not None]
    if px:
        ax.scatter(px, [p for p in plain if p is not None], color="k", marker="x", zorder=3,
                   label="rebuild every micro-batch")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("step time ratio")
    ax.legend(fontsize=8)
    ax.set_title("Step time vs DeepSpeed MoE (lower is better)")
    ax = axes[1]
    ax.bar(list(xs), mem_ratio, color="tab:green", label="MPOE")
    sx = [x for x, r in zip(xs, shard_ratio) if r is not None]
    if sx:
        ax.scatter(sx, [r for r in shard_ratio if r is not None], color="k", marker="D", zorder=3,
                   label="MPOE, central sharded over expert parallelism")
    ax.axhline(6.5, color="red", lw=0.8, ls="--", label="6.5x target (E = 16)")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("DeepSpeed MoE ÷ MPOE")
    ax.set_title("Expert-side params + optimizer state per rank")
    ax.legend(fontsize=8, loc="upper left")


def write_layer_report(json_path: Path) -> None:
    write_report(json_path, lambda data: layer_tables(data) + "\n", plot_layer, figsize=(13, 4.5))


# --------------------------------------------------------------------------- aux_gather layer cells

AUX_KINDS = ("mpoe", "mpoe_aux", "ds")


def _dispatch_mb(variant: dict[str, Any], kind: str) -> float:
    """MB this rank sent for the layer's data movement in one step.

    Ours: mpomoe_ds.parallel's counters (token all-to-alls, or aux_gather's
    all-gather and its gradient all-reduce). DeepSpeed's MoE: its all-to-all
    input buffers times (P-1)/P (the part that leaves a rank; 2 ranks: 1/2).
    """
    if kind == "ds":
        return variant["comm_bytes"].get("all_to_all", 0) / 2 / MB
    return sum(variant["dispatch_bytes"].values()) / MB


def aux_gather_tables(data: dict[str, Any]) -> str:
    lines = [machine_md(data["machine"]), "",
             "| ranks | GA | E | variant | s/step | MB sent per rank per step (dispatch) | vs token dispatch | "
             "peak MiB per rank |", "|---|---|---|---|---|---|---|---|"]
    for run in data["runs"]:
        for cell in run["cells"]:
            v = cell["variants"]
            tokens_mb = _dispatch_mb(v["mpoe"], "mpoe") if "mpoe" in v else None
            for k in AUX_KINDS:
                if k not in v:
                    continue
                mb = _dispatch_mb(v[k], k)
                rel = f"{mb / tokens_mb:.3f}" if tokens_mb else "n/a"
                step = v[k]["step_s_median"]
                step_s = "not timed" if step != step else f"{step:.2f}"  # NaN: a --bytes-only run
                lines.append(f"| {run['ranks']} | {run['grad_accum']} | {cell['experts']} | {v[k]['label']} | "
                             f"{step_s} | {mb:.1f} | {rel} | {v[k]['peak_bytes'] / MiB:.0f} |")
    return "\n".join(lines) + "\n"


def plot_aux_gather(data: dict[str, Any], axes: Any) -> None:
    names, groups = [], {k: ([], []) for k in AUX_KINDS}
    for run in data["runs"]:
        for cell in run["cells"]:
            names.append(f"E={cell['experts']}\nGA {run['grad_accum']}")
            for k in AUX_KINDS:
                v = cell["variants"].get(k)
                groups[k][0].append(_dispatch_mb(v, k) if v else 0.0)
                groups[k][1].append(v["step_s_median"] if v else float("nan"))
    width = 0.8 / len(AUX_KINDS)
    for i, k in enumerate(AUX_KINDS):
        xs = [j + i * width for j in range(len(names))]
        axes[0].bar(xs, groups[k][0], width, label=k)
        axes[1].bar(xs, groups[k][1], width, label=k)
    for ax, title in zip(axes, ("MB sent per rank per step (dispatch)", "s per step (NaN bars: not timed)")):
        ax.set_xticks([j + width for j in range(len(names))], names, fontsize=7)
        ax.set_title(title)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")


def write_aux_gather_report(json_path: Path) -> None:
    write_report(json_path, aux_gather_tables, plot_aux_gather, figsize=(12, 4.5))


# --------------------------------------------------------------------------- model


def model_tables(data: dict[str, Any]) -> str:
    cfg = data["config"]
    lines = [machine_md(data["machine"]), "",
             f"GPT-2-small-shaped model reduced to {cfg['layers']} layers for CPU time (hidden {cfg['hidden']}, "
             f"{cfg['heads']} heads, FFN {cfg['ffn']}, vocabulary {cfg['vocab']}), MoE in every other layer "
             f"(blocks {cfg['moe_layers']}), E = {cfg['experts']}, top-1 dropless; {cfg['micro_batch']} sequences "
             f"of {cfg['seq_len']} tokens per rank per micro-batch, gradient accumulation {cfg['grad_accum']}, "
             f"ZeRO-{cfg['zero_stage']}, fp32; median of {cfg['steps']} steps after {cfg['warmup']} warm-up.", ""]
    head = ["ranks (ep_size)", "model", "tokens/s", "vs DeepSpeed MoE", "s/step", "peak MiB per rank",
            "params per rank", "params + opt. state MiB per rank"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run in data["runs"]:
        variants = run["variants"]
        ds = variants.get("ds")
        for k, v in variants.items():
            rel = f"{v['tokens_per_s'] / ds['tokens_per_s']:.3f}" if ds else "n/a"
            lines.append(f"| {run['ranks']} ({run['ep_size']}) | {v['label']} | {v['tokens_per_s']:.0f} | {rel} | "
                         f"{v['step_s_median']:.2f} | {v['peak_bytes'] / MiB:.0f} | {v['params'] / 1e6:.1f}M | "
                         f"{v['state_bytes'] / MiB:.0f} |")
    return "\n".join(lines) + "\n"


def plot_model(data: dict[str, Any], axes: Any) -> None:
    runs = data["runs"]
    labels: dict[str, str] = {}  # every variant of any run, in order (one-process runs have no sharded variant)
    for run in runs:
        labels.update({k: v["label"] for k, v in run["variants"].items()})
    kinds = list(labels)
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        present = [(j, run["variants"][k]) for j, k in enumerate(kinds) if k in run["variants"]]
        xs = [j + i * width for j, _ in present]
        axes[0].bar(xs, [v["tokens_per_s"] for _, v in present], width=width, label=f"{run['ranks']} rank(s)")
        axes[1].bar(xs, [v["state_bytes"] / MiB for _, v in present], width=width, label=f"{run['ranks']} rank(s)")
    for ax, label in zip(axes, ("training tokens / s (all ranks)", "params + optimizer state MiB per rank")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(kinds))])
        ax.set_xticklabels([labels[k] for k in kinds], fontsize=7, rotation=10)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)


def write_model_report(json_path: Path) -> None:
    write_report(json_path, model_tables, plot_model, figsize=(12, 4))


# --------------------------------------------------------------------------- both


def write_report(json_path: Path, tables: Callable[[dict[str, Any]], str],
                 plot: Callable[[dict[str, Any], Any], None], figsize: tuple[float, float]) -> None:
    """``<name>.md`` (``tables(data)``) and ``<name>.png`` next to ``json_path``.

    ``plot(data, axes)`` draws into a row of two axes; the figure gets the
    machine line as its title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = Path(json_path)
    data = common.read_json(json_path)
    md, png = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md.write_text(tables(data))
    common.paste_into_readme(md)
    fig, axes = plt.subplots(1, 2, figsize=figsize)
    plot(data, axes)
    fig.suptitle(common.machine_line(data["machine"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"[bench] wrote {md} and {png}")


def main(paths: list[str]) -> None:
    for p in paths:
        data = common.read_json(Path(p))
        if data.get("benchmark") == "model":
            write_model_report(Path(p))
        elif data.get("benchmark") == "aux_gather_layer":
            write_aux_gather_report(Path(p))
        else:
            write_layer_report(Path(p))


if __name__ == "__main__":
    main(sys.argv[1:] or [str(common.RESULTS / "layer.json")])
