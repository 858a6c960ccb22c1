"""Issue 16's API surface end to end through the real gateway, with the official client
where it can say it: models.retrieve, tokenize/detokenize, /version, logit_bias,
allowed_token_ids, best_of, echo with max_tokens 0, prompt_logprobs, continuous usage,
continue_final_message, chat echo, request_id, token-id tokens, prompt truncation,
unknown fields, OpenAI's schema (the `openai` package's types, strict) for responses and
streamed chunks, system_fingerprint, the vLLM metric aliases and the log lines."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from rtpllm import __version__
from rtpllm.runtime.stack import Stack
from rtpllm.tokenizer import Tokenizer
from tests.integration.support import MODEL_NAME, ExtraGateway, client_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say hello."}]
EXACT = {"ignore_eos": True}  # random weights: make token counts exact
GREEDY = {"temperature": 0, "extra_body": EXACT}


def _id(tokenizer: Tokenizer, text: str) -> int:
    [token] = tokenizer.encode(text, add_special_tokens=False)
    return token


def _events(http: httpx.Client, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200, r.read()
        raw = r.read().decode()
    datas = [e[len("data: ") :] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    return [json.loads(d) for d in datas[:-1]]


def test_models_retrieve_and_version(client: openai.OpenAI, http: httpx.Client, stack: Stack) -> None:
    card = client.models.retrieve(MODEL_NAME)
    assert card.id == MODEL_NAME and card.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"
    assert http.get("/version").json() == {"version": __version__}
    for path in ("/version", f"/v1/models/{MODEL_NAME}"):
        assert httpx.get(f"{stack.url}{path}").status_code == 401  # behind the API key like /v1/*
    assert httpx.post(f"{stack.url}/tokenize", json={"prompt": "x"}).status_code == 401


def test_tokenize_detokenize_round_trip(http: httpx.Client, tokenizer: Tokenizer) -> None:
    text = "Hello wörld"
    r = http.post("/tokenize", json={"model": MODEL_NAME, "prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == tokenizer.encode(text)
    assert r["count"] == len(r["tokens"]) == len(r["token_strs"])
    assert r["max_model_len"] == 1024
    assert http.post("/detokenize", json={"model": MODEL_NAME, "tokens": r["tokens"]}).json() == {
        "prompt": text
    }
    chat = http.post("/tokenize", json={"messages": CHAT}).json()
    assert chat["tokens"] == tokenizer.encode_chat(CHAT)
    assert "token_strs" not in chat
    bad = http.post("/detokenize", json={"tokens": [1, 99999]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    assert http.post("/tokenize", json={"prompt": "x", "nope": 1}).json()["error"]["param"] == "nope"


def test_logit_bias_and_allowed_token_ids_force_tokens(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    a = _id(tokenizer, "A")
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=5, logit_bias={str(a): 100}, **GREEDY
    )
    assert r.choices[0].message.content == "AAAAA"
    r = client.completions.create(
        model=MODEL_NAME, prompt="x", max_tokens=4, logit_bias={str(a): 100}, **GREEDY
    )
    assert r.choices[0].text == "AAAA"
    # A ban moves greedy decoding off its first choice.
    as_ids = {**EXACT, "return_tokens_as_token_ids": True}
    args = dict(model=MODEL_NAME, prompt="The fox", max_tokens=1, logprobs=0, temperature=0)
    [first] = client.completions.create(**args, extra_body=as_ids).choices[0].logprobs.tokens
    banned = client.completions.create(**args, logit_bias={first.split(":")[1]: -100}, extra_body=as_ids)
    assert banned.choices[0].logprobs.tokens != [first]
    z = _id(tokenizer, "z")
    r = client.completions.create(
        model=MODEL_NAME,
        prompt="x",
        max_tokens=3,
        temperature=1.0,
        extra_body={**EXACT, "allowed_token_ids": [z]},
    )
    assert r.choices[0].text == "zzz"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=1, logit_bias={"100000": 1})
    assert info.value.body["param"] == "logit_bias"


def test_best_of_returns_the_best_candidates(client: openai.OpenAI) -> None:
    args = dict(
        model=MODEL_NAME, prompt="Once", max_tokens=5, temperature=1.0, seed=11, logprobs=0, extra_body=EXACT
    )
    candidates = client.completions.create(n=4, **args).choices  # the same 4 samples best_of=4 draws
    ranked = sorted(candidates, key=lambda c: -sum(c.logprobs.token_logprobs))
    best = client.completions.create(n=2, best_of=4, **args)
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == 4 * 5  # every candidate ran
    no_logprobs = client.completions.create(n=1, best_of=3, **{**args, "logprobs": None})
    assert len(no_logprobs.choices) == 1 and no_logprobs.choices[0].logprobs is None
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(n=1, best_of=2, stream=True, **args)
    assert info.value.body["param"] == "best_of"


def test_echo_with_max_tokens_0_returns_the_prompt(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    prompt = "Hello there"
    r = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    [choice] = r.choices
    assert choice.text == prompt and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert len(choice.logprobs.tokens) == len(tokenizer.encode(prompt))
    assert choice.logprobs.token_logprobs[0] is None and all(
        v is not None for v in choice.logprobs.token_logprobs[1:]
    )
    chunks = list(
        client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=0, echo=True, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == prompt
    assert chunks[-1].choices[0].finish_reason == "length"


def test_prompt_logprobs(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    prompt = "abcd"
    ids = tokenizer.encode(prompt)
    r = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for token, entry in zip(ids[1:], plp[1:], strict=True):
        assert str(token) in entry and 2 <= len(entry) <= 3
        assert all(v["logprob"] <= 0 and v["rank"] >= 1 for v in entry.values())
    chat = client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=1, extra_body={"prompt_logprobs": 0}
    )
    assert len(chat.model_extra["prompt_logprobs"]) == len(tokenizer.encode_chat(CHAT))


def test_continuous_usage_stats(http: httpx.Client) -> None:
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in (
        ("/v1/chat/completions", {"messages": CHAT}),
        ("/v1/completions", {"prompt": "Once upon"}),
    ):
        events = _events(
            http, path, {**body, "max_tokens": 6, "stream": True, "stream_options": options, **EXACT}
        )
        assert all(e["usage"] is not None for e in events)
        done = [e["usage"]["completion_tokens"] for e in events]
        assert done == sorted(done) and done[-1] == 6
        assert events[-1]["choices"] == [] and "prompt_tokens_details" in events[-1]["usage"]
        assert len({e["usage"]["prompt_tokens"] for e in events}) == 1


def test_continue_final_message_continues_the_reply(
    client: openai.OpenAI, http: httpx.Client, tokenizer: Tokenizer
) -> None:
    messages = [{"role": "user", "content": "Greet me."}, {"role": "assistant", "content": "Hello"}]
    open_prompt = http.post("/tokenize", json={"messages": messages, "continue_final_message": True}).json()[
        "tokens"
    ]
    assert tokenizer.decode(open_prompt, skip_special_tokens=False).endswith("<|im_start|>assistant\nHello")
    chat = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={**EXACT, "continue_final_message": True, "add_generation_prompt": False},
    )
    assert chat.usage.prompt_tokens == len(open_prompt)
    same = client.completions.create(model=MODEL_NAME, prompt=open_prompt, max_tokens=6, **GREEDY)
    assert chat.choices[0].message.content == same.choices[0].text
    # With echo, the reply starts with the message it continues (vLLM's chat echo).
    echoed = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=6,
        temperature=0,
        extra_body={**EXACT, "continue_final_message": True, "echo": True},
    )
    assert echoed.choices[0].message.content == "Hello" + same.choices[0].text
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL_NAME,
            messages=messages,
            extra_body={"continue_final_message": True, "add_generation_prompt": True},
        )
    assert info.value.body["param"] == "continue_final_message"


def test_request_fields_with_visible_effects(client: openai.OpenAI, tokenizer: Tokenizer) -> None:
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        max_tokens=2,
        logprobs=True,
        extra_body={**EXACT, "request_id": "my-req-1", "return_tokens_as_token_ids": True},
    )
    assert r.id == "chatcmpl-my-req-1"
    assert all(e.token.startswith("token_id:") for e in r.choices[0].logprobs.content)
    r = client.completions.create(
        model=MODEL_NAME, prompt="a long prompt here", max_tokens=1, extra_body={"truncate_prompt_tokens": 4}
    )
    assert r.usage.prompt_tokens == 4
    # A prompt longer than the context window fits once truncated (no early refusal).
    r = client.completions.create(
        model=MODEL_NAME, prompt="x" * 3000, max_tokens=1, extra_body={"truncate_prompt_tokens": 8}
    )
    assert r.usage.prompt_tokens == 8
    r = client.chat.completions.create(
        model=MODEL_NAME,
        messages=CHAT,
        max_tokens=1,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )
    assert r.choices[0].finish_reason is not None
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, extra_body={"frobnicate": 1})
    assert info.value.body["param"] == "frobnicate"
    assert "Unrecognized request argument supplied: frobnicate" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL_NAME, messages=CHAT, tools=[{"type": "function", "function": {"name": "f f"}}]
        )
    assert info.value.body["param"] == "tools.0.function.name"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, store=True)
    assert info.value.body["param"] == "store"


def test_responses_validate_against_openais_types(http: httpx.Client) -> None:
    """Strict validation of raw JSON with the `openai` package's types, plus what its
    types leave optional but OpenAI's OpenAPI schema requires: system_fingerprint a string.
    (Not `echo` with `logprobs`: its first prompt token has a null logprob, as OpenAI's
    own API answers, which its published schema does not allow.)"""
    chat = http.post(
        "/v1/chat/completions", json={"messages": CHAT, "max_tokens": 3, "logprobs": True, "top_logprobs": 2}
    ).json()
    ChatCompletion.model_validate(chat, strict=True)
    fingerprint = chat["system_fingerprint"]
    assert isinstance(fingerprint, str) and fingerprint.startswith(f"rtpllm-{__version__}-")
    stream = {
        "messages": CHAT,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
        "n": 2,
    }
    for chunk in _events(http, "/v1/chat/completions", stream):
        ChatCompletionChunk.model_validate(chunk, strict=True)
        assert chunk["system_fingerprint"] == fingerprint
    completion = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "logprobs": 2}).json()
    Completion.model_validate(completion, strict=True)
    assert completion["system_fingerprint"] == fingerprint
    for chunk in _events(
        http, "/v1/completions", {"prompt": "hi", "max_tokens": 3, "stream": True, "logprobs": 1}
    ):
        # OpenAI streams `finish_reason: null` until a choice ends, though its Completion
        # type (which the SDK also parses chunks with) says one of its reasons: check the
        # rest strictly, that one by hand.
        for choice in chunk["choices"]:
            assert choice["finish_reason"] in (None, "stop", "length")
        ending = {
            **chunk,
            "choices": [{**c, "finish_reason": c["finish_reason"] or "length"} for c in chunk["choices"]],
        }
        Completion.model_validate(ending, strict=True)
        assert chunk["system_fingerprint"] == fingerprint


def test_vllm_metric_aliases(http: httpx.Client, client: openai.OpenAI) -> None:
    client.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=2)
    text = http.get("/metrics").text
    for name in (
        "vllm:num_requests_running{",
        "vllm:num_requests_waiting{",
        "vllm:kv_cache_usage_perc{",
        "vllm:gpu_cache_usage_perc{",
        f'vllm:prompt_tokens_total{{model_name="{MODEL_NAME}"}}',
        f'vllm:generation_tokens_total{{model_name="{MODEL_NAME}"}}',
        "vllm:time_to_first_token_seconds_bucket{",
        "vllm:inter_token_latency_seconds_bucket{",
        "vllm:time_per_output_token_seconds_bucket{",
        "vllm:e2e_request_latency_seconds_bucket{",
        "vllm:request_success_total{",
    ):
        assert name in text, name


def test_access_log_and_stats_lines(stack: Stack, tmp_path: Path) -> None:
    client = client_for(stack)
    client.chat.completions.create(
        model=MODEL_NAME, messages=CHAT, max_tokens=2, extra_body={"request_id": "logged-1"}
    )
    assert stack.gateway is not None and stack.gateway.log_path is not None
    deadline = time.monotonic() + 5
    while "id=chatcmpl-logged-1" not in stack.gateway.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    [line] = [x for x in stack.gateway.log_path.read_text().splitlines() if "id=chatcmpl-logged-1" in x]
    assert '"POST /v1/chat/completions" 200' in line and "completion_tokens=2" in line and "ttft=" in line
    # A gateway with a 1 s stats interval logs a stats line while there is traffic.
    extra = ExtraGateway(stack, ["--stats-interval", "1", "--no-access-log"], tmp_path, "gateway-stats")
    try:
        extra.wait_up()
        stats_client = client_for(extra)
        deadline = time.monotonic() + 30
        log = extra.proc.log_path
        assert log is not None
        while "rtpllm.stats" not in log.read_text() and time.monotonic() < deadline:
            try:
                stats_client.completions.create(model=MODEL_NAME, prompt="x", max_tokens=8, extra_body=EXACT)
            except openai.APIStatusError:
                time.sleep(0.2)  # not ready yet
        text = log.read_text()
        assert "rtpllm.stats" in text and "tok/s" in text and "running" in text and "KV" in text
        assert "rtpllm.access" not in text
    finally:
        extra.stop()
