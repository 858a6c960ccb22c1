"""The vision-service path against in-process encoding and HF `transformers`, for both
families: images encoded by a VisionServer and shipped over a real nats-server and the
data plane into an engine's embedding pool give embeddings equal to the engine's own
tower's, and the engine fed those embeddings matches HF (greedy tokens equal, logits
close) through chunked prefill that splits image runs and through prefix-cache hits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from rtpllm import LLM
from rtpllm.multimodal.embedding_pool import EmbeddingPool, embedding_namespace
from rtpllm.multimodal.encoder import VisionEncoder
from rtpllm.multimodal.image_input import decode_image
from rtpllm.multimodal.inputs import MultimodalInputs
from rtpllm.protocol.messages import ImageSpec
from rtpllm.runtime.processes import start_nats
from rtpllm.serving.bus import NatsConfig, connect_nats
from rtpllm.serving.vision_client import VisionClient
from rtpllm.serving.vision_server import VisionServer, VisionServerConfig
from rtpllm.transfer import KVReceiver
from tests.multimodal_support import TinyVLM, png_bytes, random_image, write_idefics3, write_qwen2_vl
from tests.unit.test_multimodal_models import GREEDY, LogitsRecorder, _template_messages, check_against_hf

SIZES = [(100, 60), (56, 90), (90, 200)]


@pytest.fixture(scope="module")
def nats_url() -> Iterator[str]:
    proc, url = start_nats()
    yield url
    proc.stop(2)


@pytest.fixture(scope="module", params=["qwen2_vl", "idefics3"])
def family(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> TinyVLM:
    write = write_qwen2_vl if request.param == "qwen2_vl" else write_idefics3
    return write(tmp_path_factory.mktemp(request.param))


async def _through_the_service(url: str, family: TinyVLM, specs: list[ImageSpec]) -> list[torch.Tensor]:
    encoder = VisionEncoder.load(family.path, torch.float32, "cpu")
    namespace = embedding_namespace("test-weights", torch.float32, encoder.hidden_size)
    server_nc = await connect_nats(NatsConfig(url), "vision", 5)
    engine_nc = await connect_nats(NatsConfig(url), "engine", 5)
    server = VisionServer(server_nc, encoder, EmbeddingPool(256, encoder.hidden_size, torch.float32, "cpu", namespace), VisionServerConfig(f"vision-{family.name}", family.name, heartbeat_interval_s=0.1, batch_wait_s=0.25))
    pool = EmbeddingPool(256, encoder.hidden_size, torch.float32, "cpu", namespace)
    receiver = KVReceiver(pool.kv, pool.layout)
    await receiver.start()
    client = VisionClient(engine_nc, f"engine-{family.name}", pool, receiver)
    try:
        await server.start()
        await client.start()
        deadline = time.monotonic() + 5
        while not client.available():
            assert time.monotonic() < deadline, "no vision heartbeat"
            await asyncio.sleep(0.05)
        rows = await client.encode("parity", specs, time.time() + 30)
        assert pool.num_free == pool.num_blocks  # the engine's blocks are back
        # One batch: the request's images are queued together (the wait gives a loaded
        # machine's image preparation time to queue them all before the tower starts).
        assert server.counters.images_encoded == len(specs) and server.counters.batches == 1
        return rows
    finally:
        await client.close()
        await server.close()
        await server_nc.close()
        await engine_nc.close()


@pytest.mark.parametrize("count", [1, 3])
def test_vision_service_embeddings_match_in_process_and_hf(family: TinyVLM, nats_url: str, count: int) -> None:
    images = [decode_image(png_bytes(random_image(h, w, seed=20 + i))) for i, (h, w) in enumerate(SIZES[:count])]
    data = [png_bytes(random_image(h, w, seed=20 + i)) for i, (h, w) in enumerate(SIZES[:count])]
    llm = LLM(str(family.path), device="cpu", max_model_len=512, num_blocks=256, block_size=4, max_num_batched_tokens=7)
    tok = llm.get_tokenizer()
    assert tok is not None and llm.engine.vision is not None and llm.engine.runner.multimodal is not None
    ids, mm = llm._expand_images(tok.encode_chat(_template_messages(count)), images)
    specs = [
        ImageSpec(content_hash=im.content_hash, runs=[list(r) for r in im.runs], grid_thw=im.grid_thw, data=raw)  # type: ignore[misc]
        for im, raw in zip(mm.images, data, strict=True)
    ]
    rows = asyncio.run(_through_the_service(nats_url, family, specs))
    local = llm.engine.vision.encode(llm.engine.runner.multimodal.tower, mm.images)
    for shipped, own in zip(rows, local, strict=True):
        assert torch.equal(shipped, own)  # same tower, same preprocessing, bit for bit
    shipped_mm = MultimodalInputs(tuple(replace(im.without_payload(), embeddings=r) for im, r in zip(mm.images, rows, strict=True)))

    recorder = LogitsRecorder(llm)
    outs = []
    for rid in ("first", "again"):  # the second one hits the prefix cache past the images
        llm.engine.add_request(rid, ids, replace(GREEDY, output_kind="final"), multimodal=shipped_mm)
        while llm.engine.has_unfinished_requests():
            outs.extend(o for o in llm.engine.step() if o.finished)
    assert llm.engine.runner.multimodal.images_encoded == 0  # the engine's tower never ran
    image_rows = {i for i, t in enumerate(ids) if t == family.image_token_id}
    assert any(start in image_rows and start - 1 in image_rows for _, start, _ in recorder.chunks)
    assert outs[1].num_cached_tokens > max(image_rows)
    check_against_hf(family, outs, [[im.image for im in images]] * 2, recorder)
