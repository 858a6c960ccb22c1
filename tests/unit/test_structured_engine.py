"""Structured outputs below the API: the spec, grammar compilation, the matcher wrapper,
mask application against a reference, and the engine with a tiny random Llama (byte
tokenizer): constrained outputs always match, with batching, n > 1, chunked prefill,
preemption, streaming, a disaggregated first token, logits wider than the tokenizer's
vocabulary, and async scheduling giving exactly the synchronous outputs."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import llguidance
import llguidance.numpy
import numpy as np
import pytest
import torch

from rtpllm import LLM, SamplingParams
from rtpllm.engine.llm_engine import LLMEngine
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.structured import StructuredOutputsParams
from rtpllm.structured.bitmask import apply_token_bitmask, unpack_bitmask
from rtpllm.structured.grammar import _close_objects, check_grammar, ll_tokenizer
from rtpllm.structured.matcher import GrammarMatcher
from rtpllm.tokenizer import Tokenizer
from rtpllm.tokenizer.byte_tokenizer import write_byte_tokenizer

S = StructuredOutputsParams
REGEX = r"[a-z]{2,6}-[0-9]{1,3}"
CHOICES = ["alpha", "beta", "gamma delta"]

# -- the spec --------------------------------------------------------------------------


def test_spec_keeps_one_constraint_in_a_wire_friendly_form() -> None:
    spec = S(json={"type": "object", "properties": {"z": {}, "a": {}}})
    assert spec.kind == "json" and spec.json == '{"type":"object","properties":{"z":{},"a":{}}}'  # order kept
    assert spec.schema == {"type": "object", "properties": {"z": {}, "a": {}}}
    assert S(choice=["a", "b"]).choice == ("a", "b") and S(choice=["a", "b"]) == S(choice=("a", "b"))
    assert S(json_object=True).kind == "json_object"
    assert hash(S(regex="a+")) == hash(S(regex="a+"))


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({}, "exactly one"),
        ({"regex": "a", "grammar": "start: x"}, "exactly one"),
        ({"json": "[1]"}, "schema object"),
        ({"json": "{bad"}, "not valid JSON"),
        ({"regex": ""}, "non-empty"),
        ({"choice": []}, "non-empty"),
        ({"choice": ["a", 3]}, "choice"),
    ],
)
def test_spec_refuses_bad_values(fields: dict, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        S(**fields)


def test_sampling_params_refuse_a_raw_dict() -> None:
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"regex": "a"})  # type: ignore[arg-type]


# -- grammar compilation ---------------------------------------------------------------


def test_objects_with_properties_are_closed_but_nothing_else_changes() -> None:
    schema = {
        "type": "object",
        "properties": {
            "properties": {"type": "object", "properties": {"x": {"type": "integer"}}},  # a property so named
            "open": {"type": "object", "properties": {"y": {}}, "additionalProperties": True},
            "list": {"type": "array", "items": {"type": "object", "properties": {"z": {}}}},
            "any": {"type": "object"},
        },
        "$defs": {"d": {"properties": {"w": {}}}},
        "allOf": [{"properties": {"p": {}}}],
    }
    closed = _close_objects(schema)
    assert "additionalProperties" not in closed  # has allOf: merged branches stay open
    props = closed["properties"]
    assert props["properties"]["additionalProperties"] is False
    assert "additionalProperties" not in props  # the name -> schema map itself is untouched
    assert props["open"]["additionalProperties"] is True
    assert props["list"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in props["any"]  # any object stays any object
    assert closed["$defs"]["d"]["additionalProperties"] is False
    assert "additionalProperties" not in closed["allOf"][0]
    assert "additionalProperties" not in schema["properties"]["list"]["items"]  # input not changed


@pytest.mark.parametrize(
    "spec",
    [S(json={"type": "object"}), S(json_object=True), S(regex=REGEX), S(choice=CHOICES), S(grammar='start: "x" | "y"'),
     S(grammar='root ::= "yes" | "no"')],
)  # fmt: skip
def test_valid_constraints_compile(spec: S) -> None:
    check_grammar(spec)


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (S(json={"type": "nope"}), "nope"),
        (S(json={"type": "integer", "minimum": 3, "maximum": 1}), "minimum"),
        (S(regex="(a"), "unclosed"),
        (S(grammar="start: missing"), "missing"),
    ],
)
def test_invalid_constraints_say_why(spec: S, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_grammar(spec)


# -- the matcher wrapper ---------------------------------------------------------------


@pytest.fixture(scope="module")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    root: Path = tmp_path_factory.mktemp("tok")
    write_byte_tokenizer(root, 320)
    return Tokenizer.from_dir(root)


def ids(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def test_matcher_advances_by_position_once(byte_tokenizer: Tokenizer) -> None:
    ll = ll_tokenizer(byte_tokenizer, [258])
    m = GrammarMatcher.compile(ll, S(choice=["ab", "cd"]))
    twin = m.fork()
    a, b = ids(byte_tokenizer, "ab")
    m.advance(0, a)
    m.advance(0, a)  # the async worker and the read-back both report token 0
    assert m.num_consumed == 1 and not m.is_done
    with pytest.raises(AssertionError):
        m.advance(2, b)  # a gap: token 1 was never fed
    m.advance(1, b)
    assert m.is_done and not m.is_error
    assert twin.num_consumed == 0 and not twin.is_done  # forks are independent
    c = ids(byte_tokenizer, "c")[0]
    twin.advance(0, c)
    assert not twin.is_done


def test_rejected_token_ends_the_matcher(byte_tokenizer: Tokenizer) -> None:
    m = GrammarMatcher.compile(ll_tokenizer(byte_tokenizer, [258]), S(regex="[0-9]+"))
    m.advance(0, ids(byte_tokenizer, "x")[0])
    assert m.is_error and m.is_done


def test_compile_error_is_a_value_error(byte_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="invalid structured output"):
        GrammarMatcher.compile(ll_tokenizer(byte_tokenizer, [258]), S(regex="(x"))


# -- masks on logits -------------------------------------------------------------------


def reference_mask(logits: torch.Tensor, bits: np.ndarray, rows: list[int]) -> torch.Tensor:
    """Token by token: the obvious definition."""
    out = logits.clone()
    for i, row in enumerate(rows):
        for t in range(out.shape[1]):
            word = t // 32
            allowed = word < bits.shape[1] and (int(bits[i, word]) >> (t % 32)) & 1
            if not allowed:
                out[row, t] = float("-inf")
    return out


@pytest.mark.parametrize(
    ("vocab", "words"), [(96, 3), (100, 4), (130, 4)]
)  # exact, mask wider, logits wider (padding)
def test_apply_token_bitmask_matches_the_reference(vocab: int, words: int) -> None:
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(6, vocab, generator=gen)
    bits = (
        np.random.default_rng(vocab)
        .integers(-(2**31), 2**31, size=(3, words), dtype=np.int64)
        .astype(np.int32)
    )
    rows = [4, 0, 2]
    out = logits.clone()
    apply_token_bitmask(out, torch.from_numpy(bits), rows)
    assert torch.equal(out, reference_mask(logits, bits, rows))
    all_rows = logits[:3].clone()
    apply_token_bitmask(all_rows, torch.from_numpy(bits), None)
    assert torch.equal(all_rows, reference_mask(logits[:3], bits, [0, 1, 2]))


def test_unpacking_agrees_with_llguidance() -> None:
    bits = np.random.default_rng(0).integers(-(2**31), 2**31, size=(4, 5), dtype=np.int64).astype(np.int32)
    expected = np.zeros((4, 160), dtype=np.float32)
    llguidance.numpy.apply_token_bitmask_inplace(expected, bits)
    assert np.array_equal(unpack_bitmask(torch.from_numpy(bits), 160).numpy(), np.isfinite(expected))


# -- the engine ------------------------------------------------------------------------


def _check(text: str, spec: S) -> bool:
    if spec.regex is not None:
        return re.fullmatch(spec.regex, text) is not None
    if spec.choice is not None:
        return text in spec.choice
    return False


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(33, 127) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def test_constrained_outputs_always_match(tiny_llama: Path) -> None:
    # Small budget and few blocks: chunked prefill and preemption (recompute) happen.
    llm = LLM(str(tiny_llama), device="cpu", num_blocks=24, block_size=8, max_num_batched_tokens=32)
    specs = [S(regex=REGEX), S(choice=CHOICES), None]
    params = [
        SamplingParams(
            temperature=1.0, seed=i, n=2 if i % 3 else 1, max_tokens=40, structured_outputs=specs[i % 3]
        )
        for i in range(18)
    ]
    outs = llm.generate(_prompts(18), params)
    for p, out in zip(params, outs, strict=True):
        for c in out.outputs:
            if p.structured_outputs is not None:
                assert _check(c.text, p.structured_outputs), c.text
                assert c.finish_reason == "stop"
    assert llm.engine.stats().num_preemptions > 0
    assert llm.engine.structured.num_live == 0


def test_unconstrained_engines_never_start_the_grammar_worker(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), device="cpu")
    llm.generate(_prompts(4), SamplingParams(max_tokens=8))
    assert llm.engine.structured._worker is None


def test_invalid_constraint_is_refused_when_added(tiny_llama: Path) -> None:
    llm = LLM(str(tiny_llama), device="cpu")
    with pytest.raises(ValueError, match="invalid structured output"):
        llm.engine.add_request("bad", [1, 2, 3], SamplingParams(structured_outputs=S(regex="(a")))
    assert not llm.engine.has_unfinished_requests()


def test_async_scheduling_gives_the_sync_outputs(tiny_llama: Path) -> None:
    kw = dict(num_blocks=14, block_size=8, max_model_len=96, max_num_batched_tokens=24)
    sync = LLM(str(tiny_llama), device="cpu", async_scheduling=False, **kw)  # type: ignore[arg-type]
    asyn = LLM(str(tiny_llama), device="cpu", async_scheduling=True, **kw)  # type: ignore[arg-type]
    rng = random.Random(3)
    specs = [S(regex=REGEX), S(choice=CHOICES), S(regex="[0-9]{4,12}"), None]
    params = [
        SamplingParams(
            temperature=rng.choice([0.0, 1.0]), seed=i, max_tokens=rng.randint(4, 30), n=rng.choice([1, 2]),
            logprobs=rng.choice([None, 2]), structured_outputs=specs[i % 4],
        )
        for i in range(12)
    ]  # fmt: skip
    prompts = _prompts(12, seed=5)

    def summary(outs: list) -> list:
        return [[(o.token_ids, o.text, o.finish_reason) for o in r.outputs] for r in outs]

    a, b = sync.generate(prompts, params), asyn.generate(prompts, params)
    assert summary(a) == summary(b)
    assert asyn.engine.stats().num_preemptions > 0
    for p, r in zip(params, b, strict=True):
        for c in r.outputs:
            if p.structured_outputs is not None and c.finish_reason == "stop":
                assert _check(c.text, p.structured_outputs)


def test_streamed_deltas_add_up_and_end_with_stop(tiny_llama: Path) -> None:
    eng = LLM(str(tiny_llama), device="cpu").engine
    eng.add_request(
        "r", [10, 20, 30], SamplingParams(temperature=1.0, seed=1, n=2, structured_outputs=S(choice=CHOICES))
    )
    texts = ["", ""]
    finish: list[str | None] = [None, None]
    deltas = 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            for c in out.outputs:
                texts[c.index] += c.text
                finish[c.index] = c.finish_reason or finish[c.index]
            deltas += 1
    assert all(t in CHOICES for t in texts) and finish == ["stop", "stop"]
    assert deltas > 1


def test_disaggregated_first_token_advances_the_decode_side(tiny_llama: Path) -> None:
    eng = LLM(str(tiny_llama), device="cpu").engine
    tok = eng.tokenizer
    assert tok is not None
    params = SamplingParams(temperature=1.0, seed=0, structured_outputs=S(choice=["xy", "zw"]))
    assert eng.add_request("d", list(range(40, 80)), params, remote_prefill_min_tokens=1) is not None
    assert eng.complete_remote_prefill("d", ids(tok, "z")[0])
    text = ""
    while eng.has_unfinished_requests():
        for out in eng.step():
            text += out.outputs[0].text
            reason = out.outputs[0].finish_reason
    assert (text, reason) == ("zw", "stop")


def test_logits_wider_than_the_tokenizer_are_masked(tmp_path: Path) -> None:
    model_dir = write_random_checkpoint(tmp_path / "wide", "llama", seed=7, vocab_size=352)
    write_byte_tokenizer(model_dir, 320)  # the model's last 32 rows are padding
    llm = LLM(str(model_dir), device="cpu")
    assert llm.engine.model_config.vocab_size == 352 and llm.engine.tokenizer.vocab_size == 320  # type: ignore[union-attr]
    spec = S(regex="[a-z ]{1,30}")
    outs = llm.generate(
        _prompts(6), SamplingParams(temperature=1.0, seed=2, max_tokens=30, structured_outputs=spec)
    )
    for out in outs:
        assert all(t < 320 for t in out.outputs[0].token_ids)
        assert re.fullmatch("[a-z ]{1,30}", out.outputs[0].text)


def test_json_schema_with_a_random_model(tiny_llama: Path) -> None:
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}, "b": {"type": "boolean"}},
        "required": ["n", "b"],
    }
    llm = LLM(str(tiny_llama), device="cpu")
    outs = llm.generate(
        _prompts(4), SamplingParams(temperature=1.0, seed=3, max_tokens=60, structured_outputs=S(json=schema))
    )
    for out in outs:
        value = json.loads(out.outputs[0].text)
        assert set(value) == {"n", "b"} and 0 <= value["n"] <= 9 and isinstance(value["b"], bool)


def test_engine_without_structured_requests_is_unchanged_by_them(tiny_llama: Path) -> None:
    """Unconstrained rows of a mixed batch sample exactly what they sample alone."""
    prompts = _prompts(3, seed=9)
    free = SamplingParams(temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    alone = LLM(str(tiny_llama), device="cpu").generate(prompts, free)
    mixed_params = [free, SamplingParams(temperature=1.0, seed=1, structured_outputs=S(regex=REGEX)), free]
    mixed = LLM(str(tiny_llama), device="cpu").generate(prompts, mixed_params)
    assert alone[0].outputs[0].token_ids == mixed[0].outputs[0].token_ids
    assert alone[2].outputs[0].token_ids == mixed[2].outputs[0].token_ids


def test_engine_type_is_importable() -> None:
    assert LLMEngine is not None
