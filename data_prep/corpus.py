"""User corpora: find the input files, read documents out of them, clean, de-duplicate and split.

Supported inputs (each may be a glob; a folder means every supported file below it):
  *.txt[.gz]            plain text; `txt_documents` says whether a file, a paragraph or a line is a document
  *.jsonl / *.json[.gz] one JSON object per line (or one JSON array of objects); the text is `text_field`
  *.parquet             a column named `text_field`
  a saved HF dataset    a folder written by `datasets.save_to_disk` (Dataset or DatasetDict)

Text is decoded as strict UTF-8: a file with undecodable bytes is refused with its name and line
(DataError), never silently patched with U+FFFD replacement characters the model would then learn.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
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


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _decode(raw: bytes, path: Path, first_line: int = 1) -> str:
    """Strict UTF-8, or a DataError naming the file and the line of the first undecodable byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = first_line + raw.count(b"\n", 0, err.start)
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x}); re-encode the file as "
                        "UTF-8") from None


def _read_bytes(path: Path) -> bytes:
    try:
        with _open_binary(path) as handle:
            return handle.read()
    except (OSError, EOFError) as err:  # e.g. a truncated or fake .gz
        raise DataError(f"{path}: unreadable ({err})") from None


def read_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number from 1, decoded line with its newline) of a text or jsonl file, optionally gzipped."""
    try:
        with _open_binary(path) as handle:
            for number, raw in enumerate(handle, start=1):
                yield number, _decode(raw, path, number)
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None


# Where the field is set: a build config, `python -m data_prep.build --text-field`, or a training run's
# `data.text_field` (the stream loader raises this inside the trainer, so the trainer's key is named too).
SET_TEXT_FIELD = "set text_field / --text-field (data.text_field when training)"

def record_text(record: object, text_field: str, where: str) -> str:
    """The text of one JSON record ("" for null); a DataError naming `where` if the field is absent or
    not a string."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with field {text_field!r}, got {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))[:10])
        raise DataError(f"{where}: no field {text_field!r} (fields: {fields}); {SET_TEXT_FIELD}")
    value = record[text_field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(value).__name__}")
    return value


def _read_txt(path: Path, txt_documents: str) -> Iterator[str]:
    if txt_documents == "line":
        for _, line in read_lines(path):
            yield line
        return
    text = _decode(_read_bytes(path), path)
    if txt_documents == "file":
        yield text
    else:
        yield from re.split(r"\n[ \t]*\n", text)


def json_records(path: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for every record of a jsonl file (where = "file:line") or of a file holding one
    JSON array (where = "file record i"); invalid UTF-8 or JSON is a DataError naming file and line."""
    array: list[str] | None = None
    for number, line in read_lines(path):
        if array is not None:
            array.append(line)
            continue
        if not line.strip():
            continue
        if line.lstrip().startswith("["):
            array = [line]
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if array is None:
        return
    try:
        records = json.loads("".join(array))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON array of objects or one object per line")
    for index, record in enumerate(records):
        yield f"{path} record {index}", record


def column_text(value: object, text_field: str, where: str) -> str:
    """One parquet / HF dataset cell of the text column ("" for null); a DataError naming `where` when it is
    not a string (an int or list column would otherwise end in a traceback from the text cleaner)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: column {text_field!r} must hold strings, got {type(value).__name__} "
                        f"({value!r:.40}); {SET_TEXT_FIELD}")
    return value


def _read_json(path: Path, text_field: str) -> Iterator[str]:
    for where, record in json_records(path):
        yield record_text(record, text_field, where)


def _read_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable parquet file ({err})") from err
    if text_field not in parquet.schema_arrow.names:
        raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)}); "
                        f"{SET_TEXT_FIELD}")
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield column_text(value, text_field, str(path))


def load_saved_dataset(path: Path) -> object:
    """`datasets.load_from_disk`, with one DataError naming the folder when it is damaged (its own errors are a
    FileNotFoundError or a KeyError from deep inside `datasets`)."""
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # noqa: BLE001 - datasets raises unrelated types for a damaged folder
        reason = " ".join(str(err).split())  # one line, whatever datasets wrote
        raise DataError(f"{path}: not a readable saved HF dataset ({type(err).__name__}: {reason})") from None


def _read_hf_dataset(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    loaded = load_saved_dataset(path)
    parts = loaded.values() if isinstance(loaded, datasets.DatasetDict) else [loaded]
    for part in parts:
        if text_field not in part.column_names:
            raise DataError(f"{path}: no column {text_field!r} (columns: {', '.join(part.column_names)}); "
                            f"{SET_TEXT_FIELD}")
        for row in part.select_columns([text_field]).iter(batch_size=1024):
            for value in row[text_field]:
                yield column_text(value, text_field, str(path))


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
