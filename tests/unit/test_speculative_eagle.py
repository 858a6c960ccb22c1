"""The EAGLE-head proposer (`--speculative eagle:PATH`), with random-weight EAGLE and
EAGLE-3 heads in the published layouts and heads constructed to be exact:

- loading both layouts (safetensors and pytorch_model.bin), and clear errors at start for
  a head that does not fit the target, an unknown layout or a missing path;
- the target's features are HF's hidden states (layer inputs, the final-normed output);
- every proposal equals a dense reference EAGLE computed from HF's hidden states (the
  head's KV kept between steps, chunked catch-up, draft rows fed back);
- greedy outputs equal speculation off in mixed batches with prefix hits, forced
  preemption, n > 1 and stop strings;
- on a target built as a permutation chain, a head that predicts it exactly has every
  draft accepted, a perturbed one some, and heads reading the wrong position or layers
  (or features shifted by a row) almost none;
- sampling exact in distribution with the head's q; seeded requests batch-independent;
- the feature store's bounds, the pass cost, the KV split, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_speculative_draft import MAX_TOKENS, SAMPLES, draft_engine, exact_marginals, sampled_counts
from test_speculative_engine import GREEDY, PROMPTS, run, tokens
from test_speculative_sampling import PROMPT, VOCAB, small_vocab  # noqa: F401  (a fixture)
from test_speculative_verify import chi_square_p
from test_speculative_wiring import engine_of
from transformers import AutoModelForCausalLM

from rtpllm.cli import build_parser
from rtpllm.cli.serve import worker_settings
from rtpllm.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.kvcache.kv_pool import bytes_per_block
from rtpllm.loader.random_checkpoint import (
    make_config,
    random_weights,
    write_random_checkpoint,
    write_random_eagle_head,
)
from rtpllm.models.config import FINAL_HIDDEN, ModelConfig
from rtpllm.models.eagle_config import EAGLE, EAGLE3, EagleConfig
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative import verify as verify_mod
from rtpllm.speculative.adaptive import PassCost
from rtpllm.speculative.eagle import EagleProposer
from rtpllm.speculative.feature_store import FeatureSpan, FeatureStore
from rtpllm.speculative.speculator import Speculator

K = 4


@pytest.fixture(scope="module")
def heads(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Random heads for the 2-layer tiny llama: EAGLE with and without fc bias (the
    latter as pytorch_model.bin), EAGLE-3 reading layers 0, 1, 2 over the whole
    vocabulary, and over a 160-token draft vocabulary reading 1, 2, 0."""
    root = tmp_path_factory.mktemp("heads")
    return {
        "eagle": write_random_eagle_head(root / "e1", tiny_llama, "eagle", seed=1),
        "eagle-bin": write_random_eagle_head(root / "e1b", tiny_llama, "eagle", seed=2, fc_bias=False, torch_bin=True),
        "eagle3": write_random_eagle_head(root / "e3", tiny_llama, "eagle3", seed=3, aux_layer_ids=[0, 1, 2]),
        "eagle3-small": write_random_eagle_head(root / "e3s", tiny_llama, "eagle3", seed=4, aux_layer_ids=[1, 2, 0], draft_vocab_size=160),
    }


def eagle_engine(model: Path, head: Path | None, *, adaptive: bool = False, k: int = K, **kwargs: object) -> LLMEngine:
    return draft_engine(model, head, adaptive=adaptive, k=k, method="eagle", **kwargs)


def proposer(eng: LLMEngine) -> EagleProposer:
    assert eng.speculator is not None and isinstance(eng.speculator.proposer, EagleProposer)
    return eng.speculator.proposer


def counters(eng: LLMEngine) -> tuple[int, int]:
    c = eng.speculator.counters  # type: ignore[union-attr]
    return c.proposed_tokens, c.accepted_tokens


def assert_all_freed(eng: LLMEngine) -> None:
    head = proposer(eng)
    assert head.kv.blocks is not None
    for bm in (eng.block_manager, head.kv.blocks):
        bm.check_invariants(set())
        assert bm.num_free_blocks == bm.num_blocks
    assert head.features.num_pending == 0 and not head.kv.seqs


# -- loading and errors -----------------------------------------------------------------


@pytest.mark.parametrize("which", ["eagle", "eagle-bin", "eagle3", "eagle3-small"])
def test_both_layouts_load(tiny_llama: Path, heads: dict[str, Path], which: str) -> None:
    eng = eagle_engine(tiny_llama, heads[which])
    head = proposer(eng).head
    kind = EAGLE3 if which.startswith("eagle3") else EAGLE
    assert head.config.kind == kind
    path = heads[which]
    weights = torch.load(path / "pytorch_model.bin") if which == "eagle-bin" else load_file(path / "model.safetensors")
    for name, view in head.checkpoint_targets().items():
        assert torch.equal(view, weights[name]), name
    assert (head.fc.bias is not None) == (which == "eagle")
    if kind == EAGLE:
        assert eng.model.feature_layers == (FINAL_HIDDEN,)
    else:
        assert eng.model.feature_layers == ((0, 1, 2) if which == "eagle3" else (1, 2, 0))
        inside = head.compute_logits(torch.zeros(1, 64))[0] > -1e29
        assert int(inside.sum()) == (320 if which == "eagle3" else 160)
        if which == "eagle3-small":  # the draft vocabulary sits at its target ids
            assert torch.equal(inside.nonzero().squeeze(1), weights["d2t"] + torch.arange(160))


def test_heads_that_do_not_fit_are_refused_at_start(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"hidden size 48 .* 64"):
        eagle_engine(tiny_llama, write_random_eagle_head(tmp_path / "h48", tiny_llama, "eagle", hidden_size=48, num_attention_heads=4))
    with pytest.raises(ValueError, match=r"vocabulary of 384 tokens .* 320"):
        eagle_engine(tiny_llama, write_random_eagle_head(tmp_path / "v384", tiny_llama, "eagle3", aux_layer_ids=[0, 1, 2], vocab_size=384))
    # EAGLE-3's default taps (2, L // 2, L - 3) do not exist in a 2-layer target.
    with pytest.raises(ValueError, match=r"reads target layers \[2, 1, -1\] .* has 2 layers"):
        eagle_engine(tiny_llama, write_random_eagle_head(tmp_path / "e3d", tiny_llama, "eagle3"))
    with pytest.raises(ValueError, match=r"layers \[0, 1, 5\]"):
        eagle_engine(tiny_llama, write_random_eagle_head(tmp_path / "e3x", tiny_llama, "eagle3", aux_layer_ids=[0, 1, 5]))
    # fc of the wrong width (config and tensors disagree).
    bad = write_random_eagle_head(tmp_path / "fc", tiny_llama, "eagle3", aux_layer_ids=[0, 1, 2])
    w = load_file(bad / "model.safetensors")
    w["fc.weight"] = w["fc.weight"][:, :128].contiguous()
    save_file(w, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"fc.weight is \[64, 128\]; an EAGLE-3 head's fc reads 3 x 64"):
        eagle_engine(tiny_llama, bad)
    # A missing tensor: named.
    w = load_file(write_random_eagle_head(tmp_path / "miss", tiny_llama, "eagle") / "model.safetensors")
    del w["layers.0.mlp.down_proj.weight"]
    save_file(w, tmp_path / "miss" / "model.safetensors")
    with pytest.raises(ValueError, match="layers.0.mlp.down_proj.weight"):
        eagle_engine(tiny_llama, tmp_path / "miss")


def test_unknown_layouts_and_paths_are_refused(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not an EAGLE head.*use draft:PATH"):
        eagle_engine(tiny_llama, tiny_llama)  # a whole model
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps(make_config("llama")))
    save_file({"w.weight": torch.zeros(2, 2)}, odd / "model.safetensors")
    with pytest.raises(ValueError, match="not an EAGLE head: expected fc.weight"):
        eagle_engine(tiny_llama, odd)
    spec = tmp_path / "spec"
    spec.mkdir()
    (spec / "config.json").write_text(json.dumps({"architectures": ["Eagle3Speculator"], "speculators_config": {}}))
    with pytest.raises(ValueError, match="speculators-format"):
        eagle_engine(tiny_llama, spec)
    with pytest.raises(ValueError, match="not a directory with a config.json"):
        eagle_engine(tiny_llama, tmp_path / "missing")
    broken = write_random_eagle_head(tmp_path / "broken", tiny_llama, "eagle", torch_bin=True)
    (broken / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read .*pytorch_model.bin"):
        eagle_engine(tiny_llama, broken)
    with pytest.raises(ValueError, match="tensor parallelism"):
        EngineConfig(model=str(tiny_llama), tensor_parallel_size=2, speculative=SpeculativeConfig(method="eagle", draft_model="x"))


def test_eagle3_default_taps() -> None:
    raw = {**make_config("llama"), "architectures": ["LlamaForCausalLMEagle3"], "num_hidden_layers": 1, "draft_vocab_size": 320}
    shapes = {"fc.weight": (64, 192), "midlayer.self_attn.q_proj.weight": (64, 128), "lm_head.weight": (320, 64)}
    cfg = EagleConfig.from_checkpoint(raw, shapes, "h")
    assert cfg.feature_layers(ModelConfig.from_dict(make_config("llama", num_hidden_layers=32))) == (2, 16, 29)


# -- the target's features --------------------------------------------------------------


def hf_hidden_states(model_dir: Path, token_ids: list[int]) -> list[torch.Tensor]:
    """HF's hidden states of a sequence, indexed as feature layers: [i] the input of
    layer i (i < L), [L] the last layer's output before the final norm, [L + 1] after it."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    before_norm: list[torch.Tensor] = []
    hook = hf.model.norm.register_forward_hook(lambda m, inputs, out: before_norm.append(inputs[0]))
    with torch.no_grad():
        hs = hf(torch.tensor([token_ids]), output_hidden_states=True).hidden_states
    hook.remove()
    n = len(hs) - 1
    return [h[0] for h in hs[:n]] + [before_norm[0][0], hs[n][0]]


def test_target_features_are_hfs_hidden_states(tiny_llama: Path, heads: dict[str, Path]) -> None:
    """Through the engine (chunked prefill, decodes, verify rows): the rows handed to
    the proposer are HF's hidden states at their positions, of the feature layers."""
    for which, layers in (("eagle", [FINAL_HIDDEN]), ("eagle3", [0, 1, 2])):
        eng = eagle_engine(tiny_llama, heads[which], scheduler=SchedulerConfig(max_num_batched_tokens=16))
        seen: list[tuple[object, int, torch.Tensor]] = []
        real = eng.speculator.observe_features  # type: ignore[union-attr]

        def record(step, features, accepted, real=real, seen=seen):  # type: ignore[no-untyped-def]
            row = 0
            for item in step.scheduled:
                n = item.num_new_tokens if not item.draft else 1 + accepted[item.request.request_id]
                for j in range(n):
                    seen.append((item.request, item.start + j, features[row + j].clone()))
                row += item.num_new_tokens
            real(step, features, accepted)

        eng.speculator.observe_features = record  # type: ignore[union-attr, method-assign]
        run(eng, PROMPTS[1:3], GREEDY)
        refs: dict[int, list[torch.Tensor]] = {}
        for req, pos, row in seen:
            if id(req) not in refs:
                refs[id(req)] = hf_hidden_states(tiny_llama, req.all_token_ids)  # type: ignore[attr-defined]
            hs = refs[id(req)]
            want = torch.cat([hs[-1] if i == FINAL_HIDDEN else hs[i] for i in layers], dim=-1)[pos]
            assert ((row - want).norm() / want.norm()).item() < 1e-5, (which, pos)
        assert len(seen) >= len(PROMPTS[1]) + len(PROMPTS[2]) + 2 * 20


# -- a dense reference EAGLE -------------------------------------------------------------


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """HF's rotate-half RoPE over [T, heads, dim] at positions 0..T-1."""
    dim = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    ang = torch.outer(torch.arange(x.shape[0], dtype=torch.float64), inv)
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1)[:, None].float(), torch.cat([ang.sin(), ang.sin()], -1)[:, None].float()
    half = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
    return x * cos + half * sin


def reference_drafts(head_dir: Path, target_dir: Path, token_ids: list[int], k: int) -> list[int]:
    """EAGLE as the published code computes it, densely: head rows 0..N-2 on the target's
    hidden states (HF), then k draft rows each fed the previous draft and output."""
    cfg = json.loads((head_dir / "config.json").read_text())
    w = load_file(head_dir / "model.safetensors")
    target = load_file(target_dir / "model.safetensors")
    eps, H = cfg["rms_norm_eps"], cfg["hidden_size"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    eagle3 = "midlayer.hidden_norm.weight" in w
    p = "midlayer." if eagle3 else "layers.0."
    hs = hf_hidden_states(target_dir, token_ids)
    layers = cfg.get("eagle_aux_hidden_state_layer_ids") if eagle3 else None
    feats = torch.cat([hs[i] for i in layers], -1) if layers else hs[-1]
    feats = feats[:-1]  # positions 0..N-2
    if eagle3:
        feats = feats @ w["fc.weight"].T
    emb_table = target["model.embed_tokens.weight"]
    toks = list(token_ids[1:])
    drafts: list[int] = []
    for _ in range(k):
        emb = emb_table[torch.tensor(toks)]
        if eagle3:
            x = torch.cat([rms(emb, w[p + "input_layernorm.weight"], eps), rms(feats, w[p + "hidden_norm.weight"], eps)], -1)
            residual = feats
        else:
            x = torch.cat([emb, feats], -1) @ w["fc.weight"].T + w.get("fc.bias", torch.zeros(H))
            residual = x
        T = x.shape[0]
        q = rope((x @ w[p + "self_attn.q_proj.weight"].T).view(T, heads, -1), cfg["rope_theta"])
        kk = rope((x @ w[p + "self_attn.k_proj.weight"].T).view(T, kv_heads, -1), cfg["rope_theta"])
        v = (x @ w[p + "self_attn.v_proj.weight"].T).view(T, kv_heads, -1)
        rep = heads // kv_heads
        kk, v = kk.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        scores = torch.einsum("qhd,khd->hqk", q, kk) / q.shape[-1] ** 0.5
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(T, -1) @ w[p + "self_attn.o_proj.weight"].T
        s = residual + attn
        n = rms(s, w[p + "post_attention_layernorm.weight"], eps)
        out = s + (torch.nn.functional.silu(n @ w[p + "mlp.gate_proj.weight"].T) * (n @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
        last = out[-1]
        if eagle3:
            draft_logits = rms(last, w["norm.weight"], eps) @ w["lm_head.weight"].T
            token = int(draft_logits.argmax()) + int(w["d2t"][int(draft_logits.argmax())])
        else:
            token = int((last @ target["lm_head.weight"].T).argmax())
        drafts.append(token)
        toks.append(token)
        feats = torch.cat([feats, last[None]])  # a draft row's feature: the previous output
    return drafts


@pytest.mark.parametrize("which", ["eagle", "eagle3", "eagle3-small"])
def test_every_proposal_equals_a_dense_reference(tiny_llama: Path, heads: dict[str, Path], which: str) -> None:
    """Every proposal of a run (batched, the target's prefill and the head's catch-up in
    chunks of 24 tokens, the head's KV kept across steps, rejections every step) equals
    EAGLE computed from scratch on HF's hidden states."""
    eng = eagle_engine(tiny_llama, heads[which], scheduler=SchedulerConfig(max_num_batched_tokens=24))
    head = proposer(eng)
    calls: list[tuple[list[int], int, tuple[int, ...]]] = []
    real = head.propose_batch

    def record(batch):  # type: ignore[no-untyped-def]
        snap = [(list(req.all_token_ids), k) for req, k in batch]
        out = real(batch)
        calls.extend((toks, k, p.tokens) for (toks, k), p in zip(snap, out, strict=True))
        return out

    head.propose_batch = record  # type: ignore[method-assign]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, output_kind="final")
    run(eng, PROMPTS[:4], params)
    proposed = [(toks, k, drafts) for toks, k, drafts in calls if drafts]
    assert len(proposed) >= 4 * 3
    for toks, k, drafts in proposed:
        assert list(drafts) == reference_drafts(heads[which], tiny_llama, toks, k), (len(toks), drafts)
    assert head.stats.dropped == 0 and head.features.evicted_rows == 0


# -- greedy exactness ------------------------------------------------------------------


MIXED = [
    GREEDY,
    SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, output_kind="final"),
    SamplingParams(temperature=0, max_tokens=20, n=2, ignore_eos=True, output_kind="final"),
    SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, speculative=False, output_kind="final"),
    GREEDY,
]


@pytest.mark.parametrize("which", ["eagle", "eagle-bin", "eagle3", "eagle3-small"])
def test_greedy_equals_speculation_off(tiny_llama: Path, heads: dict[str, Path], which: str) -> None:
    base = run(eagle_engine(tiny_llama, None), PROMPTS, MIXED)
    eng = eagle_engine(tiny_llama, heads[which])
    assert tokens(run(eng, PROMPTS, MIXED)) == tokens(base)
    proposed, _ = counters(eng)
    assert proposed > 50
    assert_all_freed(eng)


def test_preemption_prefix_hits_stop_strings(tiny_llama: Path, heads: dict[str, Path]) -> None:
    """A shared 32-token prefix, pools too small for every request (the target preempts,
    the head drops sequences), stop strings crossed by drafts, logprobs, max_tokens 1-3
    with k = 8: outputs equal speculation off."""
    shared = list(range(200, 232))
    plain = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2, output_kind="final")
    ref = run(eagle_engine(tiny_llama, None), PROMPTS[:3], plain)
    stops = [o.outputs[0].text[10:12] for o in (ref[f"r{i}"] for i in range(3))]
    prompts = [shared + [i, i + 1, i + 2] for i in range(6)] + PROMPTS[:3] + [PROMPTS[3], PROMPTS[4], PROMPTS[0]]
    params = [plain] * 6 + [replace(plain, stop=[s]) if s.strip() else plain for s in stops]
    params += [replace(plain, max_tokens=m) for m in (1, 2, 3)]
    small = {"cache": CacheConfig(num_blocks=16), "scheduler": SchedulerConfig(max_num_batched_tokens=96)}
    base_eng = eagle_engine(tiny_llama, None, **small)
    base = run(base_eng, prompts, params)
    assert any(o.outputs[0].finish_reason == "stop" for o in base.values())
    for which in ("eagle", "eagle3-small"):
        eng = eagle_engine(tiny_llama, heads[which], k=8, **small)
        out = run(eng, prompts, params)
        for rid, want in base.items():
            got = out[rid].outputs[0]
            assert (got.token_ids, got.text, got.finish_reason) == (want.outputs[0].token_ids, want.outputs[0].text, want.outputs[0].finish_reason)
            for a, b in zip(got.logprobs or [], want.outputs[0].logprobs or [], strict=True):
                assert all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) for t in a)
        assert eng.preemptions_total > 0 and eng.block_manager.stats.hit_tokens > 0
        assert counters(eng)[0] > 0
        assert_all_freed(eng)


def test_async_scheduling_and_the_adaptive_policy(tiny_llama: Path, heads: dict[str, Path]) -> None:
    base = run(eagle_engine(tiny_llama, None), PROMPTS, GREEDY)
    eng = eagle_engine(tiny_llama, heads["eagle3"], adaptive=True, async_scheduling=True)
    assert tokens(run(eng, PROMPTS, GREEDY)) == tokens(base)
    assert proposer(eng).pass_cost.num_buckets > 0  # the head's passes were timed
    assert isinstance(proposer(eng).cost(list(eng.scheduler.running)), PassCost)


# -- exact heads on a permutation-chain target -------------------------------------------

V, H, L = 32, 64, 4
_g = torch.Generator().manual_seed(7)
_order = torch.randperm(V, generator=_g).tolist()
SIGMA = [0] * V  # the target's next token: one cycle through the whole vocabulary
for _i, _x in enumerate(_order):
    SIGMA[_x] = _order[(_i + 1) % V]
# PI[i][x]: the hidden dimension that represents token x entering layer i (PI[L]: leaving the last).
PI = [list(range(V))] + [torch.randperm(V, generator=_g).tolist() for _ in range(L)]
EPS = 1e-6
C = (1 / H + EPS) ** -0.5  # rms_norm of a one-hot vector: C at its one


def lookup_mlp(src: list[int], dst: list[int], inter: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gate, up, down of an MLP that turns a (normed) one-hot at src[x] into dst[x] - src[x]."""
    gate, up, down = torch.zeros(inter, H), torch.zeros(inter, H), torch.zeros(H, inter)
    act = float(torch.nn.functional.silu(torch.tensor(C, dtype=torch.float64)) * C)
    for x in range(V):
        gate[x, src[x]] = up[x, src[x]] = 1.0
        down[dst[x], x] += 1.0 / act
        down[src[x], x] -= 1.0 / act
    return gate, up, down


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A target whose next token is SIGMA of the current one, computed through every
    layer: attention adds nothing (o_proj 0), layer i's MLP moves token x's one-hot from
    dimension PI[i][x] to PI[i + 1][x], and the LM head reads PI[L]."""
    cfg = make_config("llama", vocab_size=V, hidden_size=H, num_hidden_layers=L, intermediate_size=128, rms_norm_eps=EPS)
    w = random_weights(cfg, torch.float32, seed=0, std=0.2)
    w["model.embed_tokens.weight"] = torch.eye(V, H)
    for i in range(L):
        p = f"model.layers.{i}."
        w[p + "self_attn.o_proj.weight"].zero_()
        w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"] = lookup_mlp(PI[i], PI[i + 1], 128)
        w[p + "input_layernorm.weight"], w[p + "post_attention_layernorm.weight"] = torch.ones(H), torch.ones(H)
    w["model.norm.weight"] = torch.ones(H)
    inverse = {y: x for x, y in enumerate(SIGMA)}
    w["lm_head.weight"] = torch.stack([torch.eye(H)[PI[L][inverse[y]]] for y in range(V)])
    out = tmp_path_factory.mktemp("chain")
    (out / "config.json").write_text(json.dumps(cfg))
    save_file(w, str(out / "model.safetensors"))
    return out


def chain_head(root: Path, target: Path, kind: str, step: dict[int, int] | None = None, taps: list[int] | None = None) -> Path:
    """A head for the chain target (random attention, o_proj 0, so context does not
    matter). EAGLE: fc maps the feature of token x (at PI[L][x]) to that of step[x]
    (SIGMA: exact). EAGLE-3 reads the middle of `taps` (layer 2's input, PI[2]) into
    token coordinates at step[x], its MLP advances one SIGMA, its LM head reads token
    coordinates through a shuffled d2t."""
    step = step or dict(enumerate(SIGMA))
    path = write_random_eagle_head(root, target, kind, seed=9, aux_layer_ids=taps or [1, 2, 3])
    w = load_file(path / "model.safetensors")
    p = "midlayer." if kind == EAGLE3 else "layers.0."
    w[p + "self_attn.o_proj.weight"].zero_()
    fc = torch.zeros_like(w["fc.weight"])
    if kind == EAGLE:
        for x in range(V):
            fc[PI[L][step[x]], H + PI[L][x]] = 1.0
        w["fc.bias"].zero_()
        w[p + "mlp.down_proj.weight"].zero_()
    else:
        for x in range(V):
            fc[step[x], H + PI[2][x]] = 1.0
        w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"], w[p + "mlp.down_proj.weight"] = lookup_mlp(list(range(V)), SIGMA, 128)
        for name in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
            w[p + name + ".weight"] = torch.ones(H)
        w["norm.weight"] = torch.ones(H)
        draft_to_target = torch.randperm(V, generator=torch.Generator().manual_seed(3))
        w["lm_head.weight"] = torch.eye(H)[draft_to_target]
        w["d2t"] = draft_to_target - torch.arange(V)
    w["fc.weight"] = fc
    save_file(w, path / "model.safetensors")
    return path


CHAIN_PROMPTS = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3], [30], [0] * 20, [int(x) for x in _order[:17]]]


def chain_run(target: Path, head: Path | None, **kwargs: object) -> tuple[LLMEngine, dict]:
    eng = eagle_engine(target, head, **kwargs)
    params = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, output_kind="final")
    return eng, run(eng, CHAIN_PROMPTS, [params, params, params, replace(params, n=2), params])


def test_the_chain_target_follows_sigma(chain: Path) -> None:
    _, out = chain_run(chain, None)
    for i, prompt in enumerate(CHAIN_PROMPTS):
        x = prompt[-1]
        want = []
        for _ in range(25):
            x = SIGMA[x]
            want.append(x)
        assert all(c.token_ids == want for c in out[f"r{i}"].outputs)


@pytest.mark.parametrize("kind", [EAGLE, EAGLE3])
def test_an_exact_head_has_every_draft_accepted(chain: Path, tmp_path: Path, kind: str) -> None:
    """Also with prefix hits, preemption (8 blocks) and n = 2: the head's context does
    not matter to it, only the right feature of the right position."""
    _, base = chain_run(chain, None)
    eng, out = chain_run(chain, chain_head(tmp_path / "h", chain, kind), cache=CacheConfig(num_blocks=8), k=5)
    assert tokens(out) == tokens(base)
    proposed, accepted = counters(eng)
    assert proposed > 60 and accepted == proposed
    assert eng.preemptions_total > 0 and eng.block_manager.stats.hit_tokens > 0


@pytest.mark.parametrize("kind", [EAGLE, EAGLE3])
def test_a_perturbed_head_is_partly_accepted(chain: Path, tmp_path: Path, kind: str) -> None:
    """Wrong for a quarter of the tokens (it guesses SIGMA twice for them)."""
    step = {x: (SIGMA[SIGMA[x]] if x % 4 == 0 else SIGMA[x]) for x in range(V)}
    _, base = chain_run(chain, None)
    eng, out = chain_run(chain, chain_head(tmp_path / "h", chain, kind, step))
    assert tokens(out) == tokens(base)
    proposed, accepted = counters(eng)
    assert 0.3 * proposed < accepted < 0.9 * proposed


@pytest.mark.parametrize(
    ("kind", "taps", "step"),
    [
        (EAGLE, None, "twice"),  # a head that expects the feature of the position before its own
        (EAGLE3, None, "twice"),
        (EAGLE3, [0, 1, 2], None),  # the right head, reading other layers
        (EAGLE3, [1, 3, 2], None),
    ],
)
def test_heads_reading_the_wrong_position_or_layer_fail(chain: Path, tmp_path: Path, kind: str, taps: list[int] | None, step: str | None) -> None:
    mapping = {x: SIGMA[SIGMA[x]] for x in range(V)} if step == "twice" else None
    eng, _ = chain_run(chain, chain_head(tmp_path / "h", chain, kind, mapping, taps))
    proposed, accepted = counters(eng)
    assert proposed > 0 and accepted < 0.2 * proposed


@pytest.mark.parametrize("kind", [EAGLE, EAGLE3])
def test_features_shifted_by_a_row_fail(chain: Path, tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact head, fed each position the feature of the row before it."""
    real = Speculator.observe_features
    monkeypatch.setattr(Speculator, "observe_features", lambda self, step, f, acc: real(self, step, f.roll(1, 0), acc))
    eng, _ = chain_run(chain, chain_head(tmp_path / "h", chain, kind))
    proposed, accepted = counters(eng)
    assert proposed > 0 and accepted < 0.2 * proposed


# -- sampling -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_head(small_vocab: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """An EAGLE head for the 8-token target that guesses the next feature is the current
    one (fc passes the feature through, attention and MLP add nothing): q is the target's
    distribution one position back, accepted about two thirds of the time and different
    enough that a verifier mishandling q is caught."""
    head = write_random_eagle_head(tmp_path_factory.mktemp("h8"), small_vocab, "eagle", seed=6)
    w = load_file(head / "model.safetensors")
    hidden = w["fc.weight"].shape[0]
    w["fc.weight"] = torch.cat([torch.zeros(hidden, hidden), torch.eye(hidden)], dim=1)
    w["fc.bias"].zero_()
    w["layers.0.self_attn.o_proj.weight"].zero_()
    w["layers.0.mlp.down_proj.weight"].zero_()
    save_file(w, head / "model.safetensors")
    return head


@pytest.fixture(scope="module")
def marginals(small_vocab: Path) -> list[torch.Tensor]:  # noqa: F811
    return exact_marginals(small_vocab)


def test_sampling_with_the_heads_q_is_exact(small_vocab: Path, small_head: Path, marginals: list[torch.Tensor]) -> None:  # noqa: F811
    counts, eng = sampled_counts(small_vocab, small_head, "eagle")
    proposed, accepted = counters(eng)
    assert proposed > SAMPLES and 0.3 * proposed < accepted < 0.9 * proposed
    for pos in range(MAX_TOKENS):
        assert chi_square_p(counts[pos], marginals[pos]) > 1e-3, (pos, counts[pos], marginals[pos])


def test_a_verifier_ignoring_q_after_a_rejection_fails(
    small_vocab: Path, small_head: Path, marginals: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    monkeypatch.setattr(verify_mod, "residual", lambda probs, draft, q: probs)
    counts, _ = sampled_counts(small_vocab, small_head, "eagle")
    assert min(chi_square_p(counts[pos], marginals[pos]) for pos in range(1, MAX_TOKENS)) < 1e-6


def test_seeded_requests_do_not_depend_on_the_batch(tiny_llama: Path, heads: dict[str, Path]) -> None:
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, n=2, max_tokens=24, ignore_eos=True, output_kind="final")
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, output_kind="final")
    alone = run(eagle_engine(tiny_llama, heads["eagle3"]), [PROMPTS[0]], seeded)
    crowd_eng = eagle_engine(tiny_llama, heads["eagle3"])
    run(crowd_eng, PROMPTS[1:], other, prefix="warm")  # the head's pool and the feature store are in use
    crowd = run(crowd_eng, PROMPTS, [seeded, other, GREEDY, other, GREEDY])
    assert tokens(alone)["r0"] == tokens(crowd)["r0"]
    assert alone["r0"].outputs[0].token_ids != alone["r0"].outputs[1].token_ids
    assert counters(crowd_eng)[0] > 0


# -- memory, features, flags ------------------------------------------------------------


def test_the_feature_store_is_bounded_and_continues_rows() -> None:
    store = FeatureStore(8, 2, torch.float32, "cpu")
    step = torch.arange(20, dtype=torch.float32).view(10, 2)
    store.add([FeatureSpan("a", 0, 0, 3), FeatureSpan("b", 5, 3, 2)], step)
    assert store.pending("a") == (0, 3) and store.pending("b") == (5, 2)
    # Overlap with pending rows is skipped; rows below the floor of a request with none pending too.
    store.add([FeatureSpan("a", 1, 4, 4), FeatureSpan("c", 0, 0, 4, floor=3)], step)
    assert store.pending("a") == (0, 5) and store.pending("c") == (3, 1)
    got = store.take([("a", 2), ("c", 1)])
    assert got.tolist() == [[0, 1], [2, 3], [6, 7]]
    assert store.pending("a") == (2, 3) and store.pending("c") == (0, 0)
    # A gap replaces the pending rows.
    store.add([FeatureSpan("a", 9, 0, 1)], step)
    assert store.pending("a") == (9, 1)
    # Full: the least recently used request ("b") loses its rows first.
    store.add([FeatureSpan("a", 10, 0, 6)], step)
    assert store.pending("b") == (0, 0) and store.pending("a") == (9, 7) and store.evicted_rows == 2
    assert store.num_pending == 7
    store.clear()
    assert store.num_pending == 0


def test_features_off_leave_the_plain_step_alone(tiny_llama: Path) -> None:
    eng = eagle_engine(tiny_llama, None)
    assert not eng.runner.capture_features and eng.model.feature_layers == ()
    out = eng.runner.execute
    seen = []
    eng.runner.execute = lambda step, prev=None: seen.append(out(step, prev)) or seen[-1]  # type: ignore[method-assign]
    run(eng, PROMPTS[:1], GREEDY)
    assert seen and all(o.features is None for o in seen)


def test_kv_budget_is_split_with_the_head(tiny_llama: Path, heads: dict[str, Path]) -> None:
    budget = 4 << 20
    eng = eagle_engine(tiny_llama, heads["eagle"], cache=CacheConfig(cpu_kv_bytes=budget))
    head = proposer(eng)
    assert head.kv.blocks is not None
    # One head layer against the target's two: the same tokens in both pools.
    assert abs(eng.block_manager.num_blocks - head.kv.blocks.num_blocks) <= 1
    assert head.bytes_per_block * 2 == bytes_per_block(eng.model_config, 16, torch.float32)
    eng = eagle_engine(tiny_llama, heads["eagle"], cache=CacheConfig(num_blocks=40))
    assert proposer(eng).kv.blocks.num_blocks == 40  # type: ignore[union-attr]


def test_cli_parses_eagle_path(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = engine_of("--speculative", "eagle:/heads/EAGLE3-LLaMA3.1-Instruct-8B", "--num-speculative-tokens", "5")
    assert (spec.method, spec.draft_model, spec.num_speculative_tokens) == ("eagle", "/heads/EAGLE3-LLaMA3.1-Instruct-8B", 5)
    monkeypatch.setenv("RTPLLM_SPECULATIVE", "eagle:/heads/e1")
    assert engine_of().draft_model == "/heads/e1"
    monkeypatch.delenv("RTPLLM_SPECULATIVE")
    for bad in (["--speculative", "eagle:"], ["--speculative", "eagle"], ["--speculative", "eagle3:/x"]):
        with pytest.raises(SystemExit, match="--speculative"):
            engine_of(*bad)
    with pytest.raises(ValueError, match="eagle:PATH"):
        SpeculativeConfig(method="eagle")
    # A prefill instance never decodes: it loads no head.
    args = build_parser().parse_args(["serve", "prefill", "--device", "cpu", "--speculative", "eagle:/heads/e1"])
    assert not worker_settings(args).engine.speculative.enabled


def test_help_names_eagle(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "worker", "--help"])
    assert "eagle:PATH" in " ".join(capsys.readouterr().out.split())


def test_serve_smoke(tiny_llama: Path, heads: dict[str, Path]) -> None:
    """`rtpllm serve worker --speculative eagle:PATH` builds an engine with the head."""
    args = build_parser().parse_args(["serve", "worker", "--device", "cpu", "--model", str(tiny_llama), "--speculative", f"eagle:{heads['eagle3']}"])
    config = worker_settings(args).engine
    eng = LLMEngine(config)
    assert isinstance(proposer(eng), EagleProposer) and eng.model.feature_layers == (0, 1, 2)
    out = run(eng, PROMPTS[:2], GREEDY)
    assert tokens(out) == tokens(run(eagle_engine(tiny_llama, None), PROMPTS[:2], GREEDY))


def test_random_head_writer_refuses_unknown_kinds(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind"):
        write_random_eagle_head(tmp_path, tiny_llama, "medusa")
    assert write_random_checkpoint  # the target writer the heads pair with
