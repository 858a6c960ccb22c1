"""Many concurrent streams through the gateway all finish, each with exactly its tokens."""

from __future__ import annotations

import asyncio

import openai
import pytest

from rtpllm.runtime.stack import Stack
from tests.integration.support import MODEL_NAME

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


async def test_64_concurrent_streams_finish_with_right_token_counts(stack: Stack) -> None:
    client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=stack.api_key, max_retries=0, timeout=120)
    max_tokens = 16

    async def one(i: int) -> tuple[int, int, str | None]:
        stream = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": f"request number {i}"}],
            max_tokens=max_tokens,
            logprobs=True,  # one logprob entry per streamed token: counts them exactly
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        tokens, usage_tokens, finish = 0, -1, None
        async for chunk in stream:
            if chunk.usage is not None:
                usage_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.logprobs and choice.logprobs.content:
                    tokens += len(choice.logprobs.content)
                finish = choice.finish_reason or finish
        return tokens, usage_tokens, finish

    try:
        results = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(64))), timeout=150)
    finally:
        await client.close()
    assert results == [(max_tokens, max_tokens, "length")] * 64
