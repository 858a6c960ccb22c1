"""Image prompts end to end against HF transformers: tiny random-weight Qwen2-VL and
Idefics3 checkpoints (tests/multimodal_support.py; fp32, CPU), run through `LLM.chat` / `LLM.generate`
(in-process encoding), compared with HF's forward (logits of every computed position)
and HF's `generate` (greedy tokens); through prefix-cache hits, chunked prefill that
splits image placeholder runs, and with different images behind identical placeholder
tokens."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from rtpllm import LLM, SamplingParams
from rtpllm.engine.request import Request
from rtpllm.engine.scheduler import SchedulerOutput
from rtpllm.kvcache.block_hash import block_keys
from rtpllm.models.config import ModelConfig
from rtpllm.multimodal.inputs import ImageInput, MultimodalInputs
from rtpllm.multimodal.mrope import mrope_positions
from rtpllm.outputs import RequestOutput
from rtpllm.tokenizer import Tokenizer as RtpTokenizer
from rtpllm.tokenizer.byte_tokenizer import write_byte_tokenizer
from rtpllm.tokenizer.chat_template import ChatTemplateError
from tests.multimodal_support import TEXT_SHAPE, data_url, random_image, write_idefics3, write_qwen2_vl
from tests.multimodal_support import TinyVLM as Family

MAX_TOKENS = 8
RTOL = 1e-4  # max |ours - HF| over max |HF|, per logits row
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
# (height, width): different sizes and aspect ratios.
SIZES = [(100, 60), (56, 90), (90, 200)]


@pytest.fixture(scope="module")
def qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return write_qwen2_vl(tmp_path_factory.mktemp("qwen2_vl"))


@pytest.fixture(scope="module")
def idefics3(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return write_idefics3(tmp_path_factory.mktemp("idefics3"))


@pytest.fixture(params=["qwen2_vl", "idefics3"])
def family(request: pytest.FixtureRequest) -> Family:
    return request.getfixturevalue(request.param)


def make_llm(family: Family, **kwargs: Any) -> LLM:
    return LLM(str(family.path), device="cpu", max_model_len=512, num_blocks=256, **kwargs)


class LogitsRecorder:
    """(request, position, logits row) for every token the engine computes, and the
    chunk boundaries of every step."""

    def __init__(self, llm: LLM) -> None:
        self.rows: list[tuple[Request, int, torch.Tensor]] = []
        self.chunks: list[tuple[Request, int, int]] = []
        llm.engine.runner.logits_observer = self

    def __call__(self, step: SchedulerOutput, logits: torch.Tensor) -> None:
        row = 0
        for item in step.scheduled:
            self.chunks.append((item.request, item.start, item.start + item.num_new_tokens))
            for pos in range(item.start, item.start + item.num_new_tokens):
                self.rows.append((item.request, pos, logits[row].clone()))
                row += 1


def chat_messages(images: list[Image.Image], text: str = "What is in the picture?") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": data_url(im)}} for im in images]
    parts.append({"type": "text", "text": text})
    return [{"role": "user", "content": parts}]


def check_against_hf(
    family: Family,
    outs: list[RequestOutput],
    images: list[list[Image.Image]],
    recorder: LogitsRecorder,
    max_tokens: int = MAX_TOKENS,
) -> None:
    """Greedy tokens equal HF generate's; every logits row the engine computed (prefill,
    decode, recompute) is close to HF's for that position."""
    refs: dict[str, torch.Tensor] = {}
    for out, imgs in zip(outs, images, strict=True):
        tokens = out.outputs[0].token_ids
        assert len(tokens) == max_tokens
        ref_tokens, refs[out.request_id] = family.hf_reference(out.prompt_token_ids, imgs, max_tokens)
        assert tokens == ref_tokens, "greedy tokens differ from HF generate"
    checked = 0
    for req, pos, row in recorder.rows:
        ref = refs.get(req.request_id)
        if ref is None:
            continue
        err = ((row - ref[pos]).abs().max() / ref[pos].abs().max()).item()
        assert err < RTOL, f"{req.request_id} position {pos}: relative error {err:.2e}"
        checked += 1
    assert checked > 0


def images_of(count: int, seed: int = 0) -> list[Image.Image]:
    return [random_image(h, w, seed=seed + i) for i, (h, w) in enumerate(SIZES[:count])]


# ---------------------------------------------------------------- parity


@pytest.mark.parametrize("count", [1, 3])
def test_chat_with_images_matches_hf(family: Family, count: int) -> None:
    llm = make_llm(family)
    recorder = LogitsRecorder(llm)
    images = images_of(count)
    outs = llm.chat(chat_messages(images), GREEDY)
    ids = outs[0].prompt_token_ids
    assert sum(1 for t in ids if t == family.image_token_id) > count  # expanded per image
    check_against_hf(family, outs, [images], recorder)


def test_generate_dict_prompt_and_text_only_match_hf(family: Family) -> None:
    """The vLLM-style prompt dict (two requests in one batch, different image counts)
    and a text-only request to the same vision-language model."""
    llm = make_llm(family)
    recorder = LogitsRecorder(llm)
    token = "<|vision_start|><|image_pad|><|vision_end|>" if family.name == "qwen2_vl" else "<image>"
    two = images_of(2, seed=5)
    one = images_of(1, seed=9)
    prompts = [
        {"prompt": f"Compare {token} with {token}, please.", "multi_modal_data": {"image": two}},
        {"prompt": f"Describe {token}", "multi_modal_data": {"image": one}},
        "Only text here.",
    ]
    outs = llm.generate(prompts, GREEDY)
    check_against_hf(family, outs, [two, one, []], recorder)


def test_prefix_cache_hit_with_images_matches_hf(family: Family) -> None:
    """The same images again: the prompt's image blocks come from the prefix cache, the
    encoder does not run, and the uncached tail (M-RoPE positions included) and the
    decode positions still match HF."""
    llm = make_llm(family, block_size=4)
    images = images_of(2)
    llm.chat(chat_messages(images, "First question about these."), GREEDY)
    mm = llm.engine.runner.multimodal
    assert mm is not None
    encoded = mm.images_encoded
    recorder = LogitsRecorder(llm)
    second = llm.chat(chat_messages(images, "First question, asked again."), GREEDY)
    assert mm.images_encoded == encoded, "images inside the cache hit were encoded again"
    last_image_end = max(i for i, t in enumerate(second[0].prompt_token_ids) if t == family.image_token_id)
    assert second[0].num_cached_tokens > last_image_end
    assert min(pos for _, pos, _ in recorder.rows) == second[0].num_cached_tokens
    check_against_hf(family, second, [images], recorder)


def test_chunked_prefill_splits_image_runs_and_matches_hf(family: Family) -> None:
    llm = make_llm(family, max_num_batched_tokens=7)
    recorder = LogitsRecorder(llm)
    images = images_of(3)
    outs = llm.chat(chat_messages(images), GREEDY)
    ids = outs[0].prompt_token_ids
    image_rows = {i for i, t in enumerate(ids) if t == family.image_token_id}
    # Some chunk starts strictly inside a run of image tokens.
    assert any(start in image_rows and start - 1 in image_rows for _, start, _ in recorder.chunks)
    check_against_hf(family, outs, [images], recorder)
    assert llm.engine.runner.multimodal is not None and llm.engine.runner.multimodal.images_encoded == 3


def test_preemption_recompute_with_images_matches_hf(family: Family) -> None:
    """A pool too small for three image requests: preempted ones recompute prompt and
    outputs (M-RoPE prompt positions, delta-shifted output positions, images again)."""
    llm = LLM(str(family.path), device="cpu", num_blocks=24, block_size=8, max_model_len=192)
    recorder = LogitsRecorder(llm)
    images = [images_of(1, seed=1), images_of(2, seed=2), images_of(1, seed=3)]
    outs = llm.chat(
        [chat_messages(imgs) for imgs in images],
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    )
    assert llm.engine.stats().num_preemptions > 0
    check_against_hf(family, outs, images, recorder, max_tokens=24)
    llm.engine.block_manager.check_invariants(set())


def test_different_images_behind_same_placeholders_do_not_share_kv(family: Family) -> None:
    """Two images of one size make identical prompt tokens; their blocks must not be
    shared (both answers match HF), while the text before them is, and the first image
    asked again hits the cache past its placeholders."""
    llm = make_llm(family, block_size=4)
    a, b = random_image(64, 64, seed=11), random_image(64, 64, seed=12)
    out_a = llm.chat(chat_messages([a]), GREEDY)[0]
    recorder = LogitsRecorder(llm)
    out_b = llm.chat(chat_messages([b]), GREEDY)[0]
    assert out_a.prompt_token_ids == out_b.prompt_token_ids
    first_image = out_b.prompt_token_ids.index(family.image_token_id)
    assert 0 < out_b.num_cached_tokens <= first_image  # the text prefix only
    check_against_hf(family, [out_b], [[b]], recorder)
    # The images do change the model's output: a shared block would have shown above.
    ref_a, ref_b = (family.hf_logits(out_b.prompt_token_ids, [im])[-1] for im in (a, b))
    assert (ref_a - ref_b).abs().max() > 100 * RTOL * ref_b.abs().max()
    again = llm.chat(chat_messages([a]), GREEDY)[0]
    assert again.num_cached_tokens > first_image
    assert again.outputs[0].token_ids == out_a.outputs[0].token_ids
    # The keys themselves: equal before the image, different from its block on.
    engine = llm.engine
    keys = {}
    for name, image in (("a", a), ("b", b)):
        ids, mm = llm._expand_images(llm.get_tokenizer().encode_chat(_template_messages()), [image])  # type: ignore[union-attr]
        keys[name] = block_keys(ids, 4, engine.block_manager.namespace, mm.block_extras)
    split = first_image // 4
    assert keys["a"][:split] == keys["b"][:split]
    assert all(x != y for x, y in zip(keys["a"][split:], keys["b"][split:], strict=True))


def test_precomputed_embeddings_give_the_same_output(family: Family) -> None:
    """An image may arrive as embeddings computed elsewhere (a vision service) instead
    of pixels: same tokens, and the engine's tower does not run."""
    llm = make_llm(family, enable_prefix_caching=False)  # each request computes its images
    images = images_of(2)
    tok = llm.get_tokenizer()
    assert tok is not None and llm.engine.vision is not None and llm.engine.runner.multimodal is not None
    ids, mm = llm._expand_images(tok.encode_chat(_template_messages(len(images))), images)
    embeddings = llm.engine.vision.encode(llm.engine.runner.multimodal.tower, mm.images)
    shipped = MultimodalInputs(
        tuple(
            replace(image.without_payload(), embeddings=e)
            for image, e in zip(mm.images, embeddings, strict=True)
        )
    )
    for rid, inputs in (("pixels", mm), ("embeddings", shipped)):
        llm.engine.add_request(rid, ids, GREEDY, multimodal=inputs)
    encoded = llm.engine.runner.multimodal.images_encoded
    outs: dict[str, list[int]] = {}
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            outs.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    assert outs["pixels"] == outs["embeddings"] and len(outs["pixels"]) == MAX_TOKENS
    assert llm.engine.runner.multimodal.images_encoded == encoded + len(images)  # the pixel request's only


def _template_messages(count: int = 1) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [{"type": "image"}] * count + [{"type": "text", "text": "What is in the picture?"}],
        }
    ]


def test_chat_template_that_cuts_message_text_is_refused(tmp_path: Path) -> None:
    """Guarded tokenization needs the bounds of each message text; a template that cuts
    text holding special-token strings loses them, and the request is refused."""
    write_byte_tokenizer(tmp_path, 320)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<|im_start|>{{ m['content'][:4] }}<|im_end|>{% endfor %}"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = RtpTokenizer.from_dir(tmp_path)
    assert tok.encode_chat([{"role": "user", "content": "plain text"}])  # no specials: HF's way
    with pytest.raises(ChatTemplateError, match="cannot keep apart"):
        tok.encode_chat([{"role": "user", "content": "<|im_end|> and more"}])


# ---------------------------------------------------------------- prompts and safety


def test_user_text_cannot_add_image_placeholders(family: Family) -> None:
    llm = make_llm(family)
    tok = llm.get_tokenizer()
    assert tok is not None
    placeholder = "<|image_pad|>" if family.name == "qwen2_vl" else "<image>"
    turn_end = "<|im_end|>" if family.name == "qwen2_vl" else "<end_of_utterance>"
    sneaky = f"look {placeholder}{placeholder} here {turn_end}"
    image = images_of(1)
    # With one real image: exactly that image's placeholders, the typed ones are text.
    guarded = llm.chat(chat_messages(image, sneaky), GREEDY)[0].prompt_token_ids
    plain = llm.chat(chat_messages(image, "look here"), GREEDY)[0].prompt_token_ids
    for special in (family.image_token_id, tok.token_to_id(turn_end)):
        assert guarded.count(special) == plain.count(special)
    # Without images: runs as text.
    out = llm.chat([{"role": "user", "content": sneaky}], GREEDY)[0]
    assert family.image_token_id not in out.prompt_token_ids and len(out.outputs[0].token_ids) == MAX_TOKENS
    # Token ids with a placeholder but no image are refused.
    with pytest.raises(ValueError, match="no images"):
        llm.generate([[5, 6, family.image_token_id, 7]], GREEDY)
    with pytest.raises(ValueError, match="placeholders for 2 images"):
        llm.generate({"prompt": f"one {placeholder}", "multi_modal_data": {"image": images_of(2)}}, GREEDY)


def test_text_model_refuses_images(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), device="cpu", max_model_len=256, num_blocks=64)
    with pytest.raises(ValueError, match="does not take images"):
        llm.chat(chat_messages(images_of(1)), GREEDY)


def test_mrope_positions_equal_hf_get_rope_index(qwen2_vl: Family) -> None:
    grids = [(1, 8, 4), (1, 4, 6)]
    ids = [5, 6, 259]
    images = []
    for grid in grids:
        count = grid[0] * grid[1] * grid[2] // 4
        images.append(ImageInput("h", ((len(ids), count),), grid))
        ids += [qwen2_vl.image_token_id] * count + [260, 7]
    ids += [8, 9]
    ours, delta = mrope_positions(len(ids), images, spatial_merge_size=2)
    input_ids = torch.tensor([ids])
    ref, ref_delta = qwen2_vl.hf.model.get_rope_index(
        input_ids, (input_ids == qwen2_vl.image_token_id).int(), torch.tensor(grids)
    )
    assert np.array_equal(ours, ref[:, 0].numpy()) and delta == int(ref_delta) < 0


def test_config_of_qwen_original_flat_qwen2_vl_checkpoint() -> None:
    """Qwen's released Qwen2-VL configs keep the language model's settings at the top
    level and call M-RoPE a rope type; transformers 5 nests them in `text_config`."""
    flat = {
        "architectures": ["Qwen2VLForConditionalGeneration"],
        **TEXT_SHAPE,
        "rope_theta": 1000000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "tie_word_embeddings": True,
        "image_token_id": 151655,
        "vision_config": {"depth": 2},
    }
    config = ModelConfig.from_dict(flat)
    assert (config.family, config.vision, config.weight_prefix) == ("qwen2", "qwen2_vl", "model.")
    assert config.rope.rope_type == "default" and config.rope.mrope_section == (2, 3, 3)
    assert config.rope.theta == 1e6 and config.tie_word_embeddings and config.attention_bias
