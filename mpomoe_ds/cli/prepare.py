"""``mpomoe-prepare`` / ``python -m mpomoe_ds.cli.prepare``: tokenize a corpus once into token shards.

Thin: parse, call :func:`mpomoe_ds.data.prepare.prepare_corpus` with the
model's tokenizer, print what was written. Run it once per corpus (per
language, per source); training then reads the folder with ``data.corpora``.

Examples::

    mpomoe-prepare --tokenizer minilm --out data/manpages-en --workers 2 corpus/en/*.jsonl
    mpomoe-prepare --tokenizer minilm --out data/wiki --hf-dataset wikitext --hf-config wikitext-2-raw-v1
    mpomoe-prepare --tokenizer minilm --out data/local --hf-dataset json --hf-data-files corpus/*.jsonl
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence, Union

from mpomoe_ds.data.hub_source import HubSource
from mpomoe_ds.data.prepare import prepare_corpus
from mpomoe_ds.data.tasks import DataError
from mpomoe_ds.models.hf import load_tokenizer


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpomoe-prepare",
        description="Tokenize text files (.txt: one document per file; .jsonl/.json: a 'text' field per line; "
                    ".parquet: a 'text' column; optionally .gz), or a data set read with datasets streaming "
                    "(--hf-dataset), into token shards for data.corpora. "
                    "Resumable: run the same command again after an interruption.",
        epilog="Examples: mpomoe-prepare --tokenizer minilm --out data/en --workers 2 corpus/en/ ; "
               "mpomoe-prepare --tokenizer minilm --out data/wiki --hf-dataset wikitext --hf-config "
               "wikitext-2-raw-v1")
    parser.add_argument("sources", nargs="*", help="files, directories (searched recursively) or globs "
                        "(or none, with --hf-dataset)")
    hub = parser.add_argument_group("a data set read with datasets streaming, instead of files")
    hub.add_argument("--hf-dataset", help="a hub name, a local folder of jsonl/parquet files, or a packaged "
                     "builder (json, parquet, text) with --hf-data-files")
    hub.add_argument("--hf-config", help="the data set's configuration (subset) name")
    hub.add_argument("--hf-split", default="train", help="the split to read (default train)")
    hub.add_argument("--text-field", default=None, help="the record field holding the text (default text)")
    hub.add_argument("--hf-data-files", nargs="+", default=(), help="data_files for a packaged builder")
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


def _sources(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Union[list[str], HubSource]:
    """The positional files, or the streamed data set; exactly one of them."""
    if args.hf_dataset is None:
        if not args.sources:
            parser.error("give source files / directories / globs, or --hf-dataset NAME")
        given = [flag for flag, value in (("--hf-config", args.hf_config), ("--text-field", args.text_field),
                                          ("--hf-data-files", args.hf_data_files)) if value]
        if given or args.hf_split != "train":
            parser.error(f"{', '.join(given) or '--hf-split'} applies to --hf-dataset; local jsonl/parquet files "
                         f"hold their text in a 'text' field (or stream them: --hf-dataset json --hf-data-files)")
        return args.sources
    if args.sources:
        parser.error(f"give either source files ({args.sources[0]} ...) or --hf-dataset, not both")
    return HubSource(args.hf_dataset, args.hf_config, args.hf_split, args.text_field or "text",
                     tuple(args.hf_data_files))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        report = prepare_corpus(_sources(parser, args), args.tokenizer, args.out, load_tokenizer=load_tokenizer,
                                num_workers=args.workers, docs_per_part=args.docs_per_part,
                                validation_fraction=args.validation_fraction, progress=not args.no_progress)
    except DataError as err:  # bad input: the message names the fix; a traceback would bury it
        print(f"mpomoe-prepare: error: {err}", file=sys.stderr)
        return 2
    print(f"{report.out_dir}: train {report.tokens['train']:,} tokens / {report.documents['train']:,} documents, "
          f"validation {report.tokens['validation']:,} / {report.documents['validation']:,}; "
          f"{report.parts_done} part(s) tokenized, {report.parts_reused} reused, "
          f"{report.tokens_per_second:,.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
