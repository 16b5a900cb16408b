"""The one generic decoder-only MoE transformer; every preset is this class with other config values.

Module names follow HF transformers (model.embed_tokens, model.layers.N.self_attn.q_proj, ...,
model.layers.N.mlp.gate / .experts, model.norm, lm_head) so that OLMoE/Qwen3-MoE state dicts map
one to one and DeepSpeed AutoEP finds the MoE blocks.

Shape legend: B batch, S sequence, D d_model, H query heads, G kv heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import LayerPlan, ModelConfig, layer_plan
from models.moe import BankSlot, MoEBlock, SwiGLU, borrow


class RMSNorm(nn.Module):
    """Normalises in fp32 and scales in the input dtype, as HF's Llama-family RMSNorm."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim))
    freqs_SH = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat([freqs_SH, freqs_SH], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHSDh: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x_BHSDh * cos.to(x_BHSDh.dtype)) + (_rotate_half(x_BHSDh) * sin.to(x_BHSDh.dtype))


class Attention(nn.Module):
    """Causal GQA attention with RoPE, optional q/k RMSNorm (full width or per head) and qkv clipping."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
        self.clip_qkv = cfg.clip_qkv
        self.qk_norm = cfg.qk_norm
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm == "full":
            self.q_norm = RMSNorm(self.n_heads * self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.n_kv * self.head_dim, cfg.norm_eps)
        elif cfg.qk_norm == "per_head":
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x_BSD.shape
        q, k, v = self.q_proj(x_BSD), self.k_proj(x_BSD), self.v_proj(x_BSD)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q_BSHDh = q.view(b, s, self.n_heads, self.head_dim)
        k_BSGDh = k.view(b, s, self.n_kv, self.head_dim)
        if self.qk_norm == "per_head":
            q_BSHDh, k_BSGDh = self.q_norm(q_BSHDh), self.k_norm(k_BSGDh)
        q_BHSDh = apply_rope(q_BSHDh.transpose(1, 2), cos, sin)
        k_BGSDh = apply_rope(k_BSGDh.transpose(1, 2), cos, sin)
        v_BGSDh = v.view(b, s, self.n_kv, self.head_dim).transpose(1, 2)
        if self.n_kv != self.n_heads:
            rep = self.n_heads // self.n_kv
            k_BGSDh = k_BGSDh.repeat_interleave(rep, dim=1)
            v_BGSDh = v_BGSDh.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q_BHSDh, k_BGSDh, v_BGSDh, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, plan: LayerPlan) -> None:
        super().__init__()
        self.plan = plan
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if plan.ffn == "dense":
            self.mlp: nn.Module = SwiGLU(cfg.d_model, cfg.dense_ffn_dim)
        else:
            self.mlp = MoEBlock(cfg.d_model, plan.n_experts, cfg.top_k, cfg.expert_ffn_dim, cfg.norm_topk_prob,
                                shared_ffn_dim=cfg.n_shared_experts * cfg.shared_expert_ffn_dim,
                                own_experts=not plan.is_tied_follower)

    def forward(self, x_BSD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.self_attn(self.input_layernorm(x_BSD), cos, sin)
        return x_BSD + self.mlp(self.post_attention_layernorm(x_BSD))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(DecoderLayer(cfg, p) for p in layer_plan(cfg))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)


Init = Callable[[torch.Tensor], object]
Writer = Callable[[nn.Parameter, Init], None]  # (parameter, init) -> the parameter holds init's draws

PIECE = 1 << 22  # elements per piece of a piecewise draw (16 MiB in fp32)


@dataclass(frozen=True)
class Normal:
    """N(0, std) on every element (`model.init=normal`), which can also be drawn piece by piece.

    Why pieces: building a partitioned model at paper scale, the whole-tensor draw of an embedding or a
    bank is the largest transient on the host (0.4 GiB for a 50k x 2048 embedding). PyTorch draws
    normals from one uniform per element, in order, transformed in blocks of 16, so drawing the
    flattened tensor in pieces of whole blocks (the last piece at least 16 long) gives the same values
    as drawing it whole; `pieces` checks that on this PyTorch once and otherwise draws whole.
    """

    std: float

    def __call__(self, t: torch.Tensor) -> object:
        return nn.init.normal_(t, mean=0.0, std=self.std)

    def pieces(self, numel: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(offset, values) of this init drawn on a flattened tensor of `numel` fp32 elements, in order."""
        return draw_in_pieces(numel, self)


def draw_in_pieces(numel: int, fill: Callable[[torch.Tensor], object]) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, values) of `fill` run on a flat fp32 tensor of `numel` elements, piece by piece: the values
    and the use of the random stream of running it on the whole tensor; whole where this PyTorch differs
    (checked once per `fill`)."""
    bounds = _piece_bounds(numel) if _pieces_draw_like_whole(fill) else [0, numel]
    for start, stop in zip(bounds, bounds[1:]):
        piece = torch.empty(stop - start)
        fill(piece)
        yield start, piece


def advance_stream(numel: int, fill: Callable[[torch.Tensor], object]) -> None:
    """Advance the random stream exactly as `fill` on a flat fp32 tensor of `numel` elements would, without
    holding the values: draws that are discarded (a follower's bank slot, a default init that
    `reset_parameters` overwrites) still shift every later draw, so they must happen, piece by piece."""
    for _ in draw_in_pieces(numel, fill):
        pass


def _piece_bounds(numel: int, piece: int = PIECE) -> list[int]:
    """Cut points: whole pieces of `piece` elements (a multiple of 16), the last one absorbing a short tail."""
    bounds = list(range(0, numel, piece)) + [numel]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 16:
        del bounds[-2]
    return bounds


@functools.cache
def _pieces_draw_like_whole(fill: Callable[[torch.Tensor], object]) -> bool:
    """Whether `fill` gives the same values, and leaves the random stream in the same place, run on a
    tensor whole or in `_piece_bounds` pieces."""
    numel, piece = 5 * 64 + 20, 64
    bounds = _piece_bounds(numel, piece)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        whole = torch.empty(numel)
        fill(whole)
        after_whole = torch.rand(4)
        torch.manual_seed(0)
        drawn = [torch.empty(b - a) for a, b in zip(bounds, bounds[1:])]
        for part in drawn:
            fill(part)
        after_pieces = torch.rand(4)
    return torch.equal(whole, torch.cat(drawn)) and torch.equal(after_whole, after_pieces)


def write_whole(param: nn.Parameter, init: Init) -> None:
    """Run `init` on the parameter, on the CPU generator wherever the parameter lives, so a seed gives
    the same values on every device."""
    with torch.no_grad():
        if param.device.type == "cpu":
            init(param.data)
            return
        scratch = torch.empty(param.shape, dtype=param.dtype)
        init(scratch)
        param.data.copy_(scratch)


class MoETransformer(nn.Module):
    """Causal LM. `forward(input_ids) -> logits`; losses live in the trainer.

    `defer_init=True` builds the modules only (followers still holding `BankSlot`s); the builder
    then calls `reset_parameters` and `apply_tying` itself (ZeRO-3 construction, `build_model`).
    """

    def __init__(self, cfg: ModelConfig, defer_init: bool = False) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.activation_checkpointing = False
        if not defer_init:
            self.reset_parameters()
            apply_tying(self)

    def reset_parameters(self, write: Writer = write_whole) -> None:
        """The seed-determined init. `write` puts each parameter's draws where the parameter lives
        (the engine's writer keeps only this rank's ZeRO-3 partition of them)."""
        for target, init in init_plan(self):
            if isinstance(target, torch.Size):  # a follower's bank slot: the draws only
                if isinstance(init, Normal):
                    advance_stream(target.numel(), init)
                else:
                    init(torch.empty(target))
            else:
                write(target, init)

    def forward(self, input_ids_BS: torch.Tensor) -> torch.Tensor:
        x_BSD = self.model.embed_tokens(input_ids_BS)
        cos, sin = rope_cos_sin(input_ids_BS.shape[1], self.config.attn_head_dim, self.config.rope_theta,
                                x_BSD.device)
        for layer in self.model.layers:
            if self.activation_checkpointing and self.training:
                x_BSD = torch.utils.checkpoint.checkpoint(layer, x_BSD, cos, sin, use_reentrant=False)
            else:
                x_BSD = layer(x_BSD, cos, sin)
        return self.lm_head(self.model.norm(x_BSD))


InitTarget = nn.Parameter | torch.Size  # a parameter, or the shape of a follower's bank slot


def init_plan(model: MoETransformer) -> Iterator[tuple[InitTarget, Init]]:
    """Every init draw in order: the order is the random stream, so it must never change.

    `model.init=normal`: N(0, init_std) on each Linear / Embedding weight (an embedding shared with
    the head is drawn twice, as it always was) and expert bank, ones for norms.
    `model.init=paper`: `depth_scaled_xavier` on each distinct parameter.
    """
    cfg = model.config
    if cfg.init == "paper":
        init = depth_scaled_xavier(cfg.n_layers)
        seen: set[int] = set()
        for module in model.modules():
            if isinstance(module, BankSlot):
                yield from ((shape, init) for shape in module.shapes)
            for param in module._parameters.values():  # the order of model.parameters()
                if param is not None and id(param) not in seen:
                    seen.add(id(param))
                    yield param, init
        return

    normal = Normal(cfg.init_std)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            yield module.weight, normal
        elif isinstance(module, RMSNorm):
            yield module.weight, nn.init.ones_
        elif isinstance(module, BankSlot):
            yield from ((shape, normal) for shape in module.shapes)
        for name in ("gate_up_proj", "down_proj"):
            param = module._parameters.get(name)
            if param is not None:
                yield param, normal


def depth_scaled_xavier(n_layers: int) -> Callable[[torch.Tensor], None]:
    """The paper's init: xavier_uniform with gain 1/sqrt(3 n_layers) on every matrix (embeddings, head and
    routers included), each expert [out, in] of a bank on its own so fan-in/out are one expert's; norms 1.

    Why depth-scaled: the residual stream sums 2 n_layers branch outputs, so smaller weights in deeper
    models keep its variance from growing with depth (as in epfml/looped-moe `moe_train.py`).
    """
    gain = 1.0 / math.sqrt(3 * n_layers)

    def init(t: torch.Tensor) -> None:
        if t.ndim == 2:
            nn.init.xavier_uniform_(t, gain=gain)
        elif t.ndim == 3:
            for expert in t:
                nn.init.xavier_uniform_(expert, gain=gain)
        else:
            nn.init.ones_(t)

    return init


def apply_tying(model: MoETransformer) -> None:
    """Point every follower at its owner's experts / router / attention, as the layer plan says.

    Called once at build time, and again by the engine seam after DeepSpeed has rebuilt the MoE
    blocks; it looks each module up by attribute name so it works on both block types.
    """
    layers = model.model.layers
    for layer in layers:
        plan: LayerPlan = layer.plan
        if plan.ffn == "moe" and plan.expert_owner != plan.index:
            borrow(layer.mlp, "experts", layers[plan.expert_owner].mlp.experts)
        if plan.ffn == "moe" and plan.router_owner != plan.index:
            name = "router" if hasattr(layer.mlp, "router") else "gate"
            own = getattr(layer.mlp, name)
            # Every name the block registers its router under (AutoEP also aliases it as `gate`),
            # so the follower's own router leaves the module tree entirely.
            aliases = [alias for alias, module in layer.mlp._modules.items() if module is own] or [name]
            for alias in aliases:
                borrow(layer.mlp, alias, getattr(layers[plan.router_owner].mlp, name))
        if plan.attention_owner != plan.index:
            borrow(layer, "self_attn", layers[plan.attention_owner].self_attn)


def build_model(cfg: ModelConfig, seed: int = 0,
                construct: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext,
                write: Writer = write_whole) -> MoETransformer:
    """Deterministic construction: the same config and seed give the same weights on every rank.

    `construct` wraps building the modules (the engine passes `deepspeed.zero.Init` at ZeRO-3, which
    partitions each module's parameters as soon as it is built) and `write` stores each parameter's
    init draws (the engine's keeps this rank's partition); the weights are the same either way.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with construct():
            model = MoETransformer(cfg, defer_init=True)
        model.reset_parameters(write)
        apply_tying(model)
        return model
