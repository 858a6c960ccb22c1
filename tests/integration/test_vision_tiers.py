"""Image embeddings in the kvstore's tiers: a vision instance keeps what it encodes in its
host's kvstore (a real kvstore process on a real nats-server), and another instance,
with an empty memory cache, restores the embedding from there instead of running its
tower. The bytes are the encoder's, exactly."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from rtpllm.kvstore.client import RemoteKVStore
from rtpllm.multimodal.embedding_pool import EmbeddingPool, embedding_namespace
from rtpllm.multimodal.encoder import VisionEncoder
from rtpllm.multimodal.image_input import content_hash, decode_image
from rtpllm.protocol.messages import ImageSpec
from rtpllm.runtime.stack import Stack, StackConfig
from rtpllm.serving.bus import NatsConfig, connect_nats
from rtpllm.serving.vision_client import VisionClient
from rtpllm.serving.vision_server import VisionServer, VisionServerConfig
from rtpllm.transfer import KVReceiver
from tests.multimodal_support import png_bytes, random_image, write_qwen2_vl

HOST_ID = "vision-tiers-test"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen2_vl(tmp_path_factory.mktemp("vlm")).path


@pytest.fixture(scope="module")
def infra(tmp_path_factory: pytest.TempPathFactory, model_dir: Path) -> Iterator[Stack]:
    stack = Stack(StackConfig(model=str(model_dir), use_redis=False, auth=False, log_dir=tmp_path_factory.mktemp("logs"), kvstore_args=["--host-id", HOST_ID, "--kv-host-gib", "0.05"]))
    try:
        stack.start_infra()
        stack.start_kvstore()
        yield stack
    finally:
        stack.stop()


async def _encode_with_fresh_instance(url: str, model_dir: Path, specs: list[ImageSpec], name: str) -> tuple[list[torch.Tensor], VisionServer]:
    encoder = VisionEncoder.load(model_dir, torch.float32, "cpu")
    namespace = embedding_namespace("tiers-test", torch.float32, encoder.hidden_size)
    pool = EmbeddingPool(64, encoder.hidden_size, torch.float32, "cpu", namespace)
    tiers = await asyncio.to_thread(RemoteKVStore.connect, url, HOST_ID, pool.kv, namespace, wait_s=5.0)
    assert tiers is not None, "the kvstore did not answer"
    server_nc = await connect_nats(NatsConfig(url), name, 5)
    engine_nc = await connect_nats(NatsConfig(url), f"{name}-engine", 5)
    server = VisionServer(server_nc, encoder, pool, VisionServerConfig(name, "m", heartbeat_interval_s=0.1), tiers=tiers)
    engine_pool = EmbeddingPool(64, encoder.hidden_size, torch.float32, "cpu", namespace)
    receiver = KVReceiver(engine_pool.kv, engine_pool.layout)
    await receiver.start()
    client = VisionClient(engine_nc, f"{name}-engine", engine_pool, receiver)
    try:
        await server.start()
        await client.start()
        deadline = time.monotonic() + 5
        while not client.available():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        rows = await client.encode(f"{name}-req", specs, time.time() + 30)
        await asyncio.to_thread(tiers.flush, 10.0)  # stored before this instance goes
        return rows, server
    finally:
        await client.close()
        await server.close()  # closes the tiers client too
        await server_nc.close()
        await engine_nc.close()


def test_a_fresh_vision_instance_restores_embeddings_from_the_kvstore(infra: Stack, model_dir: Path) -> None:
    encoder = VisionEncoder.load(model_dir, torch.float32, "cpu")
    specs = []
    for seed, (h, w) in enumerate([(100, 60), (90, 200)]):
        data = png_bytes(random_image(h, w, seed=40 + seed))
        processed = encoder.family.process(decode_image(data).image, encoder.tokenizer)
        n = sum(1 for t in processed.token_ids if t == encoder.family.image_token_id)
        specs.append(ImageSpec(content_hash=content_hash(data), runs=[(3 + 100 * seed, n)], grid_thw=processed.grid_thw, data=data))
    first, a = asyncio.run(_encode_with_fresh_instance(infra.nats_url, model_dir, specs, "vision-a"))
    assert a.counters.images_encoded == 2 and a.counters.tier_hits == 0
    second, b = asyncio.run(_encode_with_fresh_instance(infra.nats_url, model_dir, specs, "vision-b"))
    assert b.counters.images_encoded == 0 and b.counters.tier_hits == 2, b.counters
    for x, y in zip(first, second, strict=True):
        assert torch.equal(x, y)
