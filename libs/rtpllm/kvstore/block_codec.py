"""One KV block <-> bytes: the format every kvstore tier holds.

A block is `kv[:, :, b]` of a pool [layers, 2, num_blocks + 1, block_size, kv_heads,
head_dim] (rtpllm.kvcache.kv_pool): K and V of all layers, `num_layers * 2 * block_size *
kv_heads * head_dim` elements. Encoded, it is a header then the raw payload bytes in that
order ([layers, 2, block_size, kv_heads, head_dim], the pool's dtype). A block of a mixed
per-layer pool (`KVLayout.layer_formats`) is every layer's pages one after the other,
each [2, block_size, kv_heads, row] in the layer's format: its payload is the sum of the
layers' bytes (`KVLayout.block_bytes`), and its header is version 2, which names them:

    offset  size  field
    0       4     magic b"RKVB"
    4       2     format version (1; 2 for a mixed per-layer pool)
    6       2     header length H (a multiple of 16, so the payload starts aligned)
    8       4     CRC-32 (zlib) of bytes [12, H + payload length): the header fields
                  below, then the payload
    12      8     payload length
    20      16    num_layers, block_size, num_kv_heads, head_dim (u32 each)
    36      16    dtype name, ASCII, NUL-padded ("bfloat16")
    52      2     namespace length N
    54      N     namespace (the block-key seed: model, dtype, KV format, TP, block size)
    version 2 only:
    54 + N  2     layer formats length F
    56 + N  F     the layers' formats, ASCII, comma-separated ("fp8,bfloat16,int8")
    ...     ...   zero padding up to H
    H       ...   payload

A uniform pool's blocks are version 1, byte for byte what they were before mixed pools
moved (blocks already in the SSD and Redis tiers stay readable).

All integers little-endian. The CRC covers the header fields too, so a flipped bit
anywhere reads as `CorruptBlock`, never as a plausible other layout. A well-formed block
of another layout or namespace is `LayoutMismatch`. Both are `InvalidBlock`: a reader
treats either as a miss (ARCHITECTURE rule 6).

Copies: CPU pools are read with one gather for all blocks and written block by block
straight from the payload bytes (np.frombuffer views, no intermediate), on up to
COPY_THREADS threads (CRC checks too). CUDA pools go
through one pinned staging buffer per device: one gather + one device->host copy for all
blocks (encode), one host->device copy + one scatter for all blocks (decode), in chunks of
at most CHUNK_BYTES so a large restore does not need as much free GPU memory as it moves.

A pool that is not one tensor of this process -- a tensor-parallel engine's, each rank
holding its own KV heads, or a mixed per-layer pool, one page tensor per layer -- is
passed as its `KVBlocks` view (rtpllm.engine.sharded_blocks.ShardedPoolBlocks,
rtpllm.transfer.blocks.LayerPoolBlocks): whole blocks are read into and written from a
host buffer through `KVBlocks.read_blocks` / `write_blocks` (every rank's heads via rank
0; every layer's pages), in the same chunks, so the encoded block is the same whole
block, every KV head, whatever the pool's split.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from rtpllm.transfer.blocks import KVBlocks
from rtpllm.transfer.layout import KVLayout

MAGIC = b"RKVB"
VERSION = 1  # a uniform pool's block
VERSION_LAYERS = 2  # a mixed per-layer pool's block: the header names every layer's format
_FORMATS_LEN = struct.Struct("<H")
_PREFIX = struct.Struct("<4sHHI")  # magic, version, header length, crc32
_FIELDS = struct.Struct("<QIIII16sH")  # payload length, layers, block_size, heads, head_dim, dtype, ns length
_CRC_FROM = _PREFIX.size  # the CRC covers everything after the prefix
_ALIGN = 16
# Largest host<->device copy of one step (CUDA pools); a restore of more is chunked.
CHUNK_BYTES = 256 << 20
# Host threads for decoding: one core copies ~6-10 GB/s, the CRC ~4 GB/s; both release
# the GIL, so a few threads multiply that (RTPLLM_KVSTORE_COPY_THREADS overrides).
COPY_THREADS = int(os.environ.get("RTPLLM_KVSTORE_COPY_THREADS", min(4, os.cpu_count() or 1)))
_MIN_PARALLEL_BYTES = 4 << 20  # below this, threads cost more than they save


class InvalidBlock(ValueError):
    """A payload that must not be loaded into a pool; `index` is its position in the
    batch being decoded (None outside a batch). Treat it as a miss."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.index = index


class CorruptBlock(InvalidBlock):
    """Not a whole, intact block: bad magic or version, truncated, or a checksum mismatch."""


class LayoutMismatch(InvalidBlock):
    """An intact block of another layout or namespace than the pool it was meant for."""


@dataclass(frozen=True)
class BlockHeader:
    """The parsed header of an encoded block."""

    version: int
    header_len: int
    crc32: int
    payload_len: int
    layout: KVLayout


def block_payload_bytes(layout: KVLayout) -> int:
    """Payload bytes of one block of `layout` (all layers, K and V)."""
    return layout.block_bytes


def _version(layout: KVLayout) -> int:
    return VERSION_LAYERS if layout.mixed else VERSION


def _formats_field(layout: KVLayout) -> bytes:
    """Version 2's layer formats (length-prefixed); nothing for a uniform layout."""
    if not layout.mixed:
        return b""
    names = ",".join(layout.layer_formats).encode("ascii")
    if len(names) > 0xFFFF:
        raise ValueError("layer formats longer than 65535 bytes")
    return _FORMATS_LEN.pack(len(names)) + names


def header_len(layout: KVLayout) -> int:
    raw = _PREFIX.size + _FIELDS.size + len(layout.namespace) + len(_formats_field(layout))
    return -(-raw // _ALIGN) * _ALIGN


def _header_fields(layout: KVLayout, payload_len: int) -> bytes:
    """Header bytes after the prefix (the part the CRC covers), padding included."""
    dtype = layout.dtype.encode("ascii")
    if len(dtype) > 16:
        raise ValueError(f"dtype name too long for the block header: {layout.dtype}")
    if len(layout.namespace) > 0xFFFF:
        raise ValueError("namespace longer than 65535 bytes")
    fields = (
        _FIELDS.pack(
            payload_len,
            layout.num_layers,
            layout.block_size,
            layout.num_kv_heads,
            layout.head_dim,
            dtype,
            len(layout.namespace),
        )
        + layout.namespace
        + _formats_field(layout)
    )
    return fields + bytes(header_len(layout) - _PREFIX.size - len(fields))


def parse_header(data: bytes | memoryview) -> BlockHeader:
    """The header of an encoded block; raises CorruptBlock if it cannot be one.
    Checks neither the payload length nor the checksum (see `check_block`)."""
    if len(data) < _PREFIX.size + _FIELDS.size:
        raise CorruptBlock(f"truncated block: {len(data)} bytes is shorter than any header")
    magic, version, hlen, crc = _PREFIX.unpack_from(data, 0)
    if magic != MAGIC:
        raise CorruptBlock(f"not a KV block: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version not in (VERSION, VERSION_LAYERS):
        raise CorruptBlock(f"KV block format version {version}, this reader knows {VERSION} and {VERSION_LAYERS}")
    payload_len, layers, block_size, heads, head_dim, dtype, ns_len = _FIELDS.unpack_from(data, _PREFIX.size)
    ns_at = _PREFIX.size + _FIELDS.size
    if hlen < ns_at + ns_len or hlen % _ALIGN or len(data) < hlen:
        raise CorruptBlock(
            f"bad or truncated header: length {hlen}, namespace {ns_len} bytes, block {len(data)} bytes"
        )
    try:
        dtype_name = dtype.rstrip(b"\0").decode("ascii")
    except UnicodeDecodeError:
        raise CorruptBlock(f"bad dtype field in block header: {dtype!r}") from None
    formats = _parse_formats(data, ns_at + ns_len, hlen) if version == VERSION_LAYERS else ()
    layout = KVLayout(bytes(data[ns_at : ns_at + ns_len]), layers, block_size, heads, head_dim, dtype_name, formats)
    return BlockHeader(version, hlen, crc, payload_len, layout)


def _parse_formats(data: bytes | memoryview, at: int, hlen: int) -> tuple[str, ...]:
    """Version 2's layer formats at offset `at` of a header of `hlen` bytes."""
    if at + _FORMATS_LEN.size > hlen:
        raise CorruptBlock(f"truncated header: no layer formats in its {hlen} bytes")
    (flen,) = _FORMATS_LEN.unpack_from(data, at)
    start = at + _FORMATS_LEN.size
    if start + flen > hlen:
        raise CorruptBlock(f"truncated header: {flen} bytes of layer formats past its {hlen} bytes")
    if not flen:  # the version field is outside the CRC: a version 1 block relabeled
        raise CorruptBlock("version 2 block without layer formats")
    try:
        return tuple(bytes(data[start : start + flen]).decode("ascii").split(","))
    except UnicodeDecodeError:
        raise CorruptBlock("bad layer formats in block header") from None


def check_block(data: bytes | memoryview, verify_checksum: bool = True) -> BlockHeader:
    """Parse and check an encoded block on its own (no expected layout): header, exact
    length and, unless told not to, the CRC. Raises CorruptBlock. What tiers that read
    from outside the process (SSD, Redis) run on every read."""
    header = parse_header(data)
    expected = header.header_len + header.payload_len
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "trailing bytes in"
        raise CorruptBlock(f"{what} block: {len(data)} bytes, header says {expected}")
    if verify_checksum:
        got = zlib.crc32(memoryview(data)[_CRC_FROM:])
        if got != header.crc32:
            raise CorruptBlock(f"checksum mismatch: crc32 {got:#010x}, header says {header.crc32:#010x}")
    return header


def _block_view(kv: torch.Tensor) -> np.ndarray:
    """CPU pool as bytes [layers, 2, blocks, bytes of one block's K (or V) in one layer]."""
    return kv.view(-1).view(torch.uint8).numpy().reshape(kv.shape[0], 2, kv.shape[2], -1)


def _check_ids(kv: torch.Tensor, block_ids: Sequence[int]) -> list[int]:
    ids = [int(b) for b in block_ids]
    if ids and (min(ids) < 0 or max(ids) >= kv.shape[2]):
        raise ValueError(f"block ids out of range [0, {kv.shape[2]}): {ids[:16]}")
    return ids


class _CudaStaging:
    """Per-device side stream and pinned host buffer, reused across calls (pinning
    memory costs far more than copying it). The lock serialises users of the buffer."""

    _by_device: dict[torch.device, _CudaStaging] = {}
    _registry_lock = threading.Lock()

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffer = torch.empty(0, dtype=torch.uint8, pin_memory=True)
        self.lock = threading.Lock()

    @classmethod
    def of(cls, device: torch.device) -> _CudaStaging:
        with cls._registry_lock:
            staging = cls._by_device.get(device)
            if staging is None:
                staging = cls._by_device[device] = cls(device)
            return staging

    def host(self, nbytes: int) -> torch.Tensor:
        if self.buffer.numel() < nbytes:
            self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return self.buffer[:nbytes]


_copier: ThreadPoolExecutor | None = None
_copier_lock = threading.Lock()


def _parallel(fn: Callable[[range], None], n: int, bytes_each: int) -> None:
    """Run fn over contiguous parts of range(n), on up to COPY_THREADS threads."""
    global _copier
    parts = min(COPY_THREADS, n, max(1, n * bytes_each // _MIN_PARALLEL_BYTES))
    if parts <= 1:
        fn(range(n))
        return
    with _copier_lock:
        if _copier is None:
            _copier = ThreadPoolExecutor(COPY_THREADS, thread_name_prefix="kvstore-copy")
        copier = _copier
    bounds = [n * i // parts for i in range(parts + 1)]
    futures = [copier.submit(fn, range(bounds[i], bounds[i + 1])) for i in range(parts)]
    for future in futures:
        future.result()  # re-raises the first failure


def _chunks(n: int, per_block: int) -> list[range]:
    step = max(1, CHUNK_BYTES // per_block)
    return [range(i, min(n, i + step)) for i in range(0, n, step)]


def _encode_rows(fields: bytes, rows: memoryview, count: int, per_block: int, version: int = VERSION) -> list[bytes]:
    """Blocks from `count` consecutive payloads in `rows`: CRCs on the copy threads
    (zlib releases the GIL), then header + payload joined into one bytes object each."""
    payloads = [rows[i * per_block : (i + 1) * per_block] for i in range(count)]
    fields_crc = zlib.crc32(fields)
    crcs = [0] * count

    def crc(part: range) -> None:
        for i in part:
            crcs[i] = zlib.crc32(payloads[i], fields_crc)

    _parallel(crc, count, per_block)
    hlen = _PREFIX.size + len(fields)
    return [
        b"".join((_PREFIX.pack(MAGIC, version, hlen, c), fields, p))
        for c, p in zip(crcs, payloads, strict=True)
    ]


def _check_view(blocks: KVBlocks, block_ids: Sequence[int], layout: KVLayout) -> np.ndarray:
    if blocks.layout != layout:
        raise ValueError(f"layout does not match the pool's: {layout.mismatch(blocks.layout, 'given', 'pool')}")
    ids = np.asarray([int(b) for b in block_ids], dtype=np.int64)
    blocks.check_ids(ids, "block ids")
    return ids


def _encode_view(blocks: KVBlocks, block_ids: Sequence[int], layout: KVLayout) -> list[bytes]:
    """encode_blocks for a pool seen through its KVBlocks view (see the module docstring)."""
    ids = _check_view(blocks, block_ids, layout)
    if not len(ids):
        return []
    per_block = block_payload_bytes(layout)
    fields = _header_fields(layout, per_block)
    blocks.follow_engine()  # CUDA: after the engine's writes enqueued so far
    out: list[bytes] = []
    for chunk in _chunks(len(ids), per_block):
        host = blocks.host_buffer(len(chunk) * per_block)
        blocks.read_blocks(ids[chunk.start : chunk.stop], host)
        out.extend(_encode_rows(fields, memoryview(host.numpy()).cast("B"), len(chunk), per_block, _version(layout)))
    return out


def encode_blocks(kv: torch.Tensor | KVBlocks, block_ids: Sequence[int], layout: KVLayout) -> list[bytes]:
    """Encode blocks `block_ids` of pool `kv` (of `layout`), one bytes object each. `kv`
    is the pool tensor, or a `KVBlocks` view of a pool that is not one tensor here (tensor
    parallelism: whole blocks through rank 0; a mixed per-layer pool's layer pages).

    CUDA pools: the gather runs on a side stream ordered after the caller's current
    stream (so it sees the engine's writes enqueued so far); returns once the bytes are
    on the host.
    """
    if isinstance(kv, KVBlocks):
        return _encode_view(kv, block_ids, layout)
    layout.check_pool(kv)
    ids = _check_ids(kv, block_ids)
    if not ids:
        return []
    per_block = block_payload_bytes(layout)
    fields = _header_fields(layout, per_block)
    by_block = kv.permute(2, 0, 1, 3, 4, 5)  # [blocks, layers, 2, ...]: index_select gives whole blocks
    out: list[bytes] = []
    if not kv.is_cuda:
        for chunk in _chunks(len(ids), per_block):
            gathered = torch.index_select(by_block, 0, torch.tensor(ids[chunk.start : chunk.stop]))
            rows = memoryview(gathered.view(-1).view(torch.uint8).numpy()).cast("B")
            out.extend(_encode_rows(fields, rows, len(chunk), per_block))
        return out
    staging = _CudaStaging.of(kv.device)
    with staging.lock, torch.cuda.device(kv.device), torch.cuda.stream(staging.stream):
        staging.stream.wait_stream(torch.cuda.current_stream(kv.device))
        for chunk in _chunks(len(ids), per_block):
            index = torch.tensor(ids[chunk.start : chunk.stop]).to(kv.device, non_blocking=True)
            gathered = torch.index_select(by_block, 0, index)
            host = staging.host(len(chunk) * per_block)
            host.copy_(gathered.view(-1).view(torch.uint8), non_blocking=True)
            done = torch.cuda.Event()
            done.record(staging.stream)
            done.synchronize()
            out.extend(_encode_rows(fields, memoryview(host.numpy()).cast("B"), len(chunk), per_block))
    return out


def _validate(payloads: Sequence[bytes | memoryview], layout: KVLayout, verify_checksum: bool) -> int:
    """Check every payload against `layout`; returns the header length (equal for all).
    Raises for the first bad payload in batch order."""
    expected_hlen = header_len(layout)
    errors: list[InvalidBlock | None] = [None] * len(payloads)

    def check(part: range) -> None:
        for i in part:
            errors[i] = _check_one(payloads[i], i, layout, expected_hlen, verify_checksum)
            if errors[i] is not None:
                return

    _parallel(check, len(payloads), block_payload_bytes(layout) if verify_checksum else 0)
    for error in errors:
        if error is not None:
            raise error
    return expected_hlen


def _check_one(
    data: bytes | memoryview, i: int, layout: KVLayout, expected_hlen: int, verify_checksum: bool
) -> InvalidBlock | None:
    try:
        header = check_block(data, verify_checksum)
    except CorruptBlock as exc:
        return CorruptBlock(f"payload {i}: {exc}", i)
    diff = header.layout.mismatch(layout, "block", "pool")
    if diff is not None:
        return LayoutMismatch(f"payload {i} is a block of another layout: {diff}", i)
    if header.payload_len != block_payload_bytes(layout) or header.header_len != expected_hlen:
        # Unreachable with a good CRC unless the writer was broken: still never load it.
        return CorruptBlock(
            f"payload {i}: {header.payload_len} payload bytes after a {header.header_len}-byte header, "
            f"this layout has {block_payload_bytes(layout)} after {expected_hlen}",
            i,
        )
    return None


def _decode_view(
    blocks: KVBlocks, block_ids: Sequence[int], payloads: Sequence[bytes | memoryview], layout: KVLayout, verify_checksum: bool
) -> None:
    """decode_into for a pool seen through its KVBlocks view (see the module docstring)."""
    ids = _check_view(blocks, block_ids, layout)
    if len(ids) != len(payloads):
        raise ValueError(f"{len(ids)} block ids for {len(payloads)} payloads")
    if not len(ids):
        return
    hlen = _validate(payloads, layout, verify_checksum)
    per_block = block_payload_bytes(layout)
    after = blocks.engine_event()  # CUDA: the blocks' previous readers
    for chunk in _chunks(len(ids), per_block):
        host = blocks.host_buffer(len(chunk) * per_block)
        rows = host.numpy().reshape(len(chunk), per_block)

        def stage(part: range, rows: np.ndarray = rows, first: int = chunk.start) -> None:
            for row in part:
                rows[row] = np.frombuffer(payloads[first + row], dtype=np.uint8, count=per_block, offset=hlen)

        _parallel(stage, len(chunk), per_block)
        blocks.write_blocks(ids[chunk.start : chunk.stop], host, after)


def decode_into(
    kv: torch.Tensor | KVBlocks,
    block_ids: Sequence[int],
    payloads: Sequence[bytes | memoryview],
    layout: KVLayout,
    *,
    verify_checksum: bool = True,
) -> None:
    """Write encoded blocks `payloads[i]` into block `block_ids[i]` of pool `kv` (the pool
    tensor, or a `KVBlocks` view of a pool that is not one tensor here, as `encode_blocks`).

    Every payload is validated first (magic, version, length, CRC unless
    `verify_checksum=False`, then layout and namespace equal to `layout`); if any fails,
    nothing is written and CorruptBlock / LayoutMismatch is raised with `.index` set to
    the first bad payload, so a caller can still restore the good prefix before it.
    Skip the CRC only for payloads already verified or never outside this process
    (TieredKVStore.get_many returns only such payloads).

    CUDA pools: the copy runs on a side stream ordered after the caller's current stream
    (the blocks' previous readers); returns once the blocks are in the pool.
    """
    if isinstance(kv, KVBlocks):
        _decode_view(kv, block_ids, payloads, layout, verify_checksum)
        return
    layout.check_pool(kv)
    ids = _check_ids(kv, block_ids)
    if len(ids) != len(payloads):
        raise ValueError(f"{len(ids)} block ids for {len(payloads)} payloads")
    if not ids:
        return
    hlen = _validate(payloads, layout, verify_checksum)
    per_block = block_payload_bytes(layout)
    if not kv.is_cuda:
        pool = _block_view(kv)

        def write(part: range) -> None:
            for i in part:
                src = np.frombuffer(payloads[i], dtype=np.uint8, count=per_block, offset=hlen)
                pool[:, :, ids[i]] = src.reshape(kv.shape[0], 2, -1)

        _parallel(write, len(ids), per_block)
        return
    by_block = kv.permute(2, 0, 1, 3, 4, 5)
    staging = _CudaStaging.of(kv.device)
    with staging.lock, torch.cuda.device(kv.device), torch.cuda.stream(staging.stream):
        staging.stream.wait_stream(torch.cuda.current_stream(kv.device))
        for chunk in _chunks(len(ids), per_block):
            host = staging.host(len(chunk) * per_block)
            rows = host.numpy().reshape(len(chunk), per_block)

            def stage(part: range, rows: np.ndarray = rows, first: int = chunk.start) -> None:
                for row in part:
                    rows[row] = np.frombuffer(
                        payloads[first + row], dtype=np.uint8, count=per_block, offset=hlen
                    )

            _parallel(stage, len(chunk), per_block)
            dev = host.to(kv.device, non_blocking=True).view(kv.dtype).view(len(chunk), *by_block.shape[1:])
            index = torch.tensor(ids[chunk.start : chunk.stop]).to(kv.device, non_blocking=True)
            by_block.index_copy_(0, index, dev)
            done = torch.cuda.Event()
            done.record(staging.stream)
            # The staging buffer is refilled by the next chunk: wait for this one's copy.
            done.synchronize()
