"""The kvstore block codec: bit-exact round trips and every kind of bad block refused.

Pools hold random bit patterns (NaNs included), compared as integers. A refused batch
writes nothing: the destination pool is checked whole after every failure.
"""

from __future__ import annotations

import struct

import pytest
import torch

from rtpllm.kvcache.block_hash import namespace_key
from rtpllm.kvstore import block_codec
from rtpllm.kvstore.block_codec import (
    CorruptBlock,
    InvalidBlock,
    LayoutMismatch,
    block_payload_bytes,
    check_block,
    decode_into,
    encode_blocks,
    header_len,
    parse_header,
)
from rtpllm.transfer.blocks import LayerPoolBlocks, PoolBlocks
from rtpllm.transfer.layout import KVLayout

pytestmark = pytest.mark.timeout(30)

NS = namespace_key("tiny-llama", "bfloat16", 4)


def make_pool(
    num_blocks: int = 8,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    layers: int = 3,
    head_dim: int = 8,
    device: str = "cpu",
) -> torch.Tensor:
    """[layers, 2, num_blocks + 1, block_size 4, heads 2, head_dim] of random bits."""
    kv = torch.empty(layers, 2, num_blocks + 1, 4, 2, head_dim, dtype=dtype)
    bits(kv).random_(generator=torch.Generator().manual_seed(seed))
    return kv.to(device)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(bits(a), bits(b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pool_seen_through_its_blocks_view_encodes_and_decodes_the_same_bytes(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A KVBlocks view (how a tensor-parallel pool is passed: whole blocks read and written
    through `read_blocks`/`write_blocks`) gives the bytes of the direct tensor path, in
    chunks too, and a refused batch writes nothing through it either."""
    src = make_pool(10, dtype, seed=1)
    layout = KVLayout.of(src, NS)
    ids = [7, 0, 3, 9, 4]
    direct = encode_blocks(src, ids, layout)
    monkeypatch.setattr(block_codec, "CHUNK_BYTES", 2 * block_payload_bytes(layout))  # chunks of 2 blocks
    assert encode_blocks(PoolBlocks(src, layout), ids, layout) == direct
    dst = make_pool(6, dtype, seed=2)
    want = dst.clone()
    decode_into(want, [5, 1, 0, 2, 6], direct, layout)
    view = PoolBlocks(dst, layout)
    bad = bytearray(direct[3])
    bad[-1] ^= 0xFF
    before = dst.clone()
    with pytest.raises(CorruptBlock) as err:
        decode_into(view, [5, 1, 0, 2, 6], [*direct[:3], bytes(bad), direct[4]], layout)
    assert err.value.index == 3 and same(dst, before)
    decode_into(view, [5, 1, 0, 2, 6], direct, layout)
    assert same(dst, want)
    with pytest.raises(ValueError, match="layout does not match"):
        encode_blocks(view, [0], KVLayout.of(src, b"another-namespace"))
    with pytest.raises(ValueError, match="out of range"):
        encode_blocks(view, [7], layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    src = make_pool(10, dtype, seed=1)
    dst = make_pool(6, dtype, seed=2)  # pools of other sizes exchange blocks freely
    layout = KVLayout.of(src, NS)
    assert KVLayout.of(dst, NS) == layout
    src_ids, dst_ids = [7, 0, 3, 9], [5, 1, 0, 2]
    before = dst.clone()
    payloads = encode_blocks(src, src_ids, layout)
    assert all(isinstance(p, bytes) for p in payloads)
    assert [len(p) for p in payloads] == [header_len(layout) + block_payload_bytes(layout)] * 4
    assert block_payload_bytes(layout) == 3 * 2 * 4 * 2 * 8 * src.element_size()
    decode_into(dst, dst_ids, payloads, layout)
    for s, d in zip(src_ids, dst_ids, strict=True):
        assert same(dst[:, :, d], src[:, :, s])
    untouched = [b for b in range(dst.shape[2]) if b not in dst_ids]
    assert same(dst[:, :, untouched], before[:, :, untouched])


def test_header_describes_the_block() -> None:
    src = make_pool(4)
    layout = KVLayout.of(src, NS)
    (payload,) = encode_blocks(src, [2], layout)
    header = check_block(payload)
    assert header.layout == layout
    assert header.payload_len == block_payload_bytes(layout)
    assert header.header_len % 16 == 0 and header.header_len == header_len(layout)
    # The payload is the block's raw bytes: a reader needs nothing but the header.
    raw = src[:, :, 2].contiguous().view(-1).view(torch.uint8).numpy().tobytes()
    assert payload[header.header_len :] == raw


def test_chunked_encode_and_decode(monkeypatch: pytest.MonkeyPatch) -> None:
    src, dst = make_pool(9, seed=3), make_pool(9, seed=4)
    layout = KVLayout.of(src, NS)
    # Two blocks per chunk: the gather runs in several steps, the result is the same.
    monkeypatch.setattr(block_codec, "CHUNK_BYTES", 2 * block_payload_bytes(layout) + 1)
    ids = [8, 1, 2, 5, 0]
    decode_into(dst, ids, encode_blocks(src, ids, layout), layout)
    assert same(dst[:, :, ids], src[:, :, ids])


def _refused(
    dst: torch.Tensor,
    payloads: list[bytes],
    layout: KVLayout,
    exc: type[InvalidBlock],
    match: str,
    index: int,
    **kw: bool,
) -> None:
    before = dst.clone()
    with pytest.raises(exc, match=match) as info:
        decode_into(dst, list(range(len(payloads))), payloads, layout, **kw)
    assert info.value.index == index
    assert same(dst, before), "a refused batch must write nothing"


def test_flipped_payload_byte_is_corrupt() -> None:
    src, dst = make_pool(4), make_pool(4, seed=9)
    layout = KVLayout.of(src, NS)
    payloads = encode_blocks(src, [0, 1, 2], layout)
    bad = bytearray(payloads[1])
    bad[len(bad) // 2] ^= 0x01
    payloads[1] = bytes(bad)
    _refused(dst, payloads, layout, CorruptBlock, "checksum mismatch", 1)
    with pytest.raises(CorruptBlock):
        check_block(payloads[1])
    # The caller can still restore the good prefix.
    decode_into(dst, [0], payloads[:1], layout)
    assert same(dst[:, :, 0], src[:, :, 0])


def test_flipped_header_byte_is_corrupt_not_another_layout() -> None:
    src, dst = make_pool(4), make_pool(4, seed=9)
    layout = KVLayout.of(src, NS)
    (payload,) = encode_blocks(src, [0], layout)
    for offset in (12, 20, 40, 54):  # payload length, num_layers, dtype, namespace
        bad = bytearray(payload)
        bad[offset] ^= 0x01
        with pytest.raises(CorruptBlock):
            decode_into(dst, [0], [bytes(bad)], layout)


@pytest.mark.parametrize("cut", [1, 100, "header", "all-but-prefix"])
def test_truncated_block_is_corrupt(cut: int | str) -> None:
    src, dst = make_pool(4), make_pool(4, seed=9)
    layout = KVLayout.of(src, NS)
    (payload,) = encode_blocks(src, [3], layout)
    if cut == "header":
        short = payload[: header_len(layout) - 4]
    elif cut == "all-but-prefix":
        short = payload[:10]
    else:
        short = payload[: len(payload) - int(cut)]
    _refused(dst, [short], layout, CorruptBlock, "truncated", 0)
    _refused(dst, [short], layout, CorruptBlock, "truncated", 0, verify_checksum=False)


def test_trailing_bytes_are_corrupt() -> None:
    src, dst = make_pool(4), make_pool(4, seed=9)
    layout = KVLayout.of(src, NS)
    (payload,) = encode_blocks(src, [3], layout)
    _refused(dst, [payload + b"\0"], layout, CorruptBlock, "trailing bytes", 0)


def test_bad_magic_and_version_are_corrupt() -> None:
    src, dst = make_pool(4), make_pool(4, seed=9)
    layout = KVLayout.of(src, NS)
    (payload,) = encode_blocks(src, [3], layout)
    _refused(dst, [b"XKVB" + payload[4:]], layout, CorruptBlock, "magic", 0)
    newer = payload[:4] + struct.pack("<H", 3) + payload[6:]
    _refused(dst, [newer], layout, CorruptBlock, "version 3", 0)
    # Version 2 is a mixed pool's block (its header names the layers' formats): a
    # uniform block relabeled so names none.
    relabeled = payload[:4] + struct.pack("<H", 2) + payload[6:]
    _refused(dst, [relabeled], layout, CorruptBlock, "without layer formats", 0)
    _refused(dst, [b"not a block at all"], layout, CorruptBlock, "truncated", 0)


def test_wrong_namespace_is_a_layout_mismatch() -> None:
    src, dst = make_pool(4), make_pool(4, seed=9)
    other_model = namespace_key("other-model", "bfloat16", 4)
    payloads = encode_blocks(src, [0, 1], KVLayout.of(src, NS))
    payloads[1:] = encode_blocks(src, [1], KVLayout.of(src, other_model))
    _refused(dst, payloads, KVLayout.of(dst, NS), LayoutMismatch, "namespace", 1)


@pytest.mark.parametrize(
    "other",
    [
        dict(dtype=torch.float32),  # same shape, other dtype
        dict(head_dim=16),
        dict(layers=2),
    ],
)
def test_wrong_layout_is_a_layout_mismatch(other: dict) -> None:
    src = make_pool(4, **other)
    dst = make_pool(4, seed=9)
    payloads = encode_blocks(src, [0], KVLayout.of(src, NS))
    field = {"dtype": "dtype", "head_dim": "head_dim", "layers": "num_layers"}[next(iter(other))]
    _refused(dst, payloads, KVLayout.of(dst, NS), LayoutMismatch, field, 0)
    _refused(dst, payloads, KVLayout.of(dst, NS), LayoutMismatch, field, 0, verify_checksum=False)


def test_unverified_decode_still_checks_the_layout_but_not_the_crc() -> None:
    src, dst = make_pool(4), make_pool(4, seed=9)
    layout = KVLayout.of(src, NS)
    (payload,) = encode_blocks(src, [2], layout)
    bad = bytearray(payload)
    bad[-1] ^= 0xFF
    decode_into(dst, [2], [bytes(bad)], layout, verify_checksum=False)  # the caller vouched for it
    assert not same(dst[:, :, 2], src[:, :, 2])


def test_argument_errors() -> None:
    src = make_pool(4)
    layout = KVLayout.of(src, NS)
    with pytest.raises(ValueError, match="out of range"):
        encode_blocks(src, [5], layout)
    payloads = encode_blocks(src, [0, 1], layout)
    with pytest.raises(ValueError, match="2 payloads"):
        decode_into(src, [0], payloads, layout)
    with pytest.raises(ValueError, match="does not match"):
        encode_blocks(src, [0], KVLayout.of(make_pool(4, head_dim=16), NS))
    assert encode_blocks(src, [], layout) == []
    decode_into(src, [], [], layout)


def test_parse_header_accepts_memoryview() -> None:
    src = make_pool(4)
    layout = KVLayout.of(src, NS)
    (payload,) = encode_blocks(src, [1], layout)
    assert parse_header(memoryview(payload)).layout == layout
    dst = make_pool(4, seed=5)
    decode_into(dst, [3], [memoryview(payload)], layout)
    assert same(dst[:, :, 3], src[:, :, 1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_round_trip(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    src = make_pool(12, dtype, seed=1, device="cuda")
    layout = KVLayout.of(src, NS)
    monkeypatch.setattr(block_codec, "CHUNK_BYTES", 3 * block_payload_bytes(layout))
    ids = [11, 0, 4, 7, 3, 2, 9]
    payloads = encode_blocks(src, ids, layout)
    # Same bytes as the CPU path, and back into a CUDA pool and a CPU pool.
    assert payloads == encode_blocks(src.cpu(), ids, layout)
    dst = make_pool(12, dtype, seed=2, device="cuda")
    before = dst.clone()
    decode_into(dst, ids[::-1], payloads, layout)
    torch.cuda.synchronize()
    for s, d in zip(ids, ids[::-1], strict=True):
        assert same(dst[:, :, d], src[:, :, s])
    rest = [b for b in range(dst.shape[2]) if b not in ids]
    assert same(dst[:, :, rest], before[:, :, rest])


# -- mixed per-layer pools (a per-layer KV plan) -----------------------------------------

MIXED = ("fp8", "bfloat16", "int8")


def make_mixed(num_blocks: int = 8, seed: int = 0, formats: tuple[str, ...] = MIXED) -> LayerPoolBlocks:
    """A mixed pool's layer pages of `num_blocks + 1` blocks (block_size 4, heads 2,
    head_dim 8) of random bytes."""
    blocks = LayerPoolBlocks.allocate(KVLayout.of_layers(NS, formats, 4, 2, 8), num_blocks + 1)
    gen = torch.Generator().manual_seed(seed)
    for page in blocks.pages:
        page.view(torch.uint8).random_(generator=gen)
    return blocks


def layer_bytes(blocks: LayerPoolBlocks, ids: list[int]) -> list[torch.Tensor]:
    return [p.view(torch.uint8)[:, ids].clone() for p in blocks.pages]


def test_mixed_pool_blocks_round_trip_bit_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    """A block's payload is every layer's pages, each its own size; the header (version
    2) names the formats; chunked or not, the bytes come back where they belong."""
    src, dst = make_mixed(10, seed=1), make_mixed(6, seed=2)
    layout = src.layout
    assert block_payload_bytes(layout) == 2 * 4 * 2 * (12 + 16 + 12)  # fp8 rows 8 + 4 bytes, bf16 16
    ids, targets = [7, 0, 3, 10, 4], [5, 1, 0, 2, 6]
    payloads = encode_blocks(src, ids, layout)
    header = check_block(payloads[0])
    assert header.version == 2 and header.layout == layout
    assert header.payload_len == block_payload_bytes(layout)
    first = payloads[0][header.header_len :]
    # Layer by layer, each layer's K page then its V page.
    want = b"".join(p.view(torch.uint8)[:, 7].numpy().tobytes() for p in src.pages)
    assert first == want
    monkeypatch.setattr(block_codec, "CHUNK_BYTES", 2 * block_payload_bytes(layout))  # chunks of 2 blocks
    assert encode_blocks(src, ids, layout) == payloads
    untouched = [b for b in range(dst.num_blocks) if b not in targets]
    before = layer_bytes(dst, untouched)
    decode_into(dst, targets, payloads, layout)
    for a, b in zip(layer_bytes(src, ids), layer_bytes(dst, targets), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(layer_bytes(dst, untouched), before, strict=True))


def test_mixed_blocks_of_other_formats_are_a_layout_mismatch() -> None:
    src = make_mixed(4, seed=1, formats=("int8", "bfloat16", "fp8"))  # same sizes, other formats
    dst = make_mixed(4, seed=2)
    before = layer_bytes(dst, list(range(5)))
    payloads = encode_blocks(src, [1], src.layout)
    with pytest.raises(LayoutMismatch, match="layer_formats: block=int8,bfloat16,fp8 pool=fp8,bfloat16,int8"):
        decode_into(dst, [1], payloads, dst.layout)
    # A uniform pool's block is not a mixed pool's either, whatever its size.
    uniform = make_pool(4, torch.uint8, layers=3, head_dim=12)
    with pytest.raises(LayoutMismatch, match="layer_formats"):
        decode_into(dst, [1], encode_blocks(uniform, [0], KVLayout.of(uniform, NS)), dst.layout)
    assert all(torch.equal(a, b) for a, b in zip(layer_bytes(dst, list(range(5))), before, strict=True))


def test_a_flipped_bit_in_the_layer_formats_is_corrupt() -> None:
    src, dst = make_mixed(4, seed=1), make_mixed(4, seed=2)
    (payload,) = encode_blocks(src, [2], src.layout)
    at = payload.index(b"fp8,bfloat16,int8")
    bad = bytearray(payload)
    bad[at] ^= 0x01  # "gp8": the CRC covers the header's fields, the formats included
    before = layer_bytes(dst, [2])
    with pytest.raises(CorruptBlock, match="checksum"):
        decode_into(dst, [2], [bytes(bad)], dst.layout)
    assert torch.equal(layer_bytes(dst, [2])[0], before[0])


@pytest.mark.gpu
def test_cuda_mixed_round_trip(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layer pages on CUDA: the same encoded bytes as on the CPU, chunked, and back."""
    host = make_mixed(12, seed=1)
    src = LayerPoolBlocks.allocate(host.layout, 13, "cuda")
    for page, cpu in zip(src.pages, host.pages, strict=True):
        page.copy_(cpu)
    monkeypatch.setattr(block_codec, "CHUNK_BYTES", 3 * block_payload_bytes(src.layout))
    ids = [11, 0, 4, 7, 3, 2, 9]
    payloads = encode_blocks(src, ids, src.layout)
    assert payloads == encode_blocks(host, ids, host.layout)
    dst = LayerPoolBlocks.allocate(src.layout, 13, "cuda")
    decode_into(dst, ids[::-1], payloads, dst.layout)
    for a, b in zip(layer_bytes(host, ids), layer_bytes(dst, ids[::-1]), strict=True):
        assert torch.equal(a, b.cpu())
    rest = [b for b in range(13) if b not in ids]
    assert all(not p.view(torch.uint8)[:, rest].any() for p in dst.pages)
