"""StreamingTokenLoader: windows of the tokenized stream, rank sharding, exact resume, bad inputs."""

from __future__ import annotations

import os

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

import json
from pathlib import Path

import pytest
import torch

from data_prep.errors import DataError
from data_prep.streaming import StreamingTokenLoader, open_streaming_dataset
from data_prep.testing import FIXTURE_JSONL, FIXTURE_TXT, build_fixture_dataset
from data_prep.tokenizer import load_tokenizer

SEQ_LEN = 32


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture_dataset(tmp_path_factory.mktemp("data") / "fixture") / "tokenizer.json"


@pytest.fixture(scope="module")
def sonnets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve short documents: a stream that ends (and rolls over) within a few batches."""
    paragraphs = [p for p in FIXTURE_TXT.read_text().split("\n\n") if len(p) > 200][:12]
    path = tmp_path_factory.mktemp("stream") / "sonnets.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": p}) + "\n" for i, p in enumerate(paragraphs)))
    return path


def _expected_stream(tokenizer_path: Path, texts: list[str]) -> list[int]:
    tokenizer = load_tokenizer(tokenizer_path)
    eos = tokenizer.token_to_id("<|endoftext|>")
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text, add_special_tokens=False).ids + [eos]
    return stream


def _batches(loader: StreamingTokenLoader, count: int) -> list[dict[str, torch.Tensor]]:
    return [loader.next_batch() for _ in range(count)]


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("input_ids", "labels"))


def test_windows_follow_the_tokenized_stream(tokenizer_path: Path) -> None:
    loader = StreamingTokenLoader(FIXTURE_JSONL, tokenizer_path, SEQ_LEN, 4, shuffle_buffer=0)
    texts = [json.loads(line)["text"] for line in FIXTURE_JSONL.read_text().splitlines()]
    stream = torch.tensor(_expected_stream(tokenizer_path, texts[:3]))
    batch = loader.next_batch()
    assert batch["input_ids"].shape == batch["labels"].shape == (4, SEQ_LEN)
    assert batch["input_ids"].dtype == torch.int64 and loader.vocab_size == 512
    for row in range(4):
        window = stream[row * SEQ_LEN: row * SEQ_LEN + SEQ_LEN + 1]
        assert torch.equal(batch["input_ids"][row], window[:-1]) and torch.equal(batch["labels"][row], window[1:])


def test_same_seed_same_batches(tokenizer_path: Path, sonnets: Path) -> None:
    def run(seed: int) -> list[dict[str, torch.Tensor]]:
        return _batches(StreamingTokenLoader(sonnets, tokenizer_path, SEQ_LEN, 4, seed=seed, shuffle_buffer=8), 6)

    assert _same(run(1), run(1))
    assert not _same(run(1), run(2))


@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_two_ranks_read_disjoint_complete_parts(tokenizer_path: Path, sonnets: Path, shuffle_buffer: int) -> None:
    ranks = [StreamingTokenLoader(sonnets, tokenizer_path, SEQ_LEN, 2, rank=r, world_size=2, seed=3,
                                  shuffle_buffer=shuffle_buffer) for r in range(2)]
    seen = [[example["id"] for example in loader._dataset] for loader in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(12))
    records = [json.loads(line) for line in sonnets.read_text().splitlines()]
    for loader, ids in zip(ranks, seen):  # each rank's batches are made of its own documents, in its order
        stream = torch.tensor(_expected_stream(tokenizer_path, [records[i]["text"] for i in ids]))
        batch = loader.next_batch()
        assert torch.equal(batch["input_ids"][1], stream[SEQ_LEN: 2 * SEQ_LEN])


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_from_json_state_gives_the_same_batches(tokenizer_path: Path, sonnets: Path, world_size: int) -> None:
    steps, stop = 60, 23  # several epochs of the 12-document stream; the stop falls mid-document
    for rank in range(world_size):
        def make() -> StreamingTokenLoader:
            return StreamingTokenLoader(sonnets, tokenizer_path, SEQ_LEN, 4, rank=rank, world_size=world_size,
                                        seed=11, shuffle_buffer=8)
        straight_loader = make()
        straight = _batches(straight_loader, steps)
        assert straight_loader.epoch >= 2
        interrupted = make()
        head = _batches(interrupted, stop)
        state = json.loads(json.dumps(interrupted.state_dict()))
        assert state["examples_consumed"] > 0 and state["buffer"]
        resumed = make()
        resumed.load_state_dict(state)
        assert _same(head + _batches(resumed, steps - stop), straight)


def test_text_files_and_saved_datasets(tokenizer_path: Path, tmp_path: Path) -> None:
    import datasets

    lines = StreamingTokenLoader(FIXTURE_TXT, tokenizer_path, SEQ_LEN, 2, shuffle_buffer=0).next_batch()
    assert lines["input_ids"].shape == (2, SEQ_LEN)
    records = [json.loads(line) for line in FIXTURE_JSONL.read_text().splitlines()]
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    from_disk = StreamingTokenLoader(tmp_path / "saved", tokenizer_path, SEQ_LEN, 2, shuffle_buffer=0)
    from_jsonl = StreamingTokenLoader(FIXTURE_JSONL, tokenizer_path, SEQ_LEN, 2, shuffle_buffer=0)
    assert _same(_batches(from_disk, 3), _batches(from_jsonl, 3))


def test_bad_inputs(tokenizer_path: Path, sonnets: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no field 'body'") as raised:
        StreamingTokenLoader(sonnets, tokenizer_path, SEQ_LEN, 1, text_field="body").next_batch()
    assert "data.text_field" in str(raised.value)  # raised inside a training run too: name the trainer's key
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(DataError, match="got no text in field 'text'"):
        StreamingTokenLoader(empty, tokenizer_path, SEQ_LEN, 1).next_batch()
    with pytest.raises(DataError, match="missing.jsonl'?: no such file"):
        open_streaming_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="nope.json: no such file"):
        StreamingTokenLoader(sonnets, tmp_path / "nope.json", SEQ_LEN, 1)
    state = StreamingTokenLoader(sonnets, tokenizer_path, SEQ_LEN, 1, seed=1).state_dict()
    with pytest.raises(ValueError, match="'seed'"):
        StreamingTokenLoader(sonnets, tokenizer_path, SEQ_LEN, 1, seed=2).load_state_dict(state)


def _stream_error(path: Path, tokenizer_path: Path, **kwargs) -> str:
    with pytest.raises(DataError) as raised:
        _batches(StreamingTokenLoader(path, tokenizer_path, SEQ_LEN, 2, shuffle_buffer=0, **kwargs), 8)
    message = str(raised.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("bad_line, says", [
    (b'{"body": "no text field here"}\n', "no field 'text'"),
    (b'{"text": "unterminated\n', "not valid JSON"),
    (b'{"text": "caf\xe9 in latin-1"}\n', "not valid UTF-8 (byte 0xe9)"),
    (b'{"text": 42}\n', "must be a string"),
])
def test_bad_jsonl_line_names_file_and_line(tokenizer_path: Path, tmp_path: Path, bad_line: bytes, says: str) -> None:
    """Issue 16: found while streaming (inside the ranks), named by file:line; a ValueError for the CLI."""
    good = "".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(3)).encode()
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(good + bad_line + good)
    message = _stream_error(path, tokenizer_path)
    assert message.startswith(f"{path}:4: ") and says in message, message
    assert isinstance(DataError(message), ValueError)


def test_parquet_text_column_that_is_not_strings_is_refused(tokenizer_path: Path, tmp_path: Path) -> None:
    """An int column reached encode_batch: a TypeError traceback from every rank."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": list(range(40))}), path)
    assert "column 'text' must hold strings, got int" in _stream_error(path, tokenizer_path)


def test_non_utf8_text_file_names_file_and_line(tokenizer_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_bytes("fine line\n".encode() * 5 + b"bad \xff byte\n")
    message = _stream_error(path, tokenizer_path)
    assert message.startswith(f"{path}:6: not valid UTF-8"), message


def test_text_lines_split_like_the_datasets_text_builder(tokenizer_path: Path, tmp_path: Path) -> None:
    """Our generator replaced `datasets`' text builder: same examples (no line breaks, CRLF, empty lines)."""
    import datasets

    path = tmp_path / "lines.txt"
    path.write_bytes(b"first\r\nsecond\n\nthird \xe2\x80\x94 dash\nlast without newline")
    ours = [e["text"] for e in open_streaming_dataset(path)]
    theirs = [e["text"] for e in datasets.load_dataset("text", data_files=[str(path)], split="train", streaming=True)]
    assert ours == theirs == ["first", "second", "", "third \u2014 dash", "last without newline"]


def test_jsonl_stream_keeps_one_shard_per_file(tokenizer_path: Path, sonnets: Path, tmp_path: Path) -> None:
    """Ranks still split a multi-file stream by file (as with `datasets`' json builder)."""
    copy = tmp_path / "b.jsonl"
    copy.write_bytes(sonnets.read_bytes())
    assert open_streaming_dataset([sonnets, copy]).num_shards == 2
