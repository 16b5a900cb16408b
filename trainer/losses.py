"""Training losses: cross-entropy plus the router's load-balancing and z-losses, all in fp32.

The cross-entropy is `lean_cross_entropy`: the logits' own storage carries their gradient, and the fp32
work runs in row blocks, so the loss adds no [tokens, vocab] tensor to the model's logits (F.cross_entropy
on `.float()` logits adds two, plus a third in bf16).

The router logits come from forward hooks on every router `gate` Linear (`RouterTap`), so the same
code serves the plain model and DeepSpeed AutoEP's replacement blocks (which compute no aux loss).
A tied router is called by several layers; its hook fires once per use, in layer order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

# fp32 scratch per row block of the cross-entropy: below glibc's largest mmap threshold (32 MiB), so on CPU a
# block is reused from the heap instead of page-faulted in afresh for every block and step.
from models.accounting import CE_BLOCK_BYTES


def load_balancing_loss(logits_TE: torch.Tensor, top_k: int) -> torch.Tensor:
    """E * sum_i f_i * P_i (Switch/OLMoE): f_i = share of the T*K assignments routed to expert i,
    P_i = mean router probability of expert i. Equals 1 under perfectly uniform routing."""
    logits_TE = logits_TE.float()
    n_experts = logits_TE.shape[-1]
    probs_TE = F.softmax(logits_TE, dim=-1)
    top_idx_TK = torch.topk(probs_TE, top_k, dim=-1).indices
    counts_E = torch.zeros(n_experts, device=logits_TE.device).index_add_(
        0, top_idx_TK.reshape(-1), torch.ones(top_idx_TK.numel(), device=logits_TE.device))
    f_E = counts_E / top_idx_TK.numel()
    return n_experts * torch.sum(f_E * probs_TE.mean(dim=0))


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(logits)^2."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()


class RouterTap:
    """Collects each MoE layer's router logits during forward via hooks on the router Linears."""

    def __init__(self, model: nn.Module) -> None:
        self.logits: list[torch.Tensor] = []
        self._handles = []
        # A new forward starts a new list: activation checkpointing re-runs the routers during
        # backward, and those recomputed logits must not leak into the next step's loss.
        self._reset_handle = getattr(model, "module", model).register_forward_pre_hook(self._reset)
        seen: set[int] = set()
        for layer in _decoder_layers(model):
            router = _router_linear(layer.mlp)
            if router is not None and id(router) not in seen:
                seen.add(id(router))
                self._handles.append(router.register_forward_hook(self._record))

    def _reset(self, _module: nn.Module, _inputs: tuple) -> None:
        self.logits = []

    def _record(self, _module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        self.logits.append(output)

    def take(self) -> list[torch.Tensor]:
        out, self.logits = self.logits, []
        return out

    def remove(self) -> None:
        self._reset_handle.remove()
        for handle in self._handles:
            handle.remove()


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    module = getattr(model, "module", model)  # DeepSpeed engine or plain model
    return list(module.model.layers)


def _router_linear(mlp: nn.Module) -> nn.Linear | None:
    router = getattr(mlp, "router", None)  # AutoEP block: router.gate
    gate = getattr(router, "gate", None) if router is not None else getattr(mlp, "gate", None)
    return gate if isinstance(gate, nn.Linear) else None


_scratch: dict[torch.device, torch.Tensor] = {}


def _block_scratch(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """An fp32 [rows, vocab] work block, one per device, kept between calls: a fresh one per block and step
    costs more than the arithmetic on CPU (new pages to fault in), and it is at most CE_BLOCK_BYTES."""
    buffer = _scratch.get(device)
    if buffer is None or buffer.numel() < rows * vocab:
        buffer = _scratch[device] = torch.empty(rows * vocab, dtype=torch.float32, device=device)
    return buffer[:rows * vocab].view(rows, vocab)


class _LeanCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of `logits_TV` (any float dtype) against `labels_T`, computed in fp32.

    Forward keeps the logits and one fp32 log-sum-exp per row; backward writes (softmax - onehot) / T
    into the logits' storage, block by block, and returns that storage as their gradient (Liger-Kernel's
    trick). Autograd's version counter guards it: an op that saved the same logits for its own backward
    fails loudly instead of reading gradients. The fp32 work runs in one reused block (fp32 logits are
    their own work block in backward).
    """

    @staticmethod
    def forward(ctx: Any, logits_TV: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
        n_tokens, vocab = logits_TV.shape
        rows = max(1, min(n_tokens, CE_BLOCK_BYTES // (4 * vocab)))
        scratch = _block_scratch(rows, vocab, logits_TV.device)
        lse_T = torch.empty(n_tokens, dtype=torch.float32, device=logits_TV.device)
        for start in range(0, n_tokens, rows):
            block = logits_TV[start:start + rows]
            work = scratch[:block.shape[0]].copy_(block)
            max_R1 = work.amax(dim=-1, keepdim=True)  # as torch.logsumexp: exp after subtracting the row max
            lse_T[start:start + rows] = work.sub_(max_R1).exp_().sum(dim=-1).log_().add_(max_R1.squeeze(1))
        target_T = logits_TV.gather(1, labels_T[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits_TV, labels_T, lse_T)
        ctx.rows = rows
        return (lse_T - target_T).mean()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits_TV, labels_T, lse_T = ctx.saved_tensors
        n_tokens, vocab = logits_TV.shape
        in_place = logits_TV.dtype == torch.float32
        scratch = None if in_place else _block_scratch(ctx.rows, vocab, logits_TV.device)
        scale = grad.float() / n_tokens
        for start in range(0, n_tokens, ctx.rows):
            block = logits_TV[start:start + ctx.rows]
            work = block if scratch is None else scratch[:block.shape[0]].copy_(block)
            work.sub_(lse_T[start:start + ctx.rows, None]).exp_()
            work[torch.arange(work.shape[0], device=work.device), labels_T[start:start + ctx.rows]] -= 1.0
            work.mul_(scale)
            if scratch is not None:
                block.copy_(work)
        return logits_TV, None


def lean_cross_entropy(logits_TV: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    """F.cross_entropy(logits_TV.float(), labels_T) (every position a target, no ignore_index) without
    the [T, V] tensors it allocates. Why: those are the largest activations of a small-width model
    (fp32, several times the size of bf16 logits) and, on CPU, allocations above 32 MiB are fresh pages
    on every step. The logits hold their gradient after backward: do not read them then. A label
    outside the vocabulary fails in `gather` (no check here: it would cost a device sync per step)."""
    return _LeanCrossEntropy.apply(logits_TV, labels_T)


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    lb: torch.Tensor
    z: torch.Tensor


def plain_cross_entropy(logits_TV: torch.Tensor, labels_T: torch.Tensor) -> torch.Tensor:
    """PyTorch's own fp32 cross-entropy: what the plain-PyTorch reference run checks the trainer's against."""
    return F.cross_entropy(logits_TV.float(), labels_T)


def training_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, router_logits: list[torch.Tensor],
                  top_k: int, lb_coef: float, z_coef: float,
                  cross_entropy: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lean_cross_entropy,
                  ) -> LossParts:
    """CE + lb_coef * mean_layers(load balancing) + z_coef * mean_layers(z-loss), as the paper's code."""
    ce = cross_entropy(logits_BSV.reshape(-1, logits_BSV.shape[-1]), labels_BS.reshape(-1))
    zero = ce.new_zeros(())
    if router_logits:
        lb = torch.stack([load_balancing_loss(lg, top_k) for lg in router_logits]).mean()
        z = torch.stack([z_loss(lg) for lg in router_logits]).mean()
    else:
        lb, z = zero, zero
    return LossParts(total=ce + lb_coef * lb + z_coef * z, ce=ce.detach(), lb=lb.detach(), z=z.detach())
