"""tiedmoe against the peers a user would otherwise pick, same model, same batches, side by side.

    python benchmarks/peers.py [--steps N] [--repeats R] [--json OUT] [key=value ...]

Three trainers of ONE model (the config's, default: tiny tied OLMoE-style, g=2) in the same 2 CPU ranks:
  tiedmoe   the trainer's own session and step (`trainer.session.train_step`): ZeRO-3 (ds_configs as
            configured) + AutoEP expert parallel, tied banks kept tied
  hf_ddp    the paper's recipe: the model as Hugging Face `OlmoeForCausalLM` (grouped_mm experts)
            with each follower layer's experts aliased to its leader's (one tensor), plain
            `DistributedDataParallel`, torch AdamW
  hf_ds     the same HF model on plain DeepSpeed (the same ZeRO settings + AutoEP, no tying seam):
            AutoEP clones the experts per layer, so this one trains UNTIED; it is what DeepSpeed
            alone gives
Before timing, the script checks that all three compute the same logits on the same batch (max |diff|
printed, must be < 1e-4). Then each is timed in alternating blocks (noise hits all alike) and the
table gives tokens/s, the ratio to tiedmoe, MFU (tying-aware FLOPs from models.accounting, peak as in
trainer.metrics), and peak RSS per rank during its own blocks (VmHWM reset before each block; every
engine lives in the same process, so the shared baseline is included: compare the growth column).
The loss differs only in the router terms: tiedmoe adds load-balancing and z-loss from its router
logits, the HF peers train on cross-entropy alone (HF's aux loss is lost under AutoEP). The HF peers
compute it as HF and the paper's code do (F.cross_entropy on fp32 logits) and step torch's default
AdamW; tiedmoe uses `trainer.losses.lean_cross_entropy` (same values, no [tokens, vocab] tensors of
its own) and fused AdamW, which is part of its time: benchmarks/decompose.py also times the DDP peer
with both (like for like). Writes
benchmarks/results/peers_cpu*.json and .md. On CPU only ratios mean anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from models.hf_convert import to_hf_config, to_hf_model  # noqa: E402
from models.transformer import build_model  # noqa: E402
from trainer import engine as eng  # noqa: E402
from trainer.bench import (DEFAULT_OVERRIDES, _device, mfu, mfu_basis, mfu_note, timed_rounds, timed_steps,  # noqa: E402
                           timing_main)
from trainer.config import TrainConfig, load_config  # noqa: E402
from trainer.data import make_source  # noqa: E402
from trainer.losses import plain_cross_entropy  # noqa: E402
from trainer.session import Session, open_session  # noqa: E402

GIB = 1024 ** 3
LOGIT_TOL = 1e-4


def hf_twin(cfg: TrainConfig, alias_tied: bool) -> nn.Module:
    """The config's model (same seed, same weights) as HF OlmoeForCausalLM with grouped_mm experts.

    alias_tied: each follower layer runs its leader's experts module (one tensor, as the paper's code
    ties them); otherwise every layer holds its own copy (what HF export does).
    """
    ours = build_model(cfg.model_config(), seed=cfg.run.seed)
    hf = to_hf_model(ours, attn_implementation="sdpa").train()
    hf.config._experts_implementation = "grouped_mm"
    if alias_tied:
        for index, layer in enumerate(ours.model.layers):
            owner = layer.plan.expert_owner
            if owner is not None and owner != index:
                hf.model.layers[index].mlp.experts = hf.model.layers[owner].mlp.experts
    return hf


def check_hf(cfg: TrainConfig, overrides: list[str] | None = None) -> None:
    """The HF peers are the model as OlmoeForCausalLM / Qwen3MoeForCausalLM: a model they cannot express
    (shared experts, widened banks, ...) is refused before any rank starts, not by a ValueError traceback
    from every rank once tiedmoe's engine is built."""
    to_hf_config(cfg.model_config())


def hf_loss(model: nn.Module, batch: dict[str, torch.Tensor],
            cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = plain_cross_entropy) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"]).logits
    return cross_entropy(logits.flatten(0, 1), batch["labels"].flatten())


class Peer:
    """An HF model behind DDP or plain DeepSpeed, fed the same batches as tiedmoe."""

    def __init__(self, name: str, cfg: TrainConfig, rank: int, world: int, build: Callable[[], Any],
                 cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = plain_cross_entropy) -> None:
        self.name, self.cfg, self.cross_entropy = name, cfg, cross_entropy
        self.source = make_source(cfg, "train", rank, world)
        self.tokens_per_step = cfg.tokens_per_step(world)
        self.model, self.optimizer, self.is_ds = build()

    def step(self) -> None:
        batch = self.source.next_batch()
        loss = hf_loss(self.model, batch, self.cross_entropy)
        if self.is_ds:
            self.model.backward(loss)
            self.model.step()
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def adamw(model: nn.Module, cfg: TrainConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps,
                             weight_decay=cfg.optim.weight_decay, fused=fused)


def build_ddp(cfg: TrainConfig, fused: bool | None = None) -> Callable[[], Any]:
    """fused=None: torch's default AdamW kernel (the paper's recipe); True: the fused one tiedmoe runs."""

    def build() -> Any:
        model = torch.nn.parallel.DistributedDataParallel(hf_twin(cfg, alias_tied=True))
        return model, adamw(model, cfg, fused), False

    return build


def build_hf_ds(s: Session) -> Callable[[], Any]:
    """Plain DeepSpeed with the trainer's own ds_config (ZeRO knobs + AutoEP), no tying seam."""

    def build() -> Any:
        model = hf_twin(s.cfg, alias_tied=False)
        return eng.plain_initialize(model, adamw(model, s.cfg), dict(s.ds_config)), None, True

    return build


@torch.no_grad()
def logit_gaps(s: Session, peers: dict[str, Peer]) -> dict[str, float]:
    """max |logits - tiedmoe's| per peer on one fresh batch (weights as built: before any step)."""
    batch = make_source(s.cfg, "train", s.rank, s.world).next_batch()
    s.engine.eval()
    ours = s.engine(batch["input_ids"]).float()
    s.tap.take()
    s.engine.train()
    gaps = {}
    for name, peer in peers.items():
        peer.model.eval()
        theirs = peer.model(input_ids=batch["input_ids"]).logits.float()
        peer.model.train()
        gaps[name] = eng.max_over_ranks([(theirs - ours).abs().max().item()])[0]
    return gaps


def rss_now() -> float:
    return _status_kib("VmRSS") * 1024


def peak_rss() -> float:
    return _status_kib("VmHWM") * 1024


def _status_kib(key: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return float(line.split()[1])


def timed_block(run: Callable[[int], float], steps: int, memory: dict[str, float]) -> float:
    """Seconds for one block; tracks this rank's peak RSS and its growth over the block's start."""
    before = rss_now()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
    seconds = run(steps)
    memory["peak"] = max(memory.get("peak", 0.0), peak_rss())
    memory["growth"] = max(memory.get("growth", 0.0), peak_rss() - before)
    return seconds


def peer_runner(peer: Peer) -> Callable[[int], float]:
    def run(steps: int) -> float:
        eng.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            peer.step()
        eng.barrier()
        return time.perf_counter() - start

    return run


def worker(args: argparse.Namespace) -> None:
    eng.init_distributed()
    cfg = load_config(None, DEFAULT_OVERRIDES + args.overrides)
    s = open_session(cfg)
    peers = {"hf_ddp": Peer("hf_ddp", s.cfg, s.rank, s.world, build_ddp(s.cfg)),
             "hf_ds": Peer("hf_ds", s.cfg, s.rank, s.world, build_hf_ds(s))}
    gaps = logit_gaps(s, peers)
    runs: dict[str, Callable[[int], float]] = {"tiedmoe": lambda n: timed_steps(s, n)}
    runs.update({name: peer_runner(peer) for name, peer in peers.items()})
    seconds, memory = dict.fromkeys(runs, 0.0), {name: {} for name in runs}
    for run in runs.values():
        run(2)  # warm-up
    for _ in timed_rounds(args.repeats, "peers"):
        for name, run in runs.items():
            seconds[name] += timed_block(run, args.steps, memory[name])
    basis = mfu_basis(s)
    result: dict[str, Any] = {"overrides": args.overrides, "steps": args.steps, "repeats": args.repeats,
                              "world_size": s.world, "device": _device(), "torch": torch.__version__,
                              "ds_config": s.ds_config.get("zero_optimization"), "logit_max_abs_diff": gaps,
                              "logits_identical": all(g < LOGIT_TOL for g in gaps.values()), **basis, "peers": {}}
    for name in runs:
        tok_s = s.tokens_per_step * args.steps * args.repeats / seconds[name]
        mem = eng.max_over_ranks([memory[name]["peak"], memory[name]["growth"]])
        result["peers"][name] = {"tokens_per_s": tok_s, "mfu": mfu(basis, tok_s, s.world),
                                 "peak_rss_gib_per_rank": mem[0] / GIB, "rss_growth_gib_per_rank": mem[1] / GIB}
    for r in result["peers"].values():
        r["vs_tiedmoe"] = r["tokens_per_s"] / result["peers"]["tiedmoe"]["tokens_per_s"]
    if eng.rank() == 0:
        Path(args.json_raw).write_text(json.dumps(result, indent=1))
    eng.shutdown()


def render(result: dict[str, Any]) -> str:
    gaps = ", ".join(f"{k} {v:.1e}" for k, v in result["logit_max_abs_diff"].items())
    lines = [f"peers on {result['world_size']} ranks, {result['device']}; overrides: "
             f"{' '.join(result['overrides']) or '(default config)'}",
             f"logits vs tiedmoe, max |diff|: {gaps} ({'identical' if result['logits_identical'] else 'DIFFERENT'}"
             f" within {LOGIT_TOL:g})", "",
             "| trainer | tokens/s | vs tiedmoe | MFU | peak RSS GiB/rank | RSS growth in its blocks GiB/rank |",
             "|---|---|---|---|---|---|"]
    for name, r in result["peers"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {r['vs_tiedmoe']:.3f} | {100 * r['mfu']:.2f}% | "
                     f"{r['peak_rss_gib_per_rank']:.3f} | {r['rss_growth_gib_per_rank']:.3f} |")
    lines.append("\n" + mfu_note(result))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return timing_main(argv, __doc__, "benchmarks.peers", worker, render, (5, 3, "peers_cpu.json", "trainer"),
                       markdown=True, check=check_hf)


if __name__ == "__main__":
    sys.exit(main())
