"""Batches for the trainer: packed token shards (data_prep) or random tokens for smoke runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch

from data_prep.build import DEFAULT_OUT_DIR, ensure_default_dataset
from data_prep.errors import DataError
from data_prep.loader import TokenWindowLoader, load_manifest
from data_prep.streaming import StreamingTokenLoader, open_streaming_dataset
from data_prep.tokenizer import load_tokenizer
from trainer.config import REPO_ROOT, TrainConfig


class BatchSource(Protocol):
    vocab_size: int

    def next_batch(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RandomTokens:
    """Uniform random tokens, reproducible per (seed, rank, batch index); resumable like the real loader."""

    def __init__(self, vocab_size: int, seq_len: int, micro_batch_size: int, rank: int, seed: int) -> None:
        self.vocab_size, self.seq_len, self.micro_batch_size = vocab_size, seq_len, micro_batch_size
        self.rank, self.seed, self.index = rank, seed, 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + self.index)
        self.index += 1
        w = torch.randint(0, self.vocab_size, (self.micro_batch_size, self.seq_len + 1), generator=g)
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])


def ensure_data(cfg: TrainConfig) -> None:
    """Build the default corpus when it is missing and the config allows it (call on one process)."""
    if cfg.data.source != "shards":
        return
    path = data_dir(cfg)
    if (path / "manifest.json").is_file():
        return
    if cfg.data.build_if_missing and path.resolve() == Path(DEFAULT_OUT_DIR).resolve():
        ensure_default_dataset(path)
        return
    raise ValueError(f"data.path={cfg.data.path!r}: no manifest.json in {path}; build it with "
                     f"`python -m data_prep.build --out {cfg.data.path}`")


def data_dir(cfg: TrainConfig) -> Path:
    """The packed-shard directory of `data.path`."""
    return repo_path(cfg.data.path)


def repo_path(value: str) -> Path:
    """Paths in configs are relative to the repository root unless absolute."""
    path = Path(value)
    return path if path.is_absolute() else REPO_ROOT / path


def make_source(cfg: TrainConfig, split: str, rank: int, world_size: int) -> BatchSource | None:
    """The split's batches for this rank; None when a streamed run has no validation data."""
    model_vocab = cfg.model_config().vocab_size
    if cfg.data.source == "random":
        return RandomTokens(model_vocab, cfg.data.seq_len, cfg.batch.micro_batch_size, rank,
                            cfg.run.seed + (0 if split == "train" else 10_000))
    if cfg.data.source == "stream":
        if split == "train":
            key, files = "data.stream_train", cfg.data.stream_train
        else:
            key, files = "data.stream_validation", cfg.data.stream_validation
        if files is None:
            return None
        try:
            dataset = open_streaming_dataset(str(repo_path(files)), cfg.data.text_field)
        except DataError as err:  # it names the path; the user edits the config key
            raise DataError(f"{key}={files!r}: {err}") from None
        tokenizer = repo_path(cfg.data.tokenizer)
        try:
            load_tokenizer(tokenizer)  # the loader's own error names the path only; the user edits data.tokenizer
        except DataError as err:
            raise DataError(f"data.tokenizer={cfg.data.tokenizer!r}: {err}") from None
        loader = StreamingTokenLoader(dataset, tokenizer, cfg.data.seq_len,
                                      cfg.batch.micro_batch_size, rank=rank, world_size=world_size,
                                      seed=cfg.run.seed, text_field=cfg.data.text_field)
        if loader.vocab_size > model_vocab:
            raise ValueError(f"data.tokenizer={cfg.data.tokenizer!r}: vocab {loader.vocab_size} is larger than "
                             f"model.vocab_size={model_vocab}")
        return loader
    tokenizer_vocab = load_manifest(data_dir(cfg))["tokenizer"]["vocab_size"]
    if model_vocab < tokenizer_vocab:  # data_prep's check_vocab names the manifest; the user edits this key
        raise ValueError(f"model.vocab_size={model_vocab}: smaller than the vocab of the tokenizer of data.path="
                         f"{cfg.data.path!r} ({tokenizer_vocab}); expected at least {tokenizer_vocab} (token ids would "
                         f"index past the embedding)")
    return TokenWindowLoader(data_dir(cfg), split, cfg.data.seq_len, cfg.batch.micro_batch_size,
                             rank=rank, world_size=world_size, seed=cfg.run.seed)


def validation_reuse_note(cfg: TrainConfig, world_size: int) -> str | None:
    """`run.eval_batches` past the end of a packed validation split reads its windows again (the loader rolls
    into a new epoch) without a word: 100 batches of 8 on a split of 31 windows per rank scored each 26 times."""
    if cfg.data.source != "shards":
        return None
    split = load_manifest(data_dir(cfg))["splits"].get("validation")
    if not split:
        return None
    tokens = sum(shard["tokens"] for shard in split["shards"])
    per_rank = max(tokens - 1, 0) // cfg.data.seq_len // world_size
    wanted = cfg.run.eval_batches * cfg.batch.micro_batch_size
    if per_rank < 1 or wanted <= per_rank:
        return None
    fits = per_rank // cfg.batch.micro_batch_size
    cure = (f"run.eval_batches={fits} reads each at most once" if fits else
            "one micro-batch is already more than the split: a larger validation split reads each once")
    return (f"note: run.eval_batches={cfg.run.eval_batches} x batch.micro_batch_size={cfg.batch.micro_batch_size} "
            f"reads {wanted} validation windows per rank; the split has {per_rank} per rank, so validation reads "
            f"them again (up to {-(-wanted // per_rank)} times); {cure}")


def check_source(cfg: TrainConfig, split: str, rank: int, world_size: int) -> None:
    """Open the split and read one micro-batch from it. Streamed files are read lazily: a bad validation file
    (no text field, no text) surfaced only at the first validation, after steps were trained and saved."""
    source = make_source(cfg, split, rank, world_size)
    if source is not None:
        source.next_batch()
