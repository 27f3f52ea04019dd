#!/usr/bin/env python3
"""Golden outputs of the reference engine's oracle: Hugging Face transformers' DeepSeek-V3.

Loads a checkpoint written by expertmesh-make-checkpoint (HF layout, FP8 blocks with
weight_scale_inv) into transformers' DeepseekV3ForCausalLM in float32 -- the FP8 weights
dequantized here, block by block -- and writes JSON with, per prompt: logits at several
positions of a full-prompt forward, 16 greedy tokens (each step a full forward, no cache) and
the logits of the last greedy step. transformers has no multi-token-prediction module, so a
short PyTorch one (below) computes the MTP logits when the config has num_nextn_predict_layers.

Usage: make_engine_goldens.py --checkpoint DIR --out FILE.json [--seed N]
"""
import argparse
import json
import os

import torch
from safetensors import safe_open
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3DecoderLayer,
    DeepseekV3RMSNorm,
)

GREEDY_TOKENS = 16
ACT_QUANT_GROUP = 128
ACT_QUANT_MIN_AMAX = 1e-4  # core/numerics/quant.h kActQuantMinAmax (DeepSeek's act_quant floor)


def act_quant(x):
    """What an FP8 GEMM sees of its input: per row, per 128 channels (the last group ragged),
    scale = max(amax, 1e-4) / 448, x ~= fp8(x / scale) * scale."""
    dim = x.shape[-1]
    out = torch.empty_like(x)
    for c0 in range(0, dim, ACT_QUANT_GROUP):
        g = x[..., c0:c0 + ACT_QUANT_GROUP]
        amax = g.abs().amax(dim=-1, keepdim=True).clamp(min=ACT_QUANT_MIN_AMAX)
        scale = amax / 448.0
        out[..., c0:c0 + ACT_QUANT_GROUP] = (g / scale).to(torch.float8_e4m3fn).to(torch.float32) * scale
    return out


def fp8_module_paths(ckpt_dir, prefix_map):
    """Module paths of the FP8 weights (those with a weight_scale_inv in the index)."""
    with open(os.path.join(ckpt_dir, "model.safetensors.index.json")) as f:
        names = json.load(f)["weight_map"].keys()
    paths = set()
    for n in names:
        if n.endswith(".weight_scale_inv") and ".mlp.experts." not in n:
            path = n[: -len(".weight_scale_inv")]
            for old, new in prefix_map:
                if path.startswith(old):
                    path = new + path[len(old):]
            paths.add(path)
    return paths


def experts_forward_act_quant(self, hidden_states, top_k_index, top_k_weights):
    """DeepseekV3Experts.forward with FP8 activation quantization: the input quantized once,
    the intermediate quantized before down_proj; experts summed in ascending id order."""
    x = act_quant(hidden_states)
    out = torch.zeros_like(hidden_states)
    for e in sorted(set(top_k_index.flatten().tolist())):
        token_idx, k_pos = torch.where(top_k_index == e)
        gate, up = torch.nn.functional.linear(x[token_idx], self.gate_up_proj[e]).chunk(2, dim=-1)
        h = act_quant(self.act_fn(gate) * up)
        y = torch.nn.functional.linear(h, self.down_proj[e]) * top_k_weights[token_idx, k_pos, None]
        out.index_add_(0, token_idx, y)
    return out


def enable_act_quant(module, fp8_paths):
    """Hooks: every FP8 Linear fake-quantizes its input; routed experts as above."""
    handles = []
    for name, sub in module.named_modules():
        if name in fp8_paths:
            assert isinstance(sub, torch.nn.Linear), name
            handles.append(sub.register_forward_pre_hook(lambda m, inp: (act_quant(inp[0]),)))
        if type(sub).__name__ == "DeepseekV3Experts":
            sub.forward = experts_forward_act_quant.__get__(sub)
    return handles


def rounded(values):
    """7 significant digits: below the engines' float differences, and half the file size."""
    return [float("%.7g" % v) for v in values]


def load_float_tensors(ckpt_dir):
    """All tensors as float32; FP8 weights times their weight_scale_inv per block."""
    with open(os.path.join(ckpt_dir, "model.safetensors.index.json")) as f:
        weight_map = json.load(f)["weight_map"]
    with open(os.path.join(ckpt_dir, "config.json")) as f:
        block_rows, block_cols = json.load(f)["quantization_config"]["weight_block_size"]
    raw = {}
    for shard in sorted(set(weight_map.values())):
        with safe_open(os.path.join(ckpt_dir, shard), framework="pt") as f:
            for name in f.keys():
                raw[name] = f.get_tensor(name)
    out = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        scale_name = name + "_scale_inv"
        if scale_name in raw:
            assert t.dtype == torch.float8_e4m3fn, name
            s = raw[scale_name]
            rows, cols = t.shape
            s_full = s.repeat_interleave(block_rows, 0).repeat_interleave(block_cols, 1)
            out[name] = t.to(torch.float32) * s_full[:rows, :cols]
        else:
            out[name] = t.to(torch.float32)
    return out


def hf_state_dict(tensors, config, layers=None):
    """Checkpoint names -> transformers' names (routed experts stacked per layer) for the
    given layers (default: the main model's, without the MTP layers)."""
    if layers is None:
        layers = range(config.num_hidden_layers)
    sd = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if parts[0] == "model" and parts[1] == "layers" and int(parts[2]) not in layers:
            continue
        if ".mlp.experts." in name:
            continue
        sd[name] = t
    for layer in layers:
        if layer < config.first_k_dense_replace:
            continue
        p = f"model.layers.{layer}.mlp.experts."
        gate_up, down = [], []
        for e in range(config.n_routed_experts):
            gate_up.append(torch.cat([tensors[f"{p}{e}.gate_proj.weight"],
                                      tensors[f"{p}{e}.up_proj.weight"]], dim=0))
            down.append(tensors[f"{p}{e}.down_proj.weight"])
        sd[p + "gate_up_proj"] = torch.stack(gate_up)
        sd[p + "down_proj"] = torch.stack(down)
    return sd


class MultiTokenPrediction(torch.nn.Module):
    """model.layers.{N}: x_i = eh_proj(cat(enorm(embed(t[i+1])), hnorm(h[i]))), h[i] the main
    model's hidden state after the final norm -- embedding first, as vLLM and SGLang load
    DeepSeek's weights -- then a decoder layer with its own
    attention over the MTP positions, then shared_head.norm and shared_head.head."""

    def __init__(self, config, layer_idx):
        super().__init__()
        h = config.hidden_size
        self.embed_tokens = torch.nn.Embedding(config.vocab_size, h)
        self.enorm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)
        self.hnorm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)
        self.eh_proj = torch.nn.Linear(2 * h, h, bias=False)
        self.block = DeepseekV3DecoderLayer(config, layer_idx)
        self.shared_head_norm = DeepseekV3RMSNorm(h, eps=config.rms_norm_eps)
        self.shared_head_head = torch.nn.Linear(h, config.vocab_size, bias=False)

    def load(self, tensors, layer_idx, config):
        p = f"model.layers.{layer_idx}."
        sd = {
            "embed_tokens.weight": tensors[p + "embed_tokens.weight"],
            "enorm.weight": tensors[p + "enorm.weight"],
            "hnorm.weight": tensors[p + "hnorm.weight"],
            "eh_proj.weight": tensors[p + "eh_proj.weight"],
            "shared_head_norm.weight": tensors[p + "shared_head.norm.weight"],
            "shared_head_head.weight": tensors[p + "shared_head.head.weight"],
        }
        # The block's tensors, named as hf_state_dict names a main layer's.
        block_sd = hf_state_dict(tensors, config, layers=[layer_idx])
        for k, v in block_sd.items():
            rest = k[len(p):]
            if k.startswith(p) and rest.split(".")[0] in ("self_attn", "mlp", "input_layernorm",
                                      "post_attention_layernorm"):
                sd["block." + rest] = v
        self.load_state_dict(sd, strict=True)

    def forward(self, next_tokens, hidden, position_embeddings):
        n = next_tokens.shape[1]
        x = self.eh_proj(torch.cat([self.enorm(self.embed_tokens(next_tokens)),
                                    self.hnorm(hidden)], dim=-1))
        mask = torch.full((n, n), float("-inf")).triu(1)[None, None]
        x = self.block(x, attention_mask=mask, position_embeddings=position_embeddings)
        return self.shared_head_head(self.shared_head_norm(x))


def run_prompt(model, mtp, captured, tokens):
    config = model.config
    length = len(tokens)
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0]
        hidden = captured["h"][0]
        positions = sorted({0, length // 3, (2 * length) // 3, length - 1})
        entry = {
            "tokens": tokens,
            "positions": positions,
            "logits": [rounded(logits[p].tolist()) for p in positions],
        }
        if mtp is not None:
            pos = torch.arange(length - 1)[None]
            pe = model.model.rotary_emb(hidden[None], pos)
            mtp_logits = mtp(torch.tensor([tokens[1:]]), hidden[None, :-1], pe)[0]
            entry["mtp_positions"] = [p for p in positions if p < length - 1]
            entry["mtp_logits"] = [rounded(mtp_logits[p].tolist()) for p in entry["mtp_positions"]]
        seq = list(tokens)
        greedy = []
        for _ in range(GREEDY_TOKENS):
            step_logits = model(torch.tensor([seq])).logits[0, -1]
            nxt = int(torch.argmax(step_logits))
            greedy.append(nxt)
            seq.append(nxt)
        entry["greedy"] = greedy
        # Logits after the last greedy token was appended (a decode step in the engine).
        entry["final_logits"] = rounded(model(torch.tensor([seq])).logits[0, -1].tolist())
    return entry


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with open(os.path.join(args.checkpoint, "config.json")) as f:
        cfg = json.load(f)
    cfg.pop("quantization_config", None)
    config = DeepseekV3Config(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(args.seed)
    model = DeepseekV3ForCausalLM(config).eval()
    tensors = load_float_tensors(args.checkpoint)
    model.load_state_dict(hf_state_dict(tensors, config), strict=True)

    mtp = None
    if config.num_nextn_predict_layers > 0:
        mtp = MultiTokenPrediction(config, config.num_hidden_layers).eval()
        mtp.load(tensors, config.num_hidden_layers, config)

    # The hidden state after the final norm (model.norm's output): the MTP module's input, as
    # vLLM, SGLang and TensorRT-LLM feed DeepSeek's released weights.
    captured = {}
    model.model.norm.register_forward_hook(lambda mod, inp, out: captured.update(h=out))

    gen = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(2, config.vocab_size, (length,), generator=gen).tolist()
               for length in (5, 12, 23)]
    entries = [run_prompt(model, mtp, captured, tokens) for tokens in prompts]
    # The same with FP8 activation quantization (as DeepSeek serves and the engine's default).
    fp8_paths = fp8_module_paths(args.checkpoint, [])
    enable_act_quant(model, fp8_paths)
    if mtp is not None:
        n = config.num_hidden_layers
        enable_act_quant(mtp, fp8_module_paths(args.checkpoint, [(f"model.layers.{n}.", "block.")]))
    for entry, tokens in zip(entries, prompts):
        entry["act_quant"] = run_prompt(model, mtp, captured, tokens)
        del entry["act_quant"]["tokens"]

    golden = {
        "checkpoint": os.path.basename(os.path.normpath(args.checkpoint)),
        "generator": "tools/golden/make_engine_goldens.py (transformers DeepseekV3ForCausalLM, "
                     "float32, eager attention; FP8 weights dequantized with weight_scale_inv)",
        "vocab_size": config.vocab_size,
        "prompts": entries,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(golden, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
