"""The engine's image resolver says when images go local for want of a live vision
instance, once per change (a model served without a vision service would otherwise say
it for every image), with what it knows of the instances."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import pytest

from rtpllm.multimodal.inputs import ImageInput
from rtpllm.protocol.messages import ImageSpec
from rtpllm.serving import vision_client
from rtpllm.serving.vision_client import ImageResolver


@dataclass
class _Client:
    alive: bool = False

    def available(self) -> bool:
        return self.alive

    def describe(self) -> str:
        return "vision-0: ready, heard 4.2 s ago, lease 3.0 s"

    async def encode(self, *args: Any) -> list[Any]:
        raise AssertionError("these images are encoded here")


def test_going_local_for_want_of_a_vision_instance_is_said_once_per_change(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(vision_client, "image_from_spec", lambda family, tok, spec: ImageInput(spec.content_hash, tuple(spec.runs), None))
    client = _Client()
    resolver = ImageResolver(family=None, tokenizer=None, client=client)  # type: ignore[arg-type]
    spec = ImageSpec(content_hash="ab" * 32, runs=[(1, 4)])
    caplog.set_level(logging.INFO, logger=vision_client.__name__)

    async def resolve_twice() -> None:
        for _ in range(2):
            inputs = await resolver.resolve("r", [spec], deadline=1e12)
            assert [i.content_hash for i in inputs.images] == [spec.content_hash]

    asyncio.run(resolve_twice())
    said = [r.getMessage() for r in caplog.records]
    assert said == ["no live vision instance (vision-0: ready, heard 4.2 s ago, lease 3.0 s): encoding images here"]
    assert resolver.counters.local_images == 2
    client.alive = True
    caplog.clear()
    monkeypatch.setattr(client, "encode", _encoded_rows)
    asyncio.run(resolver.resolve("r", [spec], deadline=1e12))
    assert [r.getMessage() for r in caplog.records] == ["a vision instance is alive again: images go to the vision service"]
    assert resolver.counters.remote_images == 1


async def _encoded_rows(request_id: str, images: list[ImageSpec], deadline: float) -> list[Any]:
    import torch

    return [torch.zeros(4, 8) for _ in images]
