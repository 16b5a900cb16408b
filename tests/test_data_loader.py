"""TokenWindowLoader: window contents, determinism, rank sharding, exact resume, and damaged data sets."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.errors import DataError
from data_prep.loader import TokenWindowLoader, check_tokenizer, check_vocab, load_manifest
from data_prep.testing import FIXTURE_VOCAB_SIZE, build_fixture_dataset

SEQ_LEN = 32


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture_dataset(tmp_path_factory.mktemp("data") / "fixture")


@pytest.fixture()
def damaged(data_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the data set a test may break."""
    return Path(shutil.copytree(data_dir, tmp_path / "copy"))


def _stream(data_dir: Path, split: str) -> np.ndarray:
    manifest = load_manifest(data_dir)
    shards = manifest["splits"][split]["shards"]
    return np.concatenate([np.fromfile(data_dir / s["file"], dtype=np.uint16) for s in shards])


def _batches(loader: TokenWindowLoader, count: int) -> list[dict[str, torch.Tensor]]:
    return [loader.next_batch() for _ in range(count)]


def _same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("input_ids", "labels"))


def test_batches_are_windows_of_the_stream_with_shifted_labels(data_dir: Path) -> None:
    loader = TokenWindowLoader(data_dir, "train", SEQ_LEN, micro_batch_size=4)
    assert loader.vocab_size == FIXTURE_VOCAB_SIZE
    stream = _stream(data_dir, "train")
    batch = loader.next_batch()
    assert batch["input_ids"].shape == batch["labels"].shape == (4, SEQ_LEN)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    for row in range(4):
        window = int(loader._rank_order()[row])
        expected = torch.from_numpy(stream[window * SEQ_LEN: window * SEQ_LEN + SEQ_LEN + 1].astype(np.int64))
        assert torch.equal(batch["input_ids"][row], expected[:-1]) and torch.equal(batch["labels"][row], expected[1:])


def test_windows_across_shard_boundaries(data_dir: Path) -> None:
    """A window straddling two shard files reads the concatenated stream."""
    loader = TokenWindowLoader(data_dir, "train", SEQ_LEN, micro_batch_size=1)
    first_shard = load_manifest(data_dir)["splits"]["train"]["shards"][0]["tokens"]
    stream = _stream(data_dir, "train")
    for start in (first_shard - SEQ_LEN, first_shard - 10):  # the last token / 22 tokens in the next shard
        assert np.array_equal(loader._read(start, SEQ_LEN + 1), stream[start: start + SEQ_LEN + 1])


def test_same_seed_same_batches_other_seed_other_batches(data_dir: Path) -> None:
    first = _batches(TokenWindowLoader(data_dir, "train", SEQ_LEN, 4, seed=3), 5)
    assert _same(first, _batches(TokenWindowLoader(data_dir, "train", SEQ_LEN, 4, seed=3), 5))
    assert not _same(first, _batches(TokenWindowLoader(data_dir, "train", SEQ_LEN, 4, seed=4), 5))


def test_two_ranks_are_disjoint_and_cover_the_epoch(data_dir: Path) -> None:
    ranks = [TokenWindowLoader(data_dir, "train", SEQ_LEN, 1, rank=r, world_size=2, seed=7) for r in range(2)]
    total = ranks[0].num_windows
    assert ranks[0].windows_per_rank == ranks[1].windows_per_rank == total // 2
    seen = []
    for loader in ranks:
        windows = []
        while loader.epoch == 0 and len(windows) < loader.windows_per_rank:
            windows.append(int(loader._rank_order()[loader.position]))
            loader.next_batch()
        seen.append(set(windows))
        assert len(windows) == len(set(windows)) == loader.windows_per_rank
    assert not seen[0] & seen[1]
    union = seen[0] | seen[1]
    assert len(union) == 2 * (total // 2) and union <= set(range(total))  # all but the dropped remainder


def test_epochs_roll_over_with_a_new_shuffle(data_dir: Path) -> None:
    loader = TokenWindowLoader(data_dir, "validation", SEQ_LEN, micro_batch_size=5, seed=1)
    per_epoch = loader.windows_per_rank
    first_order = loader._rank_order().copy()
    batches = per_epoch // 5 + 1
    for _ in range(batches):
        loader.next_batch()
    assert loader.epoch == 1 and loader.position == batches * 5 - per_epoch
    assert sorted(loader._rank_order().tolist()) == sorted(first_order.tolist())
    assert not np.array_equal(loader._rank_order(), first_order)


@pytest.mark.parametrize("world_size", [1, 2])
def test_resume_from_json_state_gives_the_same_batches(data_dir: Path, world_size: int) -> None:
    steps, stop = 40, 17  # 320 windows: several epochs of the validation split, part of one of train
    for split in ("train", "validation"):
        for rank in range(world_size):
            def make() -> TokenWindowLoader:
                return TokenWindowLoader(data_dir, split, SEQ_LEN, 8, rank=rank, world_size=world_size, seed=5)
            straight = _batches(make(), steps)
            interrupted = make()
            head = _batches(interrupted, stop)
            state = json.loads(json.dumps(interrupted.state_dict()))
            resumed = make()
            resumed.load_state_dict(state)
            assert _same(head + _batches(resumed, steps - stop), straight)


def test_state_from_another_setup_is_refused(data_dir: Path) -> None:
    state = TokenWindowLoader(data_dir, "train", SEQ_LEN, 4).state_dict()
    with pytest.raises(ValueError, match="'seq_len'"):
        TokenWindowLoader(data_dir, "train", SEQ_LEN * 2, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="'world_size'"):
        TokenWindowLoader(data_dir, "train", SEQ_LEN, 4, rank=0, world_size=2).load_state_dict(state)


def test_sequence_longer_than_the_split_is_refused(data_dir: Path) -> None:
    tokens = load_manifest(data_dir)["splits"]["validation"]["tokens"]
    with pytest.raises(DataError, match=r"split 'validation' has \d+ tokens, too few for seq_len"):
        TokenWindowLoader(data_dir, "validation", tokens, 1)
    with pytest.raises(DataError, match="world_size=2"):
        TokenWindowLoader(data_dir, "validation", (tokens - 1) // 2 + 1, 1, rank=0, world_size=2)


@pytest.mark.parametrize(("name", "value"), [("seq_len", 0), ("micro_batch_size", 0), ("rank", 2), ("seed", -1)])
def test_bad_arguments_name_the_field(data_dir: Path, name: str, value: int) -> None:
    arguments = {"seq_len": SEQ_LEN, "micro_batch_size": 2, "rank": 0, "world_size": 2, "seed": 0, name: value}
    with pytest.raises(ValueError, match=name):
        TokenWindowLoader(data_dir, "train", **arguments)


def test_check_vocab(data_dir: Path) -> None:
    check_vocab(data_dir, FIXTURE_VOCAB_SIZE)
    check_vocab(data_dir, FIXTURE_VOCAB_SIZE + 64)  # a padded embedding is fine
    with pytest.raises(ValueError, match=f"tokenizer has {FIXTURE_VOCAB_SIZE}, model has 256"):
        check_vocab(data_dir, 256)


def test_missing_manifest_and_unknown_split(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="manifest.json: no manifest"):
        TokenWindowLoader(tmp_path, "train", SEQ_LEN, 1)
    with pytest.raises(DataError, match="no split 'test'"):
        TokenWindowLoader(data_dir, "test", SEQ_LEN, 1)


def test_truncated_shard_is_detected(damaged: Path) -> None:
    shard = damaged / load_manifest(damaged)["splits"]["train"]["shards"][1]["file"]
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])
    with pytest.raises(DataError, match=rf"{shard.name}: size \d+ bytes is not a multiple of uint16"):
        TokenWindowLoader(damaged, "train", SEQ_LEN, 1)
    shard.write_bytes(data[:-2])
    with pytest.raises(DataError, match=rf"{shard.name}: size .* truncated"):
        TokenWindowLoader(damaged, "train", SEQ_LEN, 1)
    shard.unlink()
    with pytest.raises(DataError, match=rf"{shard.name}: shard file is missing"):
        load_manifest(damaged)


def test_corrupted_shard_fails_its_checksum(damaged: Path) -> None:
    shard = damaged / load_manifest(damaged)["splits"]["train"]["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    load_manifest(damaged)  # sizes still match: only a checksum can tell
    with pytest.raises(DataError, match=rf"{shard.name}: sha256 .* corrupted"):
        load_manifest(damaged, verify=True)
    with pytest.raises(DataError, match="corrupted"):
        TokenWindowLoader(damaged, "train", SEQ_LEN, 1)  # small splits are checksummed at open
    TokenWindowLoader(damaged, "validation", SEQ_LEN, 1)  # only the opened split is hashed
    TokenWindowLoader(damaged, "train", SEQ_LEN, 1, verify=False)


def test_a_token_outside_the_vocab_is_named_not_an_embedding_traceback(damaged: Path) -> None:
    """A shard whose manifest and checksum agree (rewritten after the fact) but holding an id >= the tokenizer's
    vocab was an IndexError traceback from the embedding inside the ranks."""
    manifest = load_manifest(damaged)
    entry = manifest["splits"]["train"]["shards"][0]
    shard = damaged / entry["file"]
    data = np.fromfile(shard, dtype=np.uint16)
    data[:] = FIXTURE_VOCAB_SIZE + 5  # every window of this shard holds it
    data.tofile(shard)
    loader = TokenWindowLoader(damaged, "train", SEQ_LEN, 4, verify=False)
    with pytest.raises(DataError, match=rf"{shard.name}: token {FIXTURE_VOCAB_SIZE + 5} at position \d+ is outside "
                                        rf"the tokenizer's vocab of {FIXTURE_VOCAB_SIZE}"):
        for _ in range(loader.windows_per_rank):
            loader.next_batch()


def test_manifest_from_another_tokenizer(damaged: Path, data_dir: Path, tmp_path: Path) -> None:
    other = build_fixture_dataset(tmp_path / "other", vocab_size=384)
    with pytest.raises(DataError, match=r"sha256 .*another tokenizer"):
        check_tokenizer(data_dir, other / "tokenizer.json")
    check_tokenizer(data_dir, data_dir / "tokenizer.json")
    shutil.copyfile(other / "tokenizer.json", damaged / "tokenizer.json")
    with pytest.raises(DataError, match=r"manifest.json: tokenizer tokenizer.json has sha256 .*another tokenizer"):
        TokenWindowLoader(damaged, "train", SEQ_LEN, 1)


def test_malformed_manifest(damaged: Path) -> None:
    manifest_path = damaged / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["dtype"] = "int8"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest.json: field 'dtype'"):
        load_manifest(damaged)
    manifest_path.write_text("{truncated")
    with pytest.raises(DataError, match="manifest.json: not valid JSON"):
        load_manifest(damaged)


@pytest.mark.parametrize("edit, says", [
    # check_vocab trusted this field: a 256-row model then passed it and the ranks died in the embedding
    (lambda m: m["tokenizer"].update(vocab_size=256), f"'tokenizer.vocab_size' is 256 but tokenizer.json has "
                                                       f"{FIXTURE_VOCAB_SIZE}"),
    (lambda m: m["tokenizer"].update(eos_id=FIXTURE_VOCAB_SIZE), "'tokenizer.eos_id'"),
    # an AttributeError traceback
    (lambda m: m["splits"]["train"].update(shards=[1]), "splits.train.shards[0] must be an object"),
])
def test_edited_manifest_fields_are_named(damaged: Path, edit, says: str) -> None:
    manifest_path = damaged / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    edit(manifest)
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="manifest.json: .*" + re.escape(says)):
        load_manifest(damaged)
