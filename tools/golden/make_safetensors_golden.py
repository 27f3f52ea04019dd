#!/usr/bin/env python3
"""Writes small safetensors files with Python's safetensors library, for the C++ reader tests.

tests/golden/safetensors/tiny.safetensors: one tensor per dtype the reader supports (F32, F16,
  BF16, F8_E4M3, I32, I64), a scalar, an empty tensor and __metadata__.
tests/golden/safetensors/sharded/: the same tensors split over two files plus
  model.safetensors.index.json, as Hugging Face checkpoints are laid out.
tests/golden/safetensors/expected.json: per tensor its dtype, shape and raw bytes (hex).
Run: .venv/bin/python tools/golden/make_safetensors_golden.py  (from the repository root)
"""
import json
import os

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "golden", "safetensors")

DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.float8_e4m3fn: "F8_E4M3", torch.int32: "I32", torch.int64: "I64"}


def tensors():
    g = torch.Generator().manual_seed(20240601)
    weight = torch.randn(5, 7, generator=g) * 3
    return {
        "model.embed_tokens.weight": torch.randn(6, 4, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": weight.to(torch.float8_e4m3fn),
        "model.layers.0.mlp.down_proj.weight_scale_inv": torch.tensor([[0.5, 0.25]]),
        "model.layers.0.input_layernorm.weight": torch.randn(4, generator=g),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(3, 2, 2, generator=g).to(torch.float16),
        "model.layers.0.mlp.gate.e_score_correction_bias": torch.tensor(1.5),  # a scalar
        "token_ids": torch.tensor([0, -1, 2**31 - 1, -2**31], dtype=torch.int32),
        "positions": torch.tensor([[0, 2**40], [-7, 2**62]], dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }


def main():
    os.makedirs(os.path.join(OUT, "sharded"), exist_ok=True)
    ts = tensors()
    # One metadata key only: the library writes metadata keys in no fixed order.
    save_file(ts, os.path.join(OUT, "tiny.safetensors"), metadata={"format": "pt"})
    names = list(ts)
    shards = {"model-00001-of-00002.safetensors": names[:4],
              "model-00002-of-00002.safetensors": names[4:]}
    weight_map = {}
    for file, members in shards.items():
        save_file({n: ts[n] for n in members}, os.path.join(OUT, "sharded", file),
                  metadata={"format": "pt"})
        weight_map.update({n: file for n in members})
    total = sum(t.numel() * t.element_size() for t in ts.values())
    with open(os.path.join(OUT, "sharded", "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    expected = {n: {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                    "hex": t.contiguous().view(torch.uint8).numpy().tobytes().hex()
                    if t.dim() > 0 else t.reshape(1).view(torch.uint8).numpy().tobytes().hex()}
                for n, t in ts.items()}
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"generator": "tools/golden/make_safetensors_golden.py", "tensors": expected},
                  f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
