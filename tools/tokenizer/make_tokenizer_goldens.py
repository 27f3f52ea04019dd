#!/usr/bin/env python3
"""Writes the golden files the C++ tokenizer and chat-template tests compare against.

The oracle is Hugging Face: `tokenizers` for ids and decoded text, transformers'
apply_chat_template for chat prompts. Outputs (committed, plain text, a few MB):

  tests/data/tokenizers/golden_texts.txt
      One JSON string per line: >= 10,000 texts: corpus lines (held out, topped up from
      train.txt) and whole held-out documents,
      then adversarial texts (emoji, CJK, combining marks, whitespace and digit runs, mixed
      scripts, control characters, added tokens inside text, random code points), seeded.
  tests/data/tokenizers/variants/*/tokenizer.json
      The gpt4-style vocabulary with other pipelines (normalizers, Split behaviors, ByteLevel's
      regex and prefix space, single_word tokens); goldens for their first 2,000 texts.
  tests/data/tokenizers/<name>.golden.txt, for each tokenizer under test, line i for text i:
      "<ids separated by spaces>\t<decode>\t<decode_skip>" where <decode> is the JSON string
      of decode(ids, skip_special_tokens=False), left empty when equal to the text, and
      <decode_skip> is that of decode(ids, skip_special_tokens=True), empty when equal to
      <decode>.
  tests/data/tokenizers/chat_template_golden.json
      {"conversations": [...], "results": [{"template", "conversation",
      "add_generation_prompt", "text"}]} for DeepSeek-V3's and R1's reference templates and
      the bundled model's.

Run from the repository root with the venv: .venv/bin/python tools/tokenizer/make_tokenizer_goldens.py
(needs data/corpus from tools/corpus/build_corpus.py).
"""

import argparse
import json
import os
import random

from tokenizers import Tokenizer

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT = os.path.join(REPO, "tests", "data", "tokenizers")
TOKENIZERS = {
    "expertmesh-tiny": os.path.join(REPO, "models", "expertmesh-tiny", "tokenizer.json"),
    "gpt4-style-1024": os.path.join(OUT, "gpt4-style-1024", "tokenizer.json"),
}
# Pipeline variants on the gpt4-style vocabulary (first N_VARIANT_TEXTS texts each), so that
# every normalizer, Split behavior, ByteLevel's own regex and prefix space, and single_word
# added tokens are checked against tokenizers too.
VARIANT_DIR = os.path.join(OUT, "variants")
N_VARIANT_TEXTS = 2000
VARIANTS = {
    "bytelevel-regex": (
        {"type": "NFKC"},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        [("word", {"single_word": True}), ("Lord", {"single_word": True, "special": True})]),
    "split-behaviors": (
        {"type": "Sequence", "normalizers": [
            {"type": "NFD"},
            {"type": "Replace", "pattern": {"Regex": "\\s+"}, "content": " "},
            {"type": "Replace", "pattern": {"String": "LORD"}, "content": "Lord"},
            {"type": "Prepend", "prepend": ">"}]},
        {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "\\p{P}"}, "behavior": "MergedWithPrevious",
             "invert": False},
            {"type": "Split", "pattern": {"Regex": "\\d"}, "behavior": "Removed", "invert": False},
            {"type": "Split", "pattern": {"Regex": "[A-Z]"}, "behavior": "MergedWithNext",
             "invert": False},
            {"type": "Split", "pattern": {"String": "e"}, "behavior": "Contiguous", "invert": True},
            {"type": "Split", "pattern": {"Regex": " "}, "behavior": "Isolated", "invert": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        [("the", {"single_word": True, "normalized": True})]),
}


def write_variant_tokenizers():
    with open(TOKENIZERS["gpt4-style-1024"], encoding="utf-8") as f:
        base = json.load(f)
    for name, (normalizer, pre_tokenizer, extra) in VARIANTS.items():
        d = json.loads(json.dumps(base))
        d["normalizer"], d["pre_tokenizer"] = normalizer, pre_tokenizer
        next_id = max(t["id"] for t in d["added_tokens"]) + 1
        for content, flags in extra:
            d["added_tokens"].append({"id": next_id, "content": content, "single_word": False,
                                      "lstrip": False, "rstrip": False, "normalized": False,
                                      "special": False, **flags})
            next_id += 1
        os.makedirs(os.path.join(VARIANT_DIR, name), exist_ok=True)
        path = os.path.join(VARIANT_DIR, name, "tokenizer.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(d, f, ensure_ascii=False, separators=(",", ":"))
            f.write("\n")
        TOKENIZERS[name] = path


TEMPLATES = {
    "deepseek-v3": os.path.join(REPO, "tests", "data", "reference", "deepseek-v3",
                                "tokenizer_config.json"),
    "deepseek-r1": os.path.join(REPO, "tests", "data", "reference", "deepseek-r1",
                                "tokenizer_config.json"),
    "expertmesh-tiny": os.path.join(REPO, "models", "expertmesh-tiny", "tokenizer_config.json"),
}


def corpus_texts(rng, n_lines, n_docs):
    """Held-out lines and whole multi-line documents from data/corpus/{valid,test}.txt; when
    the held-out splits have fewer than n_lines lines, training lines fill up the rest."""
    def read_docs(split):
        with open(os.path.join(REPO, "data", "corpus", f"{split}.txt"), encoding="utf-8") as f:
            return [d for d in f.read().split("\n\n") if d.strip()]

    docs = read_docs("valid") + read_docs("test")
    lines = [line for d in docs for line in d.split("\n") if line.strip()]
    rng.shuffle(lines)
    rng.shuffle(docs)
    if len(lines) < n_lines:
        extra = [line for d in read_docs("train") for line in d.split("\n") if line.strip()]
        rng.shuffle(extra)
        lines += extra[:n_lines - len(lines)]
    return [line[:300] for line in lines[:n_lines]] + [d[:800] for d in docs[:n_docs]]


SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>",
            "<｜tool▁calls▁begin｜>", "<｜tool▁sep｜>", "<think>", "</think>", "<|EOT|>",
            "<|endoftext|>", "<mask>", "[SEP]", "<tool>", "café!", "cafe\u0301!"]

FIXED = [
    "", " ", "  ", "\n", "\n\n\n", "\r\n", " \r\n \t", "\t\t\tindented", "a\u00a0b\u3000c\u2028d",
    "x\u0085y\u200bz\ufeffw", "Hello, world!", "I'm DON'T we'LL you'Re it's THEY'VE",
    "12345678901234567890", "3.14159 2,718 1e-10 0x1F -42 +7", "٣٤٥ ６７８ ²³ Ⅻ ½ ௰",
    "日本語のテキストとカタカナ、ひらがな。中文句子，标点！", "한국어 문장입니다.", "你好世界123abc",
    "Привет, мир! Γειά σου κόσμε. שלום עולם. مرحبا بالعالم. नमस्ते दुनिया. สวัสดีชาวโลก",
    "e\u0301 a\u0300\u0316 Z\u0351\u0352\u0353\u0354a\u0355\u0356l\u0357g\u0358o",
    "👋🏽 👨‍👩‍👧‍👦 🇯🇵 🏳️‍🌈 😀😃😄 ❤️ 🫨 🪿", "\x00\x01\x1b[31mred\x1b[0m\x7f",
    "def f(x):\n    return x ** 2  # square\n", "if (a <= b && c != d) { return; }",
    "!!!???...---***", "«quoted» “curly” ‘single’ — – …", "$100 €50 £20 ¥1000 ₹5",
    "http://example.com/path?q=1&r=2#frag", "user@example.org", "C:\\Windows\\System32",
    "<｜User｜>Hello<｜Assistant｜>Hi there<｜end▁of▁sentence｜>", "<｜User", "｜User｜>",
    "<<｜User｜>>", "a <mask> b", "a<mask>b", "a  <mask>  b", "[SEP] x", "x [SEP]   y",
    "<think>\nreasoning\n</think>\n\nanswer", "text<tool>call</tool>", "café! cafe\u0301! CAFÉ!",
    "\u0000", "\U0010fffd\ue000", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝐛𝐨𝐥𝐝", "ﬁ ﬂ ﬀ Å Ω K", "   leading", "trailing   ",
    "a\n\n\nb", "a \n b", "line\r\nline\rline", " ?? !! ", "'s 's's ''", "1 22 333 4444 55555",
    # Long runs (the regexes' look-ahead and the BPE queue on long pieces).
    " " * 3000 + "x", "a" * 3000, "7" * 2000, "日本" * 500, "\n" * 1000 + " \n" * 500, "!?" * 1000,
]


def adversarial_texts(rng, n):
    """FIXED plus random compositions of hard pieces and random code points."""
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF),
              (0x590, 0x6FF), (0x900, 0x97F), (0xE00, 0xE7F), (0x1100, 0x11FF),
              (0x2000, 0x206F), (0x2190, 0x2BFF), (0x3000, 0x30FF), (0x4E00, 0x9FFF),
              (0xAC00, 0xD7A3), (0xFF00, 0xFFEF), (0x1F300, 0x1FAFF), (0x1D400, 0x1D7FF)]
    pieces = ["\n", "\r\n", "  ", "\t", " ", "    ", "\u3000", "123", "4567", "0",
              "the", " The", "and", "LORD", "'s", "'LL", ".", ",", "!?", "...", "(", ")"]
    pieces += SPECIALS
    out = list(FIXED)
    while len(out) < n:
        parts = []
        for _ in range(rng.randint(1, 12)):
            r = rng.random()
            if r < 0.35:
                parts.append(rng.choice(pieces))
            elif r < 0.55:
                parts.append(" " * rng.randint(1, 40) if rng.random() < 0.5 else
                             "".join(rng.choice(" \t\n\r\u00a0") for _ in range(rng.randint(1, 30))))
            elif r < 0.65:
                parts.append("".join(rng.choice("0123456789") for _ in range(rng.randint(1, 25))))
            else:
                lo, hi = rng.choice(ranges)
                parts.append("".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 8))))
        text = "".join(parts)
        if any(0xD800 <= ord(c) <= 0xDFFF for c in text):
            continue
        out.append(text)
    return out


def write_tokenizer_goldens(texts):
    with open(os.path.join(OUT, "golden_texts.txt"), "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")
    for name, path in TOKENIZERS.items():
        tok = Tokenizer.from_file(path)
        lines = []
        for t in texts[:N_VARIANT_TEXTS] if name in VARIANTS else texts:
            ids = tok.encode(t, add_special_tokens=False).ids
            dec = tok.decode(ids, skip_special_tokens=False)
            dec_skip = tok.decode(ids, skip_special_tokens=True)
            lines.append(" ".join(map(str, ids)) + "\t" +
                         ("" if dec == t else json.dumps(dec, ensure_ascii=False)) + "\t" +
                         ("" if dec_skip == dec else json.dumps(dec_skip, ensure_ascii=False)))
        with open(os.path.join(OUT, f"{name}.golden.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        n_ids = sum(len(line.split("\t")[0].split()) for line in lines)
        print(f"{name}: {len(lines)} texts, {n_ids} ids")


def conversations():
    weather_call = {"type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}
    time_call = {"type": "function", "function": {
        "name": "get_time", "arguments": "{\"tz\": \"Europe/Paris\"}"}}
    return [
        [{"role": "user", "content": "Hello"}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Rule one."}, {"role": "system", "content": "Rule two."},
         {"role": "user", "content": "Go"}],
        [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?"}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
         {"role": "assistant", "content": "A2"}],
        [{"role": "user", "content": "Weather in Paris?"},
         {"role": "assistant", "content": None, "tool_calls": [weather_call]},
         {"role": "tool", "content": "{\"temp\": 21}"},
         {"role": "assistant", "content": "It is 21 °C in Paris."}],
        [{"role": "user", "content": "Weather and time?"},
         {"role": "assistant", "content": None, "tool_calls": [weather_call, time_call]},
         {"role": "tool", "content": "{\"temp\": 21}"},
         {"role": "tool", "content": "{\"time\": \"14:00\"}"}],
        [{"role": "user", "content": "Think first."},
         {"role": "assistant", "content": "<think>\nLet me think.\n</think>\n\nDone."},
         {"role": "user", "content": "Again"}],
        [{"role": "user", "content": "Ünïcödé 日本語 👋\nline two\n\n{{ not_a_var }} {% raw %}"},
         {"role": "assistant", "content": ""}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "  spaced  "}],
        # Tool calls with a (non-None) content: transformers drops None-valued keys, so the
        # content=None conversations above raise in the reference templates.
        [{"role": "user", "content": "Weather?"},
         {"role": "assistant", "content": "", "tool_calls": [weather_call]},
         {"role": "tool", "content": "sunny"}],
        [{"role": "user", "content": "Weather?"},
         {"role": "assistant", "content": "Let me check.", "tool_calls": [weather_call, time_call]},
         {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "noon"},
         {"role": "assistant", "content": "Sunny at noon."}, {"role": "user", "content": "Thanks"}],
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "a</think>b</think>c"}],
    ]


# Jinja constructs beyond the DeepSeek templates (whitespace control, loops, filters, tests,
# slices, tojson, scoping), rendered by transformers' own Jinja environment.
SNIPPETS = [
    ("  {% if x %}\n  yes\n  {% endif %}\nend", {"x": True}),
    ("{%- for m in messages -%}\n  [{{ loop.index }}/{{ loop.length }}{% if loop.first %} first"
     "{% endif %}{% if loop.last %} last{% endif %}] {{ m.role | upper }}: "
     "{{ m['content'] | trim }}\n{%- endfor %}",
     {"messages": [{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"}]}),
    ("{{ xs | length }} {{ 'a,b,c'.split(',') | join('-') }} {{ 'h\u00e9llo'[1:4] }} "
     "{{ [1,2,3][::-1] }} {{ 7 // 2 }} {{ 7 % 3 }} {{ -7 // 2 }} {{ 2.5 * 2 }} {{ 10 / 4 }} "
     "{{ 'ab' * 3 }} {{ [1, 2] + [3] }} {{ 'x\u00e9z' | length }} {{ xs[-1] }}",
     {"xs": [1, 2]}),
    ("{{ tools | tojson }}\n{{ tools | tojson(indent=2) }}\n{{ {'b': 1, 'a': 2} | tojson }}",
     {"tools": [{"name": "f", "parameters": {"type": "object", "properties": {
         "x": {"type": "integer"}}, "required": ["x"]}, "desc": "na\u00efve \"q\"\n\t", "n": None,
         "ok": True, "v": 1.5, "e": [], "o": {}}]}),
    ("{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}{% for k in d %}{{ k }}{% endfor %}"
     "|{{ d }}|{{ d.get('a') }} {{ d.get('zz', 'none!') }} {{ d.zz }}.",
     {"d": {"b": 1, "a": [1, "x", None, True, 2.0, "it's"]}}),
    ("{% set x = 1 %}{% for i in range(3) %}{% set x = x + i %}{{ x }}{% endfor %}|{{ x }}"
     "{% set ns = namespace(t=0) %}{% for i in range(4) %}{% set ns.t = ns.t + i %}{% endfor %}"
     "|{{ ns.t }}{% for i in range(5, 0, -2) %}{{ i }}{% endfor %}", {}),
    ("{{ 'y' if a is defined else 'n' }}{{ 'y' if b is none else 'n' }}{{ 'y' if c is string }}"
     "{{ 1 if 'ell' in 'hello' }}{{ a ~ 1 }}{{ a | default('dflt') }}{{ nope | default('dflt') }}"
     "{{ 'y' if nope is not defined }}{{ '' | default('e', true) }}{{ c is not none }}"
     "{{ 3 is odd }}{{ a is mapping }}{{ b is number }}{{ 2 is integer }}",
     {"a": "A", "b": None, "c": "s"}),
    ("{% for i in range(10) if i % 2 == 0 %}{% if i > 6 %}{% break %}{% endif %}"
     "{% if i == 2 %}{% continue %}{% endif %}{{ i }},{% endfor %}", {}),
    ("a  {{- ' b ' -}}  c\n{#- comment -#}\n  d {%+ if true %}x{% endif +%}\ne\n"
     "   {# own line comment #}\nf\n\t{% if true -%}\n  g\n{%- endif %}\nh", {}),
    ("{% for x in [] %}{{ x }}{% else %}empty{% endfor %}{% for x in none_var %}{{ x }}"
     "{% endfor %}.", {}),
    ("{{ '  pad  '.strip() }}|{{ 'xxhixx'.strip('x') }}|{{ 'Hello'.startswith('He') }}|"
     "{{ 'a b  c'.split() }}|{{ 'a-b-c'.rsplit('-', 1) }}|{{ 'hello world'.title() }}|"
     "{{ 'abc'.replace('b', 'B') }}|{{ 'ABC'.lower() }}|{{ '  x '.lstrip() }}.|{{ 'a-b-c'.split('-', 1) }}",
     {}),
    ("{{ raise_exception('bad role') }}", {}),
    ("{{ nope + 'x' }}", {}),
    ("{{ m.content }}", {"m": {"role": "user"}}),
    ("{{ m.content + 'x' }}", {"m": {"role": "user"}}),
    ("{{ 'tab\\tnl\\n' }}{{ \"dq'\" }}{{ 'it\\'s' }}", {}),
    ("{{ 1 < 2 }} {{ 'a' < 'b' }} {{ 1 == 1.0 }} {{ [1] == [1] }} {{ not none }} {{ 1 != 2 }} "
     "{{ true and 'x' }} {{ false or 0 }} {{ none }} {{ 3 - 5 }} {{ 1.0 }} {{ 1e3 if false else 0.1 }}",
     {}),
    ("{% if a %}A{% elif b %}B{% elif c %}C{% else %}D{% endif %}", {"a": 0, "b": "", "c": [0]}),
    ("{{ messages[0]['content'][0]['text'] }}{% for m in messages %}{% if m.content is string %}"
     "s{% else %}{% for part in m.content %}{{ part.type }}{% endfor %}{% endif %}{% endfor %}",
     {"messages": [{"content": [{"type": "text", "text": "T"}, {"type": "image"}]},
                   {"content": "plain"}]}),
]


def write_snippet_goldens():
    from transformers.utils.chat_template_utils import _compile_jinja_template
    out = []
    for template, context in SNIPPETS:
        try:
            text = _compile_jinja_template(template).render(**context)
        except Exception as e:  # noqa: BLE001 - recorded, the C++ side must fail too
            text = None
            print(f"snippet {len(out)}: raises {type(e).__name__}: {e}")
        out.append({"template": template, "context": context, "text": text})
    return out


def write_chat_goldens():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(REPO, "models", "expertmesh-tiny"))
    convs = conversations()
    results = []
    for name, path in TEMPLATES.items():
        with open(path, encoding="utf-8") as f:
            template = json.load(f)["chat_template"]
        for i, conv in enumerate(convs):
            for gen in (False, True):
                try:
                    text = tok.apply_chat_template(conv, chat_template=template, tokenize=False,
                                                   add_generation_prompt=gen)
                except Exception as e:  # noqa: BLE001 - recorded, the C++ side must fail too
                    text = None
                    print(f"{name} conversation {i}: raises {type(e).__name__}: {e}")
                results.append({"template": name, "conversation": i,
                                "add_generation_prompt": gen, "text": text})
    with open(os.path.join(OUT, "chat_template_golden.json"), "w", encoding="utf-8") as f:
        json.dump({"templates": {k: os.path.relpath(v, REPO) for k, v in TEMPLATES.items()},
                   "conversations": convs, "results": results,
                   "snippets": write_snippet_goldens()}, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"chat templates: {len(results)} renderings")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--corpus-lines", type=int, default=6000)
    p.add_argument("--corpus-docs", type=int, default=300)
    p.add_argument("--adversarial", type=int, default=3700)
    args = p.parse_args()
    rng = random.Random(args.seed)
    texts = corpus_texts(rng, args.corpus_lines, args.corpus_docs)
    texts += adversarial_texts(rng, args.adversarial)
    write_variant_tokenizers()
    write_tokenizer_goldens(texts)
    write_chat_goldens()


if __name__ == "__main__":
    main()
