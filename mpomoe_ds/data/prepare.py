"""Corpus preparation: tokenize a text corpus once into flat token shards (raw uint16/uint32) plus an index.

A prepared corpus is a folder::

    index.json                  format version, tokenizer fingerprint, EOS id, token dtype,
                                per split the shards with their token and document counts
    train_00000.bin ...         token ids (uint16 or uint32), every document followed by EOS
    validation_00000.bin ...    the held-out documents, same format
    parts/                      one done-marker per finished part (resumable preparation)

Sources are local files, directories or globs: ``.txt`` (one document per
file), ``.jsonl`` / ``.json`` (one document per record, field ``text``),
``.parquet`` (column ``text``), each optionally ``.gz``; or one data set read
with ``datasets`` streaming (:class:`~mpomoe_ds.data.hub_source.HubSource`).
Work is cut into parts (a file, or up to ``docs_per_part`` documents of one;
for a stream, consecutive runs of ``docs_per_part`` documents of the stream),
tokenized in parallel worker processes, one shard per part and split. A document goes to
the validation split when ``crc32(text) mod 1e6 < validation_fraction * 1e6``:
a function of its text alone, so the split does not depend on how the work
was cut or on the number of workers.

Preparation is resumable: a part whose marker exists (written after its
shards, with their sizes) is not redone, so a killed run continues where it
stopped. A stream has no random access, so a resumed stream preparation reads
the stream again from its start and skips, by document count, the documents
of finished parts without tokenizing them (checking that they hash as they did:
a stream whose content changed is refused). A folder prepared with another
tokenizer is refused (its fingerprint differs), as is a folder whose sources
(files, or data set name / config / split / text field / data files) changed.
"""

from __future__ import annotations

import collections
import glob
import gzip
import hashlib
import io
import json
import os
import zlib
from dataclasses import asdict, dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from mpomoe_ds.data.hub_source import HubSource, open_stream
from mpomoe_ds.data.tasks import DataError

FORMAT_VERSION = 1
SPLITS = ("train", "validation")
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
PathLike = Union[str, Path]


# --------------------------------------------------------------------------- sources


def _format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes else ""


def expand_sources(sources: Sequence[str]) -> list[Path]:
    """Files named by ``sources`` (files, directories searched recursively, globs), sorted, deduplicated.

    Raises:
        DataError: a source matches no supported file (names it and the supported formats).
    """
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            matched = [p for p in sorted(path.rglob("*")) if p.is_file() and _format(p) in TEXT_SUFFIXES]
        elif path.is_file():
            matched = [path]
        else:
            matched = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        matched = [p for p in matched if _format(p) in TEXT_SUFFIXES]
        if not matched:
            raise DataError(f"corpus source {source!r} matches no file of a supported format "
                            f"({', '.join(TEXT_SUFFIXES)}, optionally .gz); check the path or glob")
        files.extend(matched)
    return sorted(set(p.resolve() for p in files))


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def read_documents(path: Path) -> Iterator[str]:
    """The documents of one source file, in file order (empty documents skipped)."""
    kind = _format(path)
    if kind == ".txt":
        with _open_text(path) as fh:
            text = fh.read()
        if text.strip():
            yield text
    elif kind in (".jsonl", ".json"):
        with _open_text(path) as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise DataError(f"{path}:{number}: expected one JSON object with a 'text' field per line "
                                    f"({type(err).__name__}: {err})") from None
                if isinstance(text, str) and text.strip():
                    yield text
    else:  # parquet
        import pyarrow.parquet as pq

        table = pq.read_table(path, columns=["text"])
        for text in table.column("text").to_pylist():
            if isinstance(text, str) and text.strip():
                yield text


@dataclass(frozen=True)
class Part:
    """A unit of work: documents [start, stop) of one file (or of the stream named by ``path``)."""

    index: int
    path: str
    start: int
    stop: int


def plan_parts(files: Sequence[Path], docs_per_part: int) -> list[Part]:
    """Cut the files into parts of at most ``docs_per_part`` documents (one counting pass over the files)."""
    parts = []
    for path in files:
        count = sum(1 for _ in read_documents(path))
        for start in range(0, max(count, 1), docs_per_part):
            parts.append(Part(len(parts), str(path), start, min(start + docs_per_part, count)))
    return parts


# --------------------------------------------------------------------------- tokenizer identity


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides token ids: class, vocabulary, special tokens."""
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted((str(k), str(v)) for k, v in tokenizer.special_tokens_map.items())
    payload = json.dumps([type(tokenizer).__name__, vocab, special], ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def eos_token_id(tokenizer: Any) -> int:
    """The document separator: EOS, else SEP (BERT-style tokenizers)."""
    for token_id in (tokenizer.eos_token_id, tokenizer.sep_token_id):
        if token_id is not None:
            return int(token_id)
    raise DataError(f"tokenizer {type(tokenizer).__name__} has neither an EOS nor a SEP token to separate "
                    f"documents; use a tokenizer that has one")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------- workers


@dataclass(frozen=True)
class _Job:
    part: Part
    out_dir: str
    tokenizer: str
    load_tokenizer: Callable[[str], Any]  # a module-level function: picklable for worker processes
    eos_id: int
    dtype: str
    validation_fraction: float
    texts: Optional[tuple[str, ...]] = None  # a stream's part carries its documents (no file to reread)


def texts_checksum(texts: Iterable[str]) -> int:
    """crc32 of a part's documents in order: how a resumed stream checks that its skipped parts are unchanged."""
    crc = 0
    for text in texts:
        crc = zlib.crc32(text.encode("utf-8", "replace") + b"\0", crc)
    return crc


def is_validation(text: str, fraction: float) -> bool:
    """The document's split, from its text alone."""
    return zlib.crc32(text.encode("utf-8", "replace")) % 1_000_000 < fraction * 1_000_000


def shard_name(split: str, part: int) -> str:
    return f"{split}_{part:05d}.bin"


def _marker(out_dir: Path, part: int) -> Path:
    return out_dir / "parts" / f"part_{part:05d}.json"


_TOKENIZERS: dict[str, Any] = {}  # per worker process: loaded once, reused for every part


def _worker_tokenizer(job: _Job) -> Any:
    if job.tokenizer not in _TOKENIZERS:
        _TOKENIZERS[job.tokenizer] = job.load_tokenizer(job.tokenizer)
    return _TOKENIZERS[job.tokenizer]


def _tokenize_part(job: _Job) -> dict[str, Any]:
    """Tokenize one part into its train / validation shards; write its marker last."""
    tokenizer = _worker_tokenizer(job)
    if job.texts is not None:
        docs = list(job.texts)
    else:
        docs = list(read_documents(Path(job.part.path)))[job.part.start:job.part.stop]
    out_dir = Path(job.out_dir)
    by_split: dict[str, list[str]] = {split: [] for split in SPLITS}
    for text in docs:
        by_split["validation" if is_validation(text, job.validation_fraction) else "train"].append(text)
    record: dict[str, Any] = {"part": asdict(job.part)}
    if job.texts is not None:
        record["texts_crc"] = texts_checksum(docs)
    for split, texts in by_split.items():
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        flat = np.fromiter((t for doc in ids for t in (*doc, job.eos_id)), dtype=np.dtype(job.dtype),
                           count=sum(len(doc) + 1 for doc in ids))
        path = out_dir / shard_name(split, job.part.index)
        tmp = path.with_suffix(".tmp")
        flat.tofile(tmp)
        os.replace(tmp, path)
        record[split] = {"file": path.name, "tokens": int(flat.size), "documents": len(ids),
                         "characters": sum(len(t) for t in texts)}
    marker = _marker(out_dir, job.part.index)
    marker.write_text(json.dumps(record))
    return record


# --------------------------------------------------------------------------- driver


@dataclass
class PrepareReport:
    """What a preparation did: tokens and documents per split, parts done now vs reused, throughput."""

    out_dir: str
    tokens: dict[str, int]
    documents: dict[str, int]
    parts_done: int
    parts_reused: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return sum(self.tokens.values()) / max(self.seconds, 1e-9)


def prepare_corpus(sources: Union[Sequence[str], HubSource], tokenizer_name: str, out_dir: PathLike, *,
                   load_tokenizer: Callable[[str], Any], num_workers: int = 1,
                   docs_per_part: int = 2000, validation_fraction: float = 0.01,
                   progress: bool = True) -> PrepareReport:
    """Tokenize ``sources`` with ``tokenizer_name`` into ``out_dir`` (see the module docstring).

    Args:
        sources: files, directories or globs; or a :class:`HubSource` read
            with ``datasets`` streaming.
        tokenizer_name: a tokenizer folder, hub name, or "minilm".
        load_tokenizer: name -> tokenizer, a module-level function (worker
            processes receive it by reference), e.g.
            :func:`mpomoe_ds.models.hf.load_tokenizer`.
        out_dir: the corpus folder (created; an existing one is continued).
        num_workers: tokenizing processes (1 = in this process).
        docs_per_part: the unit of work and of resumption.
        validation_fraction: share of documents held out (0 <= f < 1).
        progress: a progress bar over documents.

    Raises:
        DataError: no source files, a data set that cannot be opened or lacks
            the text field, a folder prepared with another tokenizer or other
            sources, a stream whose content changed under a resumed part, a bad fraction.
    """
    import time

    if not 0.0 <= validation_fraction < 1.0:
        raise DataError(f"validation_fraction={validation_fraction}: use a share in [0, 1)")
    if docs_per_part < 1 or num_workers < 1:
        raise DataError(f"docs_per_part={docs_per_part} and num_workers={num_workers} must be >= 1")
    start = time.perf_counter()
    out = Path(out_dir)
    stream = open_stream(sources) if isinstance(sources, HubSource) else None  # a bad name fails here, early
    files = [] if stream is not None else expand_sources(sources)
    tokenizer = load_tokenizer(tokenizer_name)
    identity = {"format_version": FORMAT_VERSION, "tokenizer": tokenizer_name,
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "eos_id": eos_token_id(tokenizer),
                "dtype": token_dtype(len(tokenizer)).name, "validation_fraction": validation_fraction,
                "docs_per_part": docs_per_part,
                "sources": [sources.identity()] if stream is not None else [str(p) for p in files]}
    _check_or_start(out, identity)

    def job(part: Part, texts: Optional[tuple[str, ...]] = None) -> _Job:
        return _Job(part, str(out), tokenizer_name, load_tokenizer, identity["eos_id"], identity["dtype"],
                    validation_fraction, texts)

    parts: list[Part] = []
    if stream is None:
        parts = plan_parts(files, docs_per_part)
        todo = [p for p in parts if not _marker(out, p.index).is_file()]
        total: Optional[int] = sum(p.stop - p.start for p in todo)
        jobs: Iterable[_Job] = [job(p) for p in todo]
    else:
        total = stream.total
        jobs = _stream_jobs(stream, sources.label(), docs_per_part, out, job, parts)
    done = _run_jobs(jobs, num_workers, progress, total)
    records = [json.loads(_marker(out, p.index).read_text()) for p in parts]
    index = {**identity, "complete": True,
             "splits": {split: {"tokens": sum(r[split]["tokens"] for r in records),
                                "documents": sum(r[split]["documents"] for r in records),
                                "shards": [r[split] for r in records if r[split]["tokens"]]}
                        for split in SPLITS}}
    tmp = out / "index.json.tmp"
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out / "index.json")
    return PrepareReport(str(out), {s: index["splits"][s]["tokens"] for s in SPLITS},
                         {s: index["splits"][s]["documents"] for s in SPLITS}, done, len(parts) - done,
                         time.perf_counter() - start)


def _stream_jobs(documents: Iterable[str], label: str, docs_per_part: int, out: Path,
                 job: Callable[..., _Job], parts: list[Part]) -> Iterator[_Job]:
    """Cut a document stream into parts of ``docs_per_part`` (appended to ``parts`` as they are read) and yield
    a job for each part without a marker; a finished part is skipped after checking its documents' checksum."""
    batch: list[str] = []

    def cut() -> Optional[_Job]:
        part = Part(len(parts), label, len(parts) * docs_per_part, len(parts) * docs_per_part + len(batch))
        parts.append(part)
        marker = _marker(out, part.index)
        if not marker.is_file():
            return job(part, tuple(batch))
        if json.loads(marker.read_text()).get("texts_crc") != texts_checksum(batch):
            raise DataError(f"{label}: documents {part.start}-{part.stop - 1} differ from those prepared in {out} "
                            f"(part {part.index}); the stream changed since: prepare into a new folder, or "
                            f"delete {out} to start over")
        return None

    for text in documents:
        batch.append(text)
        if len(batch) == docs_per_part:
            pending = cut()
            batch = []
            if pending is not None:
                yield pending
    if batch or not parts:  # an empty tail still closes the stream, as an empty file gets its part
        pending = cut()
        if pending is not None:
            yield pending


def _check_or_start(out: Path, identity: dict[str, Any]) -> None:
    """Refuse to continue a folder made with another tokenizer, sources or settings; else record ours."""
    (out / "parts").mkdir(parents=True, exist_ok=True)
    stamp = out / "parts" / "identity.json"
    if stamp.is_file():
        previous = json.loads(stamp.read_text())
        changed = sorted(k for k in identity if previous.get(k) != identity[k])
        if changed:
            hub = bool(identity["sources"]) and isinstance(identity["sources"][0], dict)
            what = f"the data set changed ({previous.get('sources')} -> {identity['sources']})" if hub \
                else "the source files changed"
            detail = "; ".join(f"{k}: {previous.get(k)!r} -> {identity[k]!r}" for k in changed
                               if k != "sources") + (f"; {what}" if "sources" in changed else "")
            raise DataError(f"{out} was prepared with other settings ({detail}). Prepare into a new folder, "
                            f"or delete {out} to start over")
    else:
        stamp.write_text(json.dumps(identity))


def _run_jobs(jobs: Iterable[_Job], num_workers: int, progress: bool, total: Optional[int]) -> int:
    """Run the jobs, in this process or in ``num_workers`` spawned ones; returns how many ran.

    At most two jobs per worker are in flight, so a stream is never read far
    ahead of the tokenizers into memory. The bar counts documents.
    """
    from tqdm import tqdm

    bar = tqdm(total=total, desc="tokenizing", unit="doc", disable=not progress)
    count = 0

    def finished(record: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        bar.update(record["part"]["stop"] - record["part"]["start"])

    if num_workers == 1 or (isinstance(jobs, list) and len(jobs) <= 1):
        for job in jobs:
            finished(_tokenize_part(job))
    else:
        with get_context("spawn").Pool(num_workers) as pool:
            pending: collections.deque = collections.deque()
            for job in jobs:
                pending.append(pool.apply_async(_tokenize_part, (job,)))
                while len(pending) >= 2 * num_workers:
                    finished(pending.popleft().get())
            while pending:
                finished(pending.popleft().get())
    bar.close()
    return count


def read_index(corpus_dir: PathLike, tokenizer: Optional[Any] = None) -> dict[str, Any]:
    """A prepared corpus's index; with ``tokenizer``, refuse a corpus prepared with another one.

    Raises:
        DataError: no complete index (names the command that makes one), or a tokenizer mismatch.
    """
    path = Path(corpus_dir) / "index.json"
    if not path.is_file():
        raise DataError(f"{corpus_dir} is not a prepared corpus (no index.json); prepare it with "
                        f"mpomoe-prepare --out {corpus_dir} --tokenizer <model> <text files>")
    index = json.loads(path.read_text())
    if index.get("format_version") != FORMAT_VERSION or not index.get("complete"):
        raise DataError(f"{path}: format {index.get('format_version')} (complete={index.get('complete')}); "
                        f"this version reads format {FORMAT_VERSION}: prepare the corpus again")
    if tokenizer is not None and tokenizer_fingerprint(tokenizer) != index["tokenizer_fingerprint"]:
        raise DataError(f"{corpus_dir} was tokenized with {index['tokenizer']!r} (fingerprint "
                        f"{index['tokenizer_fingerprint']}), not with this run's tokenizer "
                        f"({tokenizer_fingerprint(tokenizer)}); prepare it again with the run's tokenizer")
    return index
