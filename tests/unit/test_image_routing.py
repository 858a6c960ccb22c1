"""Cache-aware routing of prompts with images: the gateway's block keys carry each image's
content hash and offset, as the engine's do, so two different images behind identical
placeholder tokens never share a cached prefix and the same image again does; and a
request whose images do not fit on the bus is refused naming them."""

from __future__ import annotations

import pytest

from rtpllm.kvcache.block_hash import block_keys, namespace_key
from rtpllm.multimodal.inputs import ImageInput, MultimodalInputs
from rtpllm.protocol.messages import (
    GenerateRequest,
    Heartbeat,
    ImageSpec,
    InstanceLoad,
    MessageTooLarge,
    SamplingSpec,
    encode,
)
from rtpllm.routing.instances import Instance
from rtpllm.routing.policy import CacheAware, RouteRequest, image_spans
from rtpllm.serving.dispatcher import too_large_message

BS = 4
NS = namespace_key("m", "float32", BS)
PAD = 99  # the image placeholder token
# 6 text tokens, a 10-token image at [6, 16), 6 more text tokens: 5 full blocks.
IDS = [1, 2, 3, 4, 5, 6] + [PAD] * 10 + [7, 8, 9, 10, 11, 12]
HASH_A, HASH_B = "a" * 64, "b" * 64


def spec(digest: str, runs: list[tuple[int, int]] = [(6, 10)]) -> ImageSpec:  # noqa: B006 - read only
    return ImageSpec(content_hash=digest, runs=runs, grid_thw=(1, 4, 10), data=b"png")


def route(*images: ImageSpec, ids: list[int] = IDS) -> RouteRequest:
    return RouteRequest("r", "m", ids, image_spans(images))


def inst(instance_id: str) -> Instance:
    hb = Heartbeat(
        instance_id=instance_id, model="m", max_model_len=64, max_num_seqs=8, block_size=BS, kv_namespace=NS, lease_s=3.0, seq=1,
        load=InstanceLoad(),
    )  # fmt: skip
    return Instance(hb, 0.0)


def test_keys_equal_the_engines() -> None:
    """image_spans + RouteRequest.block_keys == MultimodalInputs.block_extras, also for an
    image of several runs (Idefics3 tiles) and two images."""
    tiles = [(2, 3), (6, 3), (11, 2)]
    two = [spec(HASH_A, tiles), spec(HASH_B, [(16, 4)])]
    ids = list(range(24))
    engine = MultimodalInputs(tuple(ImageInput(s.content_hash, tuple(s.runs), s.grid_thw) for s in two))
    assert image_spans(two) == ((HASH_A, 2, 13), (HASH_B, 16, 20))
    assert route(*two, ids=ids).block_keys(BS, NS) == block_keys(ids, BS, NS, engine.block_extras)


def test_different_images_behind_the_same_placeholders_get_different_keys() -> None:
    a, b = route(spec(HASH_A)).block_keys(BS, NS), route(spec(HASH_B)).block_keys(BS, NS)
    assert len(a) == len(b) == 5
    assert a[0] == b[0], "the block before the image is the text's"
    assert all(x != y for x, y in zip(a[1:], b[1:], strict=True)), (
        "from the image's first block on, never shared"
    )
    assert a[0] == block_keys(IDS, BS, NS)[0] and a[1] != block_keys(IDS, BS, NS)[1]


def test_the_same_image_gets_the_same_keys() -> None:
    assert route(spec(HASH_A)).block_keys(BS, NS) == route(spec(HASH_A)).block_keys(BS, NS)
    assert route().block_keys(BS, NS) == block_keys(IDS, BS, NS), "no images: the text keys"


def test_cache_aware_routing_follows_the_image_not_the_placeholders() -> None:
    policy = CacheAware(queue_tokens=0)
    a, b = inst("a"), inst("b")
    policy.index.note_routed("a", route(spec(HASH_A)).block_keys(BS, NS))
    assert policy.index.match("a", route(spec(HASH_A)).block_keys(BS, NS)).gpu == 5
    assert policy.index.match("a", route(spec(HASH_B)).block_keys(BS, NS)).gpu == 1, "the text prefix only"
    assert policy.choose(route(spec(HASH_A)), [b, a]).instance_id == "a"
    assert policy.last_reason == "cache"


def request_with(images: list[ImageSpec], prompt: list[int] = IDS) -> GenerateRequest:
    return GenerateRequest(
        request_id="r", model="m", prompt_token_ids=prompt, sampling=SamplingSpec(), reply_to="x", gateway_id="g",
        deadline=0.0, images=images,
    )  # fmt: skip


def test_images_too_large_for_the_bus_are_named() -> None:
    images = [
        ImageSpec(content_hash=HASH_A, runs=[(6, 10)], data=b"x" * 600_000),
        ImageSpec(content_hash=HASH_B, runs=[(16, 2)], data=b"y" * 600_000),
    ]
    req = request_with(images)
    with pytest.raises(MessageTooLarge) as info:
        encode(req, 1 << 20)
    message = too_large_message(req, info.value)
    assert message.startswith(
        "the request's images total 1200000 bytes, more than the bus carries (max_payload 1048576"
    )
    with pytest.raises(MessageTooLarge) as info:
        encode(request_with([], list(range(300_000))), 1 << 20)
    assert too_large_message(request_with([], []), info.value).startswith("the prompt is too large")
