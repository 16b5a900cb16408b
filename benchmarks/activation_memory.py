"""The memory planner's activation estimate against a measurement, on one GPU (or the CPU).

    python benchmarks/activation_memory.py [--micro-batch B[,B...]] [--device cuda|cpu] [--json OUT] [key=value ...]

`trainer.memory plan` sizes runs with `models.accounting.activation_memory`; this checks it where it
matters. The plain model of the config (the model every tiedmoe architecture is, without DeepSpeed)
runs one forward + training loss per micro-batch size, without and with activation checkpointing:
- on a GPU: `saved` = `torch.cuda.memory_allocated` growth when the forward ends (what autograd keeps
  for backward) against the estimate's `saved`; `peak` = `max_memory_allocated` growth over forward +
  backward against the estimate's `peak`. Gradients exist before the measured pass (a first pass made
  them), so backward adds only its transients; the largest parameter is printed, since accumulating
  its gradient briefly needs one more of it.
- on the CPU (no allocator statistics): `saved` from the bytes autograd's saved-tensor hooks see
  (`trainer.memory.saved_activation_bytes`, as tests/test_memory_activations.py); no `peak`.
The precision is `run.precision`, the sequence length `data.seq_len`, the default micro-batch the
config's. DeepSpeed's AutoEP block and ZeRO buffers add transients that neither side counts.
benchmarks/gpu_check.sh runs it as its `activations` step. Writes benchmarks/results/activation_memory_<device>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from models.accounting import activation_memory  # noqa: E402
from models.transformer import MoETransformer, build_model  # noqa: E402
from trainer.argtypes import OneLineParser, output_file, refuse_repeats  # noqa: E402
from trainer.config import TrainConfig, load_config  # noqa: E402
from trainer.launch import write_report  # noqa: E402
from trainer.losses import RouterTap, training_loss  # noqa: E402
from trainer.memory import saved_activation_bytes  # noqa: E402

GIB = 1024 ** 3
SAVED_GOAL = 0.15  # relative error of the estimate's `saved` the planner is held to (tests: <= 1.7% on CPU)


def measure_cuda(model: MoETransformer, ids: torch.Tensor, top_k: int) -> dict[str, int]:
    """Allocator growth at the end of the forward (saved) and over forward + backward (peak)."""
    tap = RouterTap(model)

    def loss() -> torch.Tensor:
        return training_loss(model(ids), ids, tap.take(), top_k, 0.01, 1e-4).total

    try:
        loss().backward()  # gradients exist from here on
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        total = loss()
        torch.cuda.synchronize()
        saved = torch.cuda.memory_allocated() - base
        total.backward()
        torch.cuda.synchronize()
        return {"saved": saved, "peak": torch.cuda.max_memory_allocated() - base}
    finally:
        tap.remove()


def measure(cfg: TrainConfig, micro_batches: list[int], device: str) -> dict[str, Any]:
    model_cfg = cfg.model_config()
    dtype = torch.bfloat16 if cfg.run.precision == "bf16" else torch.float32
    model = build_model(model_cfg, seed=cfg.run.seed).to(device, dtype)  # built as every run builds it
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    for micro_batch in micro_batches:
        for checkpointing in (False, True):
            model.activation_checkpointing = checkpointing
            ids = torch.randint(0, model_cfg.vocab_size, (micro_batch, cfg.data.seq_len),
                                generator=torch.Generator().manual_seed(0)).to(device)
            estimate = activation_memory(model_cfg, micro_batch, cfg.data.seq_len, cfg.run.precision, checkpointing)
            if device == "cuda":
                got = measure_cuda(model, ids, model_cfg.top_k)
            else:
                got = {"saved": saved_activation_bytes(model, ids, model_cfg.top_k), "peak": None}
            model.zero_grad(set_to_none=True)
            rows.append({"micro_batch": micro_batch, "checkpointing": checkpointing,
                         "estimate_saved": estimate.saved, "measured_saved": got["saved"],
                         "saved_rel_error": estimate.saved / got["saved"] - 1,
                         "estimate_peak": estimate.peak, "measured_peak": got["peak"],
                         "peak_rel_error": None if got["peak"] is None else estimate.peak / got["peak"] - 1})
    return {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
            "precision": cfg.run.precision, "seq_len": cfg.data.seq_len, "largest_parameter_bytes": largest,
            "saved_goal_rel": SAVED_GOAL, "saved_within_goal": all(abs(r["saved_rel_error"]) <= SAVED_GOAL for r in rows),
            "rows": rows}


def render(result: dict[str, Any]) -> str:
    def gib(x: int | None) -> str:
        return "-" if x is None else f"{x / GIB:.3f}"

    def rel(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:+.1f}%"

    lines = [f"activation estimate vs measurement on {result['device']} (torch {result['torch']}), "
             f"{result['precision']}, seq {result['seq_len']}; overrides: {' '.join(result['overrides']) or '(none)'}", "",
             "| micro-batch | checkpointing | saved GiB: estimate | measured | error | peak GiB: estimate | measured | error |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['micro_batch']} | {'on' if r['checkpointing'] else 'off'} | {gib(r['estimate_saved'])} | "
                     f"{gib(r['measured_saved'])} | {rel(r['saved_rel_error'])} | {gib(r['estimate_peak'])} | "
                     f"{gib(r['measured_peak'])} | {rel(r['peak_rel_error'])} |")
    lines.append(f"\nsaved within +-{100 * result['saved_goal_rel']:.0f}%: {'yes' if result['saved_within_goal'] else 'NO'}; "
                 f"largest parameter {result['largest_parameter_bytes'] / GIB:.3f} GiB (backward may hold one more of it)")
    return "\n".join(lines)


def positive_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers ("2,4")."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", type=positive_list, help="micro-batch sizes, e.g. 2,4 (default: the config's)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=output_file, help="default benchmarks/results/activation_memory_<device>.json")
    parser.add_argument("overrides", nargs="*", help="config overrides (model.*, data.seq_len, run.precision)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    try:
        refuse_repeats("--micro-batch", args.micro_batch or [])
        cfg = load_config(None, args.overrides)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result = {"overrides": args.overrides, **measure(cfg, args.micro_batch or [cfg.batch.micro_batch_size], args.device)}
    json_path = args.json or str(REPO / "benchmarks" / "results" / f"activation_memory_{args.device}.json")
    return write_report(result, render, json_path)


if __name__ == "__main__":
    sys.exit(main())
