"""Tensor-parallel sharding without processes: which part of the model each rank holds
(rtpllm.parallel.layout), and that every loader reads exactly a rank's slices."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rtpllm.attention import get_backend
from rtpllm.loader import load_checkpoint, load_checkpoint_fast
from rtpllm.loader.load_plan import build_load_plan
from rtpllm.loader.safetensors_header import read_header
from rtpllm.loader.shard import Shard
from rtpllm.loader.weights import CheckpointError, safetensors_files
from rtpllm.models import ModelConfig, build_model
from rtpllm.parallel.layout import ShardLayout, check_divisible


def _config(**overrides: int) -> ModelConfig:
    raw = {
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 321,
        "max_position_embeddings": 128,
    }
    return ModelConfig.from_dict({**raw, **overrides})


def test_heads_split_and_kv_heads_replicated_past_their_count() -> None:
    cfg = _config()
    two = [ShardLayout.of(cfg, r, 2) for r in range(2)]
    assert [(s.head_start, s.num_heads, s.kv_head_start, s.num_kv_heads) for s in two] == [
        (0, 4, 0, 1),
        (4, 4, 1, 1),
    ]
    assert not two[0].replicated_kv
    # 8 ranks, 2 KV heads: query heads 0-3 read KV head 0, 4-7 read KV head 1.
    eight = [ShardLayout.of(cfg, r, 8) for r in range(8)]
    assert [s.kv_head_start for s in eight] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert all(s.num_kv_heads == 1 and s.num_heads == 1 and s.replicated_kv for s in eight)
    for s in eight:  # each rank's query head belongs to the group of its KV head
        assert s.head_start // (cfg.num_heads // cfg.num_kv_heads) == s.kv_head_start


def test_vocab_shards_cover_the_vocabulary_once_with_padding_last() -> None:
    cfg = _config()
    shards = [ShardLayout.of(cfg, r, 4) for r in range(4)]
    assert {s.vocab_shard for s in shards} == {81}
    assert [(s.vocab_start, s.vocab_count) for s in shards] == [(0, 81), (81, 81), (162, 81), (243, 78)]
    assert ShardLayout.of(cfg).vocab_count == ShardLayout.of(cfg).vocab_shard == 321


@pytest.mark.parametrize(
    ("size", "overrides", "message"),
    [
        (3, {}, "8 attention heads"),
        (4, {"num_key_value_heads": 6, "num_attention_heads": 12}, "6 KV heads"),
        (2, {"intermediate_size": 129}, "intermediate size 129"),
    ],
)
def test_sizes_that_do_not_divide_the_model_are_refused(
    size: int, overrides: dict[str, int], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        check_divisible(_config(**overrides), size)


class _FakeGroup:
    """Rank and size only: building a shard needs no collective."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
@pytest.mark.parametrize("loader", ["reference", "direct", "ring", "native"])
def test_each_rank_loads_exactly_its_slices(
    tiny_checkpoints: dict[str, Path], family: str, loader: str
) -> None:
    model_dir = tiny_checkpoints[family]
    cfg = ModelConfig.from_dir(model_dir)
    full = {k: v.float() for f in safetensors_files(model_dir) for k, v in load_file(f).items()}
    backend = get_backend("torch", "cpu")
    for rank in range(2):
        model = build_model(cfg, backend, 64, torch.float32, "cpu", _FakeGroup(rank, 2))  # type: ignore[arg-type]
        targets = model.checkpoint_targets()
        kwargs = {"optional": model.optional_checkpoint_names()}
        if loader == "reference":
            load_checkpoint(model_dir, targets, **kwargs)
        else:
            load_checkpoint_fast(
                model_dir, targets, use_ring=loader == "ring", native=loader == "native" or None, **kwargs
            )
        lay = model.layout
        q, kv, inter = lay.q_size, lay.kv_size, lay.intermediate
        attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
        p = "model.layers.0."
        qkv = attn.qkv_proj.weight
        torch.testing.assert_close(
            qkv[:q], full[p + "self_attn.q_proj.weight"][rank * q : (rank + 1) * q], rtol=0, atol=0
        )
        torch.testing.assert_close(
            qkv[q + kv :], full[p + "self_attn.v_proj.weight"][rank * kv : (rank + 1) * kv], rtol=0, atol=0
        )
        torch.testing.assert_close(
            attn.o_proj.weight,
            full[p + "self_attn.o_proj.weight"][:, rank * q : (rank + 1) * q],
            rtol=0,
            atol=0,
        )
        torch.testing.assert_close(
            mlp.gate_up_proj.weight[inter:],
            full[p + "mlp.up_proj.weight"][rank * inter : (rank + 1) * inter],
            rtol=0,
            atol=0,
        )
        torch.testing.assert_close(
            mlp.down_proj.weight,
            full[p + "mlp.down_proj.weight"][:, rank * inter : (rank + 1) * inter],
            rtol=0,
            atol=0,
        )
        vocab = full["model.embed_tokens.weight"]
        torch.testing.assert_close(
            model.embed_tokens.weight, vocab[rank * 160 : (rank + 1) * 160], rtol=0, atol=0
        )
        if family == "qwen2":  # q/k/v biases are split like their weights
            bias = attn.qkv_proj.bias
            torch.testing.assert_close(
                bias[q : q + kv],
                full[p + "self_attn.k_proj.bias"][rank * kv : (rank + 1) * kv],
                rtol=0,
                atol=0,
            )
        else:  # q/k norms are whole on every rank
            torch.testing.assert_close(
                attn.q_norm.weight, full[p + "self_attn.q_norm.weight"], rtol=0, atol=0
            )


def test_plan_copies_only_the_ranks_bytes(tiny_llama: Path) -> None:
    cfg = ModelConfig.from_dir(tiny_llama)
    backend = get_backend("torch", "cpu")
    headers = [read_header(f) for f in safetensors_files(tiny_llama)]
    whole = build_load_plan(headers, build_model(cfg, backend, 64, torch.float32, "cpu").checkpoint_targets())
    shard = build_model(cfg, backend, 64, torch.float32, "cpu", _FakeGroup(1, 2))  # type: ignore[arg-type]
    plan = build_load_plan(headers, shard.checkpoint_targets())
    pieces = sum(p.nbytes for e in plan.extents for p in e.pieces)
    assert pieces == plan.tensor_bytes == sum(p.numel() * 4 for p in shard.parameters()) < whole.tensor_bytes
    starts = [(e.path, e.offset) for e in plan.extents]
    assert starts == sorted(starts), "extents are read in file order"
    # o_proj's columns are one run per row: its pieces start a row apart.
    o_proj = next(t for t in plan.tensors if t.name == "model.layers.0.self_attn.o_proj.weight")
    assert len(o_proj.runs) == cfg.hidden_size and o_proj.runs[1][0] - o_proj.runs[0][0] == cfg.q_size * 4


def test_a_shard_that_does_not_fit_is_a_checkpoint_error(tiny_llama: Path) -> None:
    headers = [read_header(f) for f in safetensors_files(tiny_llama)]
    with pytest.raises(CheckpointError, match="does not fit"):
        build_load_plan(
            headers,
            {"model.norm.weight": Shard(torch.empty(40), 0, 30)},
            optional=set(),
            ignore=lambda n: True,
        )
