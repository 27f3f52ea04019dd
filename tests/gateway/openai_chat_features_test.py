#!/usr/bin/env python3
"""DeepSeek chat features through the official `openai` Python client.

Run by openai_chat_features_test (C++), which starts a cluster and two gateways (DeepSeek-V3's
and DeepSeek-R1's chat templates over the same checkpoint) and writes the expected values,
from the in-process engine's greedy tokens, to a JSON file (see that test). Exits non-zero
with a message on the first mismatch.
"""
import argparse
import json
import sys

import openai


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


def stream(client, **kwargs):
    """Streams a chat completion; returns (reasoning, content, calls by index, finish, chunks)."""
    reasoning, content, calls, finish, chunks = "", "", {}, None, []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        chunks.append(chunk)
        if not chunk.choices:
            continue
        c = chunk.choices[0]
        d = c.delta
        extra = d.model_extra or {}
        reasoning += extra.get("reasoning_content") or ""
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.index not in calls:
                check(tc.id and tc.type == "function" and tc.function.name,
                      f"a call's first delta names it: {tc}")
                calls[tc.index] = {"id": tc.id, "name": tc.function.name, "arguments": ""}
            else:
                check(tc.id is None and tc.function.name is None, f"later delta {tc}")
            calls[tc.index]["arguments"] += tc.function.arguments or ""
        if c.finish_reason is not None:
            finish = c.finish_reason
    return reasoning, content, calls, finish, chunks


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--expected", required=True)
    args = ap.parse_args()
    spec = json.load(open(args.expected, encoding="utf-8"))
    model, n = spec["model"], spec["max_tokens"]
    v3 = openai.OpenAI(base_url=spec["v3_url"], api_key="unused", max_retries=0, timeout=120)
    r1 = openai.OpenAI(base_url=spec["r1_url"], api_key="unused", max_retries=0, timeout=120)
    greedy = {"model": model, "temperature": 0, "max_tokens": n,
              "extra_body": {"ignore_eos": True}}

    # R1: the reasoning as reasoning_content, whole and streamed.
    e = spec["r1"]
    r = r1.chat.completions.create(messages=e["messages"], **greedy)
    m = r.choices[0].message
    got = (m.model_extra or {}).get("reasoning_content")
    check(got == (e["reasoning"] or None), f"reasoning_content {got!r} != {e['reasoning']!r}")
    check(m.content == e["content"], f"content {m.content!r} != {e['content']!r}")
    check(r.choices[0].finish_reason == "length", "R1 finish_reason")
    reasoning, content, calls, finish, _ = stream(r1, messages=e["messages"], **greedy)
    check(reasoning == e["reasoning"], f"streamed reasoning {reasoning!r} != {e['reasoning']!r}")
    check(content == e["content"], f"streamed content {content!r}")
    check(not calls and finish == "length", "R1 stream finish")
    # include_reasoning false: the reasoning is left out.
    body = dict(greedy, extra_body={"ignore_eos": True, "include_reasoning": False})
    r = r1.chat.completions.create(messages=e["messages"], **body)
    check("reasoning_content" not in (r.choices[0].message.model_extra or {}),
          "include_reasoning false still returned reasoning_content")
    check(r.choices[0].message.content == e["content"], "include_reasoning false content")
    # V3's gateway has no reasoning parser (its template never opens <think>): all is content.
    r = v3.chat.completions.create(messages=e["messages"], **greedy)
    check(r.choices[0].message.content is not None, "V3 content")
    check("reasoning_content" not in (r.choices[0].message.model_extra or {}), "V3 reasoning")

    tools = spec["tools"]
    # A named function: the call is opened in the prompt, the model writes its arguments.
    e = spec["named"]
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = v3.chat.completions.create(messages=[{"role": "user", "content": "Weather in Paris?"}],
                                   tools=tools, tool_choice=named, **greedy)
    m = r.choices[0].message
    check(m.tool_calls and len(m.tool_calls) == e["calls"], f"named tool_calls {m.tool_calls}")
    tc = m.tool_calls[0]
    check(tc.type == "function" and tc.id.startswith("call_"), f"tool call {tc}")
    check(tc.function.name == "get_weather", f"named name {tc.function.name!r}")
    check(tc.function.arguments == e["arguments"],
          f"named arguments {tc.function.arguments!r} != {e['arguments']!r}")
    check(m.content is None, f"content beside the call {m.content!r}")
    check(r.choices[0].finish_reason == "length", "named finish (max_tokens inside the call)")
    _, content, calls, finish, _ = stream(
        v3, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=tools,
        tool_choice=named, **greedy)
    check(content == "", f"streamed content beside the call {content!r}")
    check(len(calls) == 1 and calls[0]["name"] == "get_weather" and
          calls[0]["arguments"] == e["arguments"], f"streamed named call {calls}")

    # required: the model writes the function's name, then its arguments.
    e = spec["required"]
    r = v3.chat.completions.create(messages=[{"role": "user", "content": "Weather in Paris?"}],
                                   tools=tools, tool_choice="required", **greedy)
    m = r.choices[0].message
    if e["calls"] > 0:
        check(m.tool_calls and m.tool_calls[0].function.name == e["name"] and
              m.tool_calls[0].function.arguments == e["arguments"],
              f"required call {m.tool_calls} != {e}")
    _, _, calls, _, _ = stream(v3, messages=[{"role": "user", "content": "Weather in Paris?"}],
                               tools=tools, tool_choice="required", **greedy)
    if e["calls"] > 0:
        check(calls[0]["name"] == e["name"] and calls[0]["arguments"] == e["arguments"],
              f"streamed required call {calls} != {e}")

    # A history with the assistant's call and the tool's result, rendered by V3's template.
    e = spec["history"]
    r = v3.chat.completions.create(messages=e["messages"], tools=tools, **greedy)
    check(r.usage.prompt_tokens == e["prompt_tokens"],
          f"history prompt tokens {r.usage.prompt_tokens} != {e['prompt_tokens']}")
    check(r.choices[0].message.content == e["content"], "history content")

    # Bad tools and choices: 400 with the param.
    for kwargs, param in [
            ({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
             "tool_choice"),
            ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
             "tools[0].function.name"),
            ({"tool_choice": "required"}, "tool_choice")]:
        try:
            v3.chat.completions.create(messages=[{"role": "user", "content": "x"}], **kwargs,
                                       **greedy)
            check(False, f"accepted {kwargs}")
        except openai.BadRequestError as err:
            check(err.body.get("param") == param, f"{kwargs}: {err.body}")
    print("ok")


if __name__ == "__main__":
    main()
