"""Which part of the model one tensor-parallel rank holds.

Megatron-style cuts, so each layer needs two all-reduces and nothing else:
- attention heads are split evenly (column-parallel q/k/v, row-parallel o_proj);
- KV heads are split evenly too, or, with more ranks than KV heads, each rank holds
  the one KV head its query heads read (replicated on `size / num_kv_heads` ranks);
- the MLP's intermediate dimension is split (column-parallel gate/up, row-parallel down);
- the vocabulary is split in equal shards (the last may be partly padding), for the
  embedding and the LM head alike.
Pure arithmetic on a ModelConfig: no torch, no processes.
"""

from __future__ import annotations

from dataclasses import dataclass

from rtpllm.models.config import ModelConfig


@dataclass(frozen=True)
class ShardLayout:
    """Rank `rank` of `size`: its heads, KV heads, MLP columns and vocabulary rows.

    `size == 1` is the whole model (every start 0, every count the full size)."""

    rank: int
    size: int
    head_dim: int
    num_heads: int  # query heads held
    head_start: int  # first query head held (global index)
    num_kv_heads: int
    kv_head_start: int
    total_kv_heads: int
    intermediate: int  # MLP columns held
    intermediate_start: int
    vocab_shard: int  # rows of the embedding / LM head parameter (equal on every rank)
    vocab_start: int
    vocab_count: int  # real vocabulary rows among them (the rest is padding)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def replicated_kv(self) -> bool:
        """True when several ranks hold the same KV head (more ranks than KV heads)."""
        return self.num_kv_heads * self.size > self.total_kv_heads

    @classmethod
    def of(cls, config: ModelConfig, rank: int = 0, size: int = 1) -> ShardLayout:
        check_divisible(config, size)
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is outside a tensor-parallel group of {size}")
        heads = config.num_heads // size
        kv_total = config.num_kv_heads
        if kv_total >= size:
            kv_heads, kv_start = kv_total // size, rank * (kv_total // size)
        else:
            # Query heads [rank * heads, (rank + 1) * heads) all read one KV head.
            kv_heads, kv_start = 1, rank * kv_total // size
        inter = config.intermediate_size // size
        shard = -(-config.vocab_size // size)
        vocab_start = min(rank * shard, config.vocab_size)
        return cls(
            rank=rank,
            size=size,
            head_dim=config.head_dim,
            num_heads=heads,
            head_start=rank * heads,
            num_kv_heads=kv_heads,
            kv_head_start=kv_start,
            total_kv_heads=kv_total,
            intermediate=inter,
            intermediate_start=rank * inter,
            vocab_shard=shard,
            vocab_start=vocab_start,
            vocab_count=min(shard, config.vocab_size - vocab_start),
        )


def check_divisible(config: ModelConfig, size: int) -> None:
    """ValueError unless `size` ranks can split this model evenly (see the module doc)."""
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be >= 1, got {size}")
    if size == 1:
        return
    problems = []
    if config.num_heads % size:
        problems.append(f"{config.num_heads} attention heads")
    kv = config.num_kv_heads
    if kv % size and size % kv:
        problems.append(f"{kv} KV heads (need a multiple or a divisor of the size)")
    if config.intermediate_size % size:
        problems.append(f"intermediate size {config.intermediate_size}")
    if problems:
        raise ValueError(f"tensor_parallel_size={size} does not divide the model's " + ", ".join(problems))


def local_kv_heads(config: ModelConfig, size: int) -> int:
    """KV heads each rank's pool holds."""
    return ShardLayout.of(config, 0, size).num_kv_heads
