"""Random paged-attention scenarios shared by the kernel and backend tests.

A scenario mimics one layer of one engine step: K and V caches that are strided views of
one pool tensor ([blocks, 2, block, heads, dim], so that the block stride is not the
block's size, as kernels must not assume it is), block tables made of shuffled,
non-contiguous block ids, sequences with ragged
cached prefixes and new-token counts, and q/k/v as strided views of a fused qkv output.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rtpllm.attention.backend import AttentionMetadata


@dataclass
class PagedCase:
    q: torch.Tensor  # [T, Hq, D] strided view of a fused qkv tensor
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D] strided view of the pool
    v_cache: torch.Tensor
    meta: AttentionMetadata
    scale: float

    def clone_caches(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh copies of the caches (optionally upcast, for an fp32 reference)."""
        dtype = dtype or self.k_cache.dtype
        return self.k_cache.to(dtype, copy=True), self.v_cache.to(dtype, copy=True)


def make_case(
    seq_lens: list[int],
    q_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    spare_blocks: int = 7,
) -> PagedCase:
    """Sequences i has seq_lens[i] positions of which the last q_lens[i] are new."""
    assert len(seq_lens) == len(q_lens) and all(0 < q <= s for q, s in zip(q_lens, seq_lens, strict=True))
    gen = torch.Generator().manual_seed(seed)
    need = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(need) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(need)
    # Padding entries point at a real block id (0), as the engine's tables do.
    tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    at = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[at : at + n].to(torch.int32)
        at += n
    # Random data is drawn on the target device: the GPU cases' pools reach gigabytes.
    dev_gen = torch.Generator(device=device).manual_seed(seed)
    pool = torch.randn(
        num_blocks, 2, block_size, num_kv_heads, head_dim, generator=dev_gen, device=device, dtype=dtype
    )
    slots: list[int] = []
    qsl = [0]
    for i, (s, ql) in enumerate(zip(seq_lens, q_lens, strict=True)):
        for p in range(s - ql, s):
            slots.append(int(tables[i, p // block_size]) * block_size + p % block_size)
        qsl.append(qsl[-1] + ql)
    tokens = qsl[-1]
    qkv = torch.randn(
        tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=dev_gen, device=device, dtype=dtype
    )
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    num_decodes = 0
    while num_decodes < len(q_lens) and q_lens[num_decodes] == 1 and seq_lens[num_decodes] > 1:
        num_decodes += 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        num_decodes=num_decodes,
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
        query_start_loc_host=qsl,
        seq_lens_host=list(seq_lens),
    )
    return PagedCase(
        q=qkv[:, :q_size].view(tokens, num_heads, head_dim),
        k=qkv[:, q_size : q_size + kv_size].view(tokens, num_kv_heads, head_dim),
        v=qkv[:, q_size + kv_size :].view(tokens, num_kv_heads, head_dim),
        k_cache=pool[:, 0],
        v_cache=pool[:, 1],
        meta=meta,
        scale=head_dim**-0.5,
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere fails every tolerance."""
    out64, ref64 = out.double(), ref.double()
    if torch.isnan(out64).any():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


# ||out - ref|| / ||ref|| bounds against an fp32 reference (METHOD.md: 16-bit operands land
# between 1e-3 and 1e-2; fp32 is computed with IEEE products).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 1.2e-2, torch.float16: 3e-3}
