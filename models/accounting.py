"""Parameter and FLOP accounting computed from the config alone (no model is built).

Tied modules count once in `unique_params` and at every use in `untied_params`,
`active_params_per_token` and FLOPs: a tied bank saves memory, not compute. (Peers that derive
FLOPs from the parameter count undercount a tied model g-fold.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from models.config import LayerPlan, ModelConfig, layer_plan


@dataclass(frozen=True)
class Accounting:
    unique_params: int  # what the model holds (each tied tensor once)
    untied_params: int  # same layers, every layer with its own modules
    active_params_per_token: int  # parameters a token passes through (tied ones at every use)
    unique_ffn_params: int  # experts + shared experts + dense MLPs, each bank once
    untied_ffn_params: int
    ffn_reduction: float  # 1 - unique_ffn / untied_ffn
    expert_banks: int
    moe_layers: int
    train_flops_per_token: float  # 6 * matmul params used per token + attention (PaLM appendix B)
    seq_len: int

    def to_dict(self) -> dict:
        return asdict(self)


def _attention_params(cfg: ModelConfig) -> int:
    hd, h, g, d = cfg.attn_head_dim, cfg.n_heads, cfg.kv_heads, cfg.d_model
    norms = {"none": 0, "full": (h + g) * hd, "per_head": 2 * hd}[cfg.qk_norm]
    return d * h * hd * 2 + d * g * hd * 2 + norms


def _expert_bank_params(cfg: ModelConfig, n_experts: int) -> int:
    return n_experts * 3 * cfg.expert_ffn_dim * cfg.d_model


def _shared_params(cfg: ModelConfig) -> int:
    return 3 * cfg.d_model * cfg.n_shared_experts * cfg.shared_expert_ffn_dim


def layer_parts(cfg: ModelConfig, p: LayerPlan) -> dict[str, int]:
    parts = {"attention": _attention_params(cfg), "norms": 2 * cfg.d_model}
    if p.ffn == "dense":
        parts["dense"] = 3 * cfg.d_model * cfg.dense_ffn_dim
    else:
        parts["router"] = p.n_experts * cfg.d_model
        parts["experts"] = _expert_bank_params(cfg, p.n_experts)
        parts["shared"] = _shared_params(cfg)
    return parts


def account(cfg: ModelConfig, seq_len: int | None = None) -> Accounting:
    seq_len = seq_len or cfg.max_seq_len
    plan = layer_plan(cfg)
    embed = cfg.vocab_size * cfg.d_model
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    outside = embed + head + cfg.d_model  # + final norm

    unique = untied = outside
    ffn_unique = ffn_untied = 0
    active = outside
    matmul_per_token = cfg.vocab_size * cfg.d_model  # lm_head; embedding lookup is not a matmul
    for p in plan:
        parts = layer_parts(cfg, p)
        owner_of = {"attention": p.attention_owner, "router": p.router_owner, "experts": p.expert_owner}
        for name, n in parts.items():
            untied += n
            if owner_of.get(name, p.index) == p.index:
                unique += n
        ffn = parts.get("dense", 0) + parts.get("experts", 0) + parts.get("shared", 0)
        ffn_untied += ffn
        ffn_unique += ffn - (parts.get("experts", 0) if p.expert_owner != p.index else 0)
        used_ffn = parts.get("dense", 0) + parts.get("shared", 0) + (
            parts.get("experts", 0) * cfg.top_k // p.n_experts if p.ffn == "moe" else 0)
        active += parts["attention"] + parts["norms"] + parts.get("router", 0) + used_ffn
        matmul_per_token += (cfg.d_model * cfg.attn_head_dim * (2 * cfg.n_heads + 2 * cfg.kv_heads)
                             + parts.get("router", 0) + used_ffn)
    attn_flops = 12 * cfg.n_layers * cfg.n_heads * cfg.attn_head_dim * seq_len
    moe = [p for p in plan if p.ffn == "moe"]
    return Accounting(
        unique_params=unique, untied_params=untied, active_params_per_token=active,
        unique_ffn_params=ffn_unique, untied_ffn_params=ffn_untied,
        ffn_reduction=1.0 - ffn_unique / ffn_untied if ffn_untied else 0.0,
        expert_banks=len({p.expert_owner for p in moe}), moe_layers=len(moe),
        train_flops_per_token=float(6 * matmul_per_token + attn_flops), seq_len=seq_len,
    )


@dataclass(frozen=True)
class RankMemory:
    """Model-state bytes one rank holds (activations and buffers not included)."""

    expert_params: int
    other_params: int
    grads: int
    master_params: int  # fp32 copies the optimizer keeps
    optimizer_state: int  # Adam: two fp32 moments
    total: int

    def to_dict(self) -> dict:
        return asdict(self)


def check_layout(cfg: ModelConfig, world: int, ep: int, zero: int, precision: str = "bf16") -> None:
    """Refuse, naming the setting, a layout AutoEP and ZeRO cannot build (so no estimate is printed for
    it): expert-parallel groups must tile the ranks and split every expert bank evenly."""
    for name, value in (("world", world), ("ep", ep)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    if world % ep:
        raise ValueError(f"world={world}: expected a multiple of ep={ep} (expert-parallel groups tile the ranks)")
    for n_experts in sorted({p.n_experts for p in layer_plan(cfg) if p.ffn == "moe"}):
        if n_experts % ep:
            raise ValueError(f"ep={ep}: expected a divisor of the expert count {n_experts} (each rank holds "
                             f"n_experts/ep experts of every bank)")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero={zero}: expected 0, 1, 2 or 3")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r}: expected 'bf16' or 'fp32'")


def _grad_bytes(precision: str, zero: int) -> int:
    """Gradient bytes per (unpartitioned) parameter that DeepSpeed 0.19.8 holds, by precision and stage.

    bf16 without ZeRO: bf16 gradients (DeepSpeed's bf16 wrapper accumulates in bf16). bf16 ZeRO-1 runs
    DeepSpeed's BF16_Optimizer: bf16 `param.grad` plus full fp32 gradient buffers (2 + 4). Otherwise
    fp32 gradients (fp32 accumulation). ZeRO-1 gradients are full: fp32 ZeRO-1 holds them until the
    reduce at the end of backward (when the step begins only a partition is left).
    """
    if precision == "bf16":
        return {0: 2, 1: 6}.get(zero, 4)
    return 4


def rank_memory(cfg: ModelConfig, world: int, ep: int, zero: int, precision: str = "bf16") -> RankMemory:
    """Per-rank model-state bytes under DeepSpeed ZeRO + expert parallelism, tied banks counted once.

    The ZeRO paper's accounting (Rajbhandari et al. 2020: 2 + 2 + 12 bytes per parameter in mixed
    precision), with the layout AutoEP uses: an expert bank is split over `ep` ranks and its ZeRO
    partitioning runs over the expert-data-parallel group (world / ep); other parameters over all
    ranks. bf16 keeps fp32 master weights; gradients as `_grad_bytes` says. fp32 training keeps a
    separate fp32 copy under every ZeRO stage (the optimizer's flat partitions), none without ZeRO.
    Measured against the tensors DeepSpeed 0.19.8 holds in tests/test_memory_report.py.
    """
    check_layout(cfg, world, ep, zero, precision)
    plan = layer_plan(cfg)
    banks = {p.expert_owner: p.n_experts for p in plan if p.ffn == "moe"}
    expert = sum(_expert_bank_params(cfg, n) for n in banks.values())
    other = account(cfg).unique_params - expert
    edp = world // ep

    def share(n_expert: float, n_other: float, partitioned: bool) -> float:
        return n_expert / ep / (edp if partitioned else 1) + n_other / (world if partitioned else 1)

    param_bytes = 2 if precision == "bf16" else 4
    held_expert = expert / ep / (edp if zero == 3 else 1)
    held_other = other / (world if zero == 3 else 1)
    grads = _grad_bytes(precision, zero) * share(expert, other, zero >= 2)
    has_master = precision == "bf16" or zero >= 1
    master = 4 * share(expert, other, zero >= 1) if has_master else 0
    moments = 8 * share(expert, other, zero >= 1)
    parts = [round(held_expert * param_bytes), round(held_other * param_bytes), round(grads), round(master),
             round(moments)]
    return RankMemory(*parts, total=sum(parts))


# --------------------------------------------------------------------------------------------------
# Activations: bytes saved for backward, derived from what models/transformer.py and models/moe.py
# keep alive (checked against torch's saved-tensor hooks in tests/test_memory_activations.py).
# --------------------------------------------------------------------------------------------------

_INT64, _FP32 = 8, 4
CE_BLOCK_BYTES = 8 * 2 ** 20  # fp32 rows the trainer's cross-entropy works on at once (trainer.losses)


@dataclass(frozen=True)
class ActivationMemory:
    """Activation bytes one rank holds for one micro-batch (training, forward + loss, before backward)."""

    layers: int  # saved by the decoder layers (with activation checkpointing: only their inputs)
    head: int  # final norm, the logits (the loss keeps them and their gradient reuses them), token ids
    recompute: int  # with activation checkpointing: one layer's activations rebuilt during backward
    logits: int  # not saved but alive in backward: the loss's fp32 work block (kept between steps)
    saved: int  # layers + head: held when the forward ends (what tests measure with saved-tensor hooks)
    peak: int  # saved + recompute + logits: the most held at once early in backward

    def to_dict(self) -> dict:
        return asdict(self)


def _norm_saved(width: int, elt: int, rows: int = 1) -> int:
    """RMSNorm (fp32 inside): the fp32 input, one rsqrt per row, the normalised input in the activation dtype."""
    return _FP32 * width + _FP32 * rows + elt * width


def _attention_saved_per_token(cfg: ModelConfig, elt: int) -> int:
    """Input norm, q/k norms, qkv clamps and scaled-dot-product attention (q, k, v, out, log-sum-exp).

    RoPE saves nothing per token (its cos/sin do not need gradients); GQA's repeated k/v are new
    tensors of the full query width, so attention always keeps four query-width tensors.
    """
    q_width, kv_width = cfg.n_heads * cfg.attn_head_dim, cfg.kv_heads * cfg.attn_head_dim
    total = _norm_saved(cfg.d_model, elt) + elt * cfg.d_model  # the norm and its output (read by q/k/v)
    if cfg.qk_norm == "full":
        total += _norm_saved(q_width, elt) + _norm_saved(kv_width, elt)
    elif cfg.qk_norm == "per_head":
        total += _norm_saved(q_width, elt, cfg.n_heads) + _norm_saved(kv_width, elt, cfg.kv_heads)
    if cfg.clip_qkv is not None:  # clamp keeps its input
        total += elt * (q_width + 2 * kv_width)
    return total + 4 * elt * q_width + _FP32 * cfg.n_heads


def _moe_saved_per_token(cfg: ModelConfig, n_experts: int, elt: int, router_losses: bool) -> int:
    """Router softmax + top-k, the dispatch permutation, K copies of the token through the SwiGLU
    experts (input, gate/up, silu, product), the fp32 weighted combine, shared experts, aux losses."""
    k, d, f = cfg.top_k, cfg.d_model, cfg.expert_ffn_dim
    total = _norm_saved(cfg.d_model, elt) + elt * d
    total += _FP32 * n_experts + 3 * _INT64 * k + _FP32 * k  # probs; top-k ids, sort order, token ids; weights
    total += k * (elt * d + 4 * elt * f + _FP32 * d + elt * d)  # per routed copy
    if cfg.norm_topk_prob:
        total += _FP32 * (k + 1)
    total += 4 * elt * cfg.n_shared_experts * cfg.shared_expert_ffn_dim
    return total + (_router_loss_saved_per_token(n_experts) if router_losses else 0)


def _router_loss_saved_per_token(n_experts: int) -> int:
    """The trainer's aux losses on router logits: load balancing keeps fp32 probabilities, z-loss the
    fp32 logits and the log-sum-exp. They run outside the layers, so activation checkpointing keeps them."""
    return 2 * _FP32 * n_experts + 2 * _FP32


def _dense_saved_per_token(cfg: ModelConfig, elt: int) -> int:
    return _norm_saved(cfg.d_model, elt) + elt * cfg.d_model + 4 * elt * cfg.dense_ffn_dim


def layer_activation_bytes(cfg: ModelConfig, p: LayerPlan, tokens: int, seq_len: int, precision: str,
                           router_losses: bool = True) -> int:
    """Bytes one layer saves for backward for `tokens` tokens in sequences of `seq_len`."""
    elt = 2 if precision == "bf16" else 4
    ffn = (_dense_saved_per_token(cfg, elt) if p.ffn == "dense"
           else _moe_saved_per_token(cfg, p.n_experts, elt, router_losses))
    rope = 4 * seq_len * cfg.attn_head_dim * elt if precision == "bf16" else 0  # per-layer bf16 cos/sin casts
    return tokens * (_attention_saved_per_token(cfg, elt) + ffn) + rope


def activation_memory(cfg: ModelConfig, micro_batch: int, seq_len: int, precision: str = "bf16",
                      checkpointing: bool = False, router_losses: bool = True) -> ActivationMemory:
    """Activation bytes for one micro-batch of `micro_batch` x `seq_len` tokens on one rank.

    Why analytic: the planner must size runs that cannot be built here. The terms follow the saved
    tensors of this repository's plain model (attention saves O(S) per head, not S^2: fused SDPA);
    DeepSpeed's AutoEP block and ZeRO buffers add transient memory not counted here. Tying changes
    nothing: a tied bank is run once per layer that uses it. With activation checkpointing each
    layer keeps only its input and one layer is rebuilt at a time during backward.
    """
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r}: expected 'bf16' or 'fp32'")
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch={micro_batch}, seq_len={seq_len}: expected positive integers")
    elt = 2 if precision == "bf16" else 4
    tokens = micro_batch * seq_len
    per_layer = [layer_activation_bytes(cfg, p, tokens, seq_len, precision, router_losses) for p in layer_plan(cfg)]
    rope_once = 2 * seq_len * cfg.attn_head_dim * _FP32 if precision == "fp32" else 0
    if checkpointing:
        aux = sum(_router_loss_saved_per_token(p.n_experts) for p in layer_plan(cfg) if p.ffn == "moe")
        layers = len(per_layer) * tokens * elt * cfg.d_model + (tokens * aux if router_losses else 0)
        recompute = max(per_layer)
    else:
        layers, recompute = sum(per_layer), 0
    layers += rope_once
    head = tokens * (_norm_saved(cfg.d_model, elt) + elt * cfg.d_model + elt * cfg.vocab_size + _FP32 + 2 * _INT64)
    block_rows = min(tokens, max(1, CE_BLOCK_BYTES // (_FP32 * cfg.vocab_size)))
    logits = block_rows * cfg.vocab_size * _FP32
    return ActivationMemory(layers=layers, head=head, recompute=recompute, logits=logits, saved=layers + head,
                            peak=layers + head + recompute + logits)
