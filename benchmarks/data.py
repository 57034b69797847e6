"""Pretraining data pipeline benchmark: preparation throughput, loading cost per step, memory vs corpus size.

Three measurements, written to ``--out`` (JSON + Markdown table):

1. Preparation: ``mpomoe_ds.data.prepare.prepare_corpus`` on the given text
   sources (default: the manual-page corpus of scripts/manpages_corpus.py),
   1 and ``--workers`` processes; tokens per second.
2. Loading cost per step: the time ``PackedMixtureBatches`` takes to build
   one micro-batch (B x L, three corpora mixed) against one training step
   (forward + backward + AdamW) of the recipe's GPT-2-shaped model on the
   same batch, both single process on this machine; reads are at random
   positions of the shard files (the sampler's permutation).
3. Resident memory per rank for corpora 1x, 10x and 100x the base size:
   a fresh process opens the corpora, reads ``--batches`` micro-batches and
   reports its resident set (VmRSS, anonymous and file-backed). The larger
   corpora repeat the base corpus's tokens into bigger shards (preparing
   100x the text would take hours here and measures nothing more).

Usage::

    python benchmarks/data.py --sources corpus/manpages/en corpus/manpages/de corpus/manpages/fr \\
        --tokenizer models/manpages-bpe --model models/gpt2-manpages --out benchmarks/results/data.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCALES = (1, 10, 100)


def prepare(sources: list[str], tokenizer: str, out: Path, workers: int) -> dict[str, Any]:
    from mpomoe_ds.data.prepare import prepare_corpus
    from mpomoe_ds.models.hf import load_tokenizer

    rows = {}
    for n in sorted({1, workers}):
        folder = out / f"prepared_w{n}"
        shutil.rmtree(folder, ignore_errors=True)
        report = prepare_corpus(sources, tokenizer, folder, load_tokenizer=load_tokenizer, num_workers=n,
                                docs_per_part=100, validation_fraction=0.02, progress=False)
        rows[n] = {"tokens": sum(report.tokens.values()), "seconds": report.seconds,
                   "tokens_per_s": report.tokens_per_second}
    return rows


def scaled_corpus(base: Path, out: Path, scale: int) -> Path:
    """A corpus whose train split is the base train stream repeated ``scale`` times (one shard per repeat)."""
    if scale == 1:
        return base
    folder = out / f"x{scale}"
    index = json.loads((base / "index.json").read_text())
    train = index["splits"]["train"]
    stream = np.concatenate([np.fromfile(base / s["file"], dtype=index["dtype"]) for s in train["shards"]])
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for k in range(scale):
        name = f"train_{k:05d}.bin"
        stream.tofile(folder / name)
        shards.append({"file": name, "tokens": int(stream.size), "documents": train["documents"]})
    for s in index["splits"]["validation"]["shards"]:
        shutil.copy(base / s["file"], folder / s["file"])
    index["splits"]["train"] = {"tokens": int(stream.size) * scale, "documents": train["documents"] * scale,
                                "shards": shards}
    (folder / "index.json").write_text(json.dumps(index))
    return folder


def stream_for(corpus: Path, seq_len: int, micro: int):
    from mpomoe_ds.data.corpus import PreparedCorpus
    from mpomoe_ds.data.mixture import PackedMixtureBatches

    packed = [PreparedCorpus(str(corpus), seq_len).train for _ in range(3)]  # three corpora mixed
    return PackedMixtureBatches(packed, ["a", "b", "c"], [0, 1, 2], [0.5, 0.3, 0.2], micro, seed=0)


def rss_child(corpus: str, seq_len: int, micro: int, batches: int) -> dict[str, float]:
    """Run in a fresh process: resident memory after opening the corpus and reading ``batches`` batches."""
    import torch  # noqa: F401  the training process has it loaded; count it in the baseline

    def status() -> dict[str, float]:
        fields = {}
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024
        return fields

    before = status()
    stream = stream_for(Path(corpus), seq_len, micro)
    it = iter(stream)
    for _ in range(batches):
        next(it)
    after = status()
    return {"rss_mib": after["VmRSS"], "anon_mib": after["RssAnon"], "file_mib": after["RssFile"],
            "rss_before_mib": before["VmRSS"]}


def loading_cost(corpus: Path, model_dir: str, seq_len: int, micro: int, steps: int) -> dict[str, float]:
    import torch
    import transformers

    stream = stream_for(corpus, seq_len, micro)
    it = iter(stream)
    next(it)
    start = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    data_s = (time.perf_counter() - start) / steps
    config = transformers.AutoConfig.from_pretrained(model_dir)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for i in range(steps + 1):
        start = time.perf_counter()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        if i:
            times.append(time.perf_counter() - start)
    step_s = float(np.median(times))
    return {"data_ms_per_step": 1e3 * data_s, "model_ms_per_step": 1e3 * step_s, "data_share": data_s / step_s}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores; torch {m.get('torch', '?')}; 1-minute load "
             f"average at start {result.get('load_1min_start', float('nan')):.1f}.", "",
             "| preparation | tokens | seconds | tokens/s |", "|---|---|---|---|"]
    for workers, row in result["prepare"].items():
        lines.append(f"| {workers} process(es) | {row['tokens']:,} | {row['seconds']:.1f} | {row['tokens_per_s']:,.0f} |")
    c = result["loading"]
    lines += ["", f"Loading one micro-batch ({result['micro_batch']} x {result['seq_len']}, 3 corpora mixed): "
              f"{c['data_ms_per_step']:.2f} ms; one training step of the GPT-2-shaped model on it: "
              f"{c['model_ms_per_step']:.1f} ms; data share **{100 * c['data_share']:.2f}%** of a step.", "",
              "| corpus | train tokens | shard bytes | RSS MiB after reading | anonymous | file-backed | vs 1x |",
              "|---|---|---|---|---|---|---|"]
    base = result["memory"]["1"]["rss_mib"]
    for scale, row in result["memory"].items():
        lines.append(f"| {scale}x | {row['tokens']:,} | {row['bytes'] / 2**20:,.0f} MiB | {row['rss_mib']:.0f} | "
                     f"{row['anon_mib']:.0f} | {row['file_mib']:.0f} | {row['rss_mib'] / base:.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", nargs="+", default=["corpus/manpages/en", "corpus/manpages/de",
                                                         "corpus/manpages/fr"])
    parser.add_argument("--tokenizer", default="models/manpages-bpe")
    parser.add_argument("--model", default="models/gpt2-manpages")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batches", type=int, default=200, help="micro-batches read for the memory measurement")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=common.RESULTS / "data.json")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        print(json.dumps(rss_child(args.rss_child, args.seq_len, args.micro_batch, args.batches)))
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="mpomoe-data-bench-"))
    result: dict[str, Any] = {"machine": common.machine_info(), "seq_len": args.seq_len,
                              "micro_batch": args.micro_batch, "load_1min_start": os.getloadavg()[0]}
    result["prepare"] = prepare(args.sources, args.tokenizer, work, args.workers)
    base = work / "prepared_w1"
    result["loading"] = loading_cost(scaled_corpus(base, work, 100), args.model, args.seq_len, args.micro_batch,
                                     args.steps)
    result["memory"] = {}
    for scale in SCALES:
        corpus = scaled_corpus(base, work, scale)
        index = json.loads((corpus / "index.json").read_text())
        out = subprocess.run([sys.executable, __file__, "--rss-child", str(corpus), "--seq-len", str(args.seq_len),
                              "--micro-batch", str(args.micro_batch), "--batches", str(args.batches)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["tokens"] = index["splits"]["train"]["tokens"]
        row["bytes"] = sum((corpus / s["file"]).stat().st_size for s in index["splits"]["train"]["shards"])
        result["memory"][str(scale)] = row
        print(f"{scale}x: {row}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    args.out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
