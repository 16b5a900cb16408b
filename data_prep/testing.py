"""Helpers for tests and benchmarks: the small public-domain fixture corpus and a fast build of it.

Lives in the package (not in a conftest) so the data tests, the trainer's tests and the benchmark can all
build the same tiny data set the same way.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from data_prep.build import REPO_ROOT, BuildConfig, build

FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "data"
FIXTURE_JSONL = FIXTURE_DIR / "kjv_sample.jsonl"  # 32 KJV chapters, {"title", "text"} per line
FIXTURE_TXT = FIXTURE_DIR / "sonnets.txt"  # Shakespeare's sonnets I-LX, one per paragraph
FIXTURE_VOCAB_SIZE = 512


def fixture_build_config(out_dir: str | Path, **overrides: Any) -> BuildConfig:
    """A build of the fixture corpus that takes about a second: small vocab, several shards per split
    (so reads across shard boundaries are exercised), 10% validation so that split is not empty."""
    config = BuildConfig(inputs=[str(FIXTURE_JSONL), str(FIXTURE_TXT)], out_dir=str(out_dir),
                         txt_documents="paragraph", min_chars=40, vocab_size=FIXTURE_VOCAB_SIZE,
                         validation_fraction=0.1, shard_tokens=16_384, progress=False)
    return dataclasses.replace(config, **overrides)


def build_fixture_dataset(out_dir: str | Path, **overrides: Any) -> Path:
    """Build (or reuse, when up to date) the fixture data set in `out_dir` and return that folder."""
    build(fixture_build_config(out_dir, **overrides))
    return Path(out_dir)
