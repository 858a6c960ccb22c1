"""Speculative decoding on CUDA: with CUDA graphs and async scheduling on (CUDA's
defaults), greedy outputs with each proposer equal speculation off, token for token,
in a mixed batch; the draft model's own graphs and device-side token feeding included.
fp32 weights, so the target's argmax has no bf16 near-ties between its decode and verify
kernels. Verify steps replay the decode graphs (each token a decode row)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rtpllm.config import CacheConfig, EngineConfig, SchedulerConfig, SpeculativeConfig
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.loader.random_checkpoint import write_random_checkpoint, write_random_eagle_head
from rtpllm.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

# Repetitive prompts (n-gram and suffix find matches) beside random ones.
PROMPTS = [
    [5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7],
    [100, 200, 300, 100, 200, 300, 100],
    list(range(40, 80)),
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 11, 12, 13, 14, 15],
]


def _perturbed(src: Path, dst: Path, scale: float) -> Path:
    dst.mkdir(parents=True)
    g = torch.Generator().manual_seed(3)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            w = load_file(f)
            save_file({k: v + torch.randn(v.shape, generator=g) * scale * v.std() for k, v in w.items()}, dst / f.name)
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _run(
    model: Path, device: str, spec: SpeculativeConfig, mixed: bool = False, stagger: bool = False
) -> tuple[list[list[int]], LLMEngine]:
    """`mixed`: mixed-step graphs on; `stagger`: the requests arrive one every 3 steps, so
    their prompts' chunks share steps with the others' decodes (and verify rows)."""
    eng = LLMEngine(
        EngineConfig(
            model=str(model), device=device, dtype="float32", max_model_len=256, mixed_cuda_graphs=mixed,
            cache=CacheConfig(num_blocks=128, block_size=16),
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=128),
            speculative=spec,
        )
    )
    # Verify steps (more sampling rows than requests) and whether a graph replayed them;
    # verify steps that also carried prefill tokens.
    verify_graphs: list[bool] = []
    mixed_verify: list[int] = []
    run_batch = eng.runner.run_batch

    def record(batch, fill, spans, observe, use_graph):  # type: ignore[no-untyped-def]
        if len(batch.sample_indices) > len(batch.sample_items):
            verify_graphs.append(use_graph)
            if not batch.is_pure_decode:
                mixed_verify.append(len(batch.input_ids))
        return run_batch(batch, fill, spans, observe, use_graph)

    eng.runner.run_batch = record  # type: ignore[method-assign]
    eng.verify_graphs = verify_graphs  # type: ignore[attr-defined]
    eng.mixed_verify = mixed_verify  # type: ignore[attr-defined]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, output_kind="final")
    outs: dict[str, list[int]] = {}
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"r{i}", p, params)
        for _ in range(3 if stagger else 0):
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = list(o.outputs[0].token_ids)
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                outs[o.request_id] = list(o.outputs[0].token_ids)
    return [outs[f"r{i}"] for i in range(len(PROMPTS))], eng


@pytest.mark.parametrize("method", ["ngram", "suffix", "draft-same", "draft-perturbed", "eagle", "eagle3"])
def test_greedy_equals_off_with_graphs(cuda_device: str, tmp_path: Path, method: str) -> None:
    model = write_random_checkpoint(tmp_path / "llama", "llama", seed=0)
    off, _ = _run(model, cuda_device, SpeculativeConfig())
    if method.startswith("eagle"):
        # Random heads: the target's decode and verify graphs also output its features.
        head = write_random_eagle_head(tmp_path / "head", model, method, seed=1, aux_layer_ids=[0, 1, 2])
        spec = SpeculativeConfig(method="eagle", draft_model=str(head), num_speculative_tokens=4, adaptive=False)
    elif method.startswith("draft"):
        draft = model if method == "draft-same" else _perturbed(model, tmp_path / "draft", 0.05)
        spec = SpeculativeConfig(method="draft", draft_model=str(draft), num_speculative_tokens=4, adaptive=False)
    else:
        spec = SpeculativeConfig(method=method, num_speculative_tokens=4, adaptive=False)
    on, eng = _run(model, cuda_device, spec)
    assert on == off
    assert eng.speculator is not None
    counters = eng.speculator.counters
    assert counters.proposed_tokens > 0, "nothing was proposed: the test would pass without speculation"
    # Verify steps without a prefill chunk replay the decode graphs.
    assert any(eng.verify_graphs), f"no verify step replayed a graph ({len(eng.verify_graphs)} verify steps)"  # type: ignore[attr-defined]
    if method == "draft-same":
        # The target's own weights as draft: every draft is accepted.
        assert counters.accepted_tokens == counters.proposed_tokens


@pytest.mark.parametrize("method", ["ngram", "suffix", "draft-perturbed"])
def test_greedy_equals_off_with_mixed_step_graphs(cuda_device: str, tmp_path: Path, method: str) -> None:
    """Mixed-step graphs (engine/piecewise_graphs.py) with speculation: requests arrive
    while others verify drafts, so steps carry prefill chunks beside verify rows and
    replay the pieces with the verify rows' attention eager between them. Outputs equal
    speculation off (without mixed-step graphs), token for token."""
    model = write_random_checkpoint(tmp_path / "llama", "llama", seed=0)
    off, _ = _run(model, cuda_device, SpeculativeConfig(), stagger=True)
    if method.startswith("draft"):
        spec = SpeculativeConfig(method="draft", draft_model=str(_perturbed(model, tmp_path / "draft", 0.05)),
                                 num_speculative_tokens=4, adaptive=False)  # fmt: skip
    else:
        spec = SpeculativeConfig(method=method, num_speculative_tokens=4, adaptive=False)
    on, eng = _run(model, cuda_device, spec, mixed=True, stagger=True)
    assert on == off
    assert eng.speculator is not None and eng.speculator.counters.accepted_tokens > 0
    mixed = eng.runner.mixed_graphs
    assert mixed is not None and mixed.replays > 0, "no step replayed mixed-step graphs"
    if method.startswith("draft"):
        # The draft model proposes every step, so verify rows meet the arrivals' chunks;
        # n-gram and suffix matches on random weights are rare, and whether one lands
        # in a step with a chunk is luck (on an H100 none did for these prompts).
        assert eng.mixed_verify, "no verify step carried prefill tokens: the test would pass without the pieces"  # type: ignore[attr-defined]


def test_eagle_features_from_graphs_equal_eager(cuda_device: str, tmp_path: Path) -> None:
    """The features the decode and verify graphs write to their static output are the
    eager forward's (the proposer copies them out before the next replay)."""
    model = write_random_checkpoint(tmp_path / "llama", "llama", seed=0)
    head = write_random_eagle_head(tmp_path / "head", model, "eagle3", seed=1, aux_layer_ids=[0, 1, 2])
    spec = SpeculativeConfig(method="eagle", draft_model=str(head), num_speculative_tokens=4, adaptive=False)
    seen: list[dict[tuple[int, int], torch.Tensor]] = []
    for graphs in (True, False):
        eng = LLMEngine(EngineConfig(model=str(model), device=cuda_device, dtype="float32", max_model_len=256, cuda_graphs=graphs,
                                     cache=CacheConfig(num_blocks=128), speculative=spec))
        rows: dict[tuple[int, int], torch.Tensor] = {}
        real = eng.speculator.observe_features  # type: ignore[union-attr]

        def record(step, features, accepted, real=real, rows=rows):  # type: ignore[no-untyped-def]
            row = 0
            for item in step.scheduled:
                n = item.num_new_tokens if not item.draft else 1 + accepted[item.request.request_id]
                for j in range(n):
                    rows[(int(item.request.request_id[1:]), item.start + j)] = features[row + j].float().cpu()
                row += item.num_new_tokens
            real(step, features, accepted)

        eng.speculator.observe_features = record  # type: ignore[union-attr, method-assign]
        params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, output_kind="final")
        for i, p in enumerate(PROMPTS):
            eng.add_request(f"r{i}", p, params)
        while eng.has_unfinished_requests():
            eng.step()
        seen.append(rows)
    assert seen[0].keys() == seen[1].keys()
    for key, row in seen[0].items():
        assert torch.allclose(row, seen[1][key], rtol=1e-4, atol=1e-4), key
