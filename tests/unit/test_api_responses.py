"""SSE framing, OpenAI chunk/response JSON shapes and both logprobs formats."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from rtpllm.api.errors import overloaded
from rtpllm.api.logprobs import MIN_LOGPROB, CompletionLogprobsBuilder, TokenText
from rtpllm.api.responses import ChatChunkChoice, ChatCompletionChunk, ChatDelta, usage_info
from rtpllm.api.sse import DONE, sse_error, sse_event
from rtpllm.protocol.messages import TokenLogprob
from rtpllm.tokenizer import Tokenizer
from rtpllm.tokenizer.byte_tokenizer import write_byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root: Path = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(root, 320)
    return Tokenizer.from_dir(root)


def _data(event: bytes) -> dict:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return json.loads(event[6:-2])


def test_sse_framing() -> None:
    assert DONE == b"data: [DONE]\n\n"
    assert sse_event({"a": 1}) == b'data: {"a":1}\n\n'
    err = _data(sse_error(overloaded(3)))
    assert err == {"error": {"message": err["error"]["message"], "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}


def test_chunk_shape_usage_null_or_absent() -> None:
    choice = ChatChunkChoice(index=0, delta=ChatDelta(role="assistant", content=""), logprobs=None, finish_reason=None)
    plain = _data(sse_event(ChatCompletionChunk(id="c", created=1, model="m", choices=[choice])))
    assert "usage" not in plain
    assert plain["object"] == "chat.completion.chunk"
    assert plain["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
    with_usage = _data(sse_event(ChatCompletionChunk(id="c", created=1, model="m", choices=[choice], usage=None)))
    assert with_usage["usage"] is None
    last = _data(sse_event(ChatCompletionChunk(id="c", created=1, model="m", choices=[], usage=usage_info(5, 3, 2))))
    assert last["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "prompt_tokens_details": {"cached_tokens": 2}}
    empty_delta = ChatChunkChoice(index=1, delta=ChatDelta(), logprobs=None, finish_reason="stop", stop_reason="x")
    assert msgspec.json.decode(msgspec.json.encode(empty_delta))["delta"] == {}


def test_chat_logprobs_format(tokenizer: Tokenizer) -> None:
    tt = TokenText(tokenizer)
    position = [TokenLogprob(104, -1.5, 3, "h"), TokenLogprob(97, -0.2, 1, "a"), TokenLogprob(98, -0.9, 2, "b")]
    out = msgspec.json.decode(msgspec.json.encode(tt.chat([position], top_k=2)))
    assert out == {
        "content": [
            {
                "token": "h",
                "logprob": -1.5,
                "bytes": [104],
                "top_logprobs": [{"token": "a", "logprob": -0.2, "bytes": [97]}, {"token": "b", "logprob": -0.9, "bytes": [98]}],
            }
        ],
        "refusal": None,
    }
    assert tt.chat([position], top_k=0).content[0].top_logprobs == []


def test_partial_utf8_tokens_get_their_real_bytes(tokenizer: Tokenizer) -> None:
    tt = TokenText(tokenizer)
    # "é" is bytes c3 a9: each byte alone decodes to U+FFFD, but `bytes` must be exact.
    entries = [TokenLogprob(0xC3, -1.0, 1, "\ufffd"), TokenLogprob(0xA9, -1.0, 1, "\ufffd")]
    got = [tt.token_bytes(e, tt.text(e)) for e in entries]
    assert got == [[0xC3], [0xA9]]
    assert bytes(sum(got, [])).decode() == "é"


def test_completion_logprobs_builder_offsets_and_clamp(tokenizer: Tokenizer) -> None:
    builder = CompletionLogprobsBuilder(TokenText(tokenizer), top_k=1)
    part = builder.build([None, [TokenLogprob(98, float("-inf"), 9, "b"), TokenLogprob(99, -0.1, 1, "c")]], first_token_id=97)
    assert part.tokens == ["a", "b"]
    assert part.token_logprobs == [None, MIN_LOGPROB]
    assert part.top_logprobs == [None, {"c": -0.1, "b": MIN_LOGPROB}]
    assert part.text_offset == [0, 1]
    assert builder.build([[TokenLogprob(100, -0.3, 1, "dd")]]).text_offset == [2]
    assert builder.offset == 4
