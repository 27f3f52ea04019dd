#!/usr/bin/env python3
"""The figures of `expertmesh eval` computed with PyTorch (tools/train/model.py), as a
cross-check of the C++ engine: perplexity over the same windows, the MTP module's
next-next-token top-1 on the text, its acceptance under greedy decoding, expert load.

Loads an exported directory (FP8 weights are dequantized with weight_scale_inv; activations
stay float, i.e. compare with `expertmesh eval --no-act-quant`). Documents, windows, prompts
and counting follow tools/cli/eval_command.cc exactly.

  .venv/bin/python tools/train/eval_reference.py --model models/expertmesh-tiny-bf16 \
      --text data/corpus/test.txt --max-tokens 8192
"""

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from export import dequantize_fp8_blocks  # noqa: E402
from model import DeepseekV3Tiny, TinyConfig  # noqa: E402


def load_model(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg_dict = json.load(f)
    with open(os.path.join(model_dir, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    raw = {}
    for name in files:
        raw.update(load_file(os.path.join(model_dir, name)))
    sd = {}
    for name, t in raw.items():
        if name.endswith("_scale_inv"):
            continue
        scale = raw.get(name + "_scale_inv")
        sd[name] = dequantize_fp8_blocks(t, scale) if scale is not None else t.float()
    model = DeepseekV3Tiny(TinyConfig.from_dict(cfg_dict))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    L = cfg_dict["num_hidden_layers"]
    shared = {f"model.layers.{L}.embed_tokens.weight", f"model.layers.{L}.shared_head.head.weight"}
    if set(missing) - shared or unexpected:
        sys.exit(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval(), cfg_dict


def tokenize(model_dir, text_path, bos, eos, max_tokens):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    with open(text_path, encoding="utf-8") as f:
        docs = [d for d in f.read().split("\n\n") if d.strip()]
    stream, starts = [], []
    for d in docs:
        starts.append(len(stream))
        stream += [bos] + tok.encode(d, add_special_tokens=False).ids + [eos]
        if max_tokens and len(stream) >= max_tokens:
            break
    return (stream[:max_tokens] if max_tokens else stream), starts


def mtp_logits(model, next_ids, h):
    """next_ids: [1, n]; h: [1, n, H] (after the final norm) -> [1, n, V]."""
    cos, sin = model.rope(next_ids.shape[1])
    mtp = model.model.layers[model.cfg.num_hidden_layers]
    return mtp(next_ids, h, cos, sin, model.softmax_scale)


def hidden_and_logits(model, ids):
    """ids: [1, n] -> (h after the final norm [1, n, H], logits [1, n, V])."""
    cos, sin = model.rope(ids.shape[1])
    x = model.model.embed_tokens(ids)
    for layer in model.model.layers[: model.cfg.num_hidden_layers]:
        x = layer(x, cos, sin, model.softmax_scale)
    h = model.model.norm(x)
    return h, model.lm_head(h)


@torch.no_grad()
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model, cfg = load_model(args.model)
    bos, eos = cfg["bos_token_id"], cfg["eos_token_id"]
    stream, starts = tokenize(args.model, args.text, bos, eos, args.max_tokens)
    E = cfg["n_routed_experts"]
    loads = {}
    nll, n_pred, mtp_ok, mtp_n, windows = 0.0, 0, 0, 0, 0
    for s in range(0, len(stream) - 1, args.context):
        w = torch.tensor(stream[s:s + args.context])[None]
        n = w.shape[1]
        h, logits = hidden_and_logits(model, w)
        nll += F.cross_entropy(logits[0, :-1], w[0, 1:], reduction="sum").item()
        n_pred += n - 1
        if n >= 3:
            ml = mtp_logits(model, w[:, 1:], h[:, :-1])
            mtp_ok += (ml[0, :-1].argmax(-1) == w[0, 2:]).sum().item()
            mtp_n += n - 2
        for i, layer in enumerate(model.model.layers):
            if hasattr(layer.mlp, "last_topk_idx") and layer.mlp.last_topk_idx is not None:
                c = torch.bincount(layer.mlp.last_topk_idx.reshape(-1), minlength=E)
                loads[i] = loads.get(i, torch.zeros(E, dtype=torch.long)) + c
                layer.mlp.last_topk_idx = None
        windows += 1
    print(f"perplexity: {math.exp(nll / n_pred):.4f} (mean NLL {nll / n_pred:.4f} nats/token "
          f"over {n_pred} tokens, {windows} windows)")
    print(f"mtp next-next-token top-1 on the text: {mtp_ok / max(1, mtp_n):.4f} "
          f"({mtp_ok} / {mtp_n})")
    print("routed-expert load over the text:")
    for i, c in sorted(loads.items()):
        mean = c.float().mean().item()
        print(f"  layer {i}{' (MTP)' if i >= cfg['num_hidden_layers'] else ''}: "
              f"max/mean {c.max().item() / mean:.3f}, min/mean {c.min().item() / mean:.3f}")

    drafted = accepted = used = 0
    bounds = starts[1:] + [len(stream)]
    for start, end in zip(starts, bounds):
        if used == args.prompts:
            break
        if end - start < args.prompt_tokens:
            continue
        seq = stream[start:start + args.prompt_tokens]
        h, logits = hidden_and_logits(model, torch.tensor(seq)[None])
        nxt = int(logits[0, -1].argmax())
        for _ in range(args.gen_tokens):
            if nxt == eos:
                break
            # Draft for the token after `nxt` from (nxt, h[last]); all MTP rows recomputed.
            ml = mtp_logits(model, torch.tensor(seq[1:] + [nxt])[None], h)
            draft = int(ml[0, -1].argmax())
            seq.append(nxt)
            h, logits = hidden_and_logits(model, torch.tensor(seq)[None])
            nxt = int(logits[0, -1].argmax())
            drafted += 1
            accepted += draft == nxt
        used += 1
    print(f"mtp acceptance under greedy decoding: {accepted / max(1, drafted):.4f} "
          f"({accepted} / {drafted} drafts; {used} prompts)")


if __name__ == "__main__":
    main()
