"""User corpora: find the input files, read documents out of them, clean, de-duplicate and split.

Supported inputs (each may be a glob; a folder means every supported file below it):
  *.txt[.gz]            plain text; `txt_documents` says whether a file, a paragraph or a line is a document
  *.jsonl / *.json[.gz] one JSON object per line (or one JSON array of objects); the text is `text_field`
  *.parquet             a column named `text_field`
  a saved HF dataset    a folder written by `datasets.save_to_disk` (Dataset or DatasetDict)
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from data_prep.errors import DataError

TXT_DOCUMENT_MODES = ("file", "paragraph", "line")
_TEXT_SUFFIXES = (".txt", ".text", ".md")
_JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
_PARQUET_SUFFIXES = (".parquet",)
_HF_MARKERS = ("dataset_dict.json", "state.json")


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for kind, suffixes in (("txt", _TEXT_SUFFIXES), ("json", _JSON_SUFFIXES), ("parquet", _PARQUET_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    return None


def _is_hf_dataset_dir(path: Path) -> bool:
    return path.is_dir() and any((path / marker).is_file() for marker in _HF_MARKERS)


def resolve_inputs(patterns: list[str]) -> list[Path]:
    """Expand globs and folders into a sorted, de-duplicated list of input files and HF dataset folders.

    Every pattern must match something; a typo that silently matched nothing would build a smaller corpus
    than the user asked for.
    """
    if not patterns:
        raise DataError("input: no input files given")
    resolved: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(str(Path(pattern).expanduser()), recursive=True))
        if not matches:
            raise DataError(f"input {pattern!r}: no such file or directory")
        for match in map(Path, matches):
            if _is_hf_dataset_dir(match):
                resolved.append(match)
            elif match.is_dir():
                found = sorted(p for p in match.rglob("*") if p.is_file() and _kind(p) is not None)
                if not found:
                    raise DataError(f"input {match}: folder holds no .txt/.jsonl/.json/.parquet files "
                                    "and is not a saved HF dataset")
                resolved.extend(found)
            elif _kind(match) is None:
                raise DataError(f"input {match}: unsupported file type; expected .txt, .jsonl, .json, "
                                ".parquet (optionally .gz) or a saved HF dataset folder")
            else:
                resolved.append(match)
    unique = list(dict.fromkeys(p.resolve() for p in resolved))
    for path in unique:
        if path.is_file() and path.stat().st_size == 0:
            raise DataError(f"input {path}: file is empty")
    return unique


def _open_text(path: Path) -> IO[str]:
    if path.name.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _field_text(record: object, text_field: str, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with field {text_field!r}, got {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))[:10])
        raise DataError(f"{where}: no field {text_field!r} (fields: {fields}); set text_field / --text-field")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}")
    return value


def _read_txt(path: Path, txt_documents: str) -> Iterator[str]:
    with _open_text(path) as handle:
        if txt_documents == "line":
            yield from handle
            return
        text = handle.read()
    if txt_documents == "file":
        yield text
    else:
        yield from re.split(r"\n[ \t]*\n", text)


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    with _open_text(path) as handle:
        first = handle.read(1)
        while first and first.isspace():
            first = handle.read(1)
        if first == "[":  # a JSON array of records
            try:
                records = json.loads(first + handle.read())
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: not valid JSON ({err})") from err
            for index, record in enumerate(records):
                yield _field_text(record, text_field, f"{path} record {index}")
            return
        for number, line in enumerate(_chain_first(first, handle), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from err
            yield _field_text(record, text_field, f"{path}:{number}")


def _chain_first(first: str, handle: IO[str]) -> Iterator[str]:
    """Lines of `handle`, with the one character already consumed put back in front."""
    line = first + handle.readline()
    while line:
        yield line
        line = handle.readline()


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    if text_field not in parquet.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
                        "set text_field / --text-field")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield value or ""


def _read_hf_dataset(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    parts = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for part in parts:
        if text_field not in part.column_names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(part.column_names)}); "
                            "set text_field / --text-field")
        for row in part.select_columns([text_field]).iter(batch_size=1024):
            for value in row[text_field]:
                yield value or ""


def read_documents(path: Path, text_field: str = "text", txt_documents: str = "file") -> Iterator[str]:
    """Raw document texts of one resolved input (file or saved HF dataset folder)."""
    if txt_documents not in TXT_DOCUMENT_MODES:
        raise DataError(f"txt_documents must be one of {TXT_DOCUMENT_MODES}, got {txt_documents!r}")
    if _is_hf_dataset_dir(path):
        return _read_hf_dataset(path, text_field)
    kind = _kind(path)
    if kind == "txt":
        return _read_txt(path, txt_documents)
    if kind == "json":
        return _read_json(path, text_field)
    if kind == "parquet":
        return _read_parquet(path, text_field)
    raise DataError(f"input {path}: unsupported file type")


_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def clean_text(text: str) -> str:
    """Normalise a document so that trivially different copies de-duplicate and the tokenizer sees
    consistent text: NFC unicode, Unix newlines, no control characters, no trailing spaces, at most one
    blank line in a row, no leading/trailing whitespace. Words and punctuation are left alone."""
    text = unicodedata.normalize("NFC", text.replace("\ufeff", ""))
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text)
    text = _TRAILING_SPACE.sub("\n", text)
    text = _MANY_BLANK_LINES.sub("\n\n", text)
    return text.strip()


def document_hash(text: str) -> bytes:
    """Content hash of a cleaned document: the de-duplication key and the source of its split."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def split_of(digest: bytes, validation_fraction: float) -> str:
    """'validation' or 'train', decided by the document hash alone.

    Depending only on the content makes the split stable when documents are added, removed or reordered:
    a document never moves from validation into train between builds.
    """
    position = int.from_bytes(digest[:8], "big") / 2.0**64
    return "validation" if position < validation_fraction else "train"
