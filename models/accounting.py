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


def rank_memory(cfg: ModelConfig, world: int, ep: int, zero: int, precision: str = "bf16") -> RankMemory:
    """Per-rank model-state bytes under DeepSpeed ZeRO + expert parallelism, tied banks counted once.

    The ZeRO paper's accounting (Rajbhandari et al. 2020: 2 + 2 + 12 bytes per parameter in mixed
    precision), with the layout AutoEP uses: an expert bank is split over `ep` ranks and its ZeRO
    partitioning runs over the expert-data-parallel group (world / ep); other parameters over all
    ranks. bf16 keeps fp32 gradients (fp32 accumulation) and fp32 master weights; fp32 training keeps
    a separate fp32 master only at ZeRO-3, as DeepSpeed's stage-3 optimizer does.
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
    grads = 4 * share(expert, other, zero >= 2)
    has_master = precision == "bf16" or zero == 3
    master = 4 * share(expert, other, zero >= 1) if has_master else 0
    moments = 8 * share(expert, other, zero >= 1)
    parts = [round(held_expert * param_bytes), round(held_other * param_bytes), round(grads), round(master),
             round(moments)]
    return RankMemory(*parts, total=sum(parts))
