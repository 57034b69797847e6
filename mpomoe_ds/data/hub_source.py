"""Hub data sets as a document stream for corpus preparation (``datasets.load_dataset(..., streaming=True)``).

Owns: naming a streamed source (:class:`HubSource`: data set, config, split,
text field, optional data files), opening it with errors that name the fix,
and reading its documents in stream order. Nothing is downloaded up front:
records are read as preparation consumes them, so a corpus larger than the
disk's free space of raw text still prepares. Anything ``load_dataset``
accepts works: a hub name (needs internet or a filled Hugging Face cache), a
packaged builder with local files (``json`` / ``parquet`` / ``text`` plus
``data_files``), or a local folder of jsonl / parquet files.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from mpomoe_ds.data.tasks import DataError

_HELP = ("offline, a hub name needs a filled Hugging Face cache; local data: --hf-dataset json --hf-data-files "
         "FILES, or --hf-dataset FOLDER (of jsonl/parquet files)")


@dataclass(frozen=True)
class HubSource:
    """One streamed data set: what ``load_dataset`` is called with, and the field holding each document."""

    dataset: str
    config: Optional[str] = None
    split: str = "train"
    text_field: str = "text"
    data_files: tuple[str, ...] = ()

    def identity(self) -> dict[str, Any]:
        """What the prepared folder's fingerprint records: local paths resolved, so a moved file is noticed."""
        local = Path(self.dataset).expanduser()
        return {"hf_dataset": str(local.resolve()) if local.exists() else self.dataset, "hf_config": self.config,
                "hf_split": self.split, "text_field": self.text_field,
                "data_files": [str(Path(f).expanduser().resolve()) for f in self.data_files]}

    def label(self) -> str:
        """How messages and part records name the source."""
        return f"hub:{self.dataset}" + (f"/{self.config}" if self.config else "") + f"[{self.split}]"


class DocumentStream:
    """The documents of a HubSource in stream order; ``total`` is the split's record count when the data set
    says (None when unknown, e.g. local files)."""

    def __init__(self, documents: Iterator[str], total: Optional[int]) -> None:
        self.documents = documents
        self.total = total

    def __iter__(self) -> Iterator[str]:
        return self.documents


def open_stream(source: HubSource) -> DocumentStream:
    """Open ``source`` and read its first record now, so a bad name, split or text field fails before any work.

    Raises:
        DataError: ``datasets`` missing, the data set cannot be opened, it has no records, or its records
            lack ``text_field`` (the message lists the fields they have).
    """
    try:
        import datasets
    except ImportError as err:
        raise DataError("streaming a hub data set needs the 'datasets' package: pip install 'datasets>=3.0' "
                        "(a dependency of mpomoe_ds: pip install -e .)") from err
    try:
        dataset = datasets.load_dataset(source.dataset, source.config, split=source.split, streaming=True,
                                        data_files=list(source.data_files) or None)
        records = iter(dataset)
        first = next(records, None)
    except Exception as err:  # missing data set, split, config or network: all mean "this source is unusable"
        raise DataError(f"could not open {source.label()}: {type(err).__name__}: {str(err).strip()[:500]}; "
                        f"check the name, --hf-config and --hf-split ({_HELP})") from err
    if first is None:
        raise DataError(f"{source.label()} has no records; check --hf-split and the data files")
    _check_field(first, source, 0)
    return DocumentStream(_documents(itertools.chain([first], records), source), _known_total(dataset, source))


def _check_field(record: dict[str, Any], source: HubSource, number: int) -> None:
    if source.text_field not in record:
        raise DataError(f"{source.label()}: record {number} has no field {source.text_field!r}; its fields are "
                        f"{sorted(record)}: pass --text-field with the one holding the text")


def _documents(records: Iterator[dict[str, Any]], source: HubSource) -> Iterator[str]:
    """Non-empty text of every record, in stream order (empty or non-text values skipped, as for files)."""
    for number, record in enumerate(records):
        _check_field(record, source, number)
        text = record[source.text_field]
        if isinstance(text, str) and text.strip():
            yield text


def _known_total(dataset: Any, source: HubSource) -> Optional[int]:
    splits = getattr(getattr(dataset, "info", None), "splits", None) or {}
    info = splits.get(source.split) if hasattr(splits, "get") else None
    return int(info.num_examples) if info is not None and info.num_examples else None
