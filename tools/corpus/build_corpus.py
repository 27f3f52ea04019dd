#!/usr/bin/env python3
"""Builds ExpertMesh's training corpus from redistributable English text in Debian packages.

Sources (all installed by tools/install-deps.sh, model-tools list), each with its licence as
its Debian copyright file (/usr/share/doc/<package>/copyright) states it:
  * bible: bible-kjv / bible-kjv-text, the King James Bible (1611; public domain, its copyright
    expired), dumped through the `bible` program (its data file /usr/lib/bible.data is
    compressed in the program's own format; the program itself is GPL-2+, and only its output
    text goes into the corpus).
  * wordnet: wordnet-base, WordNet 3.0 (/usr/share/wordnet/data.{noun,verb,adj,adv}): one
    document per synset: its words, part of speech and gloss (definition and quoted examples).
    WordNet 3.0 licence (Princeton University, BSD-like: use, copy, modify and distribute for
    any purpose without fee, provided the copyright notice and disclaimer appear on all copies;
    models/README.md carries them).
  * devil: dict-devil, Ambrose Bierce's The Devil's Dictionary (1911; public domain, copyright
    expired), /usr/share/dictd/devil.{index,dict.dz}, one document per entry.
  * jargon: dict-jargon, the Jargon File 4.4.7 (public domain, "to be freely used, shared, and
    modified"), /usr/share/dictd/jargon.{index,dict.dz}, one document per entry.
Not used (the corpus before this list had them): GCIDE (dict-gcide, GPL-3+) and the fortune
files (fortunes; the BSD licence covers the program, the quotations' copyright is not stated).

Output: data/corpus/{train,valid,test}.txt. A "document" is one bible chunk (up to
--verses-per-chunk verses of one chapter, headed by its reference), one WordNet synset, or
one dictionary entry. Documents are written separated by one empty line; inside a document
empty lines are removed, so the empty line is an unambiguous separator.

The split is by document and deterministic: a document goes to valid/test when
sha256(seed + source + document key) falls into their share, so adding a source never moves
another source's documents between splits. Documents are ordered by that hash inside each
split (a fixed shuffle). Stdlib only.
"""

import argparse
import base64
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import unicodedata

BIBLE_SPEC = "Gen1:1-Rev22:21"
WORDNET_DIR = "/usr/share/wordnet"
DICTD_DIR = "/usr/share/dictd"


def clean_text(text):
    """NFC-normalizes, drops overstrikes (x\\bx) and control characters, trims lines."""
    # Fortune files draw bold/underline with backspaces: "_\bA" -> "A".
    while "\b" in text:
        new = re.sub(r"[^\n]\x08", "", text)
        new = new.replace("\b", "")
        if new == text:
            break
        text = new
    text = unicodedata.normalize("NFC", text)
    text = "".join(c for c in text if c in "\n\t" or unicodedata.category(c)[0] != "C")
    lines = [line.rstrip() for line in text.replace("\t", "    ").split("\n")]
    return "\n".join(line for line in lines if line.strip())


def bible_documents(verses_per_chunk):
    """Yields (key, text): chunks of verses of one chapter, headed "Book C:V-V"."""
    out = subprocess.run(["bible", "-l", "100000", BIBLE_SPEC], stdin=subprocess.DEVNULL,
                         capture_output=True, check=True).stdout.decode("utf-8")
    chapter, verses = None, []

    def flush():
        for i in range(0, len(verses), verses_per_chunk):
            part = verses[i:i + verses_per_chunk]
            key = f"{chapter}:{part[0][0]}-{part[-1][0]}"
            yield key, key + "\n" + "\n".join(v for _, v in part)

    for line in out.split("\n"):
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            verses.append((int(m.group(1)), m.group(2).strip()))
        elif line.strip():
            if chapter is not None:
                yield from flush()
            chapter, verses = line.strip(), []
    if chapter is not None:
        yield from flush()


_WORDNET_POS = {"n": "noun", "v": "verb", "a": "adjective", "s": "adjective", "r": "adverb"}


def wordnet_documents():
    """Yields (key, text) for each WordNet synset: "word, word (pos): gloss"."""
    for part in ("noun", "verb", "adj", "adv"):
        with open(os.path.join(WORDNET_DIR, f"data.{part}"), encoding="utf-8") as f:
            for line in f:
                if line.startswith("  "):  # the licence header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                offset, ss_type, n_words = fields[0], fields[2], int(fields[3], 16)
                words = []
                for w in fields[4:4 + 2 * n_words:2]:
                    w = re.sub(r"\([a-z]+\)$", "", w).replace("_", " ")  # adjective markers
                    if w not in words:
                        words.append(w)
                text = clean_text(f"{', '.join(words)} ({_WORDNET_POS[ss_type]}): "
                                  f"{gloss.strip()}")
                if text:
                    yield f"{part}/{offset}", text


_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64_number(s):
    v = 0
    for c in s:
        v = v * 64 + _B64[c]
    return v


def dictd_documents(name):
    """Yields (key, text) for each distinct entry of a dictd database (index + gzip'd dict),
    wrapped lines rejoined into paragraphs (indented lines, verse and tables, kept as lines)."""
    with gzip.open(os.path.join(DICTD_DIR, f"{name}.dict.dz"), "rb") as f:
        data = f.read()
    seen = set()
    with open(os.path.join(DICTD_DIR, f"{name}.index"), encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith(("00-database", "00database")):
                continue
            off, size = _b64_number(parts[1]), _b64_number(parts[2])
            if (off, size) in seen:
                continue
            seen.add((off, size))
            entry = data[off:off + size].decode("utf-8", errors="replace")
            paragraphs, current = [], []
            for raw in entry.split("\n"):
                s = raw.strip()
                if not s or raw.startswith("      "):
                    if current:
                        paragraphs.append(" ".join(current))
                        current = []
                    if s:
                        paragraphs.append(s)
                    continue
                current.append(s)
            if current:
                paragraphs.append(" ".join(current))
            text = clean_text("\n".join(re.sub(r"\s+", " ", p) for p in paragraphs))
            if len(text) > 20:
                yield f"{off}", text


def split_of(seed, source, key, valid_permille, test_permille):
    h = hashlib.sha256(f"{seed}\x00{source}\x00{key}".encode()).digest()
    bucket = int.from_bytes(h[:8], "big") % 1000
    if bucket < test_permille:
        return "test", h
    if bucket < test_permille + valid_permille:
        return "valid", h
    return "train", h


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "data",
                                                 "corpus"), help="output directory")
    p.add_argument("--seed", type=int, default=20260101, help="split seed")
    p.add_argument("--valid-permille", type=int, default=10, help="share of documents in valid")
    p.add_argument("--test-permille", type=int, default=10, help="share of documents in test")
    p.add_argument("--verses-per-chunk", type=int, default=8)
    p.add_argument("--sources", default="bible,wordnet,devil,jargon",
                   help="comma-separated subset of bible,wordnet,devil,jargon")
    args = p.parse_args()

    makers = {"bible": lambda: bible_documents(args.verses_per_chunk),
              "wordnet": wordnet_documents, "devil": lambda: dictd_documents("devil"),
              "jargon": lambda: dictd_documents("jargon")}
    splits = {"train": [], "valid": [], "test": []}
    stats = {}
    for source in args.sources.split(","):
        if source not in makers:
            p.error(f"unknown source {source!r} (known: {', '.join(makers)})")
        n_docs = n_chars = 0
        for key, text in makers[source]():
            split, h = split_of(args.seed, source, key, args.valid_permille, args.test_permille)
            splits[split].append((h, text))
            n_docs += 1
            n_chars += len(text)
        stats[source] = {"documents": n_docs, "chars": n_chars}
        print(f"{source}: {n_docs} documents, {n_chars} characters", file=sys.stderr)

    os.makedirs(args.out, exist_ok=True)
    for split, docs in splits.items():
        docs.sort(key=lambda d: d[0])
        body = "\n\n".join(text for _, text in docs) + "\n"
        with open(os.path.join(args.out, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write(body)
        stats[split] = {"documents": len(docs), "bytes": len(body.encode("utf-8"))}
        print(f"{split}.txt: {len(docs)} documents, {stats[split]['bytes']} bytes",
              file=sys.stderr)
    with open(os.path.join(args.out, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)


if __name__ == "__main__":
    main()
