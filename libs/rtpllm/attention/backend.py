"""The attention-backend interface and its registry.

A backend owns two things for one layer of one step: writing the new tokens' K/V into
the paged cache, and attending each new query over its sequence's cached context. The
model code above it is the same on CPU and CUDA; only the backend changes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

# Decode steps of at least this many rows start their rows' attention programs longest
# context first (None: in batch order). The programs of a batch of mixed lengths run in
# waves; started in batch order, the last wave holds long rows that finish while the
# rest of the GPU idles. A candidate (bench: --set attention.backend.LONGEST_FIRST_MIN_ROWS=N)
# until a GPU run says it pays.
LONGEST_FIRST_MIN_ROWS: int | None = None


def orders_rows(num_rows: int) -> bool:
    """Whether a decode step of `num_rows` rows starts them longest context first."""
    return LONGEST_FIRST_MIN_ROWS is not None and num_rows >= LONGEST_FIRST_MIN_ROWS


def longest_first(seq_lens: np.ndarray) -> np.ndarray | None:
    """The decode rows' launch order (`AttentionMetadata.decode_order`): row indices by
    context length, longest first, ties in row order; None below LONGEST_FIRST_MIN_ROWS."""
    if not orders_rows(len(seq_lens)):
        return None
    return np.argsort(-np.asarray(seq_lens, dtype=np.int64), kind="stable").astype(np.int32)


@dataclass
class AttentionMetadata:
    """How one packed step maps onto the paged cache.

    The step's new tokens are packed along one axis (T tokens over B sequences).
    Sequences are ordered decodes first (one new token each), then prefill/extend chunks,
    so a backend can split the two cases at `num_decodes`.
    """

    # [T] int64: flat cache slot (block_id * block_size + offset) for each new token's K/V.
    slot_mapping: torch.Tensor
    # [B + 1] int32: cumulative new-token counts; sequence i owns tokens [qsl[i], qsl[i+1]).
    query_start_loc: torch.Tensor
    # [B] int32: context length after this step (cached + new tokens).
    seq_lens: torch.Tensor
    # [B, max_blocks] int32: physical block ids of each sequence, padded with 0.
    block_tables: torch.Tensor
    num_decodes: int
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Host copies of query_start_loc / seq_lens, for backends that loop on the host.
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
    # Some decode rows are tokens of one sequence (a speculative verify step packs its
    # k + 1 tokens as decode rows): every decode row's K/V must be in the cache before any
    # decode row attends, so a backend must not fuse a row's store into its attention.
    decode_rows_share_seqs: bool = False
    # With decode_rows_share_seqs, where the sequences' groups of decode rows start
    # ([num_decodes] int32; rtpllm.kernels.verify_attention): each row's group size when
    # the group starts there, else 0. A backend may then read a sequence's KV once for
    # all its rows. `max_decode_span` bounds the groups (fixed when a graph is captured);
    # `num_decode_groups` counts them (host int, sizes the kernel's split count).
    decode_spans: torch.Tensor | None = None
    max_decode_span: int = 1
    num_decode_groups: int = 0
    # [num_decodes] int32, a permutation of the decode rows: the order their attention
    # programs start in (longest_first); None: batch order. Timing only, never results.
    decode_order: torch.Tensor | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


def decode_spans(group_sizes: list[int]) -> list[int]:
    """`AttentionMetadata.decode_spans` of consecutive groups of these many rows:
    [3, 1] -> [3, 0, 0, 1]."""
    spans: list[int] = []
    for n in group_sizes:
        spans.append(n)
        spans.extend([0] * (n - 1))
    return spans


class AttentionBackend(ABC):
    """Writes new K/V into the paged cache and computes causal attention over it."""

    name: str = ""
    # True when forward() of a pure-decode step reads only device tensors and fixed
    # sizes, so the step can be captured in a CUDA graph and replayed.
    supports_cuda_graphs: bool = False

    @contextmanager
    def graph_capture(self, batch_size: int, max_seq_len: int) -> Iterator[None]:
        """Fix launch parameters (grids, split counts) for capturing a decode step of
        `batch_size` sequences of up to `max_seq_len` tokens."""
        yield

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        k_scale: torch.Tensor | None = None,
        v_scale: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hkv, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D].

        Stores k/v at `meta.slot_mapping`, then returns [T, Hq, D] (written into `out`
        when given: [T, Hq, D], head_dim contiguous; every row is written): query t of sequence i
        sits at position seq_len_i - q_len_i + j and attends to keys 0..that position
        (and only the last `sliding_window` of them when set).

        A quantized cache (fp8 / int8 dtype; docs/kv_quantization.md) comes with its
        scales k_scale, v_scale [num_blocks, block_size, Hkv] fp32: new K/V are quantized
        as they are stored, and every key and value (new ones too) is attended to as the
        cache holds it, dequantized.
        """


_REGISTRY: dict[str, Callable[[], AttentionBackend]] = {}


def register_backend(name: str, factory: Callable[[], AttentionBackend]) -> None:
    _REGISTRY[name] = factory


def get_backend(name: str, device: str) -> AttentionBackend:
    """Resolve a backend by name; "auto" picks the fastest one available for the device."""
    # Importing here registers the built-in backends without an import cycle.
    from rtpllm.attention import torch_ref  # noqa: F401

    if name == "auto":
        name = "triton" if device.startswith("cuda") and "triton" in _available() else "torch"
    factories = _available()
    if name not in factories:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(sorted(factories))}")
    return factories[name]()


def _available() -> dict[str, Callable[[], AttentionBackend]]:
    try:  # The Triton backend registers itself when Triton and CUDA are usable.
        from rtpllm.attention import triton_backend  # noqa: F401
    except ImportError:
        pass
    return _REGISTRY
