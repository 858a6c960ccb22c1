"""The decoder-only language model shared by Llama, Mistral, Qwen2 and Qwen3.

The families differ only in switches read from config.json (qkv bias, q/k norm, tied
embeddings, rope scaling, sliding window), so one implementation serves all four.

Tensor parallelism (a `TPGroup`): the model holds rank `group.rank`'s shard
(rtpllm.parallel.layout): its heads, KV heads and MLP columns, and a vocabulary shard of
the embedding and the LM head. The layers sum their partial outputs over the ranks;
`compute_logits` gathers every rank's vocabulary columns, so every rank gets the full
logits. `checkpoint_targets` names the slice of each checkpoint tensor the rank loads.

Speculative heads (EAGLE) read the target's hidden states: `set_feature_layers` picks
them once at engine start and `forward_with_features` returns them beside the output.
`forward` never computes them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from rtpllm.attention import AttentionBackend, AttentionMetadata
from rtpllm.kernels.gemv import linear
from rtpllm.loader.shard import Shard
from rtpllm.models.config import FINAL_HIDDEN, ModelConfig
from rtpllm.models.layers import DecoderLayer, Linear, RMSNorm
from rtpllm.models.parallel_layers import VocabParallelEmbedding
from rtpllm.models.rope import RotaryEmbedding
from rtpllm.parallel.layout import ShardLayout

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rtpllm.parallel.group import TPGroup


class DecoderLM(nn.Module):
    """Token ids + positions over a paged KV cache -> hidden states -> logits."""

    def __init__(
        self,
        config: ModelConfig,
        backend: AttentionBackend,
        max_position: int,
        dtype: torch.dtype,
        group: TPGroup | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.group = group
        self.layout = layout = ShardLayout.of(config, group.rank, group.size) if group is not None else ShardLayout.of(config)
        rotary = RotaryEmbedding(config.rope, config.head_dim, max_position, dtype)
        self.embed_tokens = VocabParallelEmbedding(
            layout.vocab_shard, config.hidden_size, layout.vocab_start, layout.vocab_count, group
        )
        self.layers = nn.ModuleList(DecoderLayer(config, backend, layout, group) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, layout.vocab_shard, bias=False)
        # The cos/sin tables every layer reads; registered once so .to() moves them once.
        self.rotary = rotary
        self.feature_layers: tuple[int, ...] = ()

    def set_feature_layers(self, layers: Sequence[int]) -> None:
        """The hidden states `forward_with_features` returns, concatenated in this order:
        i in [0, num_layers] is the input of layer i (the residual stream: layer 0's is the
        token embedding, num_layers the last layer's output before the final norm);
        FINAL_HIDDEN is the final-normed output. Set once, before CUDA graphs are captured."""
        n = self.config.num_layers
        bad = [i for i in layers if not (0 <= i <= n or i == FINAL_HIDDEN)]
        if bad or not layers:
            raise ValueError(f"feature layers must be in [0, {n}] or FINAL_HIDDEN ({FINAL_HIDDEN}), got {list(layers)}")
        self.feature_layers = tuple(layers)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, ...]],
        meta: AttentionMetadata,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """[T] ids and positions -> [T, hidden] final-normed hidden states.

        Multimodal prefill: `embeds` = (packed indices [K], rows [K, hidden]) replace the
        token embeddings of image placeholders; `positions` may be [3, T] M-RoPE
        (temporal, height, width) positions. Neither is used by text-only steps.
        """
        return self._run(input_ids, positions, kv_caches, meta, embeds, None)

    def forward_with_features(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, ...]],
        meta: AttentionMetadata,
        embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`forward`'s output and [T, width] features: the hidden states of
        `feature_layers`, concatenated along the last dim in their order."""
        taps: dict[int, torch.Tensor] = {}
        out = self._run(input_ids, positions, kv_caches, meta, embeds, taps)
        taps[FINAL_HIDDEN] = out
        parts = [taps[i] for i in self.feature_layers]
        return out, parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, ...]],
        meta: AttentionMetadata,
        embeds: tuple[torch.Tensor, torch.Tensor] | None,
        taps: dict[int, torch.Tensor] | None,
    ) -> torch.Tensor:
        """The forward pass; with `taps`, also the inputs of the feature layers into it."""
        hidden = self.embed_tokens(input_ids)
        if embeds is not None:
            hidden.index_copy_(0, embeds[0], embeds[1])
        if positions.dim() == 2:
            # Per-token cos/sin rows, indexed by the token's row in the step.
            cos, sin = self.rotary.mrope_tables(positions)
            positions = torch.arange(positions.shape[1], device=positions.device)
        else:
            cos, sin = self.rotary.cos, self.rotary.sin
        want = self.feature_layers if taps is not None else ()
        residual: torch.Tensor | None = None
        # Each layer's closing residual add is fused into the next norm (and the last
        # one into the final norm): one pass over the hidden state instead of two.
        for i, (layer, kv_cache) in enumerate(zip(self.layers, kv_caches, strict=True)):
            if i in want:
                assert taps is not None
                # The residual stream entering layer i (the add the layer fuses into its norm).
                taps[i] = hidden if residual is None else hidden + residual
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, cos, sin)
        if len(self.layers) in want:
            assert taps is not None and residual is not None
            taps[len(self.layers)] = hidden + residual
        return self.norm.add_and_norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, native: bool = False) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32 logits (through the GEMV dispatcher, which is
        `F.linear`, i.e. `hidden @ weight.T`, except for small batches on CUDA). With
        tensor parallelism every rank computes its vocabulary shard's columns and gathers
        the others' (every rank must call this with the same rows). `native`: leave them
        in the model's dtype, for a caller that casts only when it needs more than an
        argmax (the float32 copy of a large batch's logits costs more than the argmax)."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = linear(hidden, weight)
        if self.group is not None:
            logits = self.group.all_gather_columns(logits)[:, : self.config.vocab_size]
        return logits if native else logits.float()

    def zero_vocab_padding(self) -> None:
        """Zero the padding rows of the last vocabulary shard (their logits are dropped,
        but uninitialized memory could hold NaNs or infinities that a debugger trips on)."""
        count = self.layout.vocab_count
        self.embed_tokens.weight.data[count:].zero_()
        if self.lm_head is not None:
            self.lm_head.weight.data[count:].zero_()

    def checkpoint_targets(self) -> dict[str, torch.Tensor | Shard]:
        """Map every HF checkpoint tensor name to the parameter view it is loaded into.

        Fused parameters (qkv_proj, gate_up_proj) are split along dim 0, so each view is
        contiguous and has exactly the checkpoint tensor's shape: a loader can copy into
        it directly, without building a state dict.

        Tensor parallelism: a sharded tensor's target is a `Shard`, the view and where
        the rank's slice starts in the checkpoint tensor: rows (dim 0) for the
        column-parallel q/k/v (and biases), gate/up, embedding and LM head; columns
        (dim 1) for the row-parallel o_proj and down_proj. Norms are whole on every rank.
        """
        cfg, lay = self.config, self.layout
        whole = lay.size == 1

        def part(view: torch.Tensor, dim: int, start: int) -> torch.Tensor | Shard:
            return view if whole else Shard(view, dim, start)

        root = cfg.weight_prefix  # "model." ("model.text_model." in Idefics3 checkpoints)
        vocab = lay.vocab_count
        targets: dict[str, torch.Tensor | Shard] = {
            root + "embed_tokens.weight": part(self.embed_tokens.weight.data[:vocab], 0, lay.vocab_start)
        }
        targets[root + "norm.weight"] = self.norm.weight.data
        if self.lm_head is not None:
            targets["lm_head.weight"] = part(self.lm_head.weight.data[:vocab], 0, lay.vocab_start)
        q, kv, inter = lay.q_size, lay.kv_size, lay.intermediate
        q_start, kv_start = lay.head_start * lay.head_dim, lay.kv_head_start * lay.head_dim
        for i, layer in enumerate(self.layers):
            p = f"{root}layers.{i}."
            attn = layer.self_attn
            qkv = attn.qkv_proj.weight.data
            targets[p + "self_attn.q_proj.weight"] = part(qkv[:q], 0, q_start)
            targets[p + "self_attn.k_proj.weight"] = part(qkv[q : q + kv], 0, kv_start)
            targets[p + "self_attn.v_proj.weight"] = part(qkv[q + kv :], 0, kv_start)
            if attn.qkv_proj.bias is not None:
                bias = attn.qkv_proj.bias.data
                targets[p + "self_attn.q_proj.bias"] = part(bias[:q], 0, q_start)
                targets[p + "self_attn.k_proj.bias"] = part(bias[q : q + kv], 0, kv_start)
                targets[p + "self_attn.v_proj.bias"] = part(bias[q + kv :], 0, kv_start)
            targets[p + "self_attn.o_proj.weight"] = part(attn.o_proj.weight.data, 1, q_start)
            if attn.q_norm is not None and attn.k_norm is not None:
                targets[p + "self_attn.q_norm.weight"] = attn.q_norm.weight.data
                targets[p + "self_attn.k_norm.weight"] = attn.k_norm.weight.data
            gate_up = layer.mlp.gate_up_proj.weight.data
            targets[p + "mlp.gate_proj.weight"] = part(gate_up[:inter], 0, lay.intermediate_start)
            targets[p + "mlp.up_proj.weight"] = part(gate_up[inter:], 0, lay.intermediate_start)
            targets[p + "mlp.down_proj.weight"] = part(layer.mlp.down_proj.weight.data, 1, lay.intermediate_start)
            targets[p + "input_layernorm.weight"] = layer.input_layernorm.weight.data
            targets[p + "post_attention_layernorm.weight"] = layer.post_attention_layernorm.weight.data
        return targets

    # Checkpoint tensors that carry no weights we need (precomputed rope tables, a tied
    # head saved anyway).
    IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

    def ignores_checkpoint_tensor(self, name: str) -> bool:
        """Checkpoint tensors the language model does not load: precomputed rope tables,
        and a vision-language checkpoint's vision tower (loaded by the tower itself)."""
        return name.endswith(self.IGNORED_SUFFIXES) or name.startswith(self.config.vision_prefixes)

    def optional_checkpoint_names(self) -> set[str]:
        return {"lm_head.weight"} if self.lm_head is None else set()
