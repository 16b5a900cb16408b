"""Exports a user can evaluate: tokenizer + special tokens travel with the export, and `trainer.evaluate`.

One tiny run trained as a user would (`python run.sh`, 2 CPU ranks, ZeRO-3 + EP2, tied g=2) on the
fixture corpus's real tokens, exported with --hf: about 35 s on 2 shared cores for the module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.testing import FIXTURE_VOCAB_SIZE, build_fixture_dataset
from trainer.config import REPO_ROOT

TEXT = "And God said, Let there be light: and there was light.\n\nShall I compare thee to a summer's day?"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["DS_ACCELERATOR"] = "cpu"
    env.pop("TIEDMOE_CPU_RANKS", None)
    return env


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """A 3-step default-style run on the fixture shards, exported with --hf."""
    root = tmp_path_factory.mktemp("eval_run")
    shards = build_fixture_dataset(root / "shards")
    proc = _run(["run.sh", f"data.path={shards}", f"model.vocab_size={FIXTURE_VOCAB_SIZE}", "run.steps=3",
                 f"run.out_dir={root / 'runs'}", "run.name=tiny", "data.seq_len=32", "batch.micro_batch_size=4",
                 "run.eval_batches=1"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    run_dir = root / "runs" / "tiny"
    proc = _run(["-m", "trainer.export", str(run_dir), "--hf"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"run_dir": run_dir, "export": run_dir / "export" / "step00000003", "shards": shards,
            "export_stdout": proc.stdout}


@pytest.mark.distributed
def test_export_ships_the_run_tokenizer(tiny_run) -> None:
    from transformers import AutoTokenizer

    out = tiny_run["export"]
    assert "tokenizer: tokenizer.json (eos '<|endoftext|>' = id 0" in tiny_run["export_stdout"]
    assert (out / "tokenizer.json").read_bytes() == (tiny_run["shards"] / "tokenizer.json").read_bytes()
    report = json.loads((out / "export.json").read_text())
    assert report["tokenizer"]["eos_token_id"] == 0 and report["tokenizer"]["file"] == "tokenizer.json"
    for where in (out, out / "hf"):
        tok = AutoTokenizer.from_pretrained(str(where))
        ids = tok(TEXT)["input_ids"]
        assert len(ids) > 10 and max(ids) < FIXTURE_VOCAB_SIZE
        assert tok.decode(ids) == TEXT
        assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == ("<|endoftext|>", 0, 0, 0)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((out / "hf" / name).read_text())
        assert (cfg["eos_token_id"], cfg["bos_token_id"], cfg["pad_token_id"]) == (0, 0, 0), name


@pytest.mark.distributed
def test_greedy_generation_stops_at_eos(tiny_run) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = str(tiny_run["export"] / "hf")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    prompt = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: greedy picks id 0, which is eos here
    out = model.generate(prompt, max_new_tokens=20, do_sample=False)
    # generation_config.json carries eos: it stops after one token instead of running 20
    assert out.shape[1] == prompt.shape[1] + 1 and out[0, -1].item() == tok.eos_token_id
