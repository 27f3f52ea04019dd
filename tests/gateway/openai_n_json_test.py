#!/usr/bin/env python3
"""n > 1, best_of and JSON mode through the official `openai` Python client.

Run by openai_n_json_test (C++), which starts a cluster and a gateway and writes the expected
values (the reference engine's greedy text for the prompt) to a JSON file. Exits non-zero with
a message on the first mismatch.
"""
import argparse
import json
import re
import sys
import time
import urllib.request

import openai


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


def metric(url, name, labels=""):
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+)(\{[^}]*\})?\s+(\S+)$", line)
        if m and m.group(1) == name and labels in (m.group(2) or ""):
            total += float(m.group(3))
    return total


def bad_request(fn, param):
    try:
        fn()
    except openai.BadRequestError as e:
        body = e.body if isinstance(e.body, dict) else {}
        check(body.get("param") == param, f"400 names {param}: {e.body}")
        return
    check(False, f"expected 400 for {param}")


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--expected", required=True)
    args = ap.parse_args()
    spec = json.load(open(args.expected, encoding="utf-8"))
    model, k, prompt = spec["model"], spec["max_tokens"], spec["prompt"]
    client = openai.OpenAI(base_url=spec["url"], api_key="unused", max_retries=0, timeout=120)
    metrics = spec["metrics_url"]
    greedy = {"model": model, "temperature": 0, "max_tokens": k,
              "extra_body": {"ignore_eos": True}}

    # Greedy n = 3: every choice is the reference, usage counts the prompt once; the second
    # and third sequence find the first one's full prompt blocks in the prefix cache.
    hits = metric(metrics, "expertmesh_attention_prefix_cache_hits_tokens_total")
    r = client.completions.create(prompt=prompt, n=3, **greedy)
    check([c.index for c in r.choices] == [0, 1, 2], f"indices {[c.index for c in r.choices]}")
    for c in r.choices:
        check(c.text == spec["greedy"], f"choice {c.index}: {c.text!r} != {spec['greedy']!r}")
        check(c.finish_reason == "length", "finish_reason")
    check(r.usage.prompt_tokens == spec["prompt_tokens"], f"prompt_tokens {r.usage}")
    check(r.usage.completion_tokens == 3 * k, f"completion_tokens {r.usage}")
    gained = metric(metrics, "expertmesh_attention_prefix_cache_hits_tokens_total") - hits
    full = spec["prompt_tokens"] // 16 * 16
    check(gained >= 2 * full, f"prefix-cache hits grew by {gained}, want >= {2 * full}")
    print(f"n=3 prefix-cache hit tokens: {gained:.0f} (prompt {spec['prompt_tokens']} tokens)")

    # Seeded n = 2: the choices differ, choice i is the single completion with seed + i, and
    # the streamed chat chunks carry each choice's index and one finish_reason per choice.
    sampled = {"model": model, "temperature": 1.0, "max_tokens": k, "seed": 1234,
               "extra_body": {"ignore_eos": True}}
    messages = [{"role": "user", "content": "Tell me about the deep."}]
    whole = client.chat.completions.create(messages=messages, n=2, **sampled)
    texts = [c.message.content for c in whole.choices]
    check(len(texts) == 2 and texts[0] != texts[1], f"seeded choices equal: {texts}")
    for i in range(2):
        one = client.chat.completions.create(messages=messages, **dict(sampled, seed=1234 + i))
        check(one.choices[0].message.content == texts[i], f"choice {i} != seed + {i}")
    check(whole.usage.completion_tokens == 2 * k, f"chat usage {whole.usage}")
    streamed, finishes, roles = ["", ""], [[], []], [0, 0]
    for chunk in client.chat.completions.create(messages=messages, n=2, stream=True,
                                                stream_options={"include_usage": True},
                                                **sampled):
        if not chunk.choices:
            check(chunk.usage.completion_tokens == 2 * k, f"stream usage {chunk.usage}")
            continue
        check(len(chunk.choices) == 1, "one choice per chunk")
        c = chunk.choices[0]
        streamed[c.index] += c.delta.content or ""
        roles[c.index] += c.delta.role == "assistant"
        if c.finish_reason is not None:
            finishes[c.index].append(c.finish_reason)
    check(streamed == texts, f"streamed {streamed} != whole {texts}")
    check(finishes == [["length"], ["length"]], f"finishes {finishes}")
    check(roles == [1, 1], f"role once per choice: {roles}")

    # best_of 3, n 1: the choice with the highest cumulative logprob of the three sequences
    # (seeds 7, 8, 9: the same three as n = 3 with seed 7).
    sampled = {"model": model, "temperature": 1.0, "max_tokens": k, "seed": 7, "logprobs": 0,
               "extra_body": {"ignore_eos": True}}
    three = client.completions.create(prompt=prompt, n=3, **sampled)
    sums = [sum(c.logprobs.token_logprobs) for c in three.choices]
    best = three.choices[max(range(3), key=lambda i: sums[i])].text
    r = client.completions.create(prompt=prompt, best_of=3, **sampled)
    check(len(r.choices) == 1 and r.choices[0].index == 0, "best_of returns n choices")
    check(r.choices[0].text == best, f"best_of chose {r.choices[0].text!r}, best is {best!r}")
    r = client.completions.create(prompt=prompt, n=2, best_of=3, **sampled)
    order = sorted(range(3), key=lambda i: -sums[i])[:2]
    check([c.text for c in r.choices] == [three.choices[i].text for i in order],
          "best_of 3, n 2: the two best, best first")
    check(r.usage.completion_tokens == 2 * k, f"best_of usage {r.usage}")

    # Limits and impossible combinations: 400 naming the field.
    bad_request(lambda: client.completions.create(prompt=prompt, n=17, **greedy), "n")
    bad_request(lambda: client.completions.create(prompt=prompt, n=0, **greedy), "n")
    bad_request(lambda: client.completions.create(prompt=prompt, n=3, best_of=2, **greedy),
                "best_of")
    bad_request(lambda: client.completions.create(prompt=prompt, best_of=2, stream=True,
                                                  **greedy), "best_of")

    # A client that leaves a stream cancels every choice at the attention service.
    cancelled = metric(metrics, "expertmesh_attention_requests_finished_total",
                       'reason="cancelled"')
    stream = client.completions.create(prompt=prompt, n=3, stream=True,
                                       **dict(greedy, max_tokens=200))
    seen = set()
    for chunk in stream:
        seen.add(chunk.choices[0].index)
        if len(seen) == 3:
            break
    stream.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        done = metric(metrics, "expertmesh_attention_requests_finished_total",
                      'reason="cancelled"') - cancelled
        running = metric(metrics, "expertmesh_attention_requests_running")
        if done >= 3 and running == 0:
            break
        time.sleep(0.2)
    check(done >= 3 and running == 0, f"after disconnect: {done} cancelled, {running} running")

    # JSON mode: whatever the (random) model prefers, an answer that ends by "stop" is one JSON
    # object, whole and streamed; json_schema and unknown types are refused.
    stops, prompts_stopped = 0, set()
    fmt = {"type": "json_object"}
    for i, ask in enumerate(["Reply with a JSON object.", "List three colours as JSON.",
                             "Describe the earth in JSON."]):
        messages = [{"role": "user", "content": ask}]
        for temperature, choices in ((0.0, 1), (1.0, 16)):
            r = client.chat.completions.create(model=model, messages=messages, n=choices, seed=i,
                                               temperature=temperature, max_tokens=spec["json_max_tokens"],
                                               response_format=fmt)
            for c in r.choices:
                if c.finish_reason == "stop":
                    stops += 1
                    prompts_stopped.add(i)
                    try:
                        value = json.loads(c.message.content)
                    except ValueError as e:
                        check(False, f"not JSON ({e}): {c.message.content!r}")
                    check(isinstance(value, dict), f"not an object: {c.message.content!r}")
                else:
                    check(c.finish_reason == "length", f"finish {c.finish_reason}")
    r = client.completions.create(model=model, prompt=prompt, n=16, seed=5, temperature=1.0,
                                  max_tokens=spec["json_max_tokens"],
                                  extra_body={"response_format": fmt})  # vLLM's extension
    for c in r.choices:
        if c.finish_reason == "stop":
            stops += 1
            check(isinstance(json.loads(c.text), dict), f"completions: {c.text!r}")
    texts, finishes = {}, {}
    for chunk in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "JSON please."}], n=16, seed=9,
            temperature=1.0, max_tokens=spec["json_max_tokens"], response_format=fmt,
            stream=True):
        c = chunk.choices[0]
        texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
        if c.finish_reason is not None:
            finishes[c.index] = c.finish_reason
    for i, f in finishes.items():
        if f == "stop":
            stops += 1
            check(isinstance(json.loads(texts[i]), dict), f"streamed: {texts[i]!r}")
    print(f"JSON mode: {stops} answers ended by stop (chat prompts {sorted(prompts_stopped)}), "
          "every one a JSON object")
    check(stops >= 3 and len(prompts_stopped) >= 2, f"only {stops} JSON answers ended by stop")
    bad_request(lambda: client.chat.completions.create(
        model=model, messages=messages, response_format={"type": "json_schema", "json_schema":
                                                         {"name": "x", "schema": {}}}),
        "response_format")
    bad_request(lambda: client.chat.completions.create(
        model=model, messages=messages, response_format={"type": "yaml"}), "response_format")
    print("ok")


if __name__ == "__main__":
    main()
