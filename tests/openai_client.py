#!/usr/bin/env python3
"""The official `openai` Python client against a running `shadowkv serve`.

    "$(tools/python-env)" tests/openai_client.py http://127.0.0.1:PORT/v1 MODEL [--auth]

Does a completion, a chat completion and a streamed chat completion (with usage), checks
the shapes the client parses, and prints one JSON line with what came back. Exits non-zero
with a message on any failure. Driven by tests/server.rs.

With --auth the server has API keys: the client takes its key from OPENAI_API_KEY, as it
does by default, and the script also checks that a wrong key and no key at all raise the
client's `openai.AuthenticationError` on every call, and that /health answers without one.
"""

import json
import sys
import urllib.request

try:
    import openai
except ImportError:
    sys.exit(
        "the `openai` package is missing: run this with the project's Python, "
        "\"$(tools/python-env)\" tests/openai_client.py ... (tools/test does)"
    )


def calls(client, model):
    """Each kind of call: the model list, a completion, a chat completion, a stream."""
    chat = [{"role": "user", "content": "Hi"}]
    return {
        "models": lambda **kw: client.models.list(**kw),
        "completion": lambda **kw: client.completions.create(
            model=model, prompt="Hi", max_tokens=2, **kw
        ),
        "chat": lambda **kw: client.chat.completions.create(
            model=model, messages=chat, max_tokens=2, **kw
        ),
        "stream": lambda **kw: list(
            client.chat.completions.create(
                model=model, messages=chat, max_tokens=2, stream=True, **kw
            )
        ),
    }


def check_refused(base_url, model, client):
    """A wrong key and a missing one get 401 as `openai.AuthenticationError`."""
    wrong = openai.OpenAI(
        base_url=base_url, api_key="sk-wrong-key-never-valid", max_retries=0, timeout=60
    )
    # The client always sends its key; an explicit Omit sends no Authorization header.
    no_key = {"extra_headers": {"Authorization": openai.Omit()}}
    refused = []
    for case, (c, kw) in {"wrong": (wrong, {}), "missing": (client, no_key)}.items():
        for name, call in calls(c, model).items():
            try:
                call(**kw)
                raise AssertionError(f"{name} with a {case} key was accepted")
            except openai.AuthenticationError as e:
                assert e.status_code == 401, e
                assert e.body and e.body.get("type") == "authentication_error", e.body
                assert e.body.get("code") == "invalid_api_key", e.body
                refused.append(f"{case}:{name}")
    root = base_url.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(f"{root}/health", timeout=60) as r:
        health = json.load(r)
    assert r.status == 200 and health["status"] == "ok", health
    return refused


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    auth = "--auth" in sys.argv[3:]
    # With --auth the client reads OPENAI_API_KEY itself.
    key = {} if auth else {"api_key": "unused"}
    client = openai.OpenAI(base_url=base_url, max_retries=0, timeout=300, **key)
    out = {"openai_version": openai.__version__}
    if auth:
        out["refused"] = check_refused(base_url, model, client)

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
