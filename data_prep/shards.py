"""Packed token shards and the manifest that describes them.

A split is one long token stream (documents joined with an end-of-text token after each) cut into raw
little-endian `.bin` files of uint16 (vocab <= 65536) or uint32 tokens, with no header, so `np.memmap` can
open them without reading. `manifest.json` records everything needed to trust and use the files: the
tokenizer and its sha256, the dtype, and per-shard token counts, byte sizes and sha256 checksums.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from data_prep.errors import DataError
from data_prep.sources import file_sha256
from data_prep.tokenizer import load_tokenizer

MANIFEST_NAME = "manifest.json"
FORMAT_NAME = "tiedmoe-token-shards"
FORMAT_VERSION = 1
SPLITS = ("train", "validation")
DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest dtype that holds every token id: uint16 halves disk and page-cache use when it fits."""
    return "uint16" if vocab_size <= 2**16 else "uint32"


class ShardWriter:
    """Append tokens to one split, starting a new shard file every `shard_tokens` tokens.

    Checksums are computed while writing, so the manifest never needs a second pass over the data.
    """

    def __init__(self, out_dir: Path, split: str, dtype: str, shard_tokens: int) -> None:
        if shard_tokens < 1:
            raise DataError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.out_dir = out_dir
        self.split = split
        self.dtype = DTYPES[dtype]
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._handle = None
        self._digest = hashlib.sha256()
        self._in_shard = 0

    def _open_next(self) -> None:
        self._close_current()
        name = f"{self.split}_{len(self.shards):05d}.bin"
        self._handle = open(self.out_dir / name, "wb")
        self._digest = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0, "bytes": 0, "sha256": ""})

    def _close_current(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            record = self.shards[-1]
            record["tokens"] = self._in_shard
            record["bytes"] = self._in_shard * self.dtype.itemsize
            record["sha256"] = self._digest.hexdigest()

    def write(self, tokens: np.ndarray) -> None:
        tokens = np.ascontiguousarray(tokens, dtype=self.dtype)
        while tokens.size:
            if self._handle is None or self._in_shard == self.shard_tokens:
                self._open_next()
            take = min(tokens.size, self.shard_tokens - self._in_shard)
            chunk = tokens[:take].tobytes()
            self._handle.write(chunk)
            self._digest.update(chunk)
            self._in_shard += take
            tokens = tokens[take:]

    def close(self) -> list[dict[str, Any]]:
        self._close_current()
        return self.shards


def _require(condition: bool, path: Path, message: str) -> None:
    if not condition:
        raise DataError(f"{path}: {message}")


def _check_int(value: object, path: Path, field: str) -> int:
    _require(isinstance(value, int) and not isinstance(value, bool) and value >= 0, path,
             f"field {field!r} must be a non-negative integer, got {value!r}")
    return value  # type: ignore[return-value]


def load_manifest(data_dir: str | Path, verify: bool = False) -> dict[str, Any]:
    """Read and validate `manifest.json` of a built data set; raises DataError naming the bad file.

    Always checked (cheap): the format, the tokenizer file's sha256, and that every shard exists with
    exactly the recorded size, a whole number of tokens. With `verify=True` every shard's sha256 is also
    recomputed, which reads all the data once.
    """
    data_dir = Path(data_dir)
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{path}: no manifest; build the data set with `python -m data_prep.build`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from err
    _require(isinstance(manifest, dict), path, "must hold a JSON object")
    _require(manifest.get("format") == FORMAT_NAME, path, f"field 'format' must be {FORMAT_NAME!r}")
    _require(manifest.get("format_version") == FORMAT_VERSION, path,
             f"field 'format_version' is {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}; "
             "rebuild the data set")
    dtype = manifest.get("dtype")
    _require(dtype in DTYPES, path, f"field 'dtype' must be one of {sorted(DTYPES)}, got {dtype!r}")
    itemsize = DTYPES[dtype].itemsize

    tokenizer = manifest.get("tokenizer")
    _require(isinstance(tokenizer, dict), path, "field 'tokenizer' must be an object")
    vocab_size = _check_int(tokenizer.get("vocab_size"), path, "tokenizer.vocab_size")
    _require(vocab_size <= 2 ** (8 * itemsize), path, f"tokenizer.vocab_size {vocab_size} does not fit {dtype}")
    eos_id = _check_int(tokenizer.get("eos_id"), path, "tokenizer.eos_id")
    _require(eos_id < vocab_size, path, f"field 'tokenizer.eos_id' is {eos_id}, outside the vocab of {vocab_size}")
    tokenizer_file = data_dir / str(tokenizer.get("file", ""))
    _require(tokenizer_file.is_file() and bool(tokenizer.get("file")), path,
             f"tokenizer file {tokenizer_file} is missing")
    actual = file_sha256(tokenizer_file)
    _require(actual == tokenizer.get("sha256"), path,
             f"tokenizer {tokenizer_file.name} has sha256 {actual[:12]}..., the manifest was built with "
             f"{str(tokenizer.get('sha256'))[:12]}... (shards from another tokenizer); rebuild the data set")
    # The trainer sizes the embedding from this field (check_vocab): it must be the tokenizer's own.
    actual_vocab = load_tokenizer(tokenizer_file).get_vocab_size()
    _require(actual_vocab == vocab_size, path, f"field 'tokenizer.vocab_size' is {vocab_size} but "
             f"{tokenizer_file.name} has {actual_vocab} tokens; rebuild the data set")

    splits = manifest.get("splits")
    _require(isinstance(splits, dict) and bool(splits), path, "field 'splits' must be a non-empty object")
    for split, info in splits.items():
        _require(isinstance(info, dict) and isinstance(info.get("shards"), list), path,
                 f"splits.{split}.shards must be a list")
        total = 0
        for index, shard in enumerate(info["shards"]):
            _require(isinstance(shard, dict), path, f"splits.{split}.shards[{index}] must be an object, got {shard!r}")
            shard_path = data_dir / str(shard.get("file", ""))
            tokens = _check_int(shard.get("tokens"), path, f"splits.{split}.shards[].tokens")
            _require(shard_path.is_file(), shard_path, "shard file is missing")
            size = shard_path.stat().st_size
            if size % itemsize:
                raise DataError(f"{shard_path}: size {size} bytes is not a multiple of {dtype} "
                                f"({itemsize} bytes); the shard is truncated or corrupted")
            _require(size == tokens * itemsize == shard.get("bytes"), shard_path,
                     f"size {size} bytes, manifest says {tokens} tokens = {tokens * itemsize} bytes; "
                     "the shard is truncated or corrupted")
            total += tokens
        _require(total == info.get("tokens"), path,
                 f"splits.{split}.tokens is {info.get('tokens')!r} but its shards hold {total}")
        if verify:
            verify_split(data_dir, manifest, split)
    return manifest


def verify_split(data_dir: str | Path, manifest: dict[str, Any], split: str) -> None:
    """Recompute the sha256 of every shard of `split` and compare it with the manifest."""
    for shard in manifest["splits"][split]["shards"]:
        shard_path = Path(data_dir) / shard["file"]
        digest = file_sha256(shard_path)
        _require(digest == shard.get("sha256"), shard_path,
                 f"sha256 {digest[:12]}... does not match the manifest's {str(shard.get('sha256'))[:12]}...; "
                 "the shard is corrupted")


def open_split(data_dir: str | Path, manifest: dict[str, Any], split: str) -> list[np.memmap]:
    """Memory-map every non-empty shard of `split`, in stream order."""
    if split not in manifest["splits"]:
        raise DataError(f"{Path(data_dir) / MANIFEST_NAME}: no split {split!r}; "
                        f"available: {', '.join(manifest['splits'])}")
    dtype = DTYPES[manifest["dtype"]]
    return [np.memmap(Path(data_dir) / s["file"], dtype=dtype, mode="r")
            for s in manifest["splits"][split]["shards"] if s["tokens"] > 0]
