"""EAGLE draft heads (`--speculative eagle:PATH`): which of the two published layouts a
checkpoint is, from its config.json and tensor names, and whether it fits a target.
Torch-free (the tensor names and shapes come from the caller).

EAGLE (EAGLE-1/2; the EAGLE repository's `cnets1.py` layout): config.json of a one-layer
Llama ("LlamaForCausalLM", num_hidden_layers 1, the target's hidden and vocabulary
sizes; "bias" says whether `fc` has one, default true), tensors

    fc.weight [hidden, 2 * hidden] (+ fc.bias)      layers.0.self_attn.{q,k,v,o}_proj.weight
    layers.0.mlp.{gate,up,down}_proj.weight         layers.0.post_attention_layernorm.weight
    embed_tokens.weight (often; the target's copy: unused here)

and no `layers.0.input_layernorm`: the layer's input is not normed.

EAGLE-3 (the repository's `cnets.py` layout): config "LlamaForCausalLMEagle3" with
`draft_vocab_size` (and optionally `target_hidden_size`, `eagle_aux_hidden_state_layer_ids`,
`norm_before_residual`), tensors

    fc.weight [hidden, 3 * target_hidden]           midlayer.self_attn.{q,k,v}_proj.weight [.., 2 * hidden]
    midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight
    midlayer.self_attn.o_proj.weight, midlayer.mlp.{gate,up,down}_proj.weight
    norm.weight, lm_head.weight [draft_vocab, hidden], d2t [draft_vocab] int64, t2d [vocab] bool

`d2t[i]` is the offset from draft token i to its target id (target id = i + d2t[i]);
`t2d` marks the target ids in the draft vocabulary (not needed to draft).

What the head reads of the target (docs/speculative_decoding.md, "EAGLE heads"): EAGLE
the final-normed hidden state (the LM head's input); EAGLE-3 the inputs of three
target layers (default 2, L // 2 and L - 3 of L layers), concatenated in that order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rtpllm.models.config import FINAL_HIDDEN, ModelConfig

EAGLE = "eagle"
EAGLE3 = "eagle3"


@dataclass(frozen=True)
class EagleConfig:
    """An EAGLE head's layout and shape."""

    kind: str  # EAGLE or EAGLE3
    layer: ModelConfig  # the head's decoder layer (a Llama layer) and its rope
    fc_bias: bool
    vocab_size: int  # the target vocabulary the head drafts in
    draft_vocab_size: int  # EAGLE-3's own LM head rows (== vocab_size for EAGLE)
    target_hidden_size: int  # width of each target hidden state fc reads
    has_d2t: bool
    aux_layer_ids: tuple[int, ...] | None  # EAGLE-3 taps from config.json (None: the default)
    norm_before_residual: bool = False

    @property
    def hidden_size(self) -> int:
        return self.layer.hidden_size

    @staticmethod
    def check_config(raw: dict[str, Any], source: str) -> None:
        """ValueError for a config.json of a format this module does not read."""
        if "speculators_config" in raw or "transformer_layer_config" in raw:
            raise ValueError(
                f"{source} is a speculators-format checkpoint; rtpllm reads EAGLE heads in the EAGLE repository's "
                "layout (fc.weight with layers.0.* or midlayer.* tensors)"
            )

    @classmethod
    def from_checkpoint(cls, raw: dict[str, Any], shapes: dict[str, tuple[int, ...]], source: str) -> EagleConfig:
        """The layout of a head from its config.json (`raw`) and its tensors' shapes.
        ValueError naming `source` and what is wrong for anything else."""
        cls.check_config(raw, source)
        names = set(shapes)
        eagle3 = any(n.startswith("midlayer.") for n in names)
        eagle1 = "fc.weight" in names and any(n.startswith("layers.0.") for n in names)
        archs = " ".join(raw.get("architectures") or [])
        if not (eagle3 or eagle1) or "fc.weight" not in names:
            shown = ", ".join(sorted(names)[:4]) or "none"
            hint = "; it looks like a whole model: use draft:PATH for a draft model" if any(n.startswith("model.layers.") for n in names) else ""
            raise ValueError(
                f"{source} is not an EAGLE head: expected fc.weight with layers.0.* (EAGLE) or midlayer.* (EAGLE-3) "
                f"tensors, found {shown}{hint}"
            )
        if "Eagle3" in archs and not eagle3:
            raise ValueError(f"{source}: config.json says {archs} but the tensors are not EAGLE-3's (no midlayer.*)")
        if any(n.startswith("layers.1.") for n in names):
            raise ValueError(f"{source}: EAGLE heads of more than one layer are not supported")
        layer = ModelConfig.from_dict({**raw, "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1})
        hidden = layer.hidden_size
        fc_in = shapes["fc.weight"][1] if len(shapes["fc.weight"]) == 2 else -1
        if eagle3:
            target_hidden = int(raw.get("target_hidden_size") or hidden)
            draft_vocab = int(raw.get("draft_vocab_size") or layer.vocab_size)
            if fc_in != 3 * target_hidden:
                raise ValueError(f"{source}: fc.weight is {list(shapes['fc.weight'])}; an EAGLE-3 head's fc reads 3 x {target_hidden} features")
            head = shapes.get("lm_head.weight")
            if head != (draft_vocab, hidden):
                raise ValueError(f"{source}: lm_head.weight is {list(head) if head else 'missing'}; draft_vocab_size {draft_vocab} and hidden {hidden} need [{draft_vocab}, {hidden}]")
            has_d2t = "d2t" in names
            if draft_vocab != layer.vocab_size and not has_d2t:
                raise ValueError(f"{source}: a draft vocabulary of {draft_vocab} of {layer.vocab_size} tokens needs the d2t tensor")
            ids = raw.get("eagle_aux_hidden_state_layer_ids")
            return cls(
                kind=EAGLE3,
                layer=layer,
                fc_bias="fc.bias" in names,
                vocab_size=layer.vocab_size,
                draft_vocab_size=draft_vocab,
                target_hidden_size=target_hidden,
                has_d2t=has_d2t,
                aux_layer_ids=tuple(int(i) for i in ids) if ids else None,
                norm_before_residual=bool(raw.get("norm_before_residual", False)),
            )
        if fc_in != 2 * hidden:
            raise ValueError(f"{source}: fc.weight is {list(shapes['fc.weight'])}; an EAGLE head's fc reads 2 x {hidden} features")
        return cls(
            kind=EAGLE,
            layer=layer,
            fc_bias="fc.bias" in names,
            vocab_size=layer.vocab_size,
            draft_vocab_size=layer.vocab_size,
            target_hidden_size=hidden,
            has_d2t=False,
            aux_layer_ids=None,
        )

    def feature_layers(self, target: ModelConfig) -> tuple[int, ...]:
        """The target hidden states the head reads (DecoderLM.set_feature_layers)."""
        if self.kind == EAGLE:
            return (FINAL_HIDDEN,)
        n = target.num_layers
        return self.aux_layer_ids or (2, n // 2, n - 3)

    def check_target(self, target: ModelConfig, source: str, target_name: str) -> None:
        """ValueError naming both sides unless the head fits the target."""
        if self.vocab_size != target.vocab_size:
            raise ValueError(
                f"the EAGLE head {source} has a vocabulary of {self.vocab_size} tokens and the target "
                f"{target_name} one of {target.vocab_size}; the head must be trained for the target"
            )
        if self.hidden_size != target.hidden_size or self.target_hidden_size != target.hidden_size:
            raise ValueError(
                f"the EAGLE head {source} has hidden size {self.hidden_size} (features of {self.target_hidden_size}) and "
                f"the target {target_name} {target.hidden_size}; the head must be trained for the target"
            )
        if self.kind == EAGLE3:
            layers = self.feature_layers(target)
            n = target.num_layers
            if len(layers) != 3 or any(not 0 <= i <= n for i in layers):
                how = "from eagle_aux_hidden_state_layer_ids" if self.aux_layer_ids else "by default (2, L // 2, L - 3)"
                raise ValueError(
                    f"the EAGLE-3 head {source} reads target layers {list(layers)} ({how}), but the target "
                    f"{target_name} has {n} layers: three layer indices in [0, {n}] are needed"
                )
