#!/usr/bin/env python3
"""Trains ExpertMesh's bundled tiny DeepSeek-V3 (tools/train/model.py) on data/corpus.

Objective: next-token cross-entropy + mtp_weight * the MTP module's cross-entropy on t[i+2]
+ balance_alpha * DeepSeek-V3's sequence-wise balance loss. Expert balance is kept mainly by
the auxiliary-loss-free rule: after every step each MoE layer's e_score_correction_bias is
nudged by -bias_gamma for overloaded experts and +bias_gamma for underloaded ones.

Documents (separated by an empty line in the corpus) are tokenized as
[bos] document [eos] and concatenated; a batch is batch_size random windows of seq_len + 1
tokens. Float32, fixed seed, 2 CPU threads by default (the build shares the cores).

Writes to --out: ckpt.pt (state_dict, config, step; every --ckpt-every steps and at the end),
the token cache, and train.log. The loss curve goes to --log-csv.

  .venv/bin/python tools/train/train.py --minutes 55      # see tools/train/README.md
"""

import argparse
import csv
import json
import math
import os
import sys
import time

# Other jobs share this machine's two cores: OpenMP threads that spin while waiting for a
# preempted sibling slow every step severalfold (measured 9.8 s/step vs 3.6 s/step passive).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import DeepseekV3Tiny, TinyConfig  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", default=os.path.join(ROOT, "tools/train/tiny_arch.json"))
    p.add_argument("--tokenizer-dir", default=os.path.join(ROOT, "models/expertmesh-tiny"))
    p.add_argument("--data", default=os.path.join(ROOT, "data/corpus"))
    p.add_argument("--out", default=os.path.join(ROOT, "build/trainer/run"))
    p.add_argument("--log-csv",
                   default=os.path.join(ROOT, "models/expertmesh-tiny/training_log.csv"))
    p.add_argument("--steps", type=int, default=1600, help="steps (unless --minutes)")
    p.add_argument("--minutes", type=float, default=0,
                   help="train for this wall time instead: the LR schedule follows elapsed time")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--mtp-weight", type=float, default=0.3)
    p.add_argument("--balance-alpha", type=float, default=1e-4)
    # DeepSeek-V3 used 1e-3 over a long run; with a few hundred steps 1e-3 cannot undo early
    # collapse (measured max/mean load 3.9 of at most 4.0 at step 30), 1e-2 can.
    p.add_argument("--bias-gamma", type=float, default=1e-2)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--ckpt-every", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--measure", type=int, default=0, help="time this many steps, print, exit")
    return p.parse_args()


# ----------------------------------------------------------------------------------------------
# Data


def special_ids(tokenizer_dir, tok):
    """bos/eos ids from tokenizer_config.json (their token strings), as the served model uses."""
    with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
        tc = json.load(f)

    def token_id(entry):
        text = entry["content"] if isinstance(entry, dict) else entry
        i = tok.token_to_id(text)
        if i is None:
            sys.exit(f"tokenizer.json has no token {text!r}")
        return i

    return token_id(tc["bos_token"]), token_id(tc["eos_token"])


def load_tokens(split, args, tok, bos, eos):
    """The split as one uint16/int32 array [bos] doc [eos] ..., cached in --out."""
    cache = os.path.join(args.out, f"{split}.tokens.npy")
    src = os.path.join(args.data, f"{split}.txt")
    tok_path = os.path.join(args.tokenizer_dir, "tokenizer.json")
    if os.path.exists(cache) and os.path.getmtime(cache) > max(
        os.path.getmtime(src), os.path.getmtime(tok_path)
    ):
        return np.load(cache)
    with open(src, encoding="utf-8") as f:
        docs = [d for d in f.read().split("\n\n") if d.strip()]
    ids = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.append(bos)
        ids.extend(enc.ids)
        ids.append(eos)
    arr = np.asarray(ids, dtype=np.uint16 if tok.get_vocab_size() < 65536 else np.int32)
    np.save(cache, arr)
    return arr


def batch_at(tokens, starts, seq_len):
    """[B, seq_len + 1] int64 windows starting at `starts`."""
    idx = np.asarray(starts)[:, None] + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


# ----------------------------------------------------------------------------------------------
# Training


def losses(model, batch, cfg):
    """batch: [B, T + 1] -> (main CE, MTP CE) averaged over positions."""
    inp, tgt = batch[:, :-1], batch[:, 1:]
    logits, mtp_logits = model(inp)
    main = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), tgt.reshape(-1))
    # MTP position i (0 <= i < T - 1) reads t[i+1] and h[i], predicts t[i+2] = tgt[:, i + 1].
    mtp = F.cross_entropy(mtp_logits.reshape(-1, cfg.vocab_size), tgt[:, 1:].reshape(-1))
    return main, mtp


@torch.no_grad()
def update_expert_bias(model, gamma):
    """Auxiliary-loss-free balancing: bias += gamma * sign(mean load - load), per MoE layer.

    Returns per layer the step's max/mean load (1.0 = perfectly balanced).
    """
    imbalance = []
    for moe in model.moe_layers():
        E = moe.cfg.n_routed_experts
        load = torch.bincount(moe.last_topk_idx.reshape(-1), minlength=E).float()
        moe.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load)
        imbalance.append((load.max() / load.mean()).item())
    return imbalance


@torch.no_grad()
def evaluate(model, tokens, args, cfg):
    model.eval()
    g = np.random.default_rng(1234)  # the same windows every time
    main_sum = mtp_sum = 0.0
    for _ in range(args.eval_batches):
        starts = g.integers(0, len(tokens) - args.seq_len - 1, size=args.batch_size)
        main, mtp = losses(model, batch_at(tokens, starts, args.seq_len), cfg)
        main_sum += main.item()
        mtp_sum += mtp.item()
    model.train()
    return main_sum / args.eval_batches, mtp_sum / args.eval_batches


def lr_at(step, progress, args):
    """Linear warmup over --warmup steps, then cosine decay to min_lr_ratio over progress 0..1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, progress)
    cosine = 0.5 * (1 + math.cos(math.pi * t))
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine)


def save_checkpoint(model, cfg_dict, step, args):
    tmp = os.path.join(args.out, "ckpt.pt.tmp")
    torch.save({"state_dict": model.state_dict(), "config": cfg_dict, "step": step}, tmp)
    os.replace(tmp, os.path.join(args.out, "ckpt.pt"))


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(args.tokenizer_dir, "tokenizer.json"))
    bos, eos = special_ids(args.tokenizer_dir, tok)
    with open(args.arch) as f:
        cfg_dict = json.load(f)
    cfg_dict.update(vocab_size=tok.get_vocab_size(), bos_token_id=bos, eos_token_id=eos)
    cfg = TinyConfig.from_dict(cfg_dict)

    t0 = time.time()
    train_tokens = load_tokens("train", args, tok, bos, eos)
    valid_tokens = load_tokens("valid", args, tok, bos, eos)
    print(f"tokens: train {len(train_tokens)}, valid {len(valid_tokens)} "
          f"({time.time() - t0:.0f}s)", flush=True)

    model = DeepseekV3Tiny(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params / 1e6:.2f}M (embeddings and head shared with MTP)", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    rng = np.random.default_rng(args.seed)

    log_f = None
    if not args.measure:
        os.makedirs(os.path.dirname(args.log_csv), exist_ok=True)
        log_f = open(args.log_csv, "w", newline="")
        log = csv.writer(log_f)
        log.writerow(["step", "tokens", "elapsed_s", "lr", "train_loss", "train_mtp_loss",
                      "balance_loss", "max_over_mean_load", "valid_loss", "valid_mtp_loss"])
    model.train()
    t_start = time.time()
    tokens_per_step = args.batch_size * args.seq_len
    steps = args.measure or args.steps
    budget_s = args.minutes * 60 if (args.minutes and not args.measure) else 0
    step = 0
    while True:
        elapsed = time.time() - t_start
        progress = elapsed / budget_s if budget_s else step / steps
        lr = lr_at(step, progress, args)
        for group in opt.param_groups:
            group["lr"] = lr
        starts = rng.integers(0, len(train_tokens) - args.seq_len - 1, size=args.batch_size)
        main, mtp = losses(model, batch_at(train_tokens, starts, args.seq_len), cfg)
        balance = sum(moe.last_balance_loss for moe in model.moe_layers())
        loss = main + args.mtp_weight * mtp + args.balance_alpha * balance
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        imbalance = update_expert_bias(model, args.bias_gamma)
        elapsed = time.time() - t_start
        if args.measure:
            print(f"step {step}: {elapsed / (step + 1):.2f} s/step, loss {main.item():.3f}",
                  flush=True)
            step += 1
            if step == steps:
                break
            continue
        last = (elapsed >= budget_s) if budget_s else step == steps - 1
        v_main = v_mtp = ""
        if step % args.eval_every == 0 or last:
            v_main, v_mtp = evaluate(model, valid_tokens, args, cfg)
        log.writerow([step, (step + 1) * tokens_per_step, f"{elapsed:.1f}", f"{lr:.6f}",
                      f"{main.item():.4f}", f"{mtp.item():.4f}", f"{balance.item():.4f}",
                      f"{max(imbalance):.3f}",
                      f"{v_main:.4f}" if v_main != "" else "",
                      f"{v_mtp:.4f}" if v_mtp != "" else ""])
        log_f.flush()
        if step % 10 == 0 or v_main != "":
            msg = (f"step {step} lr {lr:.2e} loss {main.item():.3f} mtp {mtp.item():.3f} "
                   f"bal {balance.item():.3f} load max/mean {max(imbalance):.2f} "
                   f"{elapsed / (step + 1):.2f}s/step")
            if v_main != "":
                msg += f" | valid {v_main:.3f} mtp {v_mtp:.3f}"
            print(msg, flush=True)
        if (step + 1) % args.ckpt_every == 0 or last:
            save_checkpoint(model, cfg_dict, step + 1, args)
        step += 1
        if last:
            break
    if log_f:
        log_f.close()
        print(f"done: {step} steps in {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
