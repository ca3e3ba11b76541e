#!/usr/bin/env python3
"""The official `openai` Python client against a running `shadowkv serve`.

    "$(tools/python-env)" tests/openai_client.py http://127.0.0.1:PORT/v1 MODEL

Does a completion, a chat completion and a streamed chat completion (with usage), checks
the shapes the client parses, and prints one JSON line with what came back. Exits non-zero
with a message on any failure. Driven by tests/server.rs.
"""

import json
import sys

try:
    import openai
except ImportError:
    sys.exit(
        "the `openai` package is missing: run this with the project's Python, "
        "\"$(tools/python-env)\" tests/openai_client.py ... (tools/test does)"
    )


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)
    out = {"openai_version": openai.__version__}

    models = client.models.list()
    ids = [m.id for m in models.data]
    assert model in ids, f"{model} not in /v1/models: {ids}"

    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert c.object == "text_completion", c
    assert len(c.choices) == 1 and c.choices[0].text, c
    assert c.choices[0].finish_reason in ("stop", "length"), c
    assert c.usage.completion_tokens >= 1 and c.usage.prompt_tokens >= 1, c.usage
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    out["completion"] = c.choices[0].text

    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    msg = chat.choices[0].message
    assert chat.object == "chat.completion", chat
    assert msg.role == "assistant" and msg.content, msg
    assert chat.usage.completion_tokens >= 1, chat.usage
    out["chat"] = msg.content

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage, chunks = [], None, None, 0
    for chunk in stream:
        chunks += 1
        assert chunk.object == "chat.completion.chunk", chunk
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            if ch.delta.content:
                pieces.append(ch.delta.content)
            if ch.finish_reason:
                finish = ch.finish_reason
    text = "".join(pieces)
    assert finish in ("stop", "length"), finish
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
    assert text == msg.content, (text, msg.content)
    out["stream"] = {"text": text, "chunks": chunks, "finish_reason": finish}

    # An error comes back as the client's typed exception, with the field named.
    try:
        client.chat.completions.create(model=model, messages=[], max_tokens=4)
        raise AssertionError("empty messages were accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
        assert e.body and e.body.get("param") == "messages", e.body
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=1)
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.body and e.body.get("code") == "model_not_found", e.body

    print(json.dumps(out))


if __name__ == "__main__":
    main()
