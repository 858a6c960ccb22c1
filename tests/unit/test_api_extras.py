"""The pieces of issue 16's API surface, one by one: best_of selection, streamed usage,
vLLM's prompt_logprobs and token-id tokens, system_fingerprint, chat rendering options
(continue_final_message, chat_template_kwargs, documents), tokenize/detokenize, prompt
truncation, the access log line, the stats line and the vLLM metric aliases."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import msgspec
import pytest
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from rtpllm.api.access_log import AccessLogMiddleware, AccessRecord, format_line
from rtpllm.api.best_of import best_of, select
from rtpllm.api.errors import APIError
from rtpllm.api.fingerprint import system_fingerprint
from rtpllm.api.logprobs import TokenIdText, TokenText
from rtpllm.api.prompts import Prompt, chat_prompt, completion_prompts, template_kwargs, truncate_prompt
from rtpllm.api.requests import ChatMessage, StreamOptions
from rtpllm.api.stream_usage import StreamUsage
from rtpllm.api.tokenize import DetokenizeRequest, detokenize, tokenize_response
from rtpllm.protocol.messages import ChoiceDelta, Heartbeat, InstanceLoad, TokenDelta, TokenLogprob, Usage
from rtpllm.routing.instances import InstanceRegistry
from rtpllm.serving.admission import AdmissionController
from rtpllm.serving.metrics import GatewayMetrics
from rtpllm.serving.stats_log import StatsLogger
from rtpllm.tokenizer import Tokenizer
from rtpllm.tokenizer.byte_tokenizer import write_byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root: Path = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(root, 320)
    return Tokenizer.from_dir(root)


async def _aiter(items: list) -> object:
    for item in items:
        yield item


async def test_best_of_keeps_the_highest_cumulative_logprob_renumbered() -> None:
    # Prompt 0: candidates 0..2 end at -5, -1, -3; prompt 1: -2, -4, -0.5.
    deltas = [
        (
            0,
            TokenDelta(
                request_id="a",
                seq=0,
                choices=[ChoiceDelta(index=i, text=f"p0c{i}", cumulative_logprob=-9.0) for i in range(3)],
            ),
        ),
        (
            0,
            TokenDelta(
                request_id="a",
                seq=1,
                choices=[
                    ChoiceDelta(index=i, text="", cumulative_logprob=s, finish_reason="length")
                    for i, s in enumerate((-5.0, -1.0, -3.0))
                ],
                finished=True,
            ),
        ),
        (
            1,
            TokenDelta(
                request_id="b",
                seq=0,
                choices=[
                    ChoiceDelta(index=i, text=f"p1c{i}", cumulative_logprob=s, finish_reason="length")
                    for i, s in enumerate((-2.0, -4.0, -0.5))
                ],
                finished=True,
            ),
        ),
    ]
    out = [item async for item in best_of(_aiter(deltas), 2)]
    texts = {(p, c.index): c.text for p, d in out for c in d.choices if c.text}
    assert texts == {(0, 0): "p0c1", (0, 1): "p0c2", (1, 0): "p1c2", (1, 1): "p1c0"}
    assert select({(0, 0): -1.0, (0, 1): -1.0}, 1) == {(0, 0): 0}  # ties: the earlier


def test_stream_usage_modes() -> None:
    total = Usage(10, 4, 8)
    off = StreamUsage(None, 10)
    assert off.chunk() is msgspec.UNSET and off.final(total) is None
    final_only = StreamUsage(StreamOptions(include_usage=True), 10)
    assert final_only.chunk() is None
    assert msgspec.to_builtins(final_only.final(total))["prompt_tokens_details"] == {"cached_tokens": 8}
    running = StreamUsage(StreamOptions(continuous_usage_stats=True), 10)
    running.add(3)
    chunk = msgspec.to_builtins(running.chunk())
    assert chunk == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert running.final(total, completion_tokens=0).completion_tokens == 0


def test_prompt_logprobs_in_vllms_shape(tokenizer: Tokenizer) -> None:
    position = [TokenLogprob(104, -2.0, 3), TokenLogprob(101, -0.5, 1), TokenLogprob(102, -1.0, 2)]
    out = TokenText(tokenizer).prompt([None, position], 1)
    assert out[0] is None
    encoded = json.loads(msgspec.json.encode(out))
    assert encoded[1] == {
        "104": {"logprob": -2.0, "rank": 3, "decoded_token": "h"},
        "101": {"logprob": -0.5, "rank": 1, "decoded_token": "e"},
    }
    assert TokenIdText(tokenizer).text(TokenLogprob(7, 0.0, 1)) == "token_id:7"


def test_system_fingerprint_is_a_string_naming_the_weights() -> None:
    a = system_fingerprint(bytes.fromhex("00112233445566778899"), "m")
    assert a.startswith("rtpllm-") and a.endswith("0011223344")
    assert system_fingerprint(b"", "m") == system_fingerprint(b"", "m") != system_fingerprint(b"", "other")


def test_continue_final_message_and_template_kwargs(tokenizer: Tokenizer) -> None:
    messages = [ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="Hello wor")]
    prompt = chat_prompt(tokenizer, messages, add_generation_prompt=True, continue_final_message=True)
    assert prompt.text is not None and prompt.text.endswith("<|im_start|>assistant\nHello wor")
    assert tokenizer.decode(prompt.token_ids, skip_special_tokens=False).endswith("assistant\nHello wor")
    closed = chat_prompt(tokenizer, messages)
    assert closed.text is not None and closed.text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(APIError) as info:
        chat_prompt(
            tokenizer,
            [ChatMessage(role="user", content="x"), ChatMessage(role="assistant", content="")],
            continue_final_message=True,
        )
    assert info.value.param == "messages"
    # Template variables reach the template; reserved names are refused.
    tokenizer_vars = Tokenizer(
        tokenizer._tok,
        "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        None,
        "<|im_end|>",
    )
    assert chat_prompt(tokenizer_vars, messages[:1], template_kwargs={"greeting": "yo "}).text == "yo hi"
    assert template_kwargs({"enable_thinking": False}, [{"text": "d"}]) == {
        "enable_thinking": False,
        "documents": [{"text": "d"}],
    }
    with pytest.raises(APIError) as info:
        template_kwargs({"add_generation_prompt": True}, None)
    assert info.value.param == "chat_template_kwargs"


def test_tokenize_detokenize_round_trip_and_truncation(tokenizer: Tokenizer) -> None:
    [prompt] = completion_prompts(tokenizer, "héllo")
    reply = msgspec.to_builtins(tokenize_response(tokenizer, prompt.token_ids, 1024, token_strs=True))
    assert (
        reply["count"] == len(reply["tokens"]) == len(reply["token_strs"]) == 6
        and reply["max_model_len"] == 1024
    )
    assert "token_strs" not in msgspec.to_builtins(
        tokenize_response(tokenizer, prompt.token_ids, None, token_strs=False)
    )
    assert detokenize(tokenizer, DetokenizeRequest(tokens=prompt.token_ids)).prompt == "héllo"
    with pytest.raises(APIError) as info:
        detokenize(tokenizer, DetokenizeRequest(tokens=[1, 10_000]))
    assert info.value.param == "tokens"
    assert truncate_prompt(Prompt([1, 2, 3, 4], "abcd"), 2) == Prompt([3, 4], None)
    assert truncate_prompt(Prompt([1, 2], "ab"), 5).text == "ab"


def _generation(prompt_tokens: int, completion_tokens: int, ttft: float | None) -> SimpleNamespace:
    return SimpleNamespace(
        total_usage=lambda: Usage(prompt_tokens, completion_tokens, 0),
        prompts=[Prompt([1] * prompt_tokens)],
        ttft_s=ttft,
    )


def test_access_log_line(caplog: pytest.LogCaptureFixture) -> None:
    record = AccessRecord(response_id="cmpl-1", generation=_generation(5, 3, 0.0123))  # type: ignore[arg-type]
    line = format_line("1.2.3.4:5", "POST", "/v1/completions", 200, record, 0.25)
    assert (
        line
        == '1.2.3.4:5 "POST /v1/completions" 200 id=cmpl-1 prompt_tokens=5 completion_tokens=3 ttft=0.012s latency=0.250s'
    )
    assert "prompt_tokens=- completion_tokens=- ttft=-" in format_line(
        "-", "GET", "/v1/models", 200, AccessRecord(), 0.001
    )

    app = Starlette(
        routes=[
            Route("/v1/x", lambda r: PlainTextResponse("ok")),
            Route("/health", lambda r: PlainTextResponse("ok")),
        ]
    )
    with (
        caplog.at_level(logging.INFO, logger="rtpllm.access"),
        TestClient(AccessLogMiddleware(app)) as client,
    ):
        client.get("/v1/x")
        client.get("/health")  # a probe: debug level
        client.get("/nope%0Aforged")  # the decoded path holds a newline
    lines = [r.getMessage() for r in caplog.records if r.name == "rtpllm.access"]
    assert len(lines) == 2 and '"GET /v1/x" 200' in lines[0]
    assert '"GET /nope\\nforged" 404' in lines[1] and "\n" not in lines[1]


def _heartbeat(instance: str, running: int, waiting: int, kv: float, model: str = "m") -> Heartbeat:
    return Heartbeat(
        instance_id=instance, model=model, max_model_len=1024, max_num_seqs=8, block_size=16, lease_s=3.0, seq=1,
        load=InstanceLoad(num_running=running, num_waiting=waiting, kv_usage=kv),
    )  # fmt: skip


def test_vllm_metric_aliases_next_to_rtpllms() -> None:
    registry = InstanceRegistry()
    registry.upsert(_heartbeat("w1", 3, 1, 0.25))
    registry.upsert(_heartbeat("other", 9, 9, 0.9, model="not-ours"))
    metrics = GatewayMetrics(AdmissionController(8, 8), registry, model="m")
    metrics.ttft.observe(0.1)
    metrics.itl.observe(0.01)
    metrics.e2e.observe(0.5)
    metrics.prompt_tokens.inc(12)
    metrics.generation_tokens.inc(4)
    metrics.finished("stop")
    text = generate_latest(metrics.registry).decode()
    for line in (
        'vllm:num_requests_running{engine="w1",model_name="m"} 3.0',
        'vllm:num_requests_waiting{engine="w1",model_name="m"} 1.0',
        'vllm:kv_cache_usage_perc{engine="w1",model_name="m"} 0.25',
        'vllm:gpu_cache_usage_perc{engine="w1",model_name="m"} 0.25',
        'vllm:prompt_tokens_total{model_name="m"} 12.0',
        'vllm:generation_tokens_total{model_name="m"} 4.0',
        'vllm:time_to_first_token_seconds_count{model_name="m"} 1.0',
        'vllm:inter_token_latency_seconds_count{model_name="m"} 1.0',
        'vllm:time_per_output_token_seconds_count{model_name="m"} 1.0',
        'vllm:e2e_request_latency_seconds_count{model_name="m"} 1.0',
        'vllm:request_success_total{finished_reason="stop",model_name="m"} 1.0',
        "rtpllm_prompt_tokens_total 12.0",
        "rtpllm_time_to_first_token_seconds_count 1.0",
    ):
        assert line in text, line
    assert "not-ours" not in "".join(line for line in text.splitlines() if line.startswith("vllm:"))


def test_stats_line_while_there_is_traffic() -> None:
    registry = InstanceRegistry()
    admission = AdmissionController(8, 8)
    metrics = GatewayMetrics(admission, registry, model="m")
    stats = StatsLogger(metrics, admission, registry, 10.0, "m")
    stats._last = (0.0, 0.0, 0.0)
    assert stats.line(now=10.0) is None  # idle
    registry.upsert(_heartbeat("w1", 2, 0, 0.5))
    metrics.prompt_tokens.inc(100)
    metrics.generation_tokens.inc(50)
    assert stats.line(now=20.0) == (
        "prompt 10.0 tok/s, generation 5.0 tok/s; gateway: 0 running, 0 waiting; w1: 2 running, 0 waiting, KV 50.0%"
    )
    registry.upsert(_heartbeat("w1", 0, 0, 0.0))
    assert stats.line(now=30.0) is not None  # the first idle interval shows the drop
    assert stats.line(now=40.0) is None
