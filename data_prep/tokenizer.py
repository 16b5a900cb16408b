"""Byte-level BPE tokenizers: train one on a corpus or load a given one, and find its end-of-text token.

Byte-level BPE is used because it can encode any string without an unknown token and decodes back to
the exact same text, so the token shards lose nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data_prep.errors import DataError

EOS_TOKEN = "<|endoftext|>"
# Names other tokenizers use for their end-of-document token, tried in order when none is given.
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
VOCAB_MULTIPLE = 64  # embedding rows are padded to this anyway; a multiple keeps matmuls aligned
MIN_VOCAB_SIZE = 320  # 256 byte tokens + the special token + room for merges


def validate_vocab_size(vocab_size: int) -> None:
    """A trained vocab must be a multiple of 64 and hold the 256 byte tokens plus some merges."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise DataError(f"vocab_size must be an int, got {vocab_size!r}")
    if vocab_size < MIN_VOCAB_SIZE or vocab_size % VOCAB_MULTIPLE:
        raise DataError(f"vocab_size must be a multiple of {VOCAB_MULTIPLE} and at least {MIN_VOCAB_SIZE}, "
                        f"got {vocab_size}")
    if vocab_size > 2**32:
        raise DataError(f"vocab_size must fit uint32, got {vocab_size}")


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Train a byte-level BPE with `EOS_TOKEN` as its only special token (id 0)."""
    validate_vocab_size(vocab_size)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a `tokenizers` JSON file, with one clear error when it is missing or not a tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"tokenizer {path}: no such file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust side raises a bare Exception for malformed JSON
        raise DataError(f"tokenizer {path}: not a tokenizers JSON file ({err})") from err


def find_eos_id(tokenizer: Tokenizer, eos_token: str | None = None, where: str = "tokenizer") -> int:
    """Id of the end-of-document token placed between documents in the packed stream."""
    candidates = (eos_token,) if eos_token else EOS_CANDIDATES
    for token in candidates:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise DataError(f"{where}: has no end-of-text token; tried {', '.join(candidates)} (set eos_token / --eos-token)")
