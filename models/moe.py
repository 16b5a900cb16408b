"""Dropless token-choice MoE block with SwiGLU experts in the HF transformers 5.x fused layout.

Shape legend: B batch, S sequence, T = B*S tokens, D d_model, E experts, F expert hidden width,
K top_k, N = T*K routed assignments.

The parameter layout (`mlp.gate.weight [E, D]`, `mlp.experts.gate_up_proj [E, 2F, D]`,
`mlp.experts.down_proj [E, D, F]`) is what DeepSpeed AutoEP detects and what HF's OLMoE/Qwen3-MoE
load, so checkpoints and the expert-parallel engine need no renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


def borrow(parent: nn.Module, name: str, module: nn.Module) -> None:
    """Make `parent.<name>` refer to a module registered elsewhere, without registering it again.

    Why: a tied follower must run its leader's very own module, yet `parameters()`, `state_dict()`
    and ZeRO-3 partitioning must see each tied tensor once (under its leader's name).
    """
    parent._modules.pop(name, None)
    object.__setattr__(parent, name, module)


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP (dense layers and DeepSeek-style shared experts); HF Llama/Qwen2-MoE naming."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def experts_loop(x_ND: torch.Tensor, counts_E: torch.Tensor, w_gate_up_EFD: torch.Tensor,
                 w_down_EDF: torch.Tensor) -> torch.Tensor:
    """Exact per-expert reference: rows of `x_ND` are sorted by expert, `counts_E` rows each."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        gate, up = F.linear(x_ND[start:start + n], w_gate_up_EFD[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, w_down_EDF[e]))
        start += n
    return torch.cat(outs) if outs else x_ND.new_zeros(0, w_down_EDF.shape[1])


def experts_grouped(x_ND: torch.Tensor, counts_E: torch.Tensor, w_gate_up_EFD: torch.Tensor,
                    w_down_EDF: torch.Tensor) -> torch.Tensor:
    """Same as `experts_loop` with one grouped GEMM per projection (one autograd node, not E)."""
    offs = counts_E.cumsum(0).to(torch.int32)
    h_NF2 = torch._grouped_mm(x_ND, w_gate_up_EFD.transpose(-2, -1), offs=offs)
    gate, up = h_NF2.chunk(2, dim=-1)
    return torch._grouped_mm((F.silu(gate) * up).contiguous(), w_down_EDF.transpose(-2, -1), offs=offs)


class Experts(nn.Module):
    """E SwiGLU experts stored fused; a tie group's layers all call one instance."""

    def __init__(self, n_experts: int, d_model: int, ffn_dim: int, use_grouped_mm: bool = True) -> None:
        super().__init__()
        self.num_experts = n_experts
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * ffn_dim, d_model))
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, ffn_dim))
        self.use_grouped_mm = use_grouped_mm and _HAS_GROUPED_MM

    def forward(self, x_TD: torch.Tensor, top_idx_TK: torch.Tensor, top_w_TK: torch.Tensor) -> torch.Tensor:
        n_tokens, k = top_idx_TK.shape
        flat_idx_N = top_idx_TK.reshape(-1)
        order_N = torch.argsort(flat_idx_N, stable=True)
        token_of_N = order_N // k
        counts_E = torch.bincount(flat_idx_N, minlength=self.num_experts)
        compute = experts_grouped if self.use_grouped_mm else experts_loop
        y_ND = compute(x_TD[token_of_N], counts_E, self.gate_up_proj, self.down_proj)
        y_ND = (y_ND.float() * top_w_TK.reshape(-1)[order_N, None].float()).to(x_TD.dtype)
        return x_TD.new_zeros(n_tokens, x_TD.shape[-1]).index_add_(0, token_of_N, y_ND)


class BankSlot(nn.Module):
    """Where a tied follower's own expert bank would be: the bank's shapes, no parameters.

    Why: a follower runs its leader's bank (`apply_tying`), so a bank of its own would be built only
    to be thrown away, which at paper scale under ZeRO-3 means materialised and partitioned for
    nothing. The slot keeps the bank's place in the init order: its random draws still happen
    (into a scratch tensor), so every other tensor gets the values it had when followers built
    their own banks, and a seed gives the same model as before.
    """

    def __init__(self, n_experts: int, d_model: int, ffn_dim: int) -> None:
        super().__init__()
        self.num_experts = n_experts
        # Registration order of `Experts`: gate_up_proj, then down_proj.
        self.shapes = (torch.Size((n_experts, 2 * ffn_dim, d_model)), torch.Size((n_experts, d_model, ffn_dim)))


class MoEBlock(nn.Module):
    """Router (`gate`) + routed experts (+ optional always-on `shared_expert`). Never drops a token.

    Router logits are not returned: the trainer reads them with a forward hook on `gate`, which also
    works after DeepSpeed AutoEP replaces this block (its router keeps an `nn.Linear` named `gate`).
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, ffn_dim: int, norm_topk_prob: bool,
                 shared_ffn_dim: int = 0, own_experts: bool = True) -> None:
        super().__init__()
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        # A tied follower gets a slot, replaced by its leader's bank when the model is tied.
        self.experts: nn.Module = (Experts if own_experts else BankSlot)(n_experts, d_model, ffn_dim)
        if shared_ffn_dim:
            self.shared_expert = SwiGLU(d_model, shared_ffn_dim)

    def route(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k expert indices and their weights, softmax in fp32 (as AutoEP's router)."""
        probs_TE = F.softmax(self.gate(x_TD).float(), dim=-1)
        top_w_TK, top_idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_w_TK = top_w_TK / (top_w_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return top_idx_TK, top_w_TK

    def forward(self, hidden_BSD: torch.Tensor) -> torch.Tensor:
        x_TD = hidden_BSD.reshape(-1, hidden_BSD.shape[-1])
        top_idx_TK, top_w_TK = self.route(x_TD)
        out_BSD = self.experts(x_TD, top_idx_TK, top_w_TK).view_as(hidden_BSD)
        shared = getattr(self, "shared_expert", None)
        return out_BSD + shared(hidden_BSD) if shared is not None else out_BSD
