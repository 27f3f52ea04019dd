#!/usr/bin/env python3
"""Exports a tools/train/train.py checkpoint in DeepSeek-V3's Hugging Face layout.

Two directories from the same weights:
  models/expertmesh-tiny/       FP8, as DeepSeek ships V3/R1: every attention / dense-MLP /
                                shared- and routed-expert *_proj weight is float8_e4m3fn in
                                128x128 blocks with a float32 `<name>_scale_inv` beside it
                                (W ~= fp8 * scale_inv, scale_inv = block amax / 448, ragged
                                edge blocks); embeddings, norms, gate, lm_head, the MTP
                                eh_proj BF16; e_score_correction_bias float32.
                                config.json carries quantization_config.
  models/expertmesh-tiny-bf16/  everything BF16 (bias float32), no quantization_config, so
                                FP8 vs BF16 perplexity can be measured. To stay within the
                                repository's size budget it omits the MTP layer's copies of
                                embed_tokens and shared_head.head (equal to model.embed_tokens
                                and lm_head; loaders accept either form).
Both: sharded model-0000i-of-0000n.safetensors + model.safetensors.index.json, config.json,
generation_config.json and the tokenizer files (copied from the FP8 directory, where the
tokenizer tools write them).

  .venv/bin/python tools/train/export.py --ckpt build/trainer/run/ckpt.pt
"""

import argparse
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BLOCK = 128
FP8_MAX = 448.0
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def hf_config(cfg, quantized):
    """config.json with every field DeepSeek-V3's own config.json has (same order)."""
    c = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "aux_loss_alpha": cfg.get("aux_loss_alpha", 0.0001),
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "ep_size": 1,
        "first_k_dense_replace": cfg["first_k_dense_replace"],
        "hidden_act": "silu",
        "hidden_size": cfg["hidden_size"],
        "initializer_range": cfg["initializer_range"],
        "intermediate_size": cfg["intermediate_size"],
        "kv_lora_rank": cfg["kv_lora_rank"],
        "max_position_embeddings": cfg["max_position_embeddings"],
        "model_type": "deepseek_v3",
        "moe_intermediate_size": cfg["moe_intermediate_size"],
        "moe_layer_freq": cfg["moe_layer_freq"],
        "n_group": cfg["n_group"],
        "n_routed_experts": cfg["n_routed_experts"],
        "n_shared_experts": cfg["n_shared_experts"],
        "norm_topk_prob": cfg["norm_topk_prob"],
        "num_attention_heads": cfg["num_attention_heads"],
        "num_experts_per_tok": cfg["num_experts_per_tok"],
        "num_hidden_layers": cfg["num_hidden_layers"],
        "num_key_value_heads": cfg["num_key_value_heads"],
        "num_nextn_predict_layers": cfg["num_nextn_predict_layers"],
        "pretraining_tp": 1,
        "q_lora_rank": cfg["q_lora_rank"],
        "qk_nope_head_dim": cfg["qk_nope_head_dim"],
        "qk_rope_head_dim": cfg["qk_rope_head_dim"],
    }
    if quantized:
        c["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [BLOCK, BLOCK],
        }
    c.update({
        "rms_norm_eps": cfg["rms_norm_eps"],
        "rope_scaling": cfg["rope_scaling"] or None,
        "rope_theta": cfg["rope_theta"],
        "routed_scaling_factor": cfg["routed_scaling_factor"],
        "scoring_func": "sigmoid",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "topk_group": cfg["topk_group"],
        "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16",
        "transformers_version": "5.23.0",
        "use_cache": True,
        "v_head_dim": cfg["v_head_dim"],
        "vocab_size": cfg["vocab_size"],
    })
    return c


def generation_config(cfg):
    return {
        "_from_model_config": True,
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": cfg["eos_token_id"],
        "do_sample": True,
        "temperature": 0.6,
        "top_p": 0.95,
        "transformers_version": "5.23.0",
    }


def is_fp8_weight(name):
    """The *_proj weights DeepSeek ships in FP8 (the MTP eh_proj stays BF16, as vLLM loads it)."""
    return name.endswith("_proj.weight") and not name.endswith("eh_proj.weight")


def quantize_fp8_blocks(w):
    """w: [out, in] float32 -> (fp8 [out, in], scale_inv [ceil(out/128), ceil(in/128)] float32).

    scale_inv = amax / 448 per 128x128 block (edge blocks ragged); an all-zero block gets 1.
    """
    out_f, in_f = w.shape
    nb_o, nb_i = -(-out_f // BLOCK), -(-in_f // BLOCK)
    padded = torch.zeros(nb_o * BLOCK, nb_i * BLOCK, dtype=torch.float32)
    padded[:out_f, :in_f] = w.float()
    blocks = padded.view(nb_o, BLOCK, nb_i, BLOCK)
    amax = blocks.abs().amax(dim=(1, 3))  # [nb_o, nb_i]
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.view(nb_o * BLOCK, nb_i * BLOCK)[:out_f, :in_f].to(torch.float8_e4m3fn)
    return q.contiguous(), scale_inv.contiguous()


def dequantize_fp8_blocks(q, scale_inv):
    out_f, in_f = q.shape
    s = scale_inv.repeat_interleave(BLOCK, 0)[:out_f].repeat_interleave(BLOCK, 1)[:, :in_f]
    return q.float() * s


def shard_of(name, cfg):
    """Three shards: embeddings + first half of the layers, the rest, MTP layer + norm + head."""
    n = cfg["num_hidden_layers"]
    if name.startswith("model.layers."):
        layer = int(name.split(".")[2])
        if layer >= n:
            return 2
        return 0 if layer < (n + 1) // 2 else 1
    return 0 if name.startswith("model.embed_tokens") else 2


def export_tensors(state_dict, cfg, quantized):
    """-> {name: tensor} in the checkpoint's dtypes (FP8 + scale_inv when quantized)."""
    out = {}
    mtp_prefix = f"model.layers.{cfg['num_hidden_layers']}."
    for name, t in state_dict.items():
        if not quantized and name in (mtp_prefix + "embed_tokens.weight",
                                      mtp_prefix + "shared_head.head.weight"):
            continue
        t = t.detach().float().clone()
        if name.endswith("e_score_correction_bias"):
            out[name] = t.contiguous()
        elif quantized and is_fp8_weight(name):
            q, s = quantize_fp8_blocks(t)
            out[name] = q
            out[name[: -len("weight")] + "weight_scale_inv"] = s
        else:
            out[name] = t.to(torch.bfloat16).contiguous()
    return out


def write_model(out_dir, tensors, cfg, quantized, tokenizer_src):
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        if f.endswith(".safetensors") or f == "model.safetensors.index.json":
            os.remove(os.path.join(out_dir, f))
    n_shards = 3
    shards = [{} for _ in range(n_shards)]
    for name, t in tensors.items():
        shards[shard_of(name, cfg)][name] = t
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(dict(sorted(shard.items())), os.path.join(out_dir, fname),
                  metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(cfg, quantized), f, indent=2)
        f.write("\n")
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation_config(cfg), f, indent=2)
        f.write("\n")
    if tokenizer_src and os.path.abspath(tokenizer_src) != os.path.abspath(out_dir):
        for name in TOKENIZER_FILES:
            shutil.copyfile(os.path.join(tokenizer_src, name), os.path.join(out_dir, name))
    return total


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", default=os.path.join(ROOT, "build/trainer/run/ckpt.pt"))
    p.add_argument("--fp8-dir", default=os.path.join(ROOT, "models/expertmesh-tiny"))
    p.add_argument("--bf16-dir", default=os.path.join(ROOT, "models/expertmesh-tiny-bf16"))
    p.add_argument("--tokenizer-dir", default=os.path.join(ROOT, "models/expertmesh-tiny"),
                   help="where tokenizer.json and tokenizer_config.json are")
    args = p.parse_args()

    ckpt = torch.load(args.ckpt, map_location="cpu", weights_only=True)
    cfg, sd = ckpt["config"], ckpt["state_dict"]
    for name in TOKENIZER_FILES:
        if not os.path.exists(os.path.join(args.tokenizer_dir, name)):
            sys.exit(f"missing {name} in {args.tokenizer_dir}")
    tok_src = args.tokenizer_dir
    for out_dir, quantized in ((args.fp8_dir, True), (args.bf16_dir, False)):
        size = write_model(out_dir, export_tensors(sd, cfg, quantized), cfg, quantized, tok_src)
        print(f"{out_dir}: {size / 1e6:.1f} MB of tensors (step {ckpt['step']})")


if __name__ == "__main__":
    main()
