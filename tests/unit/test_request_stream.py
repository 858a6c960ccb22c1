"""The gateway's per-request stream: in order, duplicates dropped, early deltas held
until the gap fills (disaggregation sends seq 0 from two instances), real gaps fail."""

from __future__ import annotations

import asyncio

from rtpllm.protocol.messages import ErrorCode, ErrorInfo, TokenDelta
from rtpllm.serving.dispatcher import RequestStream


def _stream() -> tuple[RequestStream, list[RequestStream]]:
    closed: list[RequestStream] = []
    return RequestStream("r", "d", closed.append), closed


def _drain(stream: RequestStream) -> list[TokenDelta]:
    out = []
    while not stream._queue.empty():
        out.append(stream._queue.get_nowait())
    return out


def test_duplicates_are_dropped_and_early_deltas_wait() -> None:
    stream, closed = _stream()
    assert stream._push(TokenDelta(request_id="r", seq=0))
    assert stream._push(TokenDelta(request_id="r", seq=0))  # the decode instance's copy
    assert stream._push(TokenDelta(request_id="r", seq=2))
    assert [d.seq for d in _drain(stream)] == [0]
    assert stream._push(TokenDelta(request_id="r", seq=1))
    assert stream._push(TokenDelta(request_id="r", seq=3, finished=True))
    assert [d.seq for d in _drain(stream)] == [1, 2, 3]
    assert stream.finished and stream.remote_finished and closed == [stream]


def test_first_delta_arriving_after_the_second() -> None:
    stream, _ = _stream()
    assert stream._push(TokenDelta(request_id="r", seq=1))
    assert stream._push(TokenDelta(request_id="r", seq=0))
    assert [d.seq for d in _drain(stream)] == [0, 1]


def test_far_ahead_is_a_loss() -> None:
    stream, closed = _stream()
    assert stream._push(TokenDelta(request_id="r", seq=0))
    assert not stream._push(TokenDelta(request_id="r", seq=2 + RequestStream.MAX_EARLY))
    out = _drain(stream)
    assert out[-1].finished and out[-1].error is not None and out[-1].error.code == ErrorCode.LOST_DELTAS
    assert closed == [stream]


def test_an_error_ends_the_stream_even_with_a_gap() -> None:
    stream, _ = _stream()
    stream._push(TokenDelta(request_id="r", seq=0))
    stream._push(TokenDelta(request_id="r", seq=5, finished=True, error=ErrorInfo(ErrorCode.WORKER_SHUTDOWN, "bye")))
    out = _drain(stream)
    assert [d.seq for d in out] == [0, 5] and out[-1].error is not None and stream.finished


def test_batches_iterate_in_order() -> None:
    async def main() -> list[int]:
        stream, _ = _stream()
        for seq in (1, 0, 2):
            stream._push(TokenDelta(request_id="r", seq=seq, finished=seq == 2))
        return [d.seq async for d in stream]

    assert asyncio.run(main()) == [0, 1, 2]
