#!/usr/bin/env python3
"""The gateway through the official `openai` Python client.

Run by gateway_cluster_test (GatewayClusterTest.OfficialOpenAiClient), which starts the cluster
and the gateway and writes the expected greedy outputs of the in-process engine to a JSON file:
  {"model": str, "cases": [{"kind": "completion"|"chat", "prompt"|"messages": ...,
                            "max_tokens": int, "want": str}]}
Exits non-zero with a message on the first mismatch.
"""
import argparse
import json
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--expected", required=True)
    args = ap.parse_args()
    spec = json.load(open(args.expected, encoding="utf-8"))
    model = spec["model"]
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=120)
    greedy = {"temperature": 0, "extra_body": {"ignore_eos": True}}

    ids = [m.id for m in client.models.list()]
    check(ids == [model], f"models.list: {ids}")

    for case in spec["cases"]:
        n, want = case["max_tokens"], case["want"]
        if case["kind"] == "completion":
            r = client.completions.create(model=model, prompt=case["prompt"], max_tokens=n,
                                          **greedy)
            check(r.choices[0].text == want, f"completion {r.choices[0].text!r} != {want!r}")
            check(r.choices[0].finish_reason == "length", "completion finish_reason")
            check(r.usage.completion_tokens == n, "completion usage")
            text, usage = "", None
            for chunk in client.completions.create(model=model, prompt=case["prompt"],
                                                   max_tokens=n, stream=True,
                                                   stream_options={"include_usage": True},
                                                   **greedy):
                if chunk.choices:
                    text += chunk.choices[0].text
                if chunk.usage is not None:
                    usage = chunk.usage
            check(text == want, f"streamed completion {text!r} != {want!r}")
            check(usage is not None and usage.completion_tokens == n, "streamed usage")
        else:
            r = client.chat.completions.create(model=model, messages=case["messages"],
                                               max_completion_tokens=n, **greedy)
            got = r.choices[0].message.content
            check(got == want, f"chat {got!r} != {want!r}")
            check(r.choices[0].message.role == "assistant", "chat role")
            check(r.usage.completion_tokens == n, "chat usage")
            text = ""
            for chunk in client.chat.completions.create(model=model, messages=case["messages"],
                                                        max_tokens=n, stream=True, **greedy):
                if chunk.choices and chunk.choices[0].delta.content:
                    text += chunk.choices[0].delta.content
            check(text == want, f"streamed chat {text!r} != {want!r}")

    # Errors arrive as the client's typed exceptions.
    try:
        client.completions.create(model="no-such-model", prompt="a", max_tokens=1)
        check(False, "unknown model accepted")
    except openai.NotFoundError as e:
        check(e.status_code == 404, "unknown model status")
    try:
        client.completions.create(model=model, prompt="a", max_tokens=1, temperature=7)
        check(False, "temperature 7 accepted")
    except openai.BadRequestError as e:
        check(e.body.get("param") == "temperature", f"bad temperature body {e.body}")
    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=1)
        check(False, "empty messages accepted")
    except openai.BadRequestError:
        pass
    print(f"openai client: {len(spec['cases'])} cases passed")


if __name__ == "__main__":
    main()
