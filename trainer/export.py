"""Export a training run's DeepSpeed checkpoint as a plain model (and optionally a Hugging Face one).

    python -m trainer.export RUN_DIR [--tag TAG] [--out DIR] [--hf [--hf-layout tied|copied]] [--tol T]

Reads `RUN_DIR/config.yaml` and `RUN_DIR/checkpoints/<TAG>` (default: the tag `latest` names), starts
as many CPU ranks as wrote the checkpoint, and on each rebuilds the engine exactly as training did
(`trainer.engine.initialize`, any ZeRO stage, expert parallel, tied or not), loads the checkpoint,
gathers every parameter (ZeRO-3 partitions and AutoEP expert shards) and maps AutoEP's names back to
the model's own. `OUT` (default `RUN_DIR/export/<TAG>`) then holds:

    model.safetensors  fp32, exactly `MoETransformer.state_dict()` keys: each tied tensor once, under
                       its leader's name (followers' borrowed experts / router / attention have no keys)
    config.json        the ModelConfig and the tie plan; `load_exported(OUT)` rebuilds the model
    hf/                with --hf: a transformers model directory. --hf-layout tied (default for tied
                       runs): each tied bank stored once and held once after
                       `AutoModelForCausalLM.from_pretrained(hf, trust_remote_code=True)` (modeling_tiedmoe.py
                       ships in it); copied (default for untied runs): plain OLMoE / Qwen3-MoE classes with
                       every tied bank copied into each layer, for tools that refuse custom code
    export.json        where it came from and the parity numbers
    tokenizer.json     the run's tokenizer (also in hf/) with tokenizer_config.json and
                       special_tokens_map.json; eos/bos/pad ids also in the HF config.json and
                       generation_config.json. A run on random tokens has none: export.json says so.

Parity: on a fixed random batch the engine's logits (rank 0), the exported model's (`load_exported`)
and, with --hf, the reloaded HF model's must agree within --tol (default 1e-5), else the exit code is
1 and the export goes to `OUT.failed` instead of `OUT`. bf16 runs export the optimizer's fp32 master
weights; without --tol they are judged against bf16's own rounding noise (`judge`). `OUT` is replaced by renames
only: it is written in a temporary directory beside it, so a half-written export never appears there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch

from models.config import from_dict, layer_plan, tie_groups
from models.transformer import MoETransformer, build_model
from trainer.argtypes import OneLineParser, non_empty

FORMAT = "tiedmoe-export"
VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
REPORT = "export.json"
PARITY_BATCH = 2  # sequences in the fixed parity batch
PARITY_SEED = 1234
FP32_TOL = 1e-5  # default --tol: fp32 engine vs exported model differ by op order only
# bf16: two bf16 forwards that round independently differ by up to ~sqrt(2) x one's distance from fp32 (other
# op orders on other layouts); an honest export measured 0.27x, broken ones 4-20x
BF16_NOISE_FACTOR = 2.0



# --------------------------------------------------------------------------------------------------
# Loading an export (no DeepSpeed needed)
# --------------------------------------------------------------------------------------------------

def load_exported(out_dir: str | Path) -> MoETransformer:
    """Rebuild the model from `config.json` and load `model.safetensors` (strict); eval mode, fp32."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    meta = read_config(out_dir)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{out_dir / CONFIG}: not a tiedmoe export (format={meta.get('format')!r})")
    if not isinstance(meta.get("model_config"), dict):
        raise ValueError(f"{out_dir / CONFIG}: model_config: expected an object of model fields")
    try:
        model_cfg = from_dict(meta["model_config"])
    except ValueError as err:  # a hand-edited field: say which file holds it
        raise ValueError(f"{out_dir / CONFIG}: {err}") from None
    plan = [dataclasses.asdict(p) for p in layer_plan(model_cfg)]
    if meta.get("layer_plan") is not None and meta["layer_plan"] != plan:
        raise ValueError(f"{out_dir / CONFIG}: its layer_plan disagrees with the one its model_config gives")
    model = build_model(model_cfg)
    try:
        weights = load_file(str(out_dir / WEIGHTS))
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{out_dir / WEIGHTS}: unreadable ({err})") from None
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as err:  # torch lists every mismatched tensor: name the first
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise ValueError(f"{out_dir / WEIGHTS}: does not fit {out_dir / CONFIG} ({first[:200]})") from None
    return model.eval()


def read_config(out_dir: str | Path) -> dict[str, Any]:
    """An export's `config.json` as an object; a missing, unreadable or foreign file is a ValueError naming it."""
    path = Path(out_dir) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object (a trainer.export config)")
    return meta


def export_config(model_cfg: Any, source: dict[str, Any]) -> dict[str, Any]:
    return {"format": FORMAT, "version": VERSION, "dtype": "float32", "model_config": model_cfg.to_dict(),
            "tie_groups": tie_groups(model_cfg), "layer_plan": [dataclasses.asdict(p) for p in layer_plan(model_cfg)],
            "source": source}


def parity_batch(vocab_size: int, seq_len: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(PARITY_SEED)
    return torch.randint(0, vocab_size, (PARITY_BATCH, seq_len), generator=g)


# --------------------------------------------------------------------------------------------------
# Resolving what to export (main process; every bad input is a ValueError -> one line, exit 2)
# --------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Source:
    run_dir: Path
    ckpt_dir: Path
    tag: str
    world_size: int
    step: int | None
    cfg: Any  # TrainConfig
    fingerprint: str | None = None  # checkpoint.fingerprint of the tag: which write of it was exported
    layout: tuple[str, ...] = ()  # overrides that load the tag on the layout that wrote it (`written_layout`)


def resolve(run_dir: str | Path, tag: str | None, hf: bool = False, held: ExitStack | None = None) -> Source:
    """The checkpoint `tag` of `run_dir` (default: latest), checked whole before any rank starts. `held`: keep
    a running job from pruning the tag (`checkpoint.reading`) until the stack closes; taken before the checks,
    so a tag pruned in between is refused here, not half-read by the ranks."""
    from trainer import checkpoint
    from trainer.config import load_config

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise ValueError(f"run directory {run_dir}: {'a file, not a folder' if run_dir.exists() else 'not found'}")
    if not (run_dir / "config.yaml").is_file():
        raise ValueError(f"run directory {run_dir}: no config.yaml (is it a trainer.train run directory?)")
    cfg = load_config(run_dir / "config.yaml")
    if hf:
        check_hf(cfg)
    ckpt_dir = run_dir / "checkpoints"
    if tag is None:
        tag = checkpoint.latest_tag(ckpt_dir)
        if tag is None:
            raise ValueError(f"run directory {run_dir}: {checkpoint.without_latest(ckpt_dir)}; name one: "
                             f"trainer.export --tag TAG, trainer.evaluate {ckpt_dir}/TAG")
    elif not checkpoint.is_plain_name(tag):  # '../x' would export into (and replace) a directory outside export/
        raise ValueError(f"checkpoint tag {tag!r}: expected the name of a folder under {ckpt_dir}, like step00000000")
    if held is not None:
        held.enter_context(checkpoint.reading(ckpt_dir, tag))
    if not (ckpt_dir / tag).is_dir():
        have = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) if ckpt_dir.is_dir() else []
        what = "is not a checkpoint folder" if (ckpt_dir / tag).exists() else "does not exist"
        raise ValueError(f"checkpoint tag {tag!r}: {ckpt_dir / tag} {what} (have: {', '.join(have) or 'none'})")
    state_path = ckpt_dir / tag / "trainer_state_rank0.pt"
    if not state_path.is_file():
        raise ValueError(f"checkpoint {ckpt_dir / tag}: missing {state_path.name}")
    if not list((ckpt_dir / tag).glob("*model_states.pt")):
        raise ValueError(f"checkpoint {ckpt_dir / tag}: no DeepSpeed model states (*model_states.pt)")
    state = checkpoint.read_trainer_state(state_path)  # torch.load(weights_only=True); one-line error
    world = state.get("world_size")
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"checkpoint {state_path}: no world_size recorded")
    missing = [r for r in range(world) if not (ckpt_dir / tag / f"trainer_state_rank{r}.pt").is_file()]
    if missing:
        raise ValueError(f"checkpoint {ckpt_dir / tag}: written by {world} ranks, but "
                         f"trainer_state_rank{missing[0]}.pt is missing")
    checkpoint.verify_tag(ckpt_dir, tag, world)  # a truncated or corrupted file is named here, not in a rank
    layout = written_layout(cfg, state.get("identity") or {})
    if layout:
        cfg = load_config(run_dir / "config.yaml", list(layout))
    if state.get("identity") is not None:  # config.yaml edited since the checkpoint was written?
        checkpoint.check_identity(ckpt_dir, tag, checkpoint.identity(cfg),
                                  hint=f"{run_dir / 'config.yaml'} was edited after the checkpoint was written: "
                                       f"restore the value it was written with")
    cfg.for_world(world)  # the checkpoint's layout must still be a valid one for this config
    return Source(run_dir, ckpt_dir, tag, world, state.get("step"), cfg, checkpoint.fingerprint(ckpt_dir, tag),
                  layout)


def written_layout(cfg: Any, saved: dict[str, Any]) -> tuple[str, ...]:
    """Overrides of config.yaml that give the layout (expert-parallel size, ZeRO stage) a tag was written on.

    After `trainer.reshard` the run continues on another layout and config.yaml says the new one; the tags
    from before were refused ("resume with the same layout") though exporting needs no resume: DeepSpeed
    loads them on their own layout, then the weights are gathered whole. The shipped ds_config of that stage
    is used (engine settings other than the stage do not change what a checkpoint holds)."""
    from trainer.config import zero_stage

    overrides = []
    if "expert_parallel_size" in saved and saved["expert_parallel_size"] != cfg.parallel.expert_parallel_size:
        overrides.append(f"parallel.expert_parallel_size={saved['expert_parallel_size']}")
    if "zero_stage" in saved and saved["zero_stage"] != zero_stage(cfg):
        overrides.append(f"parallel.ds_config=ds_configs/zero{saved['zero_stage']}.json")
    return tuple(overrides)


def check_out(out: Path) -> None:
    """Refuse an output that publishing would destroy or cannot create, before any rank starts.

    `_publish` replaces `out` wholesale, which is right for an earlier export of the same run but would
    delete a user's file or folder (`--out ~/models` with other things in it) without a word.
    """
    from trainer.evaluate import _is_export

    for path in (out, out.with_name(out.name + ".failed")):
        if path.is_file():
            raise ValueError(f"--out {out}: {path} is a file, expected a new or an export directory")
        if path.is_dir() and any(path.iterdir()) and not _is_export(path):
            raise ValueError(f"--out {out}: {path} is a non-empty directory that is not a trainer.export "
                             f"output (it would be replaced); choose a new directory")
    try:  # the export is staged in a temporary folder beside `out`: that must work here
        out.parent.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryDirectory(dir=out.parent).cleanup()
    except OSError as err:
        raise ValueError(f"--out {out}: cannot write in {out.parent} ({err.strerror or err})") from None


def check_hf(cfg: Any) -> None:
    """Raise ValueError (one line, the reason from to_hf_config) when HF cannot express the model."""
    from models.hf_convert import to_hf_config

    try:
        to_hf_config(cfg.model_config())
    except ValueError as err:
        raise ValueError(f"--hf: {err}") from None


# --------------------------------------------------------------------------------------------------
# Worker: one per rank, under torch.distributed.run
# --------------------------------------------------------------------------------------------------

def worker(args: argparse.Namespace) -> None:
    from trainer import engine as eng
    from trainer.config import load_config

    eng.init_distributed()
    rank, world = eng.rank(), eng.world_size()
    run_dir = Path(args.run_dir)
    cfg = load_config(run_dir / "config.yaml", args.layout or [])
    cfg = cfg.for_world(world)
    model_cfg = cfg.model_config()
    engine, _ = eng.initialize(eng.build(model_cfg, cfg), cfg)
    load_path, _ = engine.load_checkpoint(str(run_dir / "checkpoints"), tag=args.tag, load_optimizer_states=False,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise RuntimeError(f"checkpoint {run_dir / 'checkpoints' / args.tag}: DeepSpeed found no model states to load")

    engine.eval()
    ids = parity_batch(model_cfg.vocab_size, min(cfg.data.seq_len, model_cfg.max_seq_len))
    with torch.no_grad():
        logits = engine(ids.to(engine.device)).float().cpu()  # collective (EP all-to-all, ZeRO-3 gathers)

    state = eng.gather_state_dict(engine, master=cfg.run.precision == "bf16")
    if rank == 0:
        from safetensors.torch import save_file

        plain = build_model(model_cfg)
        plain.load_state_dict(state, strict=True)  # every key mapped, shapes right, nothing left over
        weights = {k: v.detach().float().contiguous().clone() for k, v in plain.state_dict().items()}
        out = Path(args.stage)
        save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
        source = {"run_dir": str(run_dir), "tag": args.tag, "step": args.step, "world_size": world,
                  "checkpoint_sha256": args.fingerprint,
                  "zero_stage": engine.zero_optimization_stage(),
                  "expert_parallel_size": cfg.parallel.expert_parallel_size, "precision": cfg.run.precision,
                  "weights": "optimizer fp32 master" if cfg.run.precision == "bf16" else "module (fp32)"}
        (out / CONFIG).write_text(json.dumps(export_config(model_cfg, source), indent=1))
        torch.save({"input_ids": ids, "logits": logits}, Path(args.scratch) / "engine_logits.pt")
    from trainer.engine import shutdown

    shutdown()


# --------------------------------------------------------------------------------------------------
# Main process: launch ranks, convert to HF, check parity, publish atomically
# --------------------------------------------------------------------------------------------------

def max_logit_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def token_ids(tokenizer: dict[str, Any]) -> dict[str, int] | None:
    """eos/bos/pad ids recorded by `write_tokenizer` (None when the export has no tokenizer)."""
    if tokenizer.get("file") is None:
        return None
    return {k: tokenizer[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id")}


def hf_sizes(hf_dir: Path, hf_model: torch.nn.Module, model: MoETransformer, layout: str) -> dict[str, Any]:
    """Bytes on disk and in memory of the written layout, next to the parameter bytes of both layouts."""
    from models.hf_convert import param_bytes

    loaded = {p.data_ptr(): p.numel() * p.element_size() for p in hf_model.parameters()}
    both = param_bytes(model)
    return {"layout": layout, "file_bytes": sum(f.stat().st_size for f in hf_dir.glob("*.safetensors")),
            "loaded_param_bytes": sum(loaded.values()), "tied_param_bytes": both["tied"],
            "copied_param_bytes": both["copied"], "tied_vs_copied": round(both["tied"] / both["copied"], 4)}


def add_tokenizer(stage: Path, run_tok: Any, max_len: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """Write the run's tokenizer files into the export and record them in its config.json."""
    from trainer.export_tokenizer import write_tokenizer

    tokenizer = write_tokenizer(stage, run_tok, max_len)
    meta = {**json.loads((stage / CONFIG).read_text()), "tokenizer": tokenizer}
    (stage / CONFIG).write_text(json.dumps(meta, indent=1))
    return tokenizer, meta


def mean_logit_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().mean().item()


def bf16_row(model: MoETransformer, ids: torch.Tensor, engine_logits: torch.Tensor) -> dict[str, float]:
    """The exported model run as the engine ran it (bf16 weights = the fp32 masters rounded), next to the
    bf16 rounding noise of this model on this batch: how far its own bf16 forward is from its fp32 one.

    A fixed bound cannot judge bf16: rounding grows with the logits, and a top-k routing choice that a
    rounding flips moves one token's logits by far more than an ulp (in both forwards, at different tokens),
    so the largest difference is noise too. The mean is not: the engine and our bf16 forward share the
    rounded weights and differ by activation rounding only, so they must agree on average at least as well as
    bf16 agrees with fp32; a wrong, swapped or untied tensor moves every token (measured: 4-20x the noise).
    """
    with torch.no_grad():
        fp32 = model(ids)
        bf16 = copy.deepcopy(model).to(torch.bfloat16)(ids).float()
    return {"max_abs_logit_diff": max_logit_diff(bf16, engine_logits),
            "mean_abs_logit_diff": mean_logit_diff(bf16, engine_logits),
            "bf16_noise_mean_abs": mean_logit_diff(bf16, fp32), "bf16_noise_max_abs": max_logit_diff(bf16, fp32)}


def check_parity(stage: Path, scratch: Path, precision: str, hf: bool,
                 tokenizer: dict[str, Any] | None = None, layout: str = "copied") -> dict[str, Any]:
    ref = torch.load(scratch / "engine_logits.pt", weights_only=True)
    ids, engine_logits = ref["input_ids"], ref["logits"]
    model = load_exported(stage)
    rows: dict[str, Any] = {}
    if precision == "bf16":
        rows["exported"] = bf16_row(model, ids, engine_logits)
    else:
        with torch.no_grad():
            rows["exported"] = {"max_abs_logit_diff": max_logit_diff(model(ids), engine_logits)}
    if hf:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from models.hf_convert import save_hf
        from trainer.export_tokenizer import copy_tokenizer_files

        hf_logging.disable_progress_bar()
        save_hf(model, stage / "hf", layout, token_ids(tokenizer or {}))
        copy_tokenizer_files(stage, stage / "hf")
        hf_model = AutoModelForCausalLM.from_pretrained(str(stage / "hf"), attn_implementation="eager",
                                                        trust_remote_code=layout == "tied").eval()
        with torch.no_grad():
            hf_logits = hf_model(input_ids=ids).logits.float()
        rows["hf"] = {"max_abs_logit_diff": max_logit_diff(hf_logits, engine_logits),
                      "max_abs_diff_vs_exported": max_logit_diff(hf_logits, model(ids)),
                      "class": type(hf_model).__name__, "sizes": hf_sizes(stage / "hf", hf_model, model, layout)}
    rows["_meta"] = {"batch_shape": list(ids.shape), "logit_max_abs": engine_logits.abs().max().item()}
    return rows


def judge(parity: dict[str, Any], precision: str, tol: float | None) -> tuple[bool, dict[str, Any]]:
    """(pass, the rule applied). A given --tol bounds every row's largest |logit diff| whatever the precision;
    by default fp32 runs are held to FP32_TOL and bf16 runs to `bf16_row`'s noise bound, with the HF model
    (fp32, from the same weights) held to FP32_TOL against the exported model."""
    rows = {k: v for k, v in parity.items() if not k.startswith("_")}
    if tol is not None or precision != "bf16":
        limit = FP32_TOL if tol is None else tol
        return all(v["max_abs_logit_diff"] <= limit for v in rows.values()), {"tolerance": limit, "rule": "max"}
    ex = rows["exported"]
    ok = ex["mean_abs_logit_diff"] <= BF16_NOISE_FACTOR * ex["bf16_noise_mean_abs"]
    if "hf" in rows:
        ok = ok and rows["hf"]["max_abs_diff_vs_exported"] <= FP32_TOL
    return ok, {"tolerance": BF16_NOISE_FACTOR * ex["bf16_noise_mean_abs"], "rule": "bf16-mean"}


def _publish(stage: Path, out: Path) -> None:
    """Replace `out` by `stage` with renames only (no moment where `out` is half-written)."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [stage, *stage.rglob("*")]:  # mkdtemp / safetensors create 0700 / 0600; use the umask
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_export(run_dir: str | Path, tag: str | None = None, out: str | Path | None = None, hf: bool = False,
               tol: float | None = None, hf_layout: str | None = None,
               progress: Callable[[str], None] | None = None) -> tuple[bool, dict[str, Any], Path]:
    """Everything `main` does, minus printing the report. Returns (parity ok, report, where the export is).

    `progress` is told each stage as it starts (the export takes 20 s tiny, minutes at scale, and said
    nothing until its report); `main` prints them to stderr, so stdout stays the report.

    `tol`: the largest |logit diff| allowed; None: FP32_TOL, or for bf16 runs the noise rule of `judge`.

    `hf_layout`: "tied" or "copied"; None picks tied for tied runs (`models.hf_convert.default_layout`).
    """
    from models.hf_convert import default_layout
    from trainer.launch import spawn_cpu_ranks
    from trainer.export_tokenizer import check_fits, run_tokenizer

    chosen = Path(out).resolve() if out else None
    if chosen is not None:  # a bad --out is refused first, as the command line is read
        check_out(chosen)
    with ExitStack() as held:  # the tag is kept from a running job's pruning until the export is published
        src = resolve(run_dir, tag, hf, held)
        model_cfg = src.cfg.model_config()
        run_tok = run_tokenizer(src.cfg)
        check_fits(run_tok, model_cfg.vocab_size)  # before any rank starts
        layout = hf_layout or default_layout(model_cfg)
        out = chosen or src.run_dir / "export" / src.tag
        if chosen is None:
            check_out(out)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        start = time.perf_counter()
        say = progress or (lambda _: None)
        try:
            say(f"exporting {src.run_dir} @ {src.tag} on {src.world_size} CPU ranks (gathering the checkpoint's "
                f"weights, the engine's logits on the parity batch) ...")
            with tempfile.TemporaryDirectory() as scratch:
                proc = spawn_cpu_ranks(["trainer.export", "--worker", str(src.run_dir), "--tag", src.tag,
                                        "--stage", str(stage), "--scratch", scratch, "--step", str(src.step),
                                        "--fingerprint", str(src.fingerprint),
                                        *(f"--layout={override}" for override in src.layout)],
                                       src.world_size, capture=True)
                if proc.returncode != 0 or not (Path(scratch) / "engine_logits.pt").is_file():
                    errors = re.findall(r"^\[rank\d+\]: (\w*(?:Error|Exception)\b.*)$", proc.stderr, re.M)
                    sys.stderr.write("\n".join(proc.stderr.splitlines()[-40:]) + "\n")
                    raise RuntimeError(f"export ranks failed (exit {proc.returncode}): "
                                       f"{errors[0] if errors else 'see the log above'}")
                tokenizer, meta = add_tokenizer(stage, run_tok, model_cfg.max_seq_len)
                say(f"checking parity: the exported model{f' and its hf/ ({layout} layout, written now)' if hf else ''}"
                    f" against the engine's logits ({time.perf_counter() - start:.0f} s so far) ...")
                parity = check_parity(stage, Path(scratch), src.cfg.run.precision, hf, tokenizer, layout)
            ok, rule = judge(parity, src.cfg.run.precision, tol)
            report = {"ok": ok, **rule, "source": meta["source"], "tokenizer": tokenizer, "parity": parity,
                      "files": sorted(str(p.relative_to(stage)) for p in stage.rglob("*") if p.is_file()) + [REPORT],
                      "seconds": round(time.perf_counter() - start, 2)}
            (stage / REPORT).write_text(json.dumps(report, indent=1))
            dest = out if ok else out.with_name(out.name + ".failed")
            say(f"publishing to {dest} ({time.perf_counter() - start:.0f} s so far) ...")
            _publish(stage, dest)
            return ok, report, dest
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise


def print_report(report: dict[str, Any], dest: Path) -> None:
    src = report["source"]
    print(f"exported {src['run_dir']} @ {src['tag']} (step {src['step']}, {src['world_size']} ranks, "
          f"ZeRO {src['zero_stage']}, EP {src['expert_parallel_size']}, {src['precision']}) -> {dest}")
    if report.get("rule") == "bf16-mean":
        print_bf16_rows(report["parity"], report["tolerance"])
    else:
        print(f"{'logits vs DeepSpeed engine':<28} {'max |diff|':>11}  {'tolerance':>9}")
        for name, row in report["parity"].items():
            if not name.startswith("_"):
                print(f"{_label(name, row):<28} {row['max_abs_logit_diff']:>11.2e}  {report['tolerance']:>9.0e}")
    sizes = report["parity"].get("hf", {}).get("sizes")
    if sizes:
        print(f"hf/ layout {sizes['layout']}: {sizes['file_bytes']:,} file bytes, {sizes['loaded_param_bytes']:,} "
              f"parameter bytes loaded; parameters tied / copied = {sizes['tied_param_bytes']:,} / "
              f"{sizes['copied_param_bytes']:,} = {sizes['tied_vs_copied']:.3f}")
    tok = report.get("tokenizer") or {}
    print(f"tokenizer: {tok['file']} (eos {tok['eos_token']!r} = id {tok['eos_token_id']}; from {tok['source']})"
          if tok.get("file") else f"tokenizer: none ({tok.get('note', 'not recorded')})")
    what = "the bf16 rounding noise" if report.get("rule") == "bf16-mean" else f"{report['tolerance']:.0e}"
    print("PASS" if report["ok"] else f"FAIL: logits differ by more than {what}; export left at {dest}")


def _label(name: str, row: dict[str, Any]) -> str:
    return {"exported": "exported model (safetensors)", "hf": f"HF {row.get('class', '')}"}.get(name, name)


def print_bf16_rows(parity: dict[str, Any], tolerance: float) -> None:
    """bf16's rule in the units it judges: the mean |diff| against `tolerance`, the bound `judge` applied
    (BF16_NOISE_FACTOR x the export's own bf16-vs-fp32 noise, shown beside it)."""
    ex = parity["exported"]
    print(f"{'logits (bf16 run)':<28} {'mean |diff|':>11}  {'max |diff|':>10}  {'tolerance':>10}")
    print(f"{'exported in bf16 vs engine':<28} {ex['mean_abs_logit_diff']:>11.2e}  {ex['max_abs_logit_diff']:>10.2e}  "
          f"{tolerance:>10.2e}  (mean: {BF16_NOISE_FACTOR:g} x the export's bf16 vs fp32 noise "
          f"{ex['bf16_noise_mean_abs']:.2e}, max {ex['bf16_noise_max_abs']:.2e})")
    if "hf" in parity:
        print(f"{'HF vs exported (both fp32)':<28} {'':>11}  {parity['hf']['max_abs_diff_vs_exported']:>10.2e}  "
              f"{FP32_TOL:>10.0e}")


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m trainer.export", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a trainer.train run directory (runs/<name>)")
    parser.add_argument("--tag", help="checkpoint tag under RUN_DIR/checkpoints (default: the one `latest` names)")
    parser.add_argument("--out", type=non_empty("a directory to export to"),
                        help="output directory (default: RUN_DIR/export/<tag>)")
    parser.add_argument("--hf", action="store_true", help="also write OUT/hf, a Hugging Face transformers model")
    parser.add_argument("--hf-layout", choices=["tied", "copied"],
                        help="tied: each tied bank once (needs trust_remote_code; default for tied runs); "
                             "copied: plain HF classes, banks copied into every layer (default for untied runs)")
    parser.add_argument("--tol", type=float, help="max |logit diff| allowed (default: 1e-5 for fp32 runs; for bf16 "
                                                  "runs a bound from bf16's own rounding noise, see README)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--scratch", help=argparse.SUPPRESS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--fingerprint", help=argparse.SUPPRESS)
    parser.add_argument("--layout", action="append", help=argparse.SUPPRESS)  # `written_layout` overrides
    args = parser.parse_args(argv)
    if args.worker:
        args.step = None if args.step in (None, "None") else int(args.step)
        args.fingerprint = None if args.fingerprint in (None, "None") else args.fingerprint
        worker(args)
        return 0
    try:
        if args.hf_layout and not args.hf:
            raise ValueError("--hf-layout: only with --hf")
        if args.tol is not None and (not math.isfinite(args.tol) or args.tol <= 0):  # a tolerance of 0 or less fails every export
            raise ValueError(f"--tol={args.tol:g}: expected a positive number")
        ok, report, dest = run_export(args.run_dir, args.tag, args.out, args.hf, args.tol, args.hf_layout,
                                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as err:
        print("error: " + " ".join(line.strip() for line in str(err).splitlines() if line.strip()), file=sys.stderr)
        return 2
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print_report(report, dest)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
