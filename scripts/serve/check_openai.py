"""The official `openai` Python client against a running `routelm serve`.

    python scripts/serve/check_openai.py http://127.0.0.1:PORT/v1

Checks, with the client's own parsing: a chat completion, a streamed chat (chunks joined
equal the whole answer at temperature 0), a completion, a stop string, usage counts, the
model list, and an error (a prompt past the context) raised as the client's
BadRequestError. Exits non-zero on the first failure.
"""

import sys

import openai

base = sys.argv[1]
client = openai.OpenAI(base_url=base, api_key="not-needed", max_retries=0, timeout=120)
model = client.models.list().data[0].id
messages = [{"role": "user", "content": "Write one sentence about the sea."}]

whole = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
text = whole.choices[0].message.content
assert whole.object == "chat.completion", whole
assert whole.choices[0].message.role == "assistant"
assert whole.choices[0].finish_reason in ("stop", "length"), whole.choices[0].finish_reason
assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
assert 1 <= whole.usage.completion_tokens <= 24
print(f"chat: {text!r} ({whole.usage.completion_tokens} tokens, {whole.choices[0].finish_reason})")

pieces, finish, usage = [], None, None
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=24, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.content:
            pieces.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
streamed = "".join(pieces)
assert streamed == text, (streamed, text)
assert finish == whole.choices[0].finish_reason, finish
assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
print(f"stream: {len(pieces)} chunks, equal to the whole answer")

comp = client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0,
                                 logprobs=2)
ctext = comp.choices[0].text
assert comp.object == "text_completion"
assert len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens
assert all(lp <= 0 for lp in comp.choices[0].logprobs.token_logprobs)
print(f"completion: {ctext!r}")

# a stop string taken from the answer: the text ends just before it
stop = next((ctext[i:i + 2] for i in range(3, len(ctext) - 1) if ctext[i:i + 2].strip()), None)
assert stop, f"answer too short for a stop string: {ctext!r}"
cut = client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=0,
                                stop=[stop])
assert cut.choices[0].text == ctext[:ctext.index(stop)], (cut.choices[0].text, ctext, stop)
assert cut.choices[0].finish_reason == "stop"
print(f"stop {stop!r}: {cut.choices[0].text!r}")

try:
    client.completions.create(model=model, prompt="word " * 100000, max_tokens=4)
    raise AssertionError("a prompt past the context was accepted")
except (openai.BadRequestError, openai.APIStatusError) as e:
    assert e.status_code in (400, 413), e.status_code
    print(f"error case: HTTP {e.status_code}: {str(e)[:100]}")
try:
    client.chat.completions.create(model=model, messages=messages, temperature=5)
    raise AssertionError("temperature 5 was accepted")
except openai.BadRequestError as e:
    assert e.body and "temperature" in str(e.body), e.body
    print("error case: temperature 5 refused")
print("openai client: all checks passed")
