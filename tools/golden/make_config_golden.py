#!/usr/bin/env python3
"""Writes config.json files as transformers 5 writes them, for the C++ config parser tests.

tests/golden/config/deepseek_v3_transformers.json: the DeepSeek-V3 config loaded by
  transformers' DeepseekV3Config and saved again (rope_parameters, dtype, ...).
tests/golden/config/tiny_transformers.json: a small config built by DeepseekV3Config itself
  (no q compression, yarn rope scaling given in transformers' own spelling).
Run: .venv/bin/python tools/golden/make_config_golden.py  (from the repository root)
"""
import os
import tempfile

from transformers import DeepseekV3Config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "golden", "config")


def save(config, name):
    with tempfile.TemporaryDirectory() as tmp:
        config.save_pretrained(tmp)
        with open(os.path.join(tmp, "config.json")) as f:
            text = f.read()
    with open(os.path.join(OUT, name), "w") as f:
        f.write(text)


def main():
    os.makedirs(OUT, exist_ok=True)
    v3 = DeepseekV3Config.from_pretrained(os.path.join(ROOT, "tests", "data", "reference", "deepseek-v3"))
    save(v3, "deepseek_v3_transformers.json")
    tiny = DeepseekV3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=8, routed_scaling_factor=2.5, kv_lora_rank=32, q_lora_rank=None,
        qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16, n_group=4, topk_group=2,
        num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=True,
        max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 512, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.707},
    )
    save(tiny, "tiny_transformers.json")


if __name__ == "__main__":
    main()
