"""Our Qwen2-VL and Idefics3 preprocessing against HF's PIL image processors (bit-equal
pixel_values, grids, masks, tile counts) and our prompt expansion against HF's
processors' token ids."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
from transformers.models.idefics3.processing_idefics3 import Idefics3Processor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

from rtpllm.multimodal import idefics3_processor as idefics3
from rtpllm.multimodal import qwen2_vl_processor as qwen2_vl
from rtpllm.multimodal.image_input import ImageError

# (height, width): square, portrait, landscape, tiny, extreme aspect ratios, and sizes
# that are and are not multiples of the patch factor.
SIZES = [(100, 60), (28, 28), (333, 517), (10, 300), (1000, 40), (3, 3), (57, 113)]


def random_image(height: int, width: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    return Image.fromarray(pixels, mode)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [random_image(h, w, seed=i) for i, (h, w) in enumerate(SIZES)]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level, no merges: every character is its own token, so token ids compare the
    expanded text exactly, newlines included; the placeholder strings are special tokens."""
    vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    specials = [qwen2_vl.VISION_START, qwen2_vl.IMAGE_PAD, qwen2_vl.VISION_END, "<|video_pad|>"]
    specials += [
        idefics3.FAKE_IMAGE_TOKEN,
        idefics3.IMAGE_TOKEN,
        idefics3.GLOBAL_IMAGE_TOKEN,
        "<end_of_utterance>",
    ]
    specials += [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


class _Qwen2VLProcessorWithoutVideo(Qwen2VLProcessor):
    """HF's processor insists its video processor is a torchvision-backed class; images
    never touch it, so the check is skipped for a missing one."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)


# ---------------------------------------------------------------- Qwen2-VL

QWEN_CONFIGS = [
    {},
    {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 64},
    {"min_pixels": 28 * 28 * 16, "max_pixels": 28 * 28 * 32},
]


@pytest.mark.parametrize("kwargs", QWEN_CONFIGS, ids=["default", "small-max", "large-min"])
def test_qwen2_vl_pixel_values_equal_hf(images: list[Image.Image], kwargs: dict[str, int]) -> None:
    ref = Qwen2VLImageProcessorPil(**kwargs)(images, return_tensors="pt")
    ours = qwen2_vl.Qwen2VLImageProcessor(qwen2_vl.Qwen2VLImageConfig(**kwargs))
    out = ours(images)
    assert out.pixel_values.dtype == torch.float32
    assert torch.equal(out.image_grid_thw, ref["image_grid_thw"])
    assert torch.equal(out.pixel_values, ref["pixel_values"])
    # Token counts known from the size alone, before decoding, match what the pixels give.
    assert out.num_image_tokens == [ours.num_image_tokens(h, w) for h, w in SIZES]
    assert out.num_image_tokens == [int(g.prod()) // 4 for g in ref["image_grid_thw"]]


def test_qwen2_vl_config_from_hf_preprocessor_config() -> None:
    hf = Qwen2VLImageProcessorPil(min_pixels=3136, max_pixels=12544).to_dict()
    config = qwen2_vl.Qwen2VLImageConfig.from_hf(hf)
    assert (config.min_pixels, config.max_pixels) == (3136, 12544)
    assert config.image_mean == qwen2_vl.OPENAI_CLIP_MEAN and config.merge_size == 2
    legacy = qwen2_vl.Qwen2VLImageConfig.from_hf({"min_pixels": 100, "max_pixels": 200})
    assert (legacy.min_pixels, legacy.max_pixels) == (100, 200)


def test_smart_resize_equals_hf_over_many_sizes() -> None:
    rng = np.random.default_rng(1)
    for height, width in rng.integers(1, 3000, (300, 2)).tolist():
        if max(height, width) / min(height, width) > 200:
            continue
        for min_pixels, max_pixels in [(56 * 56, 28 * 28 * 1280), (3136, 12544)]:
            expected = hf_smart_resize(height, width, 28, min_pixels, max_pixels)
            assert qwen2_vl.smart_resize(height, width, 28, min_pixels, max_pixels) == expected


def test_qwen2_vl_refuses_extreme_aspect_ratios() -> None:
    with pytest.raises(ImageError, match="aspect ratio 250:1 exceeds 200:1") as exc:
        qwen2_vl.Qwen2VLImageProcessor()([random_image(2, 500)])
    assert exc.value.reason == "aspect_ratio"


def test_qwen2_vl_rgba_input_equals_hf() -> None:
    image = random_image(50, 70, seed=5, mode="RGBA")
    ref = Qwen2VLImageProcessorPil()([image], return_tensors="pt")
    assert torch.equal(qwen2_vl.Qwen2VLImageProcessor()([image]).pixel_values, ref["pixel_values"])


def test_qwen2_vl_prompt_expansion_equals_hf(tokenizer: PreTrainedTokenizerFast) -> None:
    kwargs = {"min_pixels": 56 * 56, "max_pixels": 28 * 28 * 16}
    images = [random_image(100, 60), random_image(56, 300, seed=1)]
    hf = _Qwen2VLProcessorWithoutVideo(
        image_processor=Qwen2VLImageProcessorPil(**kwargs), tokenizer=tokenizer
    )
    placeholder = qwen2_vl.VISION_START + qwen2_vl.IMAGE_PAD + qwen2_vl.VISION_END
    text = f"Look: {placeholder} and\n{placeholder}. Same?"
    ref = hf(text=[text], images=images)["input_ids"][0]

    counts = qwen2_vl.Qwen2VLImageProcessor(qwen2_vl.Qwen2VLImageConfig(**kwargs))(images).num_image_tokens
    assert counts[0] != counts[1]  # the order of expansion matters
    expanded = qwen2_vl.expand_image_tokens(text, counts)
    assert tokenizer(expanded)["input_ids"] == ref
    assert (
        expanded
        == f"Look: {qwen2_vl.image_placeholder(counts[0])} and\n{qwen2_vl.image_placeholder(counts[1])}. Same?"
    )
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders for 1 images"):
        qwen2_vl.expand_image_tokens(text, counts[:1])


# ---------------------------------------------------------------- Idefics3

IDEFICS_CONFIGS = {
    "small-tiles": {"size": {"longest_edge": 4 * 64}, "max_image_size": {"longest_edge": 64}},
    "odd-tiles": {"size": {"longest_edge": 200}, "max_image_size": {"longest_edge": 48}},
    "no-splitting": {
        "size": {"longest_edge": 256},
        "max_image_size": {"longest_edge": 64},
        "do_image_splitting": False,
    },
}


@pytest.mark.parametrize("name", list(IDEFICS_CONFIGS))
def test_idefics3_pixel_values_equal_hf(images: list[Image.Image], name: str) -> None:
    kwargs = IDEFICS_CONFIGS[name]
    ref = Idefics3ImageProcessorPil(**kwargs)(images, return_tensors="pt", return_row_col_info=True)
    ours = idefics3.Idefics3ImageProcessor(idefics3.Idefics3ImageConfig.from_hf(kwargs))
    out = ours(images)
    assert (out.rows, out.cols) == (ref["rows"][0], ref["cols"][0])
    assert torch.equal(out.pixel_values, ref["pixel_values"][0])
    assert torch.equal(out.pixel_attention_mask, ref["pixel_attention_mask"][0].bool())
    assert out.tiles_per_image == [r * c + 1 for r, c in zip(out.rows, out.cols, strict=True)]
    # Grids known from the size alone, before decoding, match the pixels' and HF's.
    assert [ours.grid(h, w) for h, w in SIZES] == list(zip(out.rows, out.cols, strict=True))


def test_idefics3_default_config_equals_hf() -> None:
    # The released config: 1456 longest edge, 364-pixel tiles (slow, so two images only).
    images = [random_image(333, 517, seed=7), random_image(40, 30, seed=8)]
    ref = Idefics3ImageProcessorPil()(images, return_tensors="pt", return_row_col_info=True)
    out = idefics3.Idefics3ImageProcessor()(images)
    assert (out.rows, out.cols) == (ref["rows"][0], ref["cols"][0]) == ([3, 4], [4, 3])
    assert torch.equal(out.pixel_values, ref["pixel_values"][0])


def test_idefics3_tile_counts_equal_hf_without_pixels() -> None:
    hf = Idefics3ImageProcessorPil()
    ours = idefics3.Idefics3ImageProcessor()
    rng = np.random.default_rng(2)
    for height, width in rng.integers(1, 5000, (200, 2)).tolist():
        _, rows, cols = hf.get_number_of_image_patches(height, width)
        assert ours.grid(height, width) == (rows, cols), (height, width)


def test_idefics3_rgba_input_equals_hf() -> None:
    image = random_image(50, 70, seed=5, mode="RGBA")
    kwargs = IDEFICS_CONFIGS["small-tiles"]
    ref = Idefics3ImageProcessorPil(**kwargs)([image], return_tensors="pt")
    out = idefics3.Idefics3ImageProcessor(idefics3.Idefics3ImageConfig.from_hf(kwargs))([image])
    assert torch.equal(out.pixel_values, ref["pixel_values"][0])


def test_pad_tiles_masks_real_pixels() -> None:
    tiles = [torch.ones(3, 4, 6), torch.full((3, 2, 3), 2.0)]
    values, mask = idefics3.pad_tiles(tiles)
    assert values.shape == (2, 3, 4, 6) and mask.shape == (2, 4, 6)
    assert mask[0].all() and mask[1, :2, :3].all() and mask[1].sum() == 6
    assert (values[1, :, :2, :3] == 2).all() and values[1].sum() == 2 * 18


@pytest.mark.parametrize("name", ["small-tiles", "no-splitting"])
def test_idefics3_prompt_expansion_equals_hf(tokenizer: PreTrainedTokenizerFast, name: str) -> None:
    kwargs = IDEFICS_CONFIGS[name]
    seq_len = idefics3.image_seq_len(image_size=64, patch_size=8, scale_factor=2)
    assert seq_len == 16
    images = [random_image(100, 60), random_image(60, 200, seed=1), random_image(64, 64, seed=2)]
    hf = Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(**kwargs), tokenizer=tokenizer, image_seq_len=seq_len
    )
    image = idefics3.IMAGE_TOKEN
    text = f"User:{image}{image} and\n{image}<end_of_utterance>\nAssistant:"
    ref = hf(text=[text], images=images)["input_ids"][0]

    processed = idefics3.Idefics3ImageProcessor(idefics3.Idefics3ImageConfig.from_hf(kwargs))(images)
    grids = list(zip(processed.rows, processed.cols, strict=True))
    if name == "small-tiles":  # portrait and landscape tile grids, in order
        assert grids[0] != grids[1] and all(r * c > 1 for r, c in grids)
    else:  # single tiles: the global-image-only layout
        assert grids == [(0, 0)] * 3
    expanded = idefics3.expand_image_tokens(text, grids, seq_len)
    assert tokenizer(expanded)["input_ids"] == ref
    assert expanded.count(image) == sum(idefics3.num_image_tokens(r, c, seq_len) for r, c in grids)
