"""Image prompts built at the gateway, from image sizes alone, equal the ones the engine
builds from pixels: `VisionFamily.placeholder` against `process`, the placeholder-only
expansion against `expand_image_prompt`, and `chat_prompt` with loaded images against
`LLM.chat`'s path (ids, runs, grids, content hashes, block-key extras), down to the
GenerateRequest the gateway sends."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from rtpllm.api.errors import APIError
from rtpllm.api.generation import GatewayCore, Generation
from rtpllm.api.images import ImageLoader, LoadedImage, MediaSettings
from rtpllm.api.prompts import chat_prompt, check_context_length
from rtpllm.api.requests import ChatMessage
from rtpllm.kvcache.block_hash import block_keys, namespace_key
from rtpllm.models.config import ModelConfig
from rtpllm.multimodal.families import Idefics3Family, Qwen2VLFamily, VisionFamily, load_vision_family
from rtpllm.multimodal.image_input import decode_image
from rtpllm.multimodal.prompt import expand_image_placeholders, expand_image_prompt
from rtpllm.protocol.messages import GenerateRequest
from rtpllm.routing.instances import InstanceRegistry
from rtpllm.routing.policy import RouteRequest, image_spans
from rtpllm.sampling_params import SamplingParams
from rtpllm.serving.admission import AdmissionController
from rtpllm.tokenizer import Tokenizer
from tests.multimodal_support import data_url, png_bytes, random_image, write_idefics3, write_qwen2_vl

# (width, height): squares, both orientations, extreme aspect ratios, off the patch grid.
SIZES = [(28, 28), (60, 100), (90, 56), (200, 90), (37, 500), (700, 13), (57, 57), (1500, 1000)]


class Checkpoint:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.tokenizer = Tokenizer.from_dir(path)
        family = load_vision_family(path, ModelConfig.from_dir(path))
        assert family is not None
        self.family: VisionFamily = family

    def variant(self, preprocessor: dict[str, Any]) -> VisionFamily:
        """The same model with another preprocessor config."""
        raw = json.loads((self.path / "config.json").read_text())
        cls = Qwen2VLFamily if isinstance(self.family, Qwen2VLFamily) else Idefics3Family
        return cls(raw, preprocessor)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Checkpoint]:
    root = tmp_path_factory.mktemp("vlm")
    return {
        "qwen2_vl": Checkpoint(write_qwen2_vl(root / "qwen2_vl").path),
        "idefics3": Checkpoint(write_idefics3(root / "idefics3").path),
    }


@pytest.fixture(params=["qwen2_vl", "idefics3"])
def ckpt(request: pytest.FixtureRequest, checkpoints: dict[str, Checkpoint]) -> Checkpoint:
    return checkpoints[request.param]


VARIANTS = {
    "qwen2_vl": [
        {},
        {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 64},
    ],  # {}: the real model's defaults
    "idefics3": [
        {"size": {"longest_edge": 112}, "max_image_size": {"longest_edge": 56}, "do_image_splitting": False},
        {"size": {"longest_edge": 224}, "max_image_size": {"longest_edge": 56}, "do_image_splitting": True},
    ],
}


def test_placeholder_equals_process_without_pixels(ckpt: Checkpoint) -> None:
    families = [ckpt.family, *(ckpt.variant(v) for v in VARIANTS[ckpt.family.name])]
    for i, (width, height) in enumerate(SIZES):
        image = random_image(height, width, seed=i)
        for family in families:
            processed = family.process(image, ckpt.tokenizer)
            ids, grid = family.placeholder(width, height, ckpt.tokenizer)
            assert (ids, grid) == (processed.token_ids, processed.grid_thw), (family.name, width, height)
            assert ids.count(family.image_token_id) > 0


def messages_with(urls: list[str], text: str = "What is in the picture?") -> list[ChatMessage]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Compare"}]
    for url in urls:
        parts += [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": " and "}]
    parts.append({"type": "text", "text": text})
    return [
        ChatMessage(role="system", content="Be brief."),
        ChatMessage(role="user", content=parts),
    ]


def template_messages(count: int, text: str = "What is in the picture?") -> list[dict[str, Any]]:
    """The same chat as `messages_with`, as LLM.chat renders it (`{"type": "image"}`)."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": "Compare"}]
    for _ in range(count):
        parts += [{"type": "image"}, {"type": "text", "text": " and "}]
    parts.append({"type": "text", "text": text})
    return [{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}]


def chat_of(pngs: list[bytes], text: str = "What is in the picture?") -> list[ChatMessage]:
    return messages_with([data_url(png) for png in pngs], text)


async def load_images(family: VisionFamily, pngs: list[bytes]) -> list[LoadedImage]:
    loader = ImageLoader(MediaSettings(), "tiny-vlm", family)
    return await loader.load(chat_of(pngs))


def pngs_of(sizes: list[tuple[int, int]], seed: int = 0) -> list[bytes]:
    return [png_bytes(random_image(h, w, seed=seed + i)) for i, (w, h) in enumerate(sizes)]


@pytest.mark.parametrize("count", [1, 3])
async def test_chat_prompt_equals_the_engine_path(ckpt: Checkpoint, count: int) -> None:
    family, tok = ckpt.family, ckpt.tokenizer
    pngs = pngs_of(SIZES[1 : 1 + count])
    loaded = await load_images(family, pngs)
    prompt = chat_prompt(tok, chat_of(pngs), images=loaded, vision=family)

    decoded = [decode_image(png) for png in pngs]
    ref_ids, mm = expand_image_prompt(family, tok, tok.encode_chat(template_messages(count)), decoded)
    assert prompt.token_ids == ref_ids
    assert len(prompt.images) == count
    for spec, ref, png in zip(prompt.images, mm.images, pngs, strict=True):
        assert spec.content_hash == ref.content_hash
        assert tuple(map(tuple, spec.runs)) == ref.runs
        assert spec.grid_thw == ref.grid_thw
        assert spec.data == png
    # Image tokens are prompt tokens (the engine counts len(prompt_token_ids) as usage):
    # each image token of the template became its whole placeholder.
    text_only = tok.encode_chat(template_messages(count))
    expansion = sum(len(family.placeholder(w, h, tok)[0]) for w, h in SIZES[1 : 1 + count])
    assert len(prompt.token_ids) == len(text_only) - count + expansion
    # The gateway's block keys equal the engine's, image extras included.
    ns = namespace_key("m", "float32", 4)
    route = RouteRequest("r", "m", prompt.token_ids, image_spans(prompt.images))
    assert route.block_keys(4, ns) == block_keys(ref_ids, 4, ns, mm.block_extras)
    for start in range(0, len(ref_ids) - 4, 4):
        assert route._block_extras(start, start + 4) == mm.block_extras(start, start + 4)


def test_placeholder_expansion_equals_the_pixel_path(ckpt: Checkpoint) -> None:
    family, tok = ckpt.family, ckpt.tokenizer
    ids = tok.encode_chat(template_messages(3))
    images = [random_image(h, w, seed=i) for i, (w, h) in enumerate(SIZES[2:5])]
    ref_ids, mm = expand_image_prompt(family, tok, ids, images)
    out, placements = expand_image_placeholders(family, tok, ids, [(im.width, im.height) for im in images])
    assert out == ref_ids
    assert [(p.runs, p.grid_thw) for p in placements] == [(i.runs, i.grid_thw) for i in mm.images]
    assert [(p.offset, p.end) for p in placements] == [(i.offset, i.end) for i in mm.images]
    with pytest.raises(ValueError, match="placeholders for 2 images"):
        expand_image_placeholders(family, tok, ids, [(10, 10)] * 2)


async def test_user_text_spelling_the_image_token_is_text(ckpt: Checkpoint) -> None:
    family, tok = ckpt.family, ckpt.tokenizer
    pngs = pngs_of([(60, 100)])
    loaded = await load_images(family, pngs)
    sneaky = f"look {family.image_token}{family.image_token} here"
    guarded = chat_prompt(tok, chat_of(pngs, sneaky), images=loaded, vision=family)
    plain = chat_prompt(tok, chat_of(pngs, "look here"), images=loaded, vision=family)
    assert guarded.token_ids.count(family.image_token_id) == plain.token_ids.count(family.image_token_id)


async def test_a_template_that_drops_images_is_a_400(checkpoints: dict[str, Checkpoint]) -> None:
    ckpt = checkpoints["idefics3"]
    loaded = await load_images(ckpt.family, pngs_of([(60, 100)]))
    tok = Tokenizer.from_dir(ckpt.path)
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(APIError) as info:
        chat_prompt(tok, chat_of(pngs_of([(60, 100)])), images=loaded, vision=ckpt.family)
    assert info.value.param == "messages" and "does not place every image" in info.value.message


def test_text_model_chat_with_image_parts_is_a_400(checkpoints: dict[str, Checkpoint]) -> None:
    tok = checkpoints["qwen2_vl"].tokenizer
    with pytest.raises(APIError) as info:
        chat_prompt(tok, chat_of(pngs_of([(60, 100)])))
    assert info.value.code == "images_not_supported"


async def test_context_length_counts_image_tokens(checkpoints: dict[str, Checkpoint]) -> None:
    ckpt = checkpoints["qwen2_vl"]
    family = ckpt.variant({})  # the real model's processor: a 1500x1000 image is ~1900 tokens
    pngs = pngs_of([(1500, 1000)])
    loaded = await load_images(family, pngs)
    prompt = chat_prompt(ckpt.tokenizer, chat_of(pngs), images=loaded, vision=family)
    n = len(prompt.token_ids)
    assert n > 1000
    check_context_length(n, None, n + 1, "messages")
    with pytest.raises(APIError) as info:
        check_context_length(n, None, 1024, "messages")
    assert (
        info.value.code == "context_length_exceeded" and f"your prompt has {n} tokens" in info.value.message
    )


class CapturingDispatcher:
    def __init__(self) -> None:
        self.requests: list[GenerateRequest] = []
        self.registry = InstanceRegistry()  # no instance: the response fingerprint is the gateway's

    async def submit(self, request: GenerateRequest) -> object:
        self.requests.append(request)
        return SimpleNamespace(finished=True, remote_finished=True, instance_id="w")

    def cancel(self, stream: object, reason: str) -> None:
        pass


async def test_generate_request_carries_the_images(checkpoints: dict[str, Checkpoint]) -> None:
    ckpt = checkpoints["qwen2_vl"]
    pngs = pngs_of([(60, 100), (90, 56)])
    loaded = await load_images(ckpt.family, pngs)
    prompt = chat_prompt(ckpt.tokenizer, chat_of(pngs), images=loaded, vision=ckpt.family)
    dispatcher = CapturingDispatcher()
    core = GatewayCore(dispatcher, AdmissionController(8, 8, 1), None, 60.0)  # type: ignore[arg-type]
    gen = Generation(core, "chatcmpl-x", "m", [prompt], SamplingParams(max_tokens=2))
    await gen.start()
    gen.close()
    (sent,) = dispatcher.requests
    assert sent.prompt_token_ids == prompt.token_ids and sent.images == prompt.images
    assert [image.data for image in sent.images] == pngs
