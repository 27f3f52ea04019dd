"""A small, trainable DeepSeek-V3 in plain PyTorch, with the Hugging Face parameter names.

What it provides: `DeepseekV3Tiny(config)`, the main model (MLA attention, dense first layers,
MoE layers with shared + routed experts, sigmoid `noaux_tc` gating) plus one multi-token
prediction (MTP) module stored as `model.layers.{num_hidden_layers}`. `state_dict()` keys are
exactly those of a DeepSeek-V3 Hugging Face checkpoint (per-expert `*_proj` weights), so
export.py can write the released layout directly. tools/train/test_forward_matches_hf.py shows
the main forward equals transformers' DeepseekV3ForCausalLM on the same weights.

Why not transformers' own model: it has no MTP module, and its fused 3-D expert tensors and
mask machinery make a slow CPU training loop. Names and maths follow the config fields.

Legend: B = batch, T = sequence length, H = hidden_size, V = vocab_size, E = n_routed_experts,
K = num_experts_per_tok, nh = num_attention_heads.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TinyConfig:
    """The DeepSeek-V3 config.json fields this model uses (same names, same meanings)."""

    vocab_size: int
    hidden_size: int = 256
    intermediate_size: int = 640
    moe_intermediate_size: int = 128
    num_hidden_layers: int = 4
    num_nextn_predict_layers: int = 1
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    n_shared_experts: int = 1
    n_routed_experts: int = 16
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 128
    q_lora_rank: int = 128
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    qk_nope_head_dim: int = 32
    n_group: int = 4
    topk_group: int = 2
    num_experts_per_tok: int = 4
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)  # DeepSeek's "yarn" dict, or {} for none
    initializer_range: float = 0.02

    @classmethod
    def from_dict(cls, d):
        names = cls.__dataclass_fields__.keys()
        kwargs = {k: v for k, v in d.items() if k in names}
        if kwargs.get("rope_scaling") is None:
            kwargs["rope_scaling"] = {}
        return cls(**kwargs)

    @property
    def qk_head_dim(self):
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer):
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0


# ----------------------------------------------------------------------------------------------
# RoPE with DeepSeek's YaRN frequencies


def yarn_get_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(cfg):
    """Returns (inv_freq [qk_rope_head_dim / 2], cos/sin scale, softmax scale)."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    softmax_scale = cfg.qk_head_dim**-0.5
    rs = cfg.rope_scaling
    if not rs:
        return inv_freq, 1.0, softmax_scale
    factor = rs["factor"]
    orig = rs["original_max_position_embeddings"]

    def correction_dim(num_rotations):
        return dim * math.log(orig / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.get("beta_fast", 32))), 0)
    high = min(math.ceil(correction_dim(rs.get("beta_slow", 1))), dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    # ramp = 0: keep the original frequency (fast dims); ramp = 1: interpolate by 1/factor.
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    mscale, mscale_all_dim = rs.get("mscale", 1.0), rs.get("mscale_all_dim", 0.0)
    cos_sin_scale = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    if mscale_all_dim:
        softmax_scale *= yarn_get_mscale(factor, mscale_all_dim) ** 2
    return inv_freq, cos_sin_scale, softmax_scale


def apply_rope(x, cos, sin):
    """Rotates adjacent pairs (x[2i], x[2i+1]) by angle i (DeepSeek's complex form).

    x: [B, heads, T, qk_rope_head_dim]; cos, sin: [T, qk_rope_head_dim / 2].
    The output lists the rotated real parts, then the imaginary parts (as transformers does):
    q and k are permuted alike, so q . k is that of the interleaved layout.
    """
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


# ----------------------------------------------------------------------------------------------
# Blocks


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(
            x.dtype
        )


class MLA(nn.Module):
    """Multi-head latent attention (training form: latents expanded to per-head K and V)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        nh, H = cfg.num_attention_heads, cfg.hidden_size
        self.q_a_proj = nn.Linear(H, cfg.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, nh * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(H, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank)
        self.kv_b_proj = nn.Linear(
            cfg.kv_lora_rank, nh * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(nh * cfg.v_head_dim, H, bias=False)

    def forward(self, x, cos, sin, softmax_scale):
        # x: [B, T, H]
        cfg = self.cfg
        B, T, _ = x.shape
        nh, dn, dr, dv = (
            cfg.num_attention_heads,
            cfg.qk_nope_head_dim,
            cfg.qk_rope_head_dim,
            cfg.v_head_dim,
        )
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))  # [B, T, nh * (dn + dr)]
        q = q.view(B, T, nh, dn + dr).transpose(1, 2)  # [B, nh, T, dn + dr]
        q_nope, q_pe = q.split([dn, dr], dim=-1)
        kv_a = self.kv_a_proj_with_mqa(x)  # [B, T, kv_lora_rank + dr]
        c_kv, k_pe = kv_a.split([cfg.kv_lora_rank, dr], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv))  # [B, T, nh * (dn + dv)]
        kv = kv.view(B, T, nh, dn + dv).transpose(1, 2)
        k_nope, v = kv.split([dn, dv], dim=-1)  # [B, nh, T, dn], [B, nh, T, dv]
        q_pe = apply_rope(q_pe, cos, sin)
        k_pe = apply_rope(k_pe.view(B, 1, T, dr), cos, sin).expand(B, nh, T, dr)
        q = torch.cat([q_nope, q_pe], dim=-1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=softmax_scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, nh * dv))


class MLP(nn.Module):
    """SwiGLU FFN: the dense layers, the shared experts and each routed expert."""

    def __init__(self, hidden_size, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """noaux_tc gate: sigmoid scores, group-limited top-k on biased scores, unbiased weights."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        # Auxiliary-loss-free balancing bias: changed by the training loop, never by gradients.
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def forward(self, x):
        # x: [N, H] -> scores [N, E], topk_weights [N, K], topk_idx [N, K]
        cfg = self.cfg
        N = x.shape[0]
        with torch.autocast(x.device.type, enabled=False):  # routing in float32, as DeepSeek
            scores = F.linear(x.float(), self.weight.float()).sigmoid()
        biased = scores.detach() + self.e_score_correction_bias
        per_group = biased.view(N, cfg.n_group, -1)
        group_scores = per_group.topk(2, dim=-1)[0].sum(-1)  # [N, n_group]
        group_idx = group_scores.topk(cfg.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        expert_mask = group_mask.unsqueeze(-1).expand_as(per_group).reshape(N, -1)
        biased = biased.masked_fill(expert_mask == 0, float("-inf"))
        topk_idx = biased.topk(cfg.num_experts_per_tok, dim=-1, sorted=False)[1]
        topk_weights = scores.gather(1, topk_idx)
        if cfg.norm_topk_prob:
            topk_weights = topk_weights / (topk_weights.sum(-1, keepdim=True) + 1e-20)
        return scores, topk_weights * cfg.routed_scaling_factor, topk_idx


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(
            MLP(cfg.hidden_size, cfg.moe_intermediate_size) for _ in range(cfg.n_routed_experts)
        )
        self.shared_experts = MLP(
            cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts
        )
        self.last_topk_idx = None  # [B * T, K], read by the training loop for load statistics
        self.last_balance_loss = None

    def forward(self, x):
        # x: [B, T, H]
        B, T, H = x.shape
        flat = x.reshape(B * T, H)
        scores, topk_weights, topk_idx = self.gate(flat)
        out = torch.zeros_like(flat)
        for e in range(self.cfg.n_routed_experts):
            token, slot = torch.where(topk_idx == e)
            if token.numel() == 0:
                continue
            y = self.experts[e](flat[token]) * topk_weights[token, slot, None].to(flat.dtype)
            out.index_add_(0, token, y)
        self.last_topk_idx = topk_idx.detach()
        if self.training:
            self.last_balance_loss = self.sequence_balance_loss(scores, topk_idx, B, T)
        return out.view(B, T, H) + self.shared_experts(x)

    def sequence_balance_loss(self, scores, topk_idx, B, T):
        """DeepSeek-V3's complementary sequence-wise balance loss (before its alpha).

        Per sequence: sum_i f_i * P_i, f_i = E / (K T) * (tokens routed to i), P_i = mean over
        tokens of the normalized score s_i / sum_j s_j.
        """
        E, K = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        counts = torch.zeros(B * T, E).scatter_(1, topk_idx, 1.0).view(B, T, E).sum(1)
        f = counts * E / (K * T)  # [B, E]
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, E).mean(1)  # [B, E]
        return (f * p).sum(-1).mean()


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.self_attn = MLA(cfg)
        self.mlp = (
            MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, softmax_scale):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, softmax_scale)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)


class MTPLayer(DecoderLayer):
    """Multi-token prediction module (model.layers.{num_hidden_layers}).

    Input at position i: eh_proj(concat(enorm(embed(t[i+1])), hnorm(h[i]))), embedding first as
    vLLM and SGLang load DeepSeek's weights, where h[i] is the main model's hidden state after
    the final norm (model.norm(last layer output)), the state vLLM, SGLang and TensorRT-LLM hand
    to the MTP module of the released weights and core/engine/engine.h to its MTP entry point;
    hnorm normalizes it again. Then one decoder layer with MoE, then shared_head.norm and
    shared_head.head: logits for t[i+2].
    """

    def __init__(self, cfg, layer_idx):
        super().__init__(cfg, layer_idx)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = SharedHead(cfg)

    def forward(self, next_ids, h, cos, sin, softmax_scale):
        # next_ids: [B, T] (t[i+1]); h: [B, T, H] -> logits [B, T, V] for t[i+2]
        x = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(next_ids)), self.hnorm(h)], -1))
        x = super().forward(x, cos, sin, softmax_scale)
        return self.shared_head.head(self.shared_head.norm(x))


class Backbone(nn.Module):
    """`model.*`: embeddings, decoder layers (+ the MTP layer as the last entry), final norm."""

    def __init__(self, cfg):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        layers += [
            MTPLayer(cfg, cfg.num_hidden_layers + j) for j in range(cfg.num_nextn_predict_layers)
        ]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3Tiny(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        assert cfg.num_nextn_predict_layers <= 1, "one MTP module is supported"
        self.cfg = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.num_nextn_predict_layers:
            # DeepSeek-V3 shares the embedding and output head between the main model and MTP;
            # the checkpoint stores them twice (export writes the copies).
            mtp = self.model.layers[cfg.num_hidden_layers]
            mtp.embed_tokens = self.model.embed_tokens
            mtp.shared_head.head = self.lm_head
        inv_freq, self.cos_sin_scale, self.softmax_scale = rope_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            elif name.endswith("down_proj.weight") or name.endswith("o_proj.weight"):
                # Residual-branch outputs scaled down with depth (GPT-2 style).
                p.normal_(0.0, std / math.sqrt(2 * (self.cfg.num_hidden_layers + 1)))
            else:
                p.normal_(0.0, std)

    def rope(self, T):
        pos = torch.arange(T, dtype=torch.float32)
        freqs = torch.outer(pos, self.inv_freq)  # [T, qk_rope_head_dim / 2]
        return freqs.cos() * self.cos_sin_scale, freqs.sin() * self.cos_sin_scale

    def moe_layers(self):
        return [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]

    def forward(self, ids, with_mtp=True):
        """ids: [B, T] -> (logits [B, T, V] for t[i+1], MTP logits [B, T-1, V] for t[i+2])."""
        B, T = ids.shape
        cos, sin = self.rope(T)
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers[: self.cfg.num_hidden_layers]:
            x = layer(x, cos, sin, self.softmax_scale)
        h = self.model.norm(x)
        logits = self.lm_head(h)
        mtp_logits = None
        if with_mtp and self.cfg.num_nextn_predict_layers:
            # h: the hidden state after the final norm, the MTP module's input.
            mtp = self.model.layers[self.cfg.num_hidden_layers]
            mtp_logits = mtp(ids[:, 1:], h[:, :-1], cos[:-1], sin[:-1], self.softmax_scale)
        return logits, mtp_logits
