#!/usr/bin/env python3
"""Trains the byte-level BPE tokenizers ExpertMesh ships and tests against.

Two presets:
  deepseek  models/expertmesh-tiny/tokenizer.json + tokenizer_config.json: the bundled model's
            tokenizer. DeepSeek-V3's scheme: no normalizer; pre_tokenizer = Sequence of three
            Split regexes (digit runs of 1-3, CJK/kana runs, then words/punctuation/whitespace)
            + ByteLevel without its own regex; ByteLevel decoder; DeepSeek-V3's special tokens
            (<｜begin▁of▁sentence｜> = 0, <｜end▁of▁sentence｜> = 1, pad = 2, the chat and
            tool-call tokens) and its chat template, copied from DeepSeek-V3's own
            tokenizer_config.json.
  gpt4      tests/data/tokenizers/gpt4-style-1024/tokenizer.json: a second, deliberately
            different tokenizer for the C++ conformance tests: NFC normalizer, one GPT-4-style
            Split regex with look-ahead and case-insensitive contractions, a smaller vocabulary,
            merges in the older "a b" string format, and added tokens with lstrip / rstrip /
            normalized flags and a non-special added token.

Training is deterministic for a given corpus (tokenizers' BpeTrainer breaks ties by pair order).
Needs the venv: .venv/bin/python tools/tokenizer/train_tokenizer.py --preset deepseek
"""

import argparse
import json
import os

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
from tokenizers import pre_tokenizers, processors, trainers

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

# DeepSeek-V3's pre-tokenizer regexes (its tokenizer.json, pre_tokenizer.pretokenizers[0..2]).
DEEPSEEK_V3_SPLITS = [
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+|"
    r" ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
]

# GPT-4 (cl100k)-style pattern: case-insensitive contractions, look-ahead whitespace rule.
GPT4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
# DeepSeek-V3's other special tokens (fill-in-the-middle, chat roles, tool calls), in its order.
DEEPSEEK_SPECIAL = [
    BOS, EOS, PAD,
    "<｜fim▁hole｜>", "<｜fim▁begin｜>", "<｜fim▁end｜>",
    "<｜User｜>", "<｜Assistant｜>", "<|EOT|>",
    "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>", "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>", "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
    "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>", "<｜tool▁sep｜>",
]
# R1's reasoning markers: added tokens that are not special (kept by skip_special_tokens).
DEEPSEEK_NON_SPECIAL = ["<think>", "</think>"]


def read_corpus(path, max_bytes):
    """Yields documents (separated by empty lines) up to max_bytes in total."""
    used = 0
    with open(path, encoding="utf-8") as f:
        doc = []
        for line in f:
            if line == "\n":
                if doc:
                    text = "".join(doc)
                    used += len(text)
                    yield text
                    doc = []
                    if max_bytes and used >= max_bytes:
                        return
            else:
                doc.append(line)
        if doc:
            yield "".join(doc)


def train_deepseek(corpus, vocab_size, max_bytes):
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(p), behavior="isolated", invert=False)
         for p in DEEPSEEK_V3_SPLITS] +
        [pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    specials = [AddedToken(t, special=True, normalized=False) for t in DEEPSEEK_SPECIAL]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(DEEPSEEK_NON_SPECIAL), min_frequency=2,
        special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator(read_corpus(corpus, max_bytes), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t in DEEPSEEK_NON_SPECIAL])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, tok.token_to_id(BOS))])
    return tok


def write_deepseek_config(out_dir):
    """tokenizer_config.json: DeepSeek-V3's, with its chat template copied verbatim."""
    ref = os.path.join(REPO, "tests", "data", "reference", "deepseek-v3", "tokenizer_config.json")
    with open(ref, encoding="utf-8") as f:
        template = json.load(f)["chat_template"]
    config = {
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,  # max_position_embeddings of tools/train/tiny_arch.json
        # The generic fast tokenizer: runs tokenizer.json as it is (LlamaTokenizerFast would
        # rebuild parts of it in recent transformers versions).
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": template,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")


def train_gpt4(corpus, vocab_size, max_bytes):
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(GPT4_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2,
        special_tokens=[AddedToken("<|endoftext|>", special=True, normalized=False)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(read_corpus(corpus, max_bytes), trainer=trainer)
    tok.add_special_tokens([
        AddedToken("<mask>", special=True, lstrip=True, normalized=False),
        AddedToken("[SEP]", special=True, rstrip=True, normalized=False),
    ])
    # Non-special added tokens; the second is normalized (matched after NFC).
    tok.add_tokens([AddedToken("<tool>", special=False, normalized=False),
                    AddedToken("caf\u00e9!", special=False, normalized=True)])
    return tok


def save_with_string_merges(tok, path):
    """Saves tokenizer.json with merges as "a b" strings (the format before tokenizers 0.20)."""
    data = json.loads(tok.to_str())
    data["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m
                               for m in data["model"]["merges"]]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, indent=None, separators=(",", ":"))
        f.write("\n")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["deepseek", "gpt4"], required=True)
    p.add_argument("--corpus", default=os.path.join(REPO, "data", "corpus", "train.txt"))
    p.add_argument("--vocab-size", type=int, help="total, special tokens included")
    p.add_argument("--max-bytes", type=int, help="train on the first N bytes of documents")
    p.add_argument("--out", help="output directory")
    args = p.parse_args()

    if args.preset == "deepseek":
        out = args.out or os.path.join(REPO, "models", "expertmesh-tiny")
        os.makedirs(out, exist_ok=True)
        tok = train_deepseek(args.corpus, args.vocab_size or 4096, args.max_bytes or 0)
        tok.save(os.path.join(out, "tokenizer.json"), pretty=True)
        write_deepseek_config(out)
    else:
        out = args.out or os.path.join(REPO, "tests", "data", "tokenizers", "gpt4-style-1024")
        os.makedirs(out, exist_ok=True)
        tok = train_gpt4(args.corpus, args.vocab_size or 1024, args.max_bytes or 4_000_000)
        save_with_string_merges(tok, os.path.join(out, "tokenizer.json"))
    print(f"{args.preset}: vocab {tok.get_vocab_size(with_added_tokens=True)} -> {out}")


if __name__ == "__main__":
    main()
