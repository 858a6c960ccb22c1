"""Speculative decoding in the engine: greedy outputs equal to speculation off, token
for token, with every proposer on every parity family, in mixed batches, with prefix
hits and forced preemption; KV rollback; stop strings, max_tokens, logprobs, n > 1,
seeds, async scheduling and the per-request switch."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rtpllm.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.outputs import RequestOutput
from rtpllm.sampling_params import SamplingParams
from rtpllm.speculative.replay import ReplayProposer

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, output_kind="final")

# Repetitive prompts give the model-free proposers matches; the random ones give none.
PROMPTS = [
    [11, 12, 13, 14, 15, 16, 11, 12, 13, 14, 15, 16, 11, 12, 13],
    [40, 41, 42, 43] * 6 + [40, 41],
    list(range(60, 97)),
    [7] * 20,
    [100, 3, 100, 3, 100, 3, 100],
]


def engine(model: Path, method: str | None, *, adaptive: bool = False, k: int = 4, **kwargs: object) -> LLMEngine:
    cache = kwargs.pop("cache", CacheConfig())
    scheduler = kwargs.pop("scheduler", SchedulerConfig(max_num_batched_tokens=64))
    # 1-grams: random weights repeat little, and every proposal exercises verification.
    spec = SpeculativeConfig(method=method, num_speculative_tokens=k, adaptive=adaptive, ngram_min=1)
    return LLMEngine(EngineConfig(model=str(model), cache=cache, scheduler=scheduler, speculative=spec, **kwargs))  # type: ignore[arg-type]


def run(eng: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams], prefix: str = "r") -> dict[str, RequestOutput]:
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for i, (prompt, p) in enumerate(zip(prompts, plist, strict=True)):
        eng.add_request(f"{prefix}{i}", prompt, p)
    done: dict[str, RequestOutput] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


def tokens(outs: dict[str, RequestOutput]) -> dict[str, list[list[int]]]:
    return {rid: [c.token_ids for c in out.outputs] for rid, out in outs.items()}


def replay_engine(model: Path, reference: dict[str, RequestOutput], prompts: list[list[int]], acceptance: float, **kwargs: object) -> LLMEngine:
    """An engine whose proposer replays the reference outputs at a given accuracy:
    long accepted runs and rejections at every position, where random weights give
    the model-free proposers almost nothing to accept."""
    eng = engine(model, "ngram", **kwargs)
    assert eng.speculator is not None
    replay = ReplayProposer(acceptance, eng.model_config.vocab_size, seed=1)
    for rid, out in reference.items():
        i = int(rid.lstrip("abcdefghijklmnopqrstuvwxyz"))
        for c in out.outputs:
            child = rid if len(out.outputs) == 1 else f"{rid}#{c.index}"
            replay.add_reference(child, len(prompts[i]), c.token_ids)
    eng.speculator.proposer = replay
    return eng


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_greedy_equals_speculation_off(tiny_checkpoints: dict[str, Path], family: str, method: str) -> None:
    model = tiny_checkpoints[family]
    # Mixed batch: different lengths, budgets, and one request that will not speculate.
    params = [GREEDY, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, output_kind="final"), GREEDY,
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, speculative=False, output_kind="final"), GREEDY]
    base = run(engine(model, None), PROMPTS, params)
    eng = engine(model, method)
    spec = run(eng, PROMPTS, params)
    assert tokens(spec) == tokens(base)
    assert eng.speculator is not None and eng.speculator.counters.proposed_tokens > 0
    eng.block_manager.check_invariants(set())
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_verify_steps_group_each_sequences_rows(tiny_llama: Path) -> None:
    """What a verify step tells the attention backend: each sequence's decode rows are
    one group (decode_spans), consecutive, at consecutive positions, on one block table:
    what lets the GPU's verify kernel read a sequence's KV once for all its rows."""
    eng = engine(tiny_llama, "ngram")
    seen: list[tuple[list[int], list[int], list[list[int]], int, int]] = []
    forward = eng.backend.forward

    def spy(q, k, v, k_cache, v_cache, meta, *args, **kwargs):  # type: ignore[no-untyped-def]
        if meta.decode_rows_share_seqs:
            nd = meta.num_decodes
            assert meta.decode_spans is not None
            seen.append((meta.decode_spans.tolist(), meta.seq_lens_host[:nd], meta.block_tables[:nd].tolist(),
                         meta.max_decode_span, meta.num_decode_groups))  # fmt: skip
        return forward(q, k, v, k_cache, v_cache, meta, *args, **kwargs)

    eng.backend.forward = spy  # type: ignore[method-assign]
    run(eng, PROMPTS, GREEDY)
    assert seen and any(max_span > 1 for *_, max_span, _ in seen)
    for spans, lens, tables, max_span, groups in seen:
        assert len(spans) == len(lens) and sum(spans) == len(spans)
        starts = [i for i, n in enumerate(spans) if n]
        assert starts[0] == 0 and len(starts) == groups and max(spans) == max_span
        for i in starts:
            n = spans[i]
            assert spans[i + 1 : i + n] == [0] * (n - 1)
            assert lens[i : i + n] == list(range(lens[i], lens[i] + n))
            assert all(t == tables[i] for t in tables[i : i + n])

def test_adaptive_policy_keeps_greedy_outputs(tiny_llama: Path) -> None:
    base = run(engine(tiny_llama, None), PROMPTS, GREEDY)
    eng = engine(tiny_llama, "suffix", adaptive=True)
    assert tokens(run(eng, PROMPTS, GREEDY)) == tokens(base)
    assert eng.speculator is not None and eng.speculator.cost.num_buckets > 0  # steps were timed


@pytest.mark.parametrize("acceptance", [0.0, 0.6, 1.0])
def test_replayed_drafts_under_preemption_and_prefix_hits(tiny_llama: Path, acceptance: float) -> None:
    # A shared 32-token prefix (two full blocks of 16) and a pool too small for all.
    shared = list(range(200, 232))
    prompts = [shared + [i, i + 1, i + 2] for i in range(6)] + PROMPTS[:2]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, output_kind="final")
    small = {"cache": CacheConfig(num_blocks=24), "scheduler": SchedulerConfig(max_num_batched_tokens=96)}
    base_eng = engine(tiny_llama, None, **small)
    base = run(base_eng, prompts, params)
    eng = replay_engine(tiny_llama, base, prompts, acceptance, **small)
    spec = run(eng, prompts, params)
    assert tokens(spec) == tokens(base)
    assert eng.preemptions_total > 0
    assert eng.block_manager.stats.hit_tokens > 0
    counters = eng.speculator.counters  # type: ignore[union-attr]
    assert counters.proposed_tokens > 0
    if acceptance == 1.0:
        assert counters.accepted_tokens == counters.proposed_tokens
    if acceptance == 0.0:
        assert counters.accepted_tokens < counters.proposed_tokens / 4  # a wrong token may still be right
    eng.block_manager.check_invariants(set())
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks


def test_cached_blocks_never_hold_rejected_tokens(tiny_llama: Path) -> None:
    """Every prefix-cache block of the speculating engine holds the KV the plain
    engine computed for the same block key: no draft token's KV was ever cached."""
    prompts = PROMPTS
    params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True, output_kind="final")
    cfg = {"cache": CacheConfig(block_size=4)}
    base_eng = engine(tiny_llama, None, **cfg)
    base = run(base_eng, prompts, params)
    eng = replay_engine(tiny_llama, base, prompts, 0.5, **cfg)
    assert tokens(run(eng, prompts, params)) == tokens(base)
    assert eng.speculator.counters.accepted_tokens < eng.speculator.counters.proposed_tokens  # type: ignore[union-attr]
    keys = eng.block_manager.cached_keys()
    assert len(keys) > 20
    base_blocks = dict(zip(base_eng.block_manager.cached_keys(), base_eng.block_manager.cached_block_ids(base_eng.block_manager.cached_keys()), strict=True))
    spec_blocks = eng.block_manager.cached_block_ids(keys)
    for key, block in zip(keys, spec_blocks, strict=True):
        assert key in base_blocks
        got = eng.kv_pool.kv[:, :, block]
        want = base_eng.kv_pool.kv[:, :, base_blocks[key]]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_stop_strings_max_tokens_logprobs_and_streaming(tiny_llama: Path) -> None:
    prompts = PROMPTS[:3]
    plain = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=3)
    base = run(engine(tiny_llama, None), prompts, replace(plain, output_kind="final"))
    # A stop string from the middle of each reference text, so drafts run past it.
    stops = [out.outputs[0].text[12:14] for out in base.values()]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=3, stop=[s]) if s.strip() else plain for s in stops]
    base = run(engine(tiny_llama, None), prompts, [replace(p, output_kind="final") for p in params], prefix="s")
    eng = replay_engine(tiny_llama, {}, prompts, 1.0)
    ref_run = run(engine(tiny_llama, None), prompts, [replace(plain, output_kind="final")] * 3, prefix="s")
    for rid, out in ref_run.items():  # replay the unstopped text: drafts cross the stops
        eng.speculator.proposer.add_reference(rid, len(prompts[int(rid[1:])]), out.outputs[0].token_ids)  # type: ignore[union-attr]
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        eng.add_request(f"s{i}", prompt, p)
    streamed: dict[str, list] = {f"s{i}": [] for i in range(3)}
    final: dict[str, RequestOutput] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            streamed[out.request_id].append(out.outputs[0])
            if out.finished:
                final[out.request_id] = out
    assert eng.speculator.counters.accepted_tokens > 10  # type: ignore[union-attr]
    assert any(o.outputs[0].finish_reason == "stop" for o in base.values())
    for rid, want in base.items():
        got = "".join(c.text for c in streamed[rid])
        assert got == want.outputs[0].text
        toks = [t for c in streamed[rid] for t in c.token_ids]
        assert toks == want.outputs[0].token_ids
        assert len(toks) <= 30
        lps = [lp for c in streamed[rid] for lp in (c.logprobs or [])]
        assert len(lps) == len(toks)
        for a, b in zip(lps, want.outputs[0].logprobs or [], strict=True):
            assert a.keys() == b.keys()
            for t in a:
                assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-4)
                assert a[t].rank == b[t].rank
        assert final[rid].outputs[0].finish_reason == want.outputs[0].finish_reason


def test_max_tokens_is_never_exceeded(tiny_llama: Path) -> None:
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, output_kind="final") for m in (1, 2, 3, 5, 8)]
    base = run(engine(tiny_llama, None), PROMPTS, params)
    eng = replay_engine(tiny_llama, base, PROMPTS, 1.0, k=8)
    out = run(eng, PROMPTS, params)
    assert tokens(out) == tokens(base)
    assert [len(o.outputs[0].token_ids) for o in (out[f"r{i}"] for i in range(5))] == [1, 2, 3, 5, 8]


def test_seeded_samples_are_reproducible_whatever_the_batch(tiny_llama: Path) -> None:
    seeded = SamplingParams(temperature=0.8, seed=1234, n=2, max_tokens=24, ignore_eos=True, output_kind="final")
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, output_kind="final")
    alone = run(engine(tiny_llama, "suffix"), [PROMPTS[0]], seeded)
    crowd_eng = engine(tiny_llama, "suffix")
    run(crowd_eng, PROMPTS[1:], other, prefix="warm")  # the global suffix trie learns other outputs
    crowd = run(crowd_eng, [PROMPTS[0], *PROMPTS[1:]], [seeded] + [other] * 4)
    assert tokens(alone)["r0"] == tokens(crowd)["r0"]
    assert alone["r0"].outputs[0].token_ids != alone["r0"].outputs[1].token_ids


def test_requests_that_cannot_speculate_run_plainly(tiny_llama: Path) -> None:
    """Penalties read the history token by token and a per-request opt-out: these
    never speculate, beside requests that do, and their outputs are unchanged."""
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.3, output_kind="final"),
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, speculative=False, output_kind="final"),
        GREEDY,
    ]
    prompts = PROMPTS[:3]
    base = run(engine(tiny_llama, None), prompts, params)
    eng = replay_engine(tiny_llama, base, prompts, 1.0)
    assert tokens(run(eng, prompts, params)) == tokens(base)
    counters = eng.speculator.counters  # type: ignore[union-attr]
    # Only r2 speculated: its 24 tokens take far fewer than 24 verifications.
    assert 0 < counters.verified_requests < 12


def test_async_scheduling_equals_sync(tiny_llama: Path) -> None:
    base = run(engine(tiny_llama, None), PROMPTS, GREEDY)
    eng = engine(tiny_llama, "ngram", adaptive=True, async_scheduling=True)
    assert eng.async_scheduling
    assert tokens(run(eng, PROMPTS, GREEDY)) == tokens(base)


def test_stats_report_speculation(tiny_llama: Path) -> None:
    base = run(engine(tiny_llama, None), PROMPTS, GREEDY)
    eng = replay_engine(tiny_llama, base, PROMPTS, 0.7)
    run(eng, PROMPTS, GREEDY)
    stats = eng.stats()
    assert stats.spec_proposed_tokens >= stats.spec_accepted_tokens > 0
    assert sum(stats.spec_acceptance_lengths.values()) == eng.speculator.counters.verified_requests  # type: ignore[union-attr]
    assert sum(n * c for n, c in stats.spec_acceptance_lengths.items()) == stats.spec_accepted_tokens
    assert stats.spec_chosen_k
    assert stats.generation_tokens == 24 * len(PROMPTS)
    assert engine(tiny_llama, None).stats().spec_proposed_tokens == 0


def test_structured_requests_beside_speculating_ones(tiny_llama: Path) -> None:
    """A constrained request never speculates (its grammar would have to accept every
    draft first); in a batch with speculating requests, all outputs stay as without."""
    from rtpllm.structured import StructuredOutputsParams

    regex = SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(regex="[a-c]{3,8}x"), output_kind="final")
    choice = SamplingParams(temperature=0, max_tokens=20, structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]), output_kind="final")
    params = [regex, GREEDY, choice, GREEDY, GREEDY]
    base = run(engine(tiny_llama, None), PROMPTS, params)
    eng = replay_engine(tiny_llama, base, PROMPTS, 1.0)
    out = run(eng, PROMPTS, params)
    assert tokens(out) == tokens(base)
    assert out["r2"].outputs[0].text in ("alpha", "beta")
    assert eng.speculator.counters.accepted_tokens > 0  # type: ignore[union-attr]


def test_sampled_n_samples_speculate_and_stay_valid(tiny_llama: Path) -> None:
    params = SamplingParams(temperature=0.7, n=3, seed=5, max_tokens=20, ignore_eos=True, output_kind="final")
    a = run(engine(tiny_llama, "suffix"), PROMPTS[:2], params)
    b = run(engine(tiny_llama, "suffix"), PROMPTS[:2], params)
    assert tokens(a) == tokens(b)  # seeded: reproducible run to run
    for out in a.values():
        assert len(out.outputs) == 3 and all(len(c.token_ids) == 20 for c in out.outputs)


def test_verify_steps_pack_as_decode_rows(tiny_llama: Path) -> None:
    """A verify step is packed as one decode row per token (each reading the context up to
    its own position), so a captured decode graph can replay it: the batch is pure decode
    and every row is a sampling row, in order."""
    base = run(engine(tiny_llama, None), PROMPTS, GREEDY)
    eng = replay_engine(tiny_llama, base, PROMPTS, 0.8)
    seen: list[tuple[bool, int, int]] = []
    run_batch = eng.runner.run_batch

    def record(batch, fill, spans, observe, use_graph):  # type: ignore[no-untyped-def]
        if len(batch.sample_indices) > len(batch.sample_items):  # drafts are verified in this step
            rows = batch.num_decodes  # decodes, then verify rows, then any prefill chunks
            assert batch.query_start_loc[: rows + 1].tolist() == list(range(rows + 1))
            assert batch.sample_indices[:rows].tolist() == list(range(rows))
            assert (batch.seq_lens[:rows] == batch.positions[:rows] + 1).all()  # each row ends at its token
            seen.append((batch.is_pure_decode, rows, len(batch.sample_items)))
        return run_batch(batch, fill, spans, observe, use_graph)

    eng.runner.run_batch = record  # type: ignore[method-assign]
    assert tokens(run(eng, PROMPTS, GREEDY)) == tokens(base)
    assert any(pure and rows > seqs for pure, rows, seqs in seen)


def test_the_policy_times_only_whole_steps(tiny_llama: Path) -> None:
    """With async scheduling, a step that drafts nothing and is left in flight with
    none before it (the pipeline restarting, after a verify step or a re-plan) costs
    its call only host work: the step-cost model must not take that for a step's time.
    Steps finished in the call are timed as synchronous, pipelined ones as pipelined."""
    base = run(engine(tiny_llama, None), PROMPTS, GREEDY)
    eng = replay_engine(tiny_llama, base, PROMPTS, 0.3, adaptive=True, async_scheduling=True)
    spec = eng.speculator
    assert spec is not None and eng.async_scheduling
    spec.probe_every = 2  # many re-plans in a short run
    seen: list[tuple[float | None, bool]] = []
    observe = spec.observe_step
    spec.observe_step = lambda n, seconds, pipelined=False: (seen.append((seconds, pipelined)), observe(n, seconds, pipelined))[1]  # type: ignore[method-assign]
    step = eng.step
    kinds: list[str] = []

    def checked_step() -> list[RequestOutput]:
        before, calls = eng._in_flight, len(seen)
        out = step()
        if len(seen) > calls:
            seconds, pipelined = seen[-1]
            after = eng._in_flight
            if after is None:  # finished in the call
                kinds.append("sync")
                assert seconds is not None and not pipelined
            elif seconds is None:  # left in flight, nothing finished while timed
                kinds.append("restart")
            else:  # left in flight while the one before finished
                kinds.append("pipelined")
                assert pipelined and before is not None and before is not after
        return out

    eng.step = checked_step  # type: ignore[method-assign]
    assert tokens(run(eng, PROMPTS, GREEDY)) == tokens(base)
    assert {"sync", "restart", "pipelined"} <= set(kinds), kinds


@pytest.mark.parametrize("fmt", ["fp8", "int8"])
def test_replayed_drafts_on_a_quantized_cache_with_key_transforms(tiny_llama: Path, tmp_path: Path, fmt: str) -> None:
    """Speculation over quantized KV whose plan centers and smooths the keys: verify
    steps write drafts' keys (k - m) / s quantized with their own scales, rejected ones
    are rewritten later, and greedy outputs equal speculation off's on the same cache,
    through preemption and prefix hits."""
    from rtpllm.kvcache.kv_plan import KVCachePlan
    from rtpllm.models.config import ModelConfig
    from rtpllm.models.k_smoothing import smoothing_vectors

    cfg = ModelConfig.from_dir(tiny_llama)
    g = torch.Generator().manual_seed(4)
    smooth = {i: smoothing_vectors(torch.rand(cfg.num_kv_heads, cfg.head_dim, generator=g) * 8 + 0.1, 1.0).tolist() for i in range(cfg.num_layers)}
    center = {i: (torch.randn(cfg.num_kv_heads, cfg.head_dim, generator=g) * 3).tolist() for i in range(cfg.num_layers)}
    plan = tmp_path / "plan.json"
    KVCachePlan((fmt,) * cfg.num_layers, k_smooth=smooth if fmt == "int8" else {}, k_center=center).save(plan)
    shared = list(range(200, 232))
    prompts = [shared + [i, i + 1, i + 2] for i in range(6)] + PROMPTS[:2]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, output_kind="final")
    small = {
        "cache": CacheConfig(num_blocks=24, kv_cache_plan=str(plan)),
        "scheduler": SchedulerConfig(max_num_batched_tokens=96),
    }
    base = run(engine(tiny_llama, None, **small), prompts, params)
    eng = replay_engine(tiny_llama, base, prompts, 0.6, **small)
    assert eng.model.layers[0].self_attn.k_shift is not None
    assert tokens(run(eng, prompts, params)) == tokens(base)
    counters = eng.speculator.counters  # type: ignore[union-attr]
    assert 0 < counters.accepted_tokens < counters.proposed_tokens
    assert eng.preemptions_total > 0 and eng.block_manager.stats.hit_tokens > 0
