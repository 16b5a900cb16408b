"""Fixed-length training windows from packed token shards, sharded over data-parallel ranks, resumable.

Window w of a split is the seq_len+1 tokens starting at token w * seq_len of the split's concatenated
stream (consecutive windows share one token, so every token after the first is a label exactly once per
epoch). Each epoch visits the windows in an order drawn from (seed, epoch); rank r takes every
world_size-th window of that order. The loader's whole state is (epoch, position in the rank's order),
which is why resuming is exact and the state is a handful of integers.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_prep.errors import DataError
from data_prep.shards import MANIFEST_NAME, load_manifest, open_split, verify_split
from data_prep.sources import file_sha256

__all__ = ["TokenWindowLoader", "load_manifest", "check_vocab", "check_tokenizer"]

STATE_VERSION = 1
VERIFY_AUTO_BYTES = 1 << 30  # checksum a split at open when it is at most this big (about 1 s of hashing)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class TokenWindowLoader:
    """Fixed-length windows from packed shards; each data-parallel rank reads a disjoint part.

    Every epoch the split's windows are shuffled with a generator seeded by (seed, epoch) and dealt out
    round-robin to the ranks. When the number of windows is not a multiple of world_size the last
    `num_windows % world_size` windows of that epoch's order are dropped, so every rank gets the same
    count (`windows_per_rank`) and ranks stay in step; over the epoch the ranks together read each
    remaining window exactly once. Epochs roll over by themselves (a batch may span two epochs) with a
    fresh shuffle.

    `verify`: recompute the shards' sha256 at open; None (default) does so when the split is at most
    1 GiB. Shard sizes are always checked.
    """

    def __init__(self, data_dir: str | os.PathLike, split: str, seq_len: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, *, verify: bool | None = None) -> None:
        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.micro_batch_size = _check_int("micro_batch_size", micro_batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        self.seed = _check_int("seed", seed, 0)
        self.data_dir = Path(data_dir)
        self.split = split
        manifest = load_manifest(self.data_dir)
        if split not in manifest["splits"]:
            raise DataError(f"{self.data_dir / MANIFEST_NAME}: no split {split!r}; "
                            f"available: {', '.join(manifest['splits'])}")
        split_bytes = sum(s["bytes"] for s in manifest["splits"][split]["shards"])
        if verify or (verify is None and split_bytes <= VERIFY_AUTO_BYTES):
            verify_split(self.data_dir, manifest, split)
        self.manifest = manifest
        self.vocab_size: int = manifest["tokenizer"]["vocab_size"]
        self.eos_id: int = manifest["tokenizer"]["eos_id"]
        self._shards = open_split(self.data_dir, manifest, split)
        lengths = np.array([len(s) for s in self._shards], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(lengths)])  # stream offset of each shard, plus the end
        self.num_tokens = int(self._starts[-1])
        self.num_windows = max(self.num_tokens - 1, 0) // seq_len
        self.windows_per_rank = self.num_windows // world_size
        if self.windows_per_rank < 1:
            raise DataError(f"{self.data_dir / MANIFEST_NAME}: split {split!r} has {self.num_tokens} tokens, "
                            f"too few for seq_len={seq_len} with world_size={world_size}: every rank needs at "
                            f"least one window of seq_len+1 tokens ({world_size * seq_len + 1} tokens in all)")
        self.epoch = 0
        self.position = 0  # windows of the current epoch this rank has already returned
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def _rank_order(self) -> np.ndarray:
        """This rank's window indices for the current epoch (cached; one permutation per epoch)."""
        if self._order_epoch != self.epoch:
            generator = np.random.default_rng([self.seed, self.epoch])
            order = generator.permutation(self.num_windows)[: self.windows_per_rank * self.world_size]
            self._order = order[self.rank:: self.world_size]
            self._order_epoch = self.epoch
        return self._order

    def _read(self, start: int, length: int) -> np.ndarray:
        """`length` tokens of the split's stream from `start`, stitched across shard boundaries."""
        out = np.empty(length, dtype=np.int64)
        shard = int(np.searchsorted(self._starts, start, side="right")) - 1
        filled = 0
        while filled < length:
            offset = start + filled - int(self._starts[shard])
            piece = self._shards[shard][offset: offset + length - filled]
            if len(piece) and int(piece.max()) >= self.vocab_size:  # an IndexError traceback deep in the embedding
                bad = offset + int(np.argmax(piece >= self.vocab_size))
                raise DataError(f"{self._shards[shard].filename}: token {int(self._shards[shard][bad])} at position "
                                f"{bad} is outside the tokenizer's vocab of {self.vocab_size} "
                                f"({self.data_dir / MANIFEST_NAME}); the shard is damaged or from another tokenizer: "
                                f"rebuild the data")
            out[filled: filled + len(piece)] = piece
            filled += len(piece)
            shard += 1
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        """{"input_ids": int64 [micro_batch_size, seq_len], "labels": int64 [micro_batch_size, seq_len]} where labels are the next tokens."""
        rows = np.empty((self.micro_batch_size, self.seq_len + 1), dtype=np.int64)
        for row in range(self.micro_batch_size):
            if self.position == self.windows_per_rank:
                self.epoch += 1
                self.position = 0
            window = int(self._rank_order()[self.position])
            rows[row] = self._read(window * self.seq_len, self.seq_len + 1)
            self.position += 1
        tokens = torch.from_numpy(rows)
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is in the stream, plus what must match for a resume to be exact."""
        return {"version": STATE_VERSION, "split": self.split, "seq_len": self.seq_len, "rank": self.rank,
                "world_size": self.world_size, "seed": self.seed, "num_windows": self.num_windows,
                "fingerprint": self.manifest.get("fingerprint"), "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the next batch is the one the saving loader would have returned next.

        The seed is taken from the state. Everything that changes which window comes next (split,
        seq_len, rank, world_size, the data) must match, else ValueError names the field.
        micro_batch_size may differ: the position counts windows, not batches.
        """
        if not isinstance(state, dict):
            raise ValueError(f"loader state must be a dict, got {type(state).__name__}")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state field 'version' is {state.get('version')!r}, expected {STATE_VERSION}")
        mine = self.state_dict()
        for key in ("split", "seq_len", "rank", "world_size", "num_windows", "fingerprint"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state field {key!r} is {state.get(key)!r} but this loader has "
                                 f"{mine[key]!r}; cannot resume exactly")
        epoch = _check_int("loader state field 'epoch'", state.get("epoch"), 0)
        position = _check_int("loader state field 'position'", state.get("position"), 0)
        if position > self.windows_per_rank:
            raise ValueError(f"loader state field 'position' is {position}, more than the "
                             f"{self.windows_per_rank} windows per rank")
        self.seed = _check_int("loader state field 'seed'", state.get("seed"), 0)
        self.epoch, self.position = epoch, position
        self._order_epoch = -1


def check_vocab(data_dir: str | os.PathLike, model_vocab_size: int) -> None:
    """Require model_vocab_size >= the tokenizer's vocab (a padded embedding is fine, a smaller one is not:
    token ids at or above the model's vocab would index past the embedding)."""
    tokenizer_vocab = load_manifest(data_dir)["tokenizer"]["vocab_size"]
    if model_vocab_size < tokenizer_vocab:
        raise ValueError(f"vocab_size too small for {Path(data_dir) / MANIFEST_NAME}: tokenizer has "
                         f"{tokenizer_vocab}, model has {model_vocab_size}; the model's vocab_size must be "
                         f">= the tokenizer's")


def check_tokenizer(data_dir: str | os.PathLike, tokenizer_path: str | os.PathLike) -> None:
    """Require that the shards in `data_dir` were made with the tokenizer file at `tokenizer_path`."""
    manifest = load_manifest(data_dir)
    actual = file_sha256(Path(tokenizer_path))
    if actual != manifest["tokenizer"]["sha256"]:
        raise DataError(f"{Path(data_dir) / MANIFEST_NAME}: shards were made with tokenizer sha256 "
                        f"{manifest['tokenizer']['sha256'][:12]}..., but {tokenizer_path} has {actual[:12]}... "
                        "(shards from another tokenizer)")
