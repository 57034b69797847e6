"""Build an offline multilingual pretraining corpus from Debian's manual-page packages (text nobody here wrote).

For each package (default: ``manpages`` English, ``manpages-de`` German,
``manpages-fr`` French) it installs the package with apt-get if needed,
renders every page the package ships with ``groff -k -Tutf8 -mandoc`` into
plain UTF-8 text, and writes ``OUT/<lang>/pages.jsonl`` (one page per line,
``{"text": ...}``). Pages that are only a ``.so`` link or render to almost
nothing are left out. With ``--tokenizer DIR`` it also trains a byte-level
BPE tokenizer on all languages together (Hugging Face ``tokenizers``) and
saves it as a transformers tokenizer folder, and with ``--model DIR`` writes
a small GPT-2-shaped config whose vocabulary matches it.

Example (the README's pretraining recipe)::

    python scripts/manpages_corpus.py --out corpus/manpages --tokenizer models/manpages-bpe \\
        --model models/gpt2-manpages
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

LANGUAGES = {"manpages": "en", "manpages-de": "de", "manpages-fr": "fr"}
MIN_CHARS = 200


def ensure_installed(packages: list[str]) -> None:
    missing = [p for p in packages if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0]
    if missing:
        print(f"installing {' '.join(missing)} with apt-get", flush=True)
        env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
    if shutil.which("groff") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "groff-base"], check=True)


def package_pages(package: str) -> list[Path]:
    listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=True).stdout.split()
    return sorted(Path(p) for p in listing
                  if "/man/" in p and p.endswith(".gz") and Path(p).is_file() and not Path(p).is_symlink())


def render(page: Path) -> str:
    """The page as plain text (no overstrike, no colour), or '' if it renders to almost nothing."""
    zcat = subprocess.run(["zcat", str(page)], capture_output=True, check=False).stdout
    if zcat.lstrip().startswith(b".so "):
        return ""
    out = subprocess.run(["groff", "-k", "-Tutf8", "-mandoc", "-P-cbou"], input=zcat, capture_output=True,
                         check=False).stdout.decode("utf-8", "replace")
    lines = [line.rstrip() for line in out.splitlines()]
    text = "\n".join(lines).strip()
    return text if len(text) >= MIN_CHARS else ""


def build(out: Path, packages: list[str], workers: int) -> dict[str, int]:
    counts = {}
    for package in packages:
        lang = LANGUAGES.get(package, package)
        pages = package_pages(package)
        with ThreadPoolExecutor(workers) as pool:
            texts = [t for t in pool.map(render, pages) if t]
        folder = out / lang
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / "pages.jsonl", "w", encoding="utf-8") as fh:
            for text in texts:
                fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        counts[lang] = len(texts)
        print(f"{package}: {len(texts)} of {len(pages)} pages -> {folder / 'pages.jsonl'} "
              f"({sum(len(t) for t in texts) / 1e6:.1f} M characters)", flush=True)
    return counts


def train_tokenizer(out: Path, languages: list[str], folder: Path, vocab_size: int) -> None:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    def texts():
        for lang in languages:
            with open(out / lang / "pages.jsonl", encoding="utf-8") as fh:
                for line in fh:
                    yield json.loads(line)["text"]

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts(), vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                        unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    tokenizer.save_pretrained(folder)
    print(f"tokenizer: byte-level BPE, {len(tokenizer)} tokens -> {folder}", flush=True)


def write_model_config(folder: Path, vocab_size: int, eos_id: int) -> None:
    from transformers import GPT2Config

    GPT2Config(vocab_size=vocab_size, n_positions=512, n_embd=256, n_layer=4, n_head=4, n_inner=1024,
               bos_token_id=eos_id, eos_token_id=eos_id).save_pretrained(folder)
    print(f"model config: GPT-2-shaped, 4 blocks, 256 wide, vocabulary {vocab_size} -> {folder}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="corpus folder (gets <lang>/pages.jsonl)")
    parser.add_argument("--packages", nargs="+", default=list(LANGUAGES), help="Debian manual-page packages")
    parser.add_argument("--workers", type=int, default=4, help="parallel groff processes")
    parser.add_argument("--tokenizer", type=Path, help="also train a byte-level BPE tokenizer into this folder")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model", type=Path, help="also write a small GPT-2-shaped config for that tokenizer")
    args = parser.parse_args(argv)
    if args.model and not args.tokenizer:
        parser.error("--model needs --tokenizer (the config's vocabulary is the tokenizer's)")
    ensure_installed(args.packages)
    build(args.out, args.packages, args.workers)
    if args.tokenizer:
        languages = [LANGUAGES.get(p, p) for p in args.packages]
        train_tokenizer(args.out, languages, args.tokenizer, args.vocab_size)
        if args.model:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            write_model_config(args.model, len(tokenizer), tokenizer.eos_token_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
