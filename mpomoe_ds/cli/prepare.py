"""``mpomoe-prepare`` / ``python -m mpomoe_ds.cli.prepare``: tokenize a corpus once into token shards.

Thin: parse, call :func:`mpomoe_ds.data.prepare.prepare_corpus` with the
model's tokenizer, print what was written. Run it once per corpus (per
language, per source); training then reads the folder with ``data.corpora``.

Example::

    mpomoe-prepare --tokenizer minilm --out data/manpages-en --workers 2 corpus/en/*.jsonl
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from mpomoe_ds.data.prepare import prepare_corpus
from mpomoe_ds.models.hf import load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpomoe-prepare",
        description="Tokenize text files (.txt: one document per file; .jsonl/.json: a 'text' field per line; "
                    ".parquet: a 'text' column; optionally .gz) into token shards for data.corpora. "
                    "Resumable: run the same command again after an interruption.",
        epilog="Example: mpomoe-prepare --tokenizer minilm --out data/en --workers 2 corpus/en/")
    parser.add_argument("sources", nargs="+", help="files, directories (searched recursively) or globs")
    parser.add_argument("--out", required=True, help="the corpus folder to write (continued if it exists)")
    parser.add_argument("--tokenizer", required=True,
                        help="the training model's tokenizer: a folder, hub name, or 'minilm'")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes (default 1)")
    parser.add_argument("--docs-per-part", type=int, default=2000,
                        help="documents per unit of work and of resumption (default 2000)")
    parser.add_argument("--validation-fraction", type=float, default=0.01,
                        help="share of documents held out for evaluation (default 0.01)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    report = prepare_corpus(args.sources, args.tokenizer, args.out, load_tokenizer=load_tokenizer,
                            num_workers=args.workers, docs_per_part=args.docs_per_part,
                            validation_fraction=args.validation_fraction, progress=not args.no_progress)
    print(f"{report.out_dir}: train {report.tokens['train']:,} tokens / {report.documents['train']:,} documents, "
          f"validation {report.tokens['validation']:,} / {report.documents['validation']:,}; "
          f"{report.parts_done} part(s) tokenized, {report.parts_reused} reused, "
          f"{report.tokens_per_second:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
