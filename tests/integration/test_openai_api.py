"""The OpenAI API end to end: official `openai` client -> gateway -> NATS -> workers."""

from __future__ import annotations

import httpx
import openai
import pytest

from rtpllm.runtime.stack import Stack
from rtpllm.tokenizer import Tokenizer
from tests.integration.support import MODEL_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
EXACT = {"ignore_eos": True}  # random weights: make token counts exact


def test_models_health_ready(http: httpx.Client) -> None:
    models = http.get("/v1/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [MODEL_NAME]
    assert models["data"][0]["max_model_len"] == 1024
    assert http.get("/health").json() == {"status": "ok"}
    ready = http.get("/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["workers"] == 2
    assert body["dependencies"] == {"nats": "ok", "redis": "ok"}


def test_chat_non_streaming_usage(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=7, extra_body=EXACT)
    assert r.object == "chat.completion"
    assert r.id.startswith("chatcmpl-")
    assert r.model == MODEL_NAME
    [choice] = r.choices
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str)
    assert choice.finish_reason == "length"
    assert choice.logprobs is None
    prompt_tokens = len(tokenizer.encode_chat(CHAT))
    assert r.usage.prompt_tokens == prompt_tokens
    assert r.usage.completion_tokens == 7
    assert r.usage.total_tokens == prompt_tokens + 7
    assert r.usage.prompt_tokens_details.cached_tokens % 16 == 0


def test_chat_streaming(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=9, stream=True, stream_options={"include_usage": True}, extra_body=EXACT
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert all(c.usage is None for c in chunks[:-1])
    assert usage.completion_tokens == 9
    assert usage.prompt_tokens == len(tokenizer.encode_chat(CHAT))
    # The same request, greedy, gives the same text streamed or not.
    greedy = dict(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=0, extra_body=EXACT)
    full = client.chat.completions.create(**greedy).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **greedy) if c.choices)
    assert streamed == full
    assert isinstance(content, str)


def test_sse_wire_format(http: httpx.Client) -> None:
    body = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 3, "stream": True, "ignore_eos": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == ""  # every event ends with a blank line
    assert events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert '"usage"' not in raw  # no include_usage: no usage key at all


def test_completions_non_streaming_and_streaming(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=5, extra_body=EXACT)
    assert r.object == "text_completion"
    assert r.usage.prompt_tokens == len(tokenizer.encode("Once upon a time"))
    assert r.usage.completion_tokens == 5
    assert r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL_NAME, prompt="Once upon a time", max_tokens=5, stream=True, extra_body=EXACT))
    assert chunks[-1].choices[0].finish_reason == "length"
    # Default max_tokens of /v1/completions is 16, as OpenAI's.
    r = client.completions.create(model=MODEL_NAME, prompt=[1, 2, 3, 4], extra_body=EXACT)
    assert r.usage.completion_tokens == 16
    assert r.usage.prompt_tokens == 4


def test_completions_batch_prompts_and_n(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=["alpha", "beta gamma"], n=2, max_tokens=4, extra_body=EXACT)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.completion_tokens == 16
    assert r.usage.prompt_tokens == 5 + 10  # byte tokenizer: one token per byte
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=["alpha", "beta"], n=2, max_tokens=3, stream=True, extra_body=EXACT))
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1, 2, 3]


def test_chat_n2_streamed_interleaved(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=2, max_tokens=6, extra_body=EXACT)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=MODEL_NAME, messages=CHAT, n=2, max_tokens=6, stream=True, extra_body=EXACT))
    roles = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert roles == [0, 1]
    order = [c.choices[0].index for c in chunks if c.choices and c.choices[0].delta.content]
    assert set(order) <= {0, 1}
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_stop_string(client: openai.OpenAI) -> None:
    base = dict(model=MODEL_NAME, prompt="The quick brown fox", max_tokens=24, temperature=0)
    text = client.completions.create(**base, extra_body=EXACT).choices[0].text
    # A printable character whose first occurrence is past the start of the text.
    index = next((i for i, ch in enumerate(text) if i >= 2 and ch.isalnum() and text.index(ch) == i), None)
    if index is None:
        pytest.skip(f"greedy text {text!r} has no usable stop character")
    r = client.completions.create(**base, stop=[text[index]], extra_body=EXACT)
    assert r.choices[0].text == text[:index]
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra.get("stop_reason") == text[index]


def test_seed_reproducible_across_workers(client: openai.OpenAI) -> None:
    args = dict(model=MODEL_NAME, messages=CHAT, max_tokens=12, temperature=1.0, seed=1234, extra_body=EXACT)
    # Several requests: least-loaded routing spreads them over both workers.
    texts = {client.chat.completions.create(**args).choices[0].message.content for _ in range(4)}
    assert len(texts) == 1
    other = client.chat.completions.create(**{**args, "seed": 4321}).choices[0].message.content
    assert other not in texts


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=3, extra_body=EXACT)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6
        assert isinstance(entry.bytes, list)
    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=5, logprobs=True, top_logprobs=0, stream=True, extra_body=EXACT
    )
    streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert len(streamed) == 5
    assert all(e.top_logprobs == [] for e in streamed)


def test_completion_logprobs_and_echo(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    prompt = "Hello there"
    n_prompt = len(tokenizer.encode(prompt))
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, logprobs=2, extra_body=EXACT)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(t) >= 1 for t in lp.top_logprobs)
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=4, logprobs=2, echo=True, extra_body=EXACT)
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]) == prompt
    assert lp.text_offset[:n_prompt] == list(range(n_prompt))
    # Streamed echo: the prompt comes first.
    chunks = list(client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=3, echo=True, stream=True, extra_body=EXACT))
    assert chunks[0].choices[0].text == prompt


def test_prefix_cache_hits_reported(client: openai.OpenAI) -> None:
    long_prompt = "The same long prefix shared by every request here. " * 3  # > 2 blocks of 16 tokens
    cached = [
        client.completions.create(model=MODEL_NAME, prompt=long_prompt, max_tokens=2, extra_body=EXACT).usage.prompt_tokens_details.cached_tokens
        for _ in range(4)
    ]
    assert cached[0] == 0 or cached[0] % 16 == 0
    assert max(cached[1:]) >= 32  # two workers, four requests: some land where the prefix is


def test_metrics_exposed(http: httpx.Client, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2)
    text = http.get("/metrics").text
    for name in (
        'rtpllm_requests_total{endpoint="chat",status="200"}',
        "rtpllm_time_to_first_token_seconds_bucket",
        "rtpllm_inter_token_latency_seconds_bucket",
        "rtpllm_e2e_request_latency_seconds_bucket",
        "rtpllm_queue_depth",
        "rtpllm_running_requests",
        "rtpllm_kv_usage{",
        "rtpllm_prefix_cache_hit_ratio{",
        "rtpllm_prompt_tokens_total",
        "rtpllm_generation_tokens_total",
    ):
        assert name in text, name


def test_instances_endpoint(http: httpx.Client, stack: Stack) -> None:
    items = http.get("/instances").json()["instances"]
    assert len(items) == 2
    assert {i["model"] for i in items} == {MODEL_NAME}
    assert all(i["load"]["num_blocks"] == 1024 for i in items)
