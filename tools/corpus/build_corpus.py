#!/usr/bin/env python3
"""Builds ExpertMesh's training corpus from public-domain English text in Debian packages.

Sources (all installed by tools/install-deps.sh, model-tools list):
  * bible-kjv / bible-kjv-text: the King James Bible, dumped through the `bible` program
    (its data file /usr/lib/bible.data is compressed in the program's own format).
  * fortunes: /usr/share/games/fortunes/* (the '%'-separated text files; .dat are indexes).
  * dict-gcide: /usr/share/dictd/gcide.{index,dict.dz} (dictd format: the .dz is gzip; the
    index holds base64 offsets), cleaned from its markup into plain definitions.

Output: data/corpus/{train,valid,test}.txt. A "document" is one bible chunk (up to
--verses-per-chunk verses of one chapter, headed by its reference), one fortune, or one
dictionary entry. Documents are written separated by one empty line; inside a document
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
FORTUNE_DIR = "/usr/share/games/fortunes"
GCIDE_INDEX = "/usr/share/dictd/gcide.index"
GCIDE_DICT = "/usr/share/dictd/gcide.dict.dz"


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


def fortune_documents():
    """Yields (key, text) for every fortune of every fortune file."""
    for name in sorted(os.listdir(FORTUNE_DIR)):
        path = os.path.join(FORTUNE_DIR, name)
        if name.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            raw = f.read().decode("utf-8", errors="replace")
        for i, chunk in enumerate(re.split(r"^%\s*$", raw, flags=re.M)):
            text = clean_text(chunk)
            if text:
                yield f"{name}/{i}", text


_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64_number(s):
    v = 0
    for c in s:
        v = v * 64 + _B64[c]
    return v


# GCIDE's source tags: [1913 Webster], [WordNet 1.5], [PJC], [Century Dict.], ...
_GCIDE_SOURCE = re.compile(r"\[(?:[^\]]*(?:Webster|WordNet|PJC|Century|Suppl|Dict\.|RDH|JS|"
                           r"Chambers|Note|Obs\.|Note:)[^\]]*)\]")
_GCIDE_LIGATURES = {"[ae]": "\u00e6", "[AE]": "\u00c6", "[oe]": "\u0153", "[OE]": "\u0152"}


def clean_gcide_entry(entry):
    """Turns one dictd GCIDE entry into readable prose, or None when nothing is left."""
    for k, v in _GCIDE_LIGATURES.items():
        entry = entry.replace(k, v)
    # Headword line: 'Actinia \Ac*tin"i*a\, n.; ...' -> 'Actinia, n.; ...'
    entry = re.sub(r"^(.*?)\s*\\[^\\\n]*\\", r"\1", entry, count=1)
    entry = re.sub(r"\\[^\\\n]*\\", "", entry)  # further pronunciations
    entry = _GCIDE_SOURCE.sub("", entry)
    entry = entry.replace("{", "").replace("}", "")
    # Rejoin wrapped lines; keep paragraph breaks (blank lines, numbered senses) as newlines.
    paragraphs, current = [], []
    for line in entry.split("\n"):
        s = line.strip()
        if not s:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        if current and re.match(r"^(\d+\.|\([a-z]\)|Syn:|Note:|--)", s):
            paragraphs.append(" ".join(current))
            current = []
        current.append(s)
    if current:
        paragraphs.append(" ".join(current))
    text = clean_text("\n".join(re.sub(r"\s+", " ", p) for p in paragraphs))
    return text if len(text) > 20 else None


def gcide_documents():
    """Yields (key, text) for each distinct GCIDE entry (several headwords share some)."""
    with gzip.open(GCIDE_DICT, "rb") as f:
        data = f.read()
    seen = set()
    with open(GCIDE_INDEX, encoding="utf-8") as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3 or parts[0].startswith("00-database"):
                continue
            off, size = _b64_number(parts[1]), _b64_number(parts[2])
            if (off, size) in seen:
                continue
            seen.add((off, size))
            text = clean_gcide_entry(data[off:off + size].decode("utf-8", errors="replace"))
            if text:
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
    p.add_argument("--sources", default="bible,fortunes,gcide",
                   help="comma-separated subset of bible,fortunes,gcide")
    args = p.parse_args()

    makers = {"bible": lambda: bible_documents(args.verses_per_chunk),
              "fortunes": fortune_documents, "gcide": gcide_documents}
    splits = {"train": [], "valid": [], "test": []}
    stats = {}
    for source in args.sources.split(","):
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
