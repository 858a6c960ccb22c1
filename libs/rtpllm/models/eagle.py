"""An EAGLE / EAGLE-3 draft head (layouts: models/eagle_config.py): one Llama decoder layer
over a paged KV cache of its own, fed the target's hidden states.

Row j of a head's sequence takes the token at target position j + 1 and a feature of
position j, and predicts the token at j + 2:

- EAGLE: x = fc(cat(embed(token), f)); out = layer(x) (no input norm, residual kept:
  attention and MLP added to x). `out` is the head's guess of the target's final-normed
  hidden state at j + 1: the target's own LM head (no norm in between) gives the draft,
  and `out` is the feature of the next row. f is the target's final-normed hidden state
  on rows the target computed, the previous row's `out` on draft rows.
- EAGLE-3: h = fc(cat(target layer inputs)) on rows the target computed, the previous
  row's `out` on draft rows (no fc); attention reads cat(input_layernorm(embed(token)),
  hidden_norm(h)) (2 x hidden wide), the residual is h; out = h + attention + MLP, before
  the head's own final norm. norm(out) through the head's LM head gives logits over the
  draft vocabulary, placed at their target ids (d2t); target ids outside it get -1e30
  (a draw never picks them while any draft token is allowed). `out` is the next row's h.

The token embedding (and, for EAGLE, the LM head) is the target's, shared, not a copy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rtpllm.attention import AttentionBackend, AttentionMetadata
from rtpllm.kernels.gemv import linear
from rtpllm.models.eagle_config import EAGLE3, EagleConfig
from rtpllm.models.factory import allocate_parameters
from rtpllm.models.layers import Attention, GatedMLP, Linear, RMSNorm
from rtpllm.models.rope import RotaryEmbedding

# The logit of a target token outside an EAGLE-3 head's draft vocabulary: finite, so a
# row whose every draft token is banned (allowed_token_ids) still has a distribution.
OUTSIDE_DRAFT_VOCAB = -1e30


@dataclass(frozen=True)
class TargetParts:
    """What a head shares with its target model: the token embedding and (EAGLE) the LM
    head. Plain callables, so the target's parameters never become the head's."""

    embed: Callable[[torch.Tensor], torch.Tensor]
    logits: Callable[[torch.Tensor], torch.Tensor]


class EagleHead(nn.Module):
    """The head's own weights and its forward pass (see the module docstring)."""

    def __init__(self, config: EagleConfig, backend: AttentionBackend, max_position: int, dtype: torch.dtype) -> None:
        super().__init__()
        cfg = config.layer
        hidden, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.config = config
        self.eagle3 = config.kind == EAGLE3
        self.rotary = RotaryEmbedding(cfg.rope, cfg.head_dim, max_position, dtype)
        fc_in = 3 * config.target_hidden_size if self.eagle3 else 2 * hidden
        self.fc = Linear(fc_in, hidden, bias=config.fc_bias)
        self.self_attn = Attention(cfg, backend)
        self.post_attention_layernorm = RMSNorm(hidden, eps)
        self.mlp = GatedMLP(hidden, cfg.intermediate_size)
        self.input_layernorm: RMSNorm | None = None
        self.hidden_norm: RMSNorm | None = None
        self.norm: RMSNorm | None = None
        self.lm_head: Linear | None = None
        if self.eagle3:
            # Attention reads the embedding and the feature side by side.
            self.self_attn.qkv_proj = Linear(2 * hidden, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
            self.input_layernorm = RMSNorm(hidden, eps)
            self.hidden_norm = RMSNorm(hidden, eps)
            self.norm = RMSNorm(hidden, eps)
            self.lm_head = Linear(hidden, config.draft_vocab_size, bias=False)
        # d2t as the checkpoint stores it (target id - draft id); `finish_loading` turns
        # it into target ids.
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64), persistent=False)
        self._target_ids: torch.Tensor | None = None
        self.target: TargetParts | None = None

    def share_target(self, parts: TargetParts) -> None:
        self.target = parts

    def finish_loading(self) -> None:
        """After the weights are in: the draft vocabulary's target ids (EAGLE-3 with d2t)."""
        if self.eagle3 and self.config.has_d2t:
            self._target_ids = self.d2t + torch.arange(self.d2t.shape[0], device=self.d2t.device)
            if int(self._target_ids.min()) < 0 or int(self._target_ids.max()) >= self.config.vocab_size:
                raise ValueError(f"the EAGLE-3 head's d2t maps draft tokens outside the vocabulary [0, {self.config.vocab_size})")

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, ...]],
        meta: AttentionMetadata,
        from_target: bool,
    ) -> torch.Tensor:
        """[T] token ids, [T, width] features, positions -> [T, hidden]: each row's output
        state (the next row's feature). `from_target`: the features are the target's
        (EAGLE-3: the fused layer inputs go through fc), else the head's own outputs."""
        assert self.target is not None, "share_target first"
        emb = self.target.embed(input_ids)
        cos, sin = self.rotary.cos, self.rotary.sin
        if not self.eagle3:
            x = self.fc(torch.cat([emb, features], dim=-1))
            attn = self.self_attn(positions, x, kv_caches[0], meta, cos, sin)
            normed, residual = self.post_attention_layernorm.add_and_norm(attn, x)
            return self.mlp(normed) + residual
        assert self.input_layernorm is not None and self.hidden_norm is not None
        h = self.fc(features) if from_target else features
        normed_h = self.hidden_norm(h)
        residual = normed_h if self.config.norm_before_residual else h
        x = torch.cat([self.input_layernorm(emb), normed_h], dim=-1)
        attn = self.self_attn(positions, x, kv_caches[0], meta, cos, sin)
        normed, residual = self.post_attention_layernorm.add_and_norm(attn, residual)
        return self.mlp(normed) + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] output states -> [N, vocab] float32 logits over the target's vocabulary."""
        assert self.target is not None
        if not self.eagle3:
            return self.target.logits(hidden)
        assert self.norm is not None and self.lm_head is not None
        draft = linear(self.norm(hidden), self.lm_head.weight).float()
        if self._target_ids is None:
            return draft
        out = draft.new_full((draft.shape[0], self.config.vocab_size), OUTSIDE_DRAFT_VOCAB)
        return out.index_copy_(1, self._target_ids, draft)

    def checkpoint_targets(self) -> dict[str, torch.Tensor]:
        """Every checkpoint tensor name -> the parameter view it loads into (q/k/v and
        gate/up are split views of the fused parameters, as in DecoderLM)."""
        cfg = self.config.layer
        p = "midlayer." if self.eagle3 else "layers.0."
        attn = self.self_attn
        q, kv, inter = cfg.q_size, cfg.kv_size, cfg.intermediate_size
        qkv = attn.qkv_proj.weight.data
        t: dict[str, torch.Tensor] = {
            "fc.weight": self.fc.weight.data,
            p + "self_attn.q_proj.weight": qkv[:q],
            p + "self_attn.k_proj.weight": qkv[q : q + kv],
            p + "self_attn.v_proj.weight": qkv[q + kv :],
            p + "self_attn.o_proj.weight": attn.o_proj.weight.data,
            p + "mlp.gate_proj.weight": self.mlp.gate_up_proj.weight.data[:inter],
            p + "mlp.up_proj.weight": self.mlp.gate_up_proj.weight.data[inter:],
            p + "mlp.down_proj.weight": self.mlp.down_proj.weight.data,
            p + "post_attention_layernorm.weight": self.post_attention_layernorm.weight.data,
        }
        if self.fc.bias is not None:
            t["fc.bias"] = self.fc.bias.data
        if attn.qkv_proj.bias is not None:
            bias = attn.qkv_proj.bias.data
            t[p + "self_attn.q_proj.bias"] = bias[:q]
            t[p + "self_attn.k_proj.bias"] = bias[q : q + kv]
            t[p + "self_attn.v_proj.bias"] = bias[q + kv :]
        if self.eagle3:
            assert self.input_layernorm is not None and self.hidden_norm is not None
            assert self.norm is not None and self.lm_head is not None
            t[p + "input_layernorm.weight"] = self.input_layernorm.weight.data
            t[p + "hidden_norm.weight"] = self.hidden_norm.weight.data
            t["norm.weight"] = self.norm.weight.data
            t["lm_head.weight"] = self.lm_head.weight.data
            if self.config.has_d2t:
                t["d2t"] = self.d2t
        return t

    @staticmethod
    def ignores_checkpoint_tensor(name: str) -> bool:
        """Checkpoint tensors a head does not load: its copy of the target's embedding,
        EAGLE-3's t2d (the inverse of d2t), precomputed rope tables."""
        return name in ("embed_tokens.weight", "t2d") or name.endswith("rotary_emb.inv_freq")

    @torch.no_grad()
    def fill_random(self, seed: int, std: float = 0.02) -> None:
        """Random weights (`--load-format dummy`): norms 1, the rest N(0, std), d2t the
        first draft_vocab_size target ids."""
        gen = torch.Generator(device=self.fc.weight.device).manual_seed(seed)
        for name, param in self.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=gen)
        self.d2t.zero_()


def build_eagle_head(config: EagleConfig, backend: AttentionBackend, max_position: int, dtype: torch.dtype, device: str) -> EagleHead:
    """An uninitialised head on `device` (built on the meta device: no init work)."""
    with torch.device("meta"):
        head = EagleHead(config, backend, max_position, dtype)
    allocate_parameters(head, torch.device(device), dtype)
    head.rotary.build_tables(torch.device(device))
    return head.eval().requires_grad_(False)
