#!/usr/bin/env python3
"""Writes the seed corpora of the safetensors fuzzers (tests/fuzz/corpus/<target>).

safetensors_header: 8 bytes little-endian data-section size followed by header JSON: the
  headers of the golden files written by Python's safetensors library, plus hand-made near
  misses (overlaps, bad offsets, odd numbers, deep nesting, unknown dtypes).
safetensors_file: the golden files themselves.
Run: python3 tools/golden/make_fuzz_corpus.py  (from the repository root)
"""
import glob
import os
import shutil
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fuzz", "corpus", "safetensors_header")
FILE_OUT = os.path.join(ROOT, "tests", "fuzz", "corpus", "safetensors_file")


def seed(name, data_size, header):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(struct.pack("<Q", data_size) + header.encode())


def main():
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(FILE_OUT, exist_ok=True)
    golden = sorted(glob.glob(os.path.join(ROOT, "tests", "golden", "safetensors", "**", "*.safetensors"),
                              recursive=True))
    for i, path in enumerate(golden):
        shutil.copyfile(path, os.path.join(FILE_OUT, f"golden{i}"))
        raw = open(path, "rb").read()
        (n,) = struct.unpack("<Q", raw[:8])
        seed(f"golden{i}", len(raw) - 8 - n, raw[8:8 + n].decode())
    w = '"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}'
    seed("valid", 16, "{" + w + "}")
    seed("metadata", 16, '{"__metadata__": {"format": "pt"}, ' + w + "}")
    seed("overlap", 24, '{"a": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}, '
                        '"b": {"dtype": "I64", "shape": [2], "data_offsets": [4, 20]}}')
    seed("past_end", 8, "{" + w + "}")
    seed("empty_tensor", 0, '{"e": {"dtype": "F8_E4M3", "shape": [0, 5], "data_offsets": [0, 0]}}')
    seed("scalar", 4, '{"s": {"dtype": "I32", "shape": [], "data_offsets": [0, 4]}}')
    seed("big_numbers", 2**63, '{"w": {"dtype": "F16", "shape": [18446744073709551615, 2], '
                               '"data_offsets": [0, 1e30]}}')
    seed("unknown_dtype", 16, '{"w": {"dtype": "F64", "shape": [2], "data_offsets": [0, 16]}}')
    seed("nested", 0, "[" * 64 + "]" * 64)
    seed("duplicate", 16, "{" + w + ", " + w + "}")


if __name__ == "__main__":
    main()
