"""Tokenize on the fly: windows from a streamed dataset, for corpora too big (or too fresh) to pack first.

Same batches and state interface as `TokenWindowLoader`. Documents are read in stream order (optionally
through a seeded shuffle buffer), tokenized in small batches, joined with an end-of-text token, and cut
into windows of seq_len+1 tokens that overlap by one token. The state is the number of examples this rank
has consumed in the current epoch plus the tokens read but not yet returned, so a resumed loader re-reads
the stream up to that point without tokenizing it and returns exactly the next batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from data_prep.corpus import (SET_TEXT_FIELD, column_text, json_records, load_saved_dataset, read_lines, record_text,
                              resolve_inputs)
from data_prep.errors import DataError
from data_prep.sources import file_sha256
from data_prep.tokenizer import find_eos_id, load_tokenizer

__all__ = ["StreamingTokenLoader", "open_streaming_dataset"]

STATE_VERSION = 1
_BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".json": "json", ".jsonl": "json",
             ".ndjson": "json", ".parquet": "parquet"}


def _text_examples(paths: list[str]) -> Iterator[dict[str, str]]:
    """One example per line, split like the `datasets` text builder (str.splitlines, no line breaks)."""
    for path in paths:
        for _, line in read_lines(Path(path)):
            for piece in line.splitlines():
                yield {"text": piece}


def _json_examples(paths: list[str], text_field: str) -> Iterator[dict[str, Any]]:
    """Records as parsed (every field kept), once their text field is checked; a null text becomes ""."""
    for path in paths:
        for where, record in json_records(Path(path)):
            yield {**record, text_field: record_text(record, text_field, where)}


def open_streaming_dataset(inputs: str | os.PathLike | list[str | os.PathLike], text_field: str = "text") -> Any:
    """Local files (globs; all of one kind: text, json/jsonl or parquet) or a `save_to_disk` folder as a
    `datasets.IterableDataset`. Text files give one example per line in the field "text".

    Text and json/jsonl files are read by our own generator (one shard per file, like the `datasets`
    builders) so that a line that is not UTF-8, not JSON or lacks `text_field` stops the run with a
    DataError naming the file and line, instead of a traceback from inside `datasets` naming neither.
    """
    import datasets

    patterns = [str(p) for p in inputs] if isinstance(inputs, list) else [str(inputs)]
    paths = resolve_inputs(patterns)
    if len(paths) == 1 and paths[0].is_dir():
        loaded = load_saved_dataset(paths[0])
        if isinstance(loaded, datasets.DatasetDict):
            raise DataError(f"dataset {paths[0]}: holds splits {list(loaded)}; pass the folder of one split")
        return loaded.to_iterable_dataset()
    builders = set()
    for path in paths:
        suffix = Path(path.name[:-3] if path.name.endswith(".gz") else path.name).suffix.lower()
        if suffix not in _BUILDERS:
            raise DataError(f"dataset {path}: streaming reads .txt, .json, .jsonl or .parquet files")
        builders.add(_BUILDERS[suffix])
    if len(builders) != 1:
        raise DataError(f"dataset {patterns}: files must all be of one kind, got {sorted(builders)}")
    files = [str(p) for p in paths]
    builder = builders.pop()
    if builder == "text":
        return datasets.IterableDataset.from_generator(_text_examples, gen_kwargs={"paths": files})
    if builder == "json":
        return datasets.IterableDataset.from_generator(_json_examples,
                                                       gen_kwargs={"paths": files, "text_field": text_field})
    return datasets.load_dataset(builder, data_files=files, split="train", streaming=True)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def example_text(example: Any, text_field: str) -> str:
    """An example's text ("" for none), or a DataError naming the fields it has."""
    if not isinstance(example, dict) or text_field not in example:
        fields = ", ".join(sorted(example)) if isinstance(example, dict) else type(example).__name__
        raise DataError(f"dataset: example has no field {text_field!r} (fields: {fields}); {SET_TEXT_FIELD}")
    return column_text(example[text_field], text_field, "dataset")


def document_tokens(tokenizer: Any, texts: list[str], eos_id: int) -> list[int]:
    """The texts' token ids, each document followed by end-of-text: how the stream is joined into windows."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos_id)
    return ids


class StreamingTokenLoader:
    """Fixed-length windows tokenized on the fly from a streamed dataset; each rank reads a disjoint part.

    `dataset` is a `datasets.IterableDataset` or local files / a saved dataset folder (opened with
    `open_streaming_dataset`). Ranks are split with `datasets.distributed.split_dataset_by_node`: by file
    when the number of files is a multiple of world_size, else by example (every world_size-th example).
    With `shuffle_buffer > 0` the stream is shuffled with a buffer seeded by `seed`, differently each epoch;
    the shuffle happens before the rank split, so the ranks stay disjoint. Epochs roll over by themselves.
    """

    def __init__(self, dataset: Any, tokenizer_path: str | os.PathLike, seq_len: int, micro_batch_size: int,
                 rank: int = 0, world_size: int = 1, seed: int = 0, *, text_field: str = "text",
                 eos_token: str | None = None, shuffle_buffer: int = 1000, encode_batch: int = 16) -> None:
        import datasets
        from datasets.distributed import split_dataset_by_node

        self.seq_len = _check_int("seq_len", seq_len, 1)
        self.micro_batch_size = _check_int("micro_batch_size", micro_batch_size, 1)
        self.world_size = _check_int("world_size", world_size, 1)
        self.rank = _check_int("rank", rank, 0)
        if rank >= world_size:
            raise ValueError(f"rank must be < world_size={world_size}, got {rank}")
        self.seed = _check_int("seed", seed, 0)
        self.encode_batch = _check_int("encode_batch", encode_batch, 1)
        _check_int("shuffle_buffer", shuffle_buffer, 0)
        if not isinstance(text_field, str) or not text_field:
            raise ValueError(f"text_field must be a non-empty string, got {text_field!r}")
        self.text_field = text_field
        self.tokenizer_path = Path(tokenizer_path)
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.tokenizer_sha256 = file_sha256(self.tokenizer_path)
        self.vocab_size: int = self.tokenizer.get_vocab_size()
        self.eos_id = find_eos_id(self.tokenizer, eos_token, where=f"tokenizer {self.tokenizer_path}")
        if not isinstance(dataset, datasets.IterableDataset):
            dataset = open_streaming_dataset(dataset, text_field)
        if shuffle_buffer > 0:
            dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self._dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.epoch = 0
        self.examples_consumed = 0  # examples of this rank's stream read in the current epoch
        self._buffer: list[int] = []  # tokens read but not yet returned (the next window starts here)
        self._iterator: Iterator[Any] | None = None
        self._texts_this_epoch = 0

    def _open_epoch(self) -> Iterator[Any]:
        """An iterator over this rank's stream for `self.epoch`, advanced past the consumed examples."""
        self._dataset.set_epoch(self.epoch)
        iterator = iter(self._dataset)
        for skipped in range(self.examples_consumed):
            if next(iterator, None) is None:
                raise ValueError(f"loader state field 'examples_consumed' is {self.examples_consumed} but this "
                                 f"rank's stream has only {skipped} examples in epoch {self.epoch}")
        return iterator

    def _next_texts(self) -> list[str]:
        """Up to `encode_batch` texts; rolls over to the next epoch at the end of the stream."""
        if self._iterator is None:
            self._iterator = self._open_epoch()
            self._texts_this_epoch = int(self.examples_consumed > 0)  # resumed mid-epoch: text was seen
        texts: list[str] = []
        while len(texts) < self.encode_batch:
            example = next(self._iterator, None)
            if example is None:
                if texts:
                    break
                if self._texts_this_epoch == 0:
                    raise DataError(f"dataset: rank {self.rank} of {self.world_size} got no text in field "
                                    f"{self.text_field!r} in a whole epoch")
                self.epoch += 1
                self.examples_consumed = 0
                self._iterator = self._open_epoch()
                self._texts_this_epoch = 0
                continue
            self.examples_consumed += 1
            text = example_text(example, self.text_field)
            if text:
                texts.append(text)
                self._texts_this_epoch += 1
        return texts

    def _fill(self, needed: int) -> None:
        while len(self._buffer) < needed:
            self._buffer.extend(document_tokens(self.tokenizer, self._next_texts(), self.eos_id))

    def next_batch(self) -> dict[str, torch.Tensor]:
        """{"input_ids": int64 [micro_batch_size, seq_len], "labels": int64 [micro_batch_size, seq_len]} where labels are the next tokens."""
        rows = []
        for _ in range(self.micro_batch_size):
            self._fill(self.seq_len + 1)
            rows.append(self._buffer[: self.seq_len + 1])
            del self._buffer[: self.seq_len]  # the last token of this window starts the next one
        tokens = torch.tensor(rows, dtype=torch.int64)
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: epoch, examples consumed this epoch and the unreturned tokens."""
        return {"version": STATE_VERSION, "kind": "streaming", "seq_len": self.seq_len, "rank": self.rank,
                "world_size": self.world_size, "seed": self.seed, "text_field": self.text_field,
                "tokenizer_sha256": self.tokenizer_sha256, "epoch": self.epoch,
                "examples_consumed": self.examples_consumed, "buffer": list(self._buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`: the next batch is the one the saving loader would have returned next.

        The dataset, shuffle settings and seed must be the ones the state was saved with; the fields in
        the state that can be checked are, and a mismatch raises ValueError naming the field.
        """
        if not isinstance(state, dict):
            raise ValueError(f"loader state must be a dict, got {type(state).__name__}")
        if state.get("version") != STATE_VERSION or state.get("kind") != "streaming":
            raise ValueError(f"loader state: expected a streaming state of version {STATE_VERSION}, got "
                             f"kind={state.get('kind')!r} version={state.get('version')!r}")
        mine = self.state_dict()
        for key in ("seq_len", "rank", "world_size", "seed", "text_field", "tokenizer_sha256"):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state field {key!r} is {state.get(key)!r} but this loader has "
                                 f"{mine[key]!r}; cannot resume exactly")
        buffer = state.get("buffer")
        if not isinstance(buffer, list) or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in buffer):
            raise ValueError(f"loader state field 'buffer' must be a list of token ids < {self.vocab_size}")
        self.epoch = _check_int("loader state field 'epoch'", state.get("epoch"), 0)
        self.examples_consumed = _check_int("loader state field 'examples_consumed'",
                                            state.get("examples_consumed"), 0)
        self._buffer = list(buffer)
        self._iterator = None
