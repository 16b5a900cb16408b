"""Optimizer parameter groups and construction, in plain PyTorch.

The DeepSpeed engine and the single-process reference (`trainer.reference`) build their optimizer
here, so both apply the same weight-decay split, the same tied-bank learning-rate scale and, for
`optim.name=muon`, the same Muon / AdamW split and orthogonalisation.

Muon (the paper's recipe, epfml/looped-moe `moe_train.py`, which uses `torch.optim.Muon`): hidden
2-D weights and every expert of an expert bank get SGD-momentum (Nesterov) whose update is replaced by
its nearest semi-orthogonal matrix (Newton-Schulz), scaled by sqrt(max(1, rows/cols)); embeddings, the
LM head, routers and 1-D tensors get AdamW at `adam_lr_ratio` x the Muon lr. A bank [E, rows, cols] is
orthogonalised as E separate matrices, never as one flattened [E*rows, cols] matrix. AutoEP stores
a bank's gate and up projections as two tensors (w1, w3 [E_local, F, D]) where the model has one
`gate_up_proj` [E, 2F, D]; `joint_row_blocks` pairs them so each expert's [2F, D] matrix is
orthogonalised as a whole, exactly as the unreplaced model (and the paper's per-expert proxies) do.

Under DeepSpeed ZeRO 1-3 and its bf16 optimizers the optimizer is handed flat fp32 tensors (a rank's
partition of many parameters) instead of the parameters. Everything but Newton-Schulz is elementwise,
so momentum, decay and the AdamW half run on the flat partition as they are; for Newton-Schulz a
`FlatLayout` (built by `trainer.engine`, the one module that reads DeepSpeed's layout) says which
whole tensors the partition holds pieces of and sums those pieces over the ranks sharing them, so
each expert is still orthogonalised whole and on its own. The momentum buffer stays partitioned (it
lives in the optimizer state DeepSpeed checkpoints).

Shape legend: E experts (local to the rank under expert parallelism), R rows, C columns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.config import ModelConfig, layer_plan
from trainer.config import OptimSection

# Newton-Schulz quintic coefficients of Keller Jordan's Muon (also torch.optim.Muon's defaults).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
# Flat partitions (ZeRO 1-3, bf16): whole tensors are summed over ranks in batches of at most this many
# elements (fp32: 256 MiB), which bounds the step's extra memory on large models.
FLAT_SUM_ELEMENTS = 1 << 26


def tied_lr_multiplier(setting: str | float, group_size: int) -> float:
    """LR scale of a bank shared by `group_size` layers (paper: 1/sqrt(g), since its gradient sums g layers)."""
    if setting == "inv_sqrt_g":
        return 1.0 / math.sqrt(group_size)
    if setting == "inv_g":
        return 1.0 / group_size
    if setting == "none":
        return 1.0
    return float(setting)


def expert_bank_uses(model_cfg: ModelConfig) -> dict[int, int]:
    """Leader layer -> how many layers use its expert bank."""
    uses: dict[int, int] = {}
    for p in layer_plan(model_cfg):
        if p.expert_owner is not None:
            uses[p.expert_owner] = uses.get(p.expert_owner, 0) + 1
    return uses


def _mlp_part(name: str) -> str | None:
    """`experts`, `gate`, `router`, ... for a parameter inside `model.layers.N.mlp`, else None."""
    parts = name.split(".")
    if len(parts) > 4 and parts[0] == "model" and parts[1] == "layers" and parts[3] == "mlp":
        return parts[4]
    return None


def expert_owner_of(name: str, uses: dict[int, int]) -> int | None:
    """Layer index if parameter `name` belongs to a bank shared by several layers, else None.

    Names are read after AutoEP replacement too (w1/w2/w3 instead of the fused layout).
    """
    if _mlp_part(name) == "experts":
        layer = int(name.split(".")[2])
        return layer if uses.get(layer, 1) > 1 else None
    return None


def full_ndim(param: nn.Parameter) -> int:
    """Dimensions of the whole tensor: a ZeRO-3 partitioned parameter is a flat slice that keeps its
    full shape in `ds_shape` (the model is built partitioned at ZeRO-3, so groups see slices)."""
    return len(getattr(param, "ds_shape", param.shape))


def uses_muon(name: str, param: nn.Parameter) -> bool:
    """The paper's split: Muon for hidden matrices and expert banks; AdamW for embeddings, the LM head,
    routers (ours: `mlp.gate`, AutoEP: `mlp.router.gate`) and 1-D tensors."""
    if full_ndim(param) < 2 or name in ("model.embed_tokens.weight", "lm_head.weight"):
        return False
    return _mlp_part(name) not in ("gate", "router")


def param_groups(model: nn.Module, optim: OptimSection, model_cfg: ModelConfig) -> list[dict[str, Any]]:
    """Parameter groups crossed with the tied-bank LR scale (`lr_scale`, applied by `set_lr`).

    adamw / sgd: decay vs no decay (1-D tensors). muon: Muon vs AdamW halves of the paper's split.
    """
    uses = expert_bank_uses(model_cfg)
    groups: dict[tuple[bool, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        owner = expert_owner_of(name, uses)
        scale = tied_lr_multiplier(optim.tied_lr_scale, uses[owner]) if owner is not None else 1.0
        kind = uses_muon(name, param) if optim.name == "muon" else full_ndim(param) >= 2
        key = (kind, scale)
        if key not in groups:
            groups[key] = _new_group(kind, scale, optim)
        groups[key]["params"].append(param)
    return list(groups.values())


def _new_group(kind: bool, scale: float, optim: OptimSection) -> dict[str, Any]:
    """One group's settings; `kind` is decay (adamw, sgd) or use_muon (muon)."""
    if optim.name != "muon":
        return {"name": f"{'decay' if kind else 'no_decay'}_lr{scale:.4g}", "params": [],
                "weight_decay": optim.weight_decay if kind else 0.0, "lr_scale": scale}
    if kind:
        return {"name": f"muon_lr{scale:.4g}", "params": [], "use_muon": True, "lr_scale": scale,
                "weight_decay": optim.muon_weight_decay, "momentum": optim.muon_momentum,
                "nesterov": optim.muon_nesterov, "ns_steps": optim.muon_ns_steps}
    scale = scale * optim.adam_lr_ratio
    return {"name": f"adamw_lr{scale:.4g}", "params": [], "use_muon": False, "lr_scale": scale,
            "weight_decay": optim.adam_weight_decay, "betas": optim.betas, "eps": optim.eps}


def joint_row_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """AutoEP's gate (w1) and up (w3) tensors of each bank, in the model's `gate_up_proj` row order.

    Muon orthogonalises each block's per-expert matrices stacked along rows, so a replaced bank gets
    the update the model's fused [E, 2F, D] tensor would get. Empty for an unreplaced model.
    """
    banks: dict[str, dict[str, nn.Parameter]] = {}
    for name, param in model.named_parameters():
        prefix, _, leaf = name.rpartition(".")
        if _mlp_part(name) == "experts" and leaf in ("w1", "w3"):
            banks.setdefault(prefix, {})[leaf] = param
    return [[bank["w1"], bank["w3"]] for bank in banks.values() if len(bank) == 2]


@dataclass
class FlatPiece:
    """The part of one whole tensor that a rank's flat partition holds (numel 0: none of it)."""
    param: nn.Parameter  # the model's parameter (its identity pairs row blocks)
    shape: torch.Size  # of the whole tensor (ZeRO-3 leaves the parameter itself empty)
    start: int  # first element held, in the whole tensor flattened
    numel: int
    flat_start: int  # where those elements sit in the flat partition


@dataclass
class FlatLayout:
    """What a flat partition is made of: every tensor of its group, in the same order on every rank
    that shares the group, and how to sum a buffer of those whole tensors over those ranks (in place)."""
    pieces: list[FlatPiece]
    sum_over_ranks: Callable[[torch.Tensor], None]


def build_optimizer(groups: list[dict[str, Any]], optim: OptimSection,
                    row_blocks: Sequence[Sequence[nn.Parameter]] = (), per_expert: bool = True) -> torch.optim.Optimizer:
    """row_blocks, per_expert: Muon only (see `MuonWithAdamW`)."""
    if optim.name == "adamw":  # fused: one kernel per group, no temporaries the size of a ZeRO flat partition
        return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps,
                                 weight_decay=optim.weight_decay, fused=True)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.name == "muon":
        return MuonWithAdamW(groups, lr=optim.lr, row_blocks=row_blocks, per_expert=per_expert)
    raise ValueError(f"optim.name={optim.name!r}: expected 'adamw', 'sgd' or 'muon'")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Base LR for this step; each group keeps its own scale (tied banks, Muon's AdamW half)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# --------------------------------------------------------------------------------------------------
# Muon
# --------------------------------------------------------------------------------------------------

def orthogonalize(g_ERC: torch.Tensor, steps: int, per_expert: bool = True) -> torch.Tensor:
    """Approximately U V^T of each trailing [R, C] matrix (G = U S V^T), by quintic Newton-Schulz in fp32.

    Leading dimensions are a batch: each expert of a bank is normalised and iterated on its own, so
    one expert's large gradient cannot shrink another's update. `per_expert=False` treats a 3-D bank
    as one [E*R, C] matrix: the wrong way, kept as the negative control of the parity check.
    Like torch.optim.Muon the result has singular values near, not at, 1 (roughly 0.5-1.5); fp32
    instead of torch's bf16 so the engine and the reference agree to rounding.
    """
    shape = g_ERC.shape
    x = g_ERC.float()
    if not per_expert and x.ndim == 3:
        x = x.reshape(-1, shape[-1])
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=NS_EPS)
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if transposed:
        x = x.mT
    return x.reshape(shape).to(g_ERC.dtype)


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for groups with `use_muon`, AdamW (decoupled decay, as torch.optim.AdamW) for the others.

    One optimizer object, because DeepSpeed steps, checkpoints and schedules exactly one. Muon follows
    torch.optim.Muon (momentum buffer lerp, Nesterov blend, decay lr x wd, step lr x sqrt(max(1, R/C)))
    with two differences: a 3-D tensor is a batch of per-expert matrices, and the tensors of one row
    block (`row_blocks`, AutoEP's w1 + w3) are orthogonalised stacked. A flat partition (DeepSpeed ZeRO
    1-3, bf16) in a Muon group needs `layout_of` to return its `FlatLayout`; without one it is refused.
    """

    def __init__(self, groups: list[dict[str, Any]], lr: float, row_blocks: Sequence[Sequence[nn.Parameter]] = (),
                 per_expert: bool = True) -> None:
        super().__init__(groups, {"lr": lr})
        self.per_expert = per_expert
        self.layout_of: Callable[[torch.Tensor], FlatLayout | None] = lambda flat: None
        self._block_of: dict[int, tuple[nn.Parameter, ...]] = {}
        group_of = {id(p): i for i, g in enumerate(self.param_groups) for p in g["params"]}
        for block in row_blocks:
            if len({group_of.get(id(p)) for p in block}) != 1 or id(block[0]) not in group_of:
                raise ValueError("optim.name=muon: the tensors of one expert bank ended up in different "
                                 "parameter groups; they must share lr and decay")
            for p in block:
                self._block_of[id(p)] = tuple(block)

    def rebind(self, copy_of: dict[int, torch.Tensor]) -> None:
        """The optimizer now steps copies of the parameters (DeepSpeed's bf16 ZeRO-0 optimizer keeps fp32
        copies of whole tensors): pair the copies as their originals were paired (`row_blocks`)."""
        blocks = {tuple(id(q) for q in block): block for block in self._block_of.values()}
        self._block_of = {}
        for block in blocks.values():
            copies = tuple(copy_of[id(q)] for q in block)
            for q in copies:
                self._block_of[id(q)] = copies

    def row_block_of(self, p: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The tensors stepped together with `p` (itself alone unless it is in a row block)."""
        return self._block_of.get(id(p), (p,))

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        for p in group["params"]:
            layout = self.layout_of(p) if p.ndim == 1 else None
            if layout is not None:
                self._flat_muon_step(p, layout, group)
                continue
            block = self._block_of.get(id(p), (p,))
            if p is not block[0] or p.grad is None:
                continue  # a later member of a row block is stepped with its first member
            pieces, step_lr = self._orthogonalized([self._momentum_update(q, group) for q in block], group)
            for q, piece in zip(block, pieces):
                q.mul_(1 - group["lr"] * group["weight_decay"])
                q.add_(piece, alpha=-step_lr)

    def _orthogonalized(self, mats: list[torch.Tensor], group: dict[str, Any]) -> tuple[list[torch.Tensor], float]:
        """One row block's updates stacked along rows, orthogonalised (per expert), split back, and
        Muon's step size for the stacked shape (lr x sqrt(max(1, R/C)))."""
        joined = mats[0] if len(mats) == 1 else torch.cat(mats, dim=-2)
        ortho = orthogonalize(joined, group["ns_steps"], self.per_expert)
        rows, cols = joined.shape[-2:]
        return list(ortho.split([m.shape[-2] for m in mats], dim=-2)), group["lr"] * math.sqrt(max(1.0, rows / cols))

    def _flat_muon_step(self, flat: torch.Tensor, layout: FlatLayout, group: dict[str, Any]) -> None:
        """Muon on a flat partition: momentum here, Newton-Schulz on the whole tensors its pieces belong to.

        Collective (`layout.sum_over_ranks`, once per batch of at most FLAT_SUM_ELEMENTS): every rank
        sharing the partition's group takes this step. A rank orthogonalises only the blocks it holds a
        piece of and applies only its own pieces.
        """
        update = self._momentum_update(flat, group, allow_flat=True)
        step = torch.zeros_like(flat)
        for batch in self._block_batches(layout):
            members = [m for block in batch for m in block]
            sizes = [layout.pieces[m].shape.numel() for m in members]
            buffer = update.new_zeros(sum(sizes))
            whole = dict(zip(members, buffer.split(sizes)))  # views of `buffer`, one whole tensor each
            for m in members:
                pc = layout.pieces[m]
                whole[m][pc.start:pc.start + pc.numel] = update[pc.flat_start:pc.flat_start + pc.numel]
            layout.sum_over_ranks(buffer)  # each element comes from exactly one rank, the others add zeros
            for block in batch:
                if not any(layout.pieces[m].numel for m in block):
                    continue  # nothing of this block is held here
                parts, step_lr = self._orthogonalized([whole[m].view(layout.pieces[m].shape) for m in block], group)
                for m, part in zip(block, parts):
                    pc = layout.pieces[m]
                    mine = part.reshape(-1)[pc.start:pc.start + pc.numel]
                    step[pc.flat_start:pc.flat_start + pc.numel] = mine * step_lr
        flat.mul_(1 - group["lr"] * group["weight_decay"])
        flat.sub_(step)

    def _block_batches(self, layout: FlatLayout) -> list[list[list[int]]]:
        """The layout's pieces as row blocks (indices; a block is one tensor or AutoEP's gate + up pair),
        in piece order (the same on every rank), batched up to FLAT_SUM_ELEMENTS whole-tensor elements."""
        index = {id(piece.param): i for i, piece in enumerate(layout.pieces)}
        blocks, seen = [], set()
        for piece in layout.pieces:
            block = self._block_of.get(id(piece.param), (piece.param,))
            if id(block[0]) in seen:
                continue
            seen.add(id(block[0]))
            if any(id(q) not in index for q in block):
                raise ValueError("optim.name=muon: the gate and up tensors of one expert bank landed in different "
                                 "ZeRO sub-groups; raise zero_optimization.sub_group_size")
            blocks.append([index[id(q)] for q in block])
        batches: list[list[list[int]]] = [[]]
        size = 0
        for block in blocks:
            numel = sum(layout.pieces[m].shape.numel() for m in block)
            if batches[-1] and size + numel > FLAT_SUM_ELEMENTS:
                batches.append([])
                size = 0
            batches[-1].append(block)
            size += numel
        return [b for b in batches if b]

    def _momentum_update(self, p: nn.Parameter, group: dict[str, Any], allow_flat: bool = False) -> torch.Tensor:
        """Momentum buffer step and the (Nesterov) update to orthogonalise (elementwise: fine on a partition)."""
        if p.ndim < 2 and not allow_flat:
            raise ValueError(f"optim.name=muon: got a {p.ndim}-D tensor of {p.numel()} elements in a Muon group "
                             "and no layout of the whole tensors it is a partition of (trainer.engine attaches one)")
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p)
        buf = state["momentum_buffer"]
        buf.lerp_(p.grad, 1 - group["momentum"])
        return p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf

    def _adamw_step(self, group: dict[str, Any]) -> None:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = state["step"].item()
            p.mul_(1 - group["lr"] * group["weight_decay"])
            state["exp_avg"].lerp_(p.grad, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2 ** step)).add_(group["eps"])
            p.addcdiv_(state["exp_avg"], denom, value=-group["lr"] / (1 - beta1 ** step))

