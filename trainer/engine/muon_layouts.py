"""Muon under ZeRO 1-3 and bf16: what DeepSpeed's flat partitions are made of (read-only)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from trainer.engine.construction import held_range
from trainer.engine.state import basic_optimizer
from trainer.optim import joint_row_blocks


def attach_muon_layouts(engine: Any) -> None:
    """Let `MuonWithAdamW` orthogonalise whole tensors although DeepSpeed hands it flat partitions.

    Why: ZeRO 1-3 and the bf16 optimizers step the client optimizer on flat fp32 tensors (this rank's
    partition of a parameter group, or of a ZeRO-3 sub-group). Momentum, decay and AdamW are
    elementwise and run on them as they are; Newton-Schulz needs each expert's whole matrix, so the
    optimizer asks `layout_of(flat)` which parameters the flat holds which elements of. This reads
    DeepSpeed's bookkeeping only (changes nothing): ZeRO-1/2 and BF16_Optimizer link each parameter to
    its fragment of the partition (`_hp_mapping`); ZeRO-3 concatenates each parameter's partition
    (`ds_tensor`, rank r holds elements [r*n, (r+1)*n)) in sub-group order. The bf16 ZeRO-0 optimizer
    (FP16_UnfusedOptimizer) steps whole fp32 copies, so there only AutoEP's gate/up pairing is moved
    onto the copies. No-op for other optimizers and for ZeRO-0 fp32 (the parameters themselves).
    Layouts are rebuilt if DeepSpeed ever swaps a flat tensor for a new one.
    """
    from trainer.optim import MuonWithAdamW

    basic = basic_optimizer(engine)
    if not isinstance(basic, MuonWithAdamW) or basic is engine.optimizer:
        return
    wrapper = engine.optimizer
    if _is_unfused(wrapper):  # whole fp32 copies, no flats: only the gate/up pairing must follow the copies
        basic.rebind({id(p): copy for lp, hp in zip(wrapper.fp16_groups, wrapper.fp32_groups)
                      for p, copy in zip(lp, hp)})
        return
    cache: dict[int, tuple[torch.Tensor, Any]] = {}

    def layout_of(flat: torch.Tensor) -> Any:
        hit = cache.get(id(flat))
        if hit is None or hit[0] is not flat:
            cache.clear()
            cache.update({id(f): (f, layout) for f, layout in _flat_layouts(wrapper)})
            hit = cache.get(id(flat))
        if hit is None or hit[0] is not flat:
            raise RuntimeError(f"optim.name=muon: a flat tensor of {flat.numel()} elements that "
                               f"{type(wrapper).__name__} does not list; its layout is unknown")
        return hit[1]

    basic.layout_of = layout_of


def _flat_layouts(wrapper: Any) -> list[tuple[torch.Tensor, Any]]:
    """(flat fp32 tensor, FlatLayout) for every flat the DeepSpeed optimizer `wrapper` steps."""
    from trainer.optim import FlatLayout, FlatPiece

    out = []
    if getattr(wrapper, "fp32_partitioned_groups_flat", None) is not None:  # ZeRO-3
        for i, flat in enumerate(wrapper.fp32_partitioned_groups_flat):
            pieces, at = [], 0
            for p in wrapper.fp16_groups[i]:  # one partition group per sub-group (stage3 asserts it)
                start, count = held_range(p)
                pieces.append(FlatPiece(p, p.ds_shape, start, count, at))
                at += p.partition_numel()
            out.append((flat, FlatLayout(pieces, _summer(wrapper.sub_group_process_groups[i]))))
        return out
    flats = (getattr(wrapper, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
             or getattr(wrapper, "fp32_groups_flat_partition", None))  # BF16_Optimizer (bf16 ZeRO-1)
    if flats:
        lp_groups = getattr(wrapper, "bit16_groups", None) or wrapper.bf16_groups
        for i, flat in enumerate(flats):
            pieces = []
            for p in lp_groups[i]:
                frag = getattr(p, "_hp_mapping", None)
                if frag is None:  # no element of p in this rank's partition
                    pieces.append(FlatPiece(p, p.shape, 0, 0, 0))
                else:
                    pieces.append(FlatPiece(p, p.shape, frag.lp_fragment_address.start, frag.lp_fragment_address.numel,
                                            frag.hp_fragment_address.start))
            out.append((flat, FlatLayout(pieces, _summer(wrapper.real_dp_process_group[i]))))
        return out
    raise RuntimeError(f"optim.name=muon: no flat-partition layout known for {type(wrapper).__name__}")


def _is_unfused(wrapper: Any) -> bool:
    """DeepSpeed's bf16 ZeRO-0 optimizer (FP16_UnfusedOptimizer): one fp32 copy per parameter, whole."""
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    return isinstance(wrapper, FP16_UnfusedOptimizer)


def _summer(group: Any) -> Callable[[torch.Tensor], None]:
    """In-place sum over a process group (nothing to do for a group of one)."""
    import deepspeed.comm as dist

    def sum_over_ranks(t: torch.Tensor) -> None:
        if dist.get_world_size(group=group) > 1:
            dist.all_reduce(t, group=group)

    return sum_over_ranks


def check_muon_layouts(engine: Any) -> dict[str, Any]:
    """Test aid: rebuild every whole tensor from the flat fp32 partitions through their `FlatLayout`s and
    compare with the module's parameter (ZeRO-3: gathered), cast to its dtype; also count how often each
    element of each whole tensor is held over the ranks (must be exactly once). Collective."""
    import deepspeed

    worst, coverage_ok, flats = 0.0, True, 0
    wrapper = engine.optimizer
    if _is_unfused(wrapper):  # whole copies: each equals its parameter, gate/up copies paired
        basic = basic_optimizer(engine)
        copy_of = {id(p): copy for lp, hp in zip(wrapper.fp16_groups, wrapper.fp32_groups) for p, copy in zip(lp, hp)}
        for p in engine.module.parameters():
            worst = max(worst, (copy_of[id(p)].detach().to(p.dtype).float() - p.detach().float()).abs().max().item())
        for block in joint_row_blocks(engine.module):
            paired = [id(q) for q in basic.row_block_of(copy_of[id(block[0])])]
            coverage_ok &= paired == [id(copy_of[id(q)]) for q in block]
        return {"max_abs_diff": worst, "coverage_ok": coverage_ok, "flats": len(wrapper.fp32_groups)}
    for flat, layout in _flat_layouts(wrapper):
        flats += 1
        for pc in layout.pieces:
            whole = torch.zeros(pc.shape.numel(), dtype=flat.dtype, device=flat.device)
            held = torch.zeros_like(whole)
            whole[pc.start:pc.start + pc.numel] = flat.detach()[pc.flat_start:pc.flat_start + pc.numel]
            held[pc.start:pc.start + pc.numel] = 1.0
            layout.sum_over_ranks(whole)
            layout.sum_over_ranks(held)
            coverage_ok &= bool((held == 1).all())
            if hasattr(pc.param, "ds_id"):
                with deepspeed.zero.GatheredParameters([pc.param], modifier_rank=None):
                    value = pc.param.detach().clone()
            else:
                value = pc.param.detach()
            diff = (whole.view(pc.shape).to(value.dtype).float() - value.float()).abs().max().item()
            worst = max(worst, diff)
    return {"max_abs_diff": worst, "coverage_ok": coverage_ok, "flats": flats}
