"""The draft-model proposer (`--speculative draft:PATH`): greedy outputs equal to
speculation off with the target's own weights as draft (every draft accepted), a
perturbed copy (some accepted) and an unrelated model of another family (almost none),
in mixed batches, under forced preemption and prefix hits in both pools, with n > 1,
stop strings and max_tokens edges; sampling exact in distribution with the draft's q
(and a verifier drawing from p after a rejection caught); seeded requests independent of
the batch; the KV split, the adaptive policy's draft cost, errors and CLI parsing."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_speculative_adaptive import linear_cost
from test_speculative_engine import GREEDY, PROMPTS, run, tokens
from test_speculative_sampling import PROMPT, VOCAB, small_vocab  # noqa: F401  (a fixture)
from test_speculative_verify import chi_square_p
from test_speculative_wiring import engine_of

from rtpllm.cli import build_parser
from rtpllm.cli.serve import worker_settings
from rtpllm.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.kvcache.kv_pool import bytes_per_block
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative import verify as verify_mod
from rtpllm.speculative.adaptive import Candidate, PassCost, PolicyConfig, SpeculationPolicy, draft_values
from rtpllm.speculative.draft import DraftModelProposer, position_seed

K = 4


def perturbed_copy(src: Path, dst: Path, scale: float, seed: int = 1) -> Path:
    """The checkpoint at `src` with every tensor moved by `scale` of its own std: a
    draft that agrees with the target often, not always."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dst / f.name)
    g = torch.Generator().manual_seed(seed)
    for f in src.glob("*.safetensors"):
        weights = load_file(f)
        save_file({k: v + torch.randn(v.shape, generator=g) * scale * v.std() for k, v in weights.items()}, dst / f.name)
    return dst


@pytest.fixture(scope="module")
def drafts(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("drafts")
    return {
        "same": tiny_llama,
        "perturbed": perturbed_copy(tiny_llama, root / "perturbed", 0.05),
        "other": write_random_checkpoint(root / "other", "qwen2", seed=11),  # the same vocabulary
    }


def draft_engine(
    model: Path, draft: Path | None, *, adaptive: bool = False, k: int = K, method: str = "draft", **kwargs: object
) -> LLMEngine:
    """An engine whose `draft` (a draft model, or an EAGLE head with method "eagle")
    proposes; speculation off without one."""
    cache = kwargs.pop("cache", CacheConfig())
    scheduler = kwargs.pop("scheduler", SchedulerConfig(max_num_batched_tokens=64))
    spec = SpeculativeConfig(method=method, draft_model=str(draft), num_speculative_tokens=k, adaptive=adaptive) if draft else SpeculativeConfig()
    return LLMEngine(EngineConfig(model=str(model), cache=cache, scheduler=scheduler, speculative=spec, **kwargs))  # type: ignore[arg-type]


def proposer(eng: LLMEngine) -> DraftModelProposer:
    assert eng.speculator is not None and isinstance(eng.speculator.proposer, DraftModelProposer)
    return eng.speculator.proposer


def assert_all_freed(eng: LLMEngine) -> None:
    draft = proposer(eng)
    assert draft.blocks is not None
    for bm in (eng.block_manager, draft.blocks):
        bm.check_invariants(set())
        assert bm.num_free_blocks == bm.num_blocks


# -- greedy exactness ------------------------------------------------------------------


@pytest.mark.parametrize("which", ["same", "perturbed", "other"])
def test_greedy_equals_speculation_off(tiny_llama: Path, drafts: dict[str, Path], which: str) -> None:
    # Mixed: lengths, budgets, n = 2, and a request that does not speculate.
    params = [
        GREEDY,
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, output_kind="final"),
        SamplingParams(temperature=0, max_tokens=20, n=2, ignore_eos=True, output_kind="final"),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, speculative=False, output_kind="final"),
        GREEDY,
    ]
    base = run(draft_engine(tiny_llama, None), PROMPTS, params)
    eng = draft_engine(tiny_llama, drafts[which])
    assert tokens(run(eng, PROMPTS, params)) == tokens(base)
    c = eng.speculator.counters  # type: ignore[union-attr]
    assert c.proposed_tokens > 0
    if which == "same":
        assert c.accepted_tokens == c.proposed_tokens
    if which == "perturbed":
        assert 0.15 * c.proposed_tokens < c.accepted_tokens < 0.9 * c.proposed_tokens
    assert_all_freed(eng)


def test_same_weights_accept_every_draft_and_keep_their_kv(tiny_llama: Path) -> None:
    # 1 token from prefill, then verifications of K drafts + 1 bonus token each.
    params = SamplingParams(temperature=0, max_tokens=1 + 4 * (K + 1), ignore_eos=True, output_kind="final")
    eng = draft_engine(tiny_llama, tiny_llama)
    out = run(eng, PROMPTS, params)
    assert tokens(out) == tokens(run(draft_engine(tiny_llama, None), PROMPTS, params))
    lengths = eng.speculator.counters.acceptance_lengths  # type: ignore[union-attr]
    assert sum(n * c for n, c in lengths.items()) / sum(lengths.values()) > K - 0.5
    # The draft's KV stays between steps: it ran each prompt (and the first output)
    # once, then two tokens per later verification (the last draft and the bonus
    # token), and one per further draft position.
    verifications = sum(lengths.values())
    first = sum(len(p) + 1 for p in PROMPTS)
    stats = proposer(eng).stats
    assert stats.pass_tokens == first + (verifications - len(PROMPTS)) * 2 + verifications * (K - 1)
    # Batched: at most K passes per verifying step, whatever the requests in it.
    c = eng.speculator.counters  # type: ignore[union-attr]
    assert K * c.speculative_steps - 2 <= stats.passes <= K * c.speculative_steps < K * c.verified_requests / 2


def test_preemption_and_prefix_hits_in_both_pools(tiny_llama: Path, drafts: dict[str, Path]) -> None:
    """A shared 32-token prefix and pools too small for every request: the target
    preempts, the draft drops sequences (least recently used) and finds their blocks
    again in its prefix cache. With the target's weights as draft every draft is still
    accepted: no draft KV was stale or lost."""
    shared = list(range(200, 232))
    prompts = [shared + [i, i + 1, i + 2] for i in range(6)] + PROMPTS[:2]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, output_kind="final")
    small = {"cache": CacheConfig(num_blocks=24), "scheduler": SchedulerConfig(max_num_batched_tokens=96)}
    base_eng = draft_engine(tiny_llama, None, **small)
    base = run(base_eng, prompts, params)
    for which in ("same", "perturbed"):
        eng = draft_engine(tiny_llama, drafts[which], **small)
        assert tokens(run(eng, prompts, params)) == tokens(base)
        draft = proposer(eng)
        assert eng.preemptions_total > 0 and eng.block_manager.stats.hit_tokens > 0
        assert draft.stats.dropped > 0 and draft.blocks is not None and draft.blocks.stats.hit_tokens > 0
        c = eng.speculator.counters  # type: ignore[union-attr]
        assert c.proposed_tokens > 0
        if which == "same":
            assert c.accepted_tokens == c.proposed_tokens
        assert_all_freed(eng)


def test_stop_strings_and_max_tokens_edges(tiny_llama: Path, drafts: dict[str, Path]) -> None:
    prompts = PROMPTS[:3]
    plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2, output_kind="final")
    ref = run(draft_engine(tiny_llama, None), prompts, plain)
    # A stop string from the middle of each text: accepted drafts run past it.
    params = [replace(plain, stop=[o.outputs[0].text[12:14]]) if o.outputs[0].text[12:14].strip() else plain for o in (ref[f"r{i}"] for i in range(3))]
    params += [replace(plain, max_tokens=m) for m in (1, 2, 3, 5)]
    prompts = prompts + PROMPTS[:4]
    base = run(draft_engine(tiny_llama, None), prompts, params)
    assert any(o.outputs[0].finish_reason == "stop" for o in base.values())
    eng = draft_engine(tiny_llama, drafts["same"], k=8)
    out = run(eng, prompts, params)
    assert eng.speculator.counters.accepted_tokens > 10  # type: ignore[union-attr]
    for rid, want in base.items():
        got = out[rid].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason) == (want.outputs[0].token_ids, want.outputs[0].text, want.outputs[0].finish_reason)
        for a, b in zip(got.logprobs or [], want.outputs[0].logprobs or [], strict=True):
            assert a.keys() == b.keys()
            assert all(a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4) for t in a)
    assert [len(out[f"r{i}"].outputs[0].token_ids) for i in range(3, 7)] == [1, 2, 3, 5]


def test_async_scheduling_and_the_adaptive_policy(tiny_llama: Path, drafts: dict[str, Path]) -> None:
    base = run(draft_engine(tiny_llama, None), PROMPTS, GREEDY)
    eng = draft_engine(tiny_llama, drafts["perturbed"], adaptive=True, async_scheduling=True)
    assert tokens(run(eng, PROMPTS, GREEDY)) == tokens(base)
    assert proposer(eng).pass_cost.num_buckets > 0  # the draft's passes were timed


# -- sampling --------------------------------------------------------------------------

SAMPLES = 1500
MAX_TOKENS = 4
SAMPLED = SamplingParams(temperature=1.0, top_k=6, max_tokens=MAX_TOKENS, ignore_eos=True, output_kind="final")


@pytest.fixture(scope="module")
def small_draft(small_vocab: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """The 8-token target, perturbed: q close enough to p that most drafts are
    accepted, different enough that a verifier mishandling q is caught."""
    return perturbed_copy(small_vocab, tmp_path_factory.mktemp("d8"), 0.2)


def exact_marginals(model: Path) -> list[torch.Tensor]:
    """The exact distribution of each output position under SAMPLED: the target's
    next-token distribution after every context (8 + 64 + 512 of them, logprobs of all 8
    tokens), filtered as sampling does, chained into marginals."""
    eng = LLMEngine(EngineConfig(model=str(model)))
    contexts: list[tuple[int, ...]] = [()]
    for _ in range(MAX_TOKENS - 1):
        contexts += [c + (t,) for c in contexts if len(c) == len(contexts[-1]) for t in range(VOCAB)]
    probe = SamplingParams(temperature=0, max_tokens=1, logprobs=VOCAB, output_kind="final")
    for i, c in enumerate(contexts):
        eng.add_request(str(i), PROMPT + list(c), probe)
    nxt: dict[tuple[int, ...], torch.Tensor] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            row = out.outputs[0].logprobs[0]  # type: ignore[index]
            logits = torch.tensor([row[t].logprob for t in range(VOCAB)], dtype=torch.float64)
            logits[logits < logits.topk(SAMPLED.top_k).values[-1]] = float("-inf")
            nxt[contexts[int(out.request_id)]] = logits.softmax(-1)
    joint = {(): 1.0}
    marginals = []
    for _ in range(MAX_TOKENS):
        marginals.append(sum(p * nxt[c] for c, p in joint.items()))
        joint = {c + (t,): p * float(nxt[c][t]) for c, p in joint.items() for t in range(VOCAB)} if len(next(iter(joint))) < MAX_TOKENS - 1 else joint
    return marginals


@pytest.fixture(scope="module")
def marginals(small_vocab: Path) -> list[torch.Tensor]:  # noqa: F811
    return exact_marginals(small_vocab)


def sampled_counts(model: Path, draft: Path, method: str = "draft") -> tuple[list[list[int]], LLMEngine]:
    """Per output position, how often each token was sampled over SAMPLES requests of
    PROMPT, with `draft` proposing (a draft model, or an EAGLE head with method "eagle")."""
    spec = SpeculativeConfig(method=method, draft_model=str(draft), num_speculative_tokens=3, adaptive=False)
    eng = LLMEngine(EngineConfig(model=str(model), seed=3, speculative=spec))
    for i in range(SAMPLES):
        eng.add_request(str(i), PROMPT, SAMPLED)
    counts = [[0] * VOCAB for _ in range(MAX_TOKENS)]
    while eng.has_unfinished_requests():
        for out in eng.step():
            for pos, token in enumerate(out.outputs[0].token_ids):
                counts[pos][token] += 1
    return counts, eng


def test_sampling_with_the_drafts_q_is_exact(small_vocab: Path, small_draft: Path, marginals: list[torch.Tensor]) -> None:  # noqa: F811
    counts, eng = sampled_counts(small_vocab, small_draft)
    c = eng.speculator.counters  # type: ignore[union-attr]
    # Drafts were drawn from q and verified against it; rejections were common.
    assert c.proposed_tokens > SAMPLES and 0.3 * c.proposed_tokens < c.accepted_tokens < 0.9 * c.proposed_tokens
    for pos in range(MAX_TOKENS):
        assert chi_square_p(counts[pos], marginals[pos]) > 1e-3, (pos, counts[pos], marginals[pos])


def test_a_verifier_ignoring_q_after_a_rejection_fails(
    small_vocab: Path, small_draft: Path, marginals: list[torch.Tensor], monkeypatch: pytest.MonkeyPatch  # noqa: F811
) -> None:
    """After a rejection, drawing from p instead of norm(max(0, p - q)) over-weights
    the tokens q favours: the same check catches it. (Ignoring q altogether, i.e.
    verifying sampled drafts as point masses, would be exact, only accepting less:
    docs/speculative_decoding.md#draft-model.)"""
    monkeypatch.setattr(verify_mod, "residual", lambda probs, draft, q: probs)
    counts, _ = sampled_counts(small_vocab, small_draft)
    assert min(chi_square_p(counts[pos], marginals[pos]) for pos in range(1, MAX_TOKENS)) < 1e-6


def test_seeded_requests_do_not_depend_on_the_batch(tiny_llama: Path, drafts: dict[str, Path]) -> None:
    seeded = SamplingParams(temperature=0.8, top_p=0.95, seed=1234, n=2, max_tokens=24, ignore_eos=True, output_kind="final")
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, output_kind="final")
    alone = run(draft_engine(tiny_llama, drafts["perturbed"]), [PROMPTS[0]], seeded)
    crowd_eng = draft_engine(tiny_llama, drafts["perturbed"])
    run(crowd_eng, PROMPTS[1:], other, prefix="warm")  # the draft's pool and prefix cache are in use
    crowd = run(crowd_eng, PROMPTS, [seeded, other, GREEDY, other, GREEDY])
    assert tokens(alone)["r0"] == tokens(crowd)["r0"]
    assert alone["r0"].outputs[0].token_ids != alone["r0"].outputs[1].token_ids
    assert crowd_eng.speculator.counters.accepted_tokens > 0  # type: ignore[union-attr]


def test_position_seeds_differ_by_seed_and_position() -> None:
    seeds = {position_seed(s, p) for s in (0, 1, -5, 1 << 63) for p in range(50)}
    assert len(seeds) == 200 and all(0 <= s < 1 << 63 for s in seeds)


# -- memory, cost, errors, flags --------------------------------------------------------


def test_kv_budget_is_split_between_the_pools(tiny_llama: Path, drafts: dict[str, Path]) -> None:
    budget = 4 << 20
    eng = draft_engine(tiny_llama, drafts["other"], cache=CacheConfig(cpu_kv_bytes=budget))
    draft = proposer(eng)
    assert draft.blocks is not None and draft.pool is not None
    t_block = bytes_per_block(eng.model_config, 16, torch.float32)
    used = eng.block_manager.num_blocks * t_block + draft.blocks.num_blocks * draft.bytes_per_block
    assert budget - t_block - draft.bytes_per_block < used <= budget
    # By default both pools hold the same number of tokens (here: the same shapes).
    assert abs(eng.block_manager.num_blocks - draft.blocks.num_blocks) <= 1
    spec = SpeculativeConfig(method="draft", draft_model=str(drafts["other"]), draft_kv_share=0.25)
    eng = LLMEngine(EngineConfig(model=str(tiny_llama), cache=CacheConfig(cpu_kv_bytes=budget), speculative=spec))
    assert proposer(eng).blocks.num_blocks == int(budget * 0.25) // draft.bytes_per_block  # type: ignore[union-attr]
    # An explicit pool size: the draft's pool gets as many blocks.
    eng = draft_engine(tiny_llama, drafts["other"], cache=CacheConfig(num_blocks=40))
    assert proposer(eng).blocks.num_blocks == 40  # type: ignore[union-attr]


def test_draft_passes_count_in_the_policy() -> None:
    """The same requests and target cost: drafts pay while the draft's passes are
    cheap, and none are taken once the passes cost as much as the target step."""
    target = linear_cost(fixed=0.010, per_token=0.0001)
    policy = SpeculationPolicy(PolicyConfig(max_k=4), target)
    cands = [Candidate(draft_values(0.7, (1.0,) * 4)) for _ in range(8)]
    assert sum(policy.allot(cands, 8, 8, 1000, PassCost(linear_cost(fixed=0.0002, per_token=0.00001)))) == 32
    assert sum(policy.allot(cands, 8, 8, 1000, PassCost(linear_cost(fixed=0.010, per_token=0.0001)))) == 0
    mid = sum(policy.allot(cands, 8, 8, 1000, PassCost(linear_cost(fixed=0.002, per_token=0.0001))))
    assert 0 < mid < 32


def test_pass_cost_adds_tokens_per_draft_and_a_pass_per_new_position() -> None:
    cost = PassCost(linear_cost(fixed=1.0, per_token=0.5), first_pass_tokens=[1, 3])
    assert cost.add(0, 1) == pytest.approx(1.5)  # pass 1 starts: fixed + a token
    assert cost.add(1, 1) == pytest.approx(3.0)  # 3 catch-up tokens join pass 1
    assert cost.add(1, 2) == pytest.approx(4.5)  # pass 2 starts with one token
    assert cost.add(0, 2) == pytest.approx(5.0)


def test_a_vocabulary_mismatch_is_refused_at_start(tiny_llama: Path, tmp_path: Path) -> None:
    larger = write_random_checkpoint(tmp_path / "v384", "llama", vocab_size=384)
    with pytest.raises(ValueError, match=r"vocabulary of 384 tokens.* 320"):
        draft_engine(tiny_llama, larger)
    with pytest.raises(ValueError, match="draft model"):
        draft_engine(tiny_llama, tmp_path / "missing")


def test_cli_parses_draft_path(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = engine_of("--speculative", "draft:/models/small", "--num-speculative-tokens", "3", "--speculative-draft-kv-share", "0.2")
    assert (spec.method, spec.draft_model, spec.num_speculative_tokens, spec.draft_kv_share) == ("draft", "/models/small", 3, 0.2)
    assert engine_of("--speculative", "suffix").draft_model is None
    assert not engine_of("--speculative", "off").enabled
    monkeypatch.setenv("RTPLLM_SPECULATIVE", "draft:smollm2-135m-instruct")
    assert engine_of().draft_model == "smollm2-135m-instruct"
    for bad in (["--speculative", "draft:"], ["--speculative", "draft"], ["--speculative", "eagle"],
                ["--speculative", "draft:x", "--speculative-draft-kv-share", "1.5"]):
        with pytest.raises(SystemExit, match="--speculative"):
            engine_of(*bad)
    with pytest.raises(ValueError, match="draft_model"):
        SpeculativeConfig(method="ngram", draft_model="x")
    # A prefill instance never decodes: it loads no draft model.
    args = build_parser().parse_args(["serve", "prefill", "--device", "cpu", "--speculative", "draft:/models/small"])
    assert not worker_settings(args).engine.speculative.enabled


def test_a_failing_draft_costs_its_drafts_not_the_step(tiny_llama: Path, drafts: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A draft pass that raises (an allocation, a kernel) leaves the step to run without
    drafts: outputs still equal speculation off, and drafting resumes afterwards."""
    base = run(draft_engine(tiny_llama, None), PROMPTS, [GREEDY] * len(PROMPTS))
    eng = draft_engine(tiny_llama, drafts["same"])
    draft = proposer(eng)
    real = draft.propose_batch
    calls = {"n": 0}

    def flaky(batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] in (2, 3):
            raise RuntimeError("injected draft failure")
        return real(batch)

    monkeypatch.setattr(draft, "propose_batch", flaky)
    assert tokens(run(eng, PROMPTS, [GREEDY] * len(PROMPTS))) == tokens(base)
    c = eng.speculator.counters  # type: ignore[union-attr]
    assert c.proposer_failures == 2
    assert calls["n"] > 3 and c.accepted_tokens > 0, "drafting resumed after the failures"
    assert_all_freed(eng)
