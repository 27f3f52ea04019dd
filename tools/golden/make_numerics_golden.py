#!/usr/bin/env python3
"""Writes the numerics golden files from PyTorch, the independent implementation.

tests/golden/fp8_e4m3.json: float8_e4m3fn decode of all 256 codes, and torch's encoding of
  every midpoint between adjacent codes, each midpoint +- 1 float32 ulp, every code's own
  value, special values (0, -0, +-inf, NaN, 448..480, huge, float32 subnormals) and seeded
  random floats over the whole range.
tests/golden/bf16_fp16.json: torch's float32 -> bfloat16 / float16 encodings of midpoints
  (+- 1 ulp) across the exponent range, subnormals, overflow boundaries and random floats;
  float16 decodes of a spread of codes.

Every float is stored as its float32 bit pattern (an integer) so the files are exact.
Run: .venv/bin/python tools/golden/make_numerics_golden.py  (from the repository root)
"""
import json
import os
import struct

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT_DIR = os.path.join(ROOT, "tests", "golden")


def f32_bits(values):
    return np.asarray(values, dtype=np.float32).view(np.uint32).tolist()


def with_neighbours(values):
    """values and their float32 neighbours one ulp below and above."""
    v = np.asarray(values, dtype=np.float32)
    down = np.nextafter(v, np.float32(-np.inf))
    up = np.nextafter(v, np.float32(np.inf))
    return np.concatenate([v, down, up])


def both_signs(values):
    v = np.asarray(values, dtype=np.float32)
    return np.concatenate([v, -v])


def specials():
    return np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e30, -1e30, 3.4e38,
                     np.float32(1e-45), np.float32(1e-40), np.float32(1.1754942e-38)],
                    dtype=np.float32)


def unique_bits(values):
    bits = np.unique(np.asarray(values, dtype=np.float32).view(np.uint32))
    return bits.view(np.float32)


def encode(values, dtype, view):
    x = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    return x.to(dtype).view(view).numpy().astype(np.int64) & (0xFF if view == torch.uint8 else 0xFFFF)


def fp8_golden(rng):
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    decoded = codes.view(torch.float8_e4m3fn).to(torch.float32).numpy()
    finite = np.sort(decoded[:0x7F])  # positive finite codes 0x00..0x7E, ascending
    midpoints = (finite[:-1].astype(np.float64) + finite[1:]) / 2  # exact in float32
    beyond = np.array([448.0, 456.0, 464.0, 472.0, 480.0, 500.0, 1024.0], dtype=np.float32)
    random = np.concatenate([
        rng.standard_normal(1000) * 10.0 ** rng.uniform(-4, 2.8, 1000),  # across binades
        rng.uniform(-2.0 ** -6, 2.0 ** -6, 300),                        # subnormal range
        rng.uniform(-600, 600, 300),                                    # saturation range
    ]).astype(np.float32)
    inputs = unique_bits(np.concatenate([
        both_signs(with_neighbours(midpoints)),
        both_signs(with_neighbours(finite)),
        both_signs(with_neighbours(beyond)),
        specials(), random]))
    out = encode(inputs, torch.float8_e4m3fn, torch.uint8)
    return {
        "decode_f32_bits": f32_bits(decoded),
        "encode": [[b, int(c)] for b, c in zip(f32_bits(inputs), out)],
    }


def midpoints_of(dtype, view, n_per_binade, rng, lo_exp, hi_exp):
    """Midpoints between adjacent representable values of dtype over [2^lo_exp, 2^hi_exp]."""
    vals = []
    for e in range(lo_exp, hi_exp):
        x = (2.0 ** e) * (1 + rng.random(n_per_binade))
        v = torch.from_numpy(x.astype(np.float32)).to(dtype)
        nxt = torch.nextafter(v, torch.full_like(v, float("inf")))
        vals.append(((v.to(torch.float64) + nxt.to(torch.float64)) / 2).numpy())
    return np.concatenate(vals)


def half_golden(rng):
    result = {}
    for name, dtype, lo, hi, edges in [
        ("bf16", torch.bfloat16, -133, 127, [3.3895314e38, 3.3961776e38, 1.17549435e-38, 9.2e-41]),
        ("fp16", torch.float16, -24, 16, [65504.0, 65519.0, 65520.0, 65536.0, 6.1035156e-05,
                                          5.9604645e-08, 2.9802322e-08, 8.940697e-08]),
    ]:
        mids = midpoints_of(dtype, torch.int16, 2, rng, lo, hi).astype(np.float32)
        random = (rng.standard_normal(300) * 10.0 ** rng.uniform(-8, 8, 300)).astype(np.float32)
        inputs = unique_bits(np.concatenate([
            both_signs(with_neighbours(mids)), both_signs(with_neighbours(edges)),
            specials()[:4], random]))  # NaN payloads differ between torch paths: tested apart
        out = encode(inputs, dtype, torch.int16)
        result[name] = {"encode": [[b, int(c)] for b, c in zip(f32_bits(inputs), out)]}
    codes = np.unique(np.concatenate([np.arange(0, 65536, 97), np.arange(0, 40), np.arange(0x3F0, 0x410),
                                      np.arange(0x7BF0, 0x7C10), np.arange(0xFBF0, 0xFC10)]))
    decoded = torch.from_numpy(codes.astype(np.int32)).to(torch.int16).view(torch.float16).to(torch.float32)
    result["fp16"]["decode"] = [[int(c), b] for c, b in zip(codes, f32_bits(decoded.numpy()))]
    return result


def main():
    rng = np.random.default_rng(20240601)
    os.makedirs(OUT_DIR, exist_ok=True)
    header = {"generator": "tools/golden/make_numerics_golden.py", "torch": torch.__version__}
    with open(os.path.join(OUT_DIR, "fp8_e4m3.json"), "w") as f:
        json.dump({**header, **fp8_golden(rng)}, f, separators=(",", ":"))
        f.write("\n")
    with open(os.path.join(OUT_DIR, "bf16_fp16.json"), "w") as f:
        json.dump({**header, **half_golden(rng)}, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
