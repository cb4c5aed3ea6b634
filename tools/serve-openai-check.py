#!/usr/bin/env python3
"""Drives a running `qlora serve` with the official `openai` Python client (no ML stack):
lists the models, chats with an adapter (whole and streamed: the same text), completes text
with the base, and checks that an unknown model raises the client's NotFoundError.

    python3 tools/serve-openai-check.py http://127.0.0.1:8000 ADAPTER
Prints one JSON object; exits non-zero on any mismatch. Used by crates/cli/tests/serve.rs.
"""
import json
import sys

import openai

url, adapter = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=url + "/v1", api_key="not-needed", max_retries=0)
models = [m.id for m in client.models.list().data]
assert adapter in models, models
base = models[0]
msgs = [{"role": "user", "content": "What is the capital of France?"}]
whole = client.chat.completions.create(model=adapter, messages=msgs, temperature=0, max_tokens=12)
text = whole.choices[0].message.content
assert whole.usage.completion_tokens > 0, whole
parts = []
stream = client.chat.completions.create(
    model=adapter, messages=msgs, temperature=0, max_tokens=12, stream=True,
    stream_options={"include_usage": True},
)
usage = None
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage is not None:
        usage = chunk.usage
assert "".join(parts) == text, (parts, text)
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
done = client.completions.create(model=base, prompt="Once upon a time", temperature=0, max_tokens=8)
try:
    client.chat.completions.create(model="no-such-model", messages=msgs, max_tokens=4)
    raise SystemExit("an unknown model did not raise")
except openai.NotFoundError as e:
    not_found = e.status_code
print(json.dumps({
    "openai": openai.__version__, "models": models, "chat": text,
    "streamed": "".join(parts), "completion": done.choices[0].text, "not_found": not_found,
}))
