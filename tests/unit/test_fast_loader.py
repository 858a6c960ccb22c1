"""The fast loader against safetensors' own reader: bit-exact loads, casts, fused views, errors."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from rtpllm.attention import get_backend
from rtpllm.loader import fast_loader
from rtpllm.loader.cuda_copy import cuda_runtime
from rtpllm.loader.fast_loader import execute_plan, load_checkpoint_fast
from rtpllm.loader.file_reader import CheckpointFile, resident_pages
from rtpllm.loader.load_plan import ALIGN, align_down, build_load_plan
from rtpllm.loader.native_ring import native_library
from rtpllm.loader.pinned import PinnedBuffer
from rtpllm.loader.progress import ProgressPrinter
from rtpllm.loader.safetensors_header import read_header
from rtpllm.loader.weights import CheckpointError, LoadStats, load_checkpoint, safetensors_files
from rtpllm.models import DecoderLM, ModelConfig, build_model

DTYPES = [
    torch.float32,
    torch.bfloat16,
    torch.float16,
    torch.float64,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
]

# The loader's execution paths: CPU scatter reads straight into the destinations, and the
# Python ring pipeline the GPU uses (plain buffers here), with page-cache and O_DIRECT
# reads, and the C reader loop (native_ring; memcpy to host destinations here, cast
# pieces left to the Python ring) with its default chunks and with 4 KiB ones.
PATHS = [
    {},
    {"use_ring": True},
    {"use_ring": True, "direct_io": False},
    {"use_ring": True, "direct_io": True},
    {"native": True},
    {"native": True, "chunk_bytes": ALIGN},
]


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -(2**62)), min(info.max, 2**62), shape, generator=gen, dtype=dtype)


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes (so -0.0 != 0.0 and NaN payloads count)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8)
    )


def write_checkpoint(root: Path, tensors: dict[str, torch.Tensor], num_shards: int = 1) -> None:
    """safetensors' own writer; several shards get an HF index, as real checkpoints do."""
    root.mkdir(parents=True, exist_ok=True)
    if num_shards == 1:
        save_file(tensors, str(root / "model.safetensors"))
        return
    names = list(tensors)
    weight_map = {}
    for s in range(num_shards):
        fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: tensors[n] for n in names[s::num_shards]}
        save_file(chunk, str(root / fname))
        weight_map.update(dict.fromkeys(chunk, fname))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def reference(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in safetensors_files(root):
        out.update(load_file(str(path)))
    return out


def write_raw(path: Path, header: object, data: bytes, header_len: int | None = None) -> None:
    """A hand-made safetensors file, for corruptions safetensors' writer would never produce."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data)


# -- bit-exact loads --------------------------------------------------------------------

shapes = st.one_of(
    st.just(()),
    st.lists(st.integers(0, 9), min_size=1, max_size=3).map(tuple),
    st.tuples(st.integers(1, 700), st.sampled_from([1, 3, 16])),  # several KiB: spans extents
)
# (source dtype, shape, which cast to ask for: 0 = none, else an index into cast_targets).
specs = st.lists(st.tuples(st.sampled_from(DTYPES), shapes, st.integers(0, 3)), min_size=1, max_size=8)


def cast_target(dtype: torch.dtype, choice: int) -> torch.dtype:
    """A destination dtype for `dtype`; only well-defined casts (no negative float -> uint8)."""
    if choice == 0:
        return dtype
    if dtype.is_floating_point:
        options = [torch.float32, torch.bfloat16, torch.float16]
    else:
        options = [torch.int64, torch.float32, torch.int32]
    return options[choice - 1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=specs,
    num_shards=st.integers(1, 3),
    extent_bytes=st.sampled_from([ALIGN, 2 * ALIGN, 16 << 20]),
    threads=st.sampled_from([1, 3]),
    ring_depth=st.sampled_from([1, 2, None]),
    path=st.sampled_from(PATHS),
    seed=st.integers(0, 2**16),
)
def test_matches_safetensors_load_file(
    specs: list[tuple[torch.dtype, tuple[int, ...], int]],
    num_shards: int,
    extent_bytes: int,
    threads: int,
    ring_depth: int | None,
    path: dict[str, object],
    seed: int,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}.{str(dt)[6:]}": random_tensor(dt, shape, gen) for i, (dt, shape, _) in enumerate(specs)}
    # Destinations may ask for another dtype: the loader must cast exactly like Tensor.copy_.
    dest_dtypes = {name: cast_target(dt, c) for name, (dt, _, c) in zip(tensors, specs, strict=True)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_checkpoint(root, tensors, min(num_shards, len(tensors)))
        ref = reference(root)
        targets = {n: torch.empty(t.shape, dtype=dest_dtypes[n]) for n, t in ref.items()}
        stats = load_checkpoint_fast(
            root, targets, extent_bytes=extent_bytes, num_threads=threads, ring_depth=ring_depth, **path
        )
    assert stats.num_tensors == len(ref)
    assert stats.bytes_read == sum(t.numel() * t.element_size() for t in ref.values())
    for name, src in ref.items():
        assert bits_equal(targets[name], src.to(dest_dtypes[name])), name


@pytest.mark.parametrize("path", PATHS)
def test_large_tensors_split_over_many_extents(tmp_path: Path, path: dict[str, object]) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "a": random_tensor(torch.bfloat16, (257, 333), gen),
        "b": random_tensor(torch.float32, (1001,), gen),
        "c": random_tensor(torch.int64, (3, 5, 7), gen),
        "d": random_tensor(torch.bfloat16, (129, 65), gen),
    }
    write_checkpoint(tmp_path, tensors, 2)
    targets = {n: torch.empty_like(t) for n, t in tensors.items()}
    targets["d"] = torch.empty(129, 65, dtype=torch.float32)  # a cast tensor split over extents
    load_checkpoint_fast(tmp_path, targets, extent_bytes=ALIGN, num_threads=4, ring_depth=3, **path)
    for name, src in tensors.items():
        assert bits_equal(targets[name], src.to(targets[name].dtype)), name


@pytest.mark.parametrize("path", PATHS)
def test_fused_and_strided_destinations(tmp_path: Path, path: dict[str, object]) -> None:
    gen = torch.Generator().manual_seed(2)
    q, k, w = (random_tensor(torch.bfloat16, s, gen) for s in [(96, 40), (32, 40), (40, 24)])
    write_checkpoint(tmp_path, {"q_proj": q, "k_proj": k, "w": w})
    fused = torch.empty(128, 40, dtype=torch.bfloat16)
    fused32 = torch.empty(128, 40, dtype=torch.float32)
    strided = torch.empty(24, 40, dtype=torch.bfloat16).t()  # not contiguous: goes through a temporary
    load_checkpoint_fast(tmp_path, {"q_proj": fused[:96], "k_proj": fused[96:], "w": strided}, **path)
    assert bits_equal(fused, torch.cat([q, k]))
    assert bits_equal(strided.contiguous(), w)
    load_checkpoint_fast(
        tmp_path, {"q_proj": fused32[:96], "k_proj": fused32[96:]}, extent_bytes=ALIGN, **path
    )
    assert bits_equal(fused32, torch.cat([q, k]).float())


def test_plan_orders_by_file_offset_and_skips_large_gaps(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = {n: random_tensor(torch.float32, (3000,), gen) for n in ["a", "b", "c", "d"]}
    tensors["big_unused"] = random_tensor(torch.float32, (300_000,), gen)  # 1.2 MB gap
    save_file(tensors, str(tmp_path / "model.safetensors"))
    header = read_header(tmp_path / "model.safetensors")
    targets = {n: torch.empty(3000) for n in "abcd"}
    plan = build_load_plan([header], targets, ignore=lambda n: n == "big_unused", max_gap=1 << 20)
    starts = [e.offset for e in plan.extents]
    assert starts == sorted(starts) and all(e.offset % ALIGN == 0 for e in plan.extents)
    unused = next(t for t in header.tensors if t.name == "big_unused")
    for e in plan.extents:  # no extent reads across the big unused tensor
        assert e.end <= unused.start or e.offset >= align_down(unused.end)
    assert plan.read_bytes < header.file_size - unused.nbytes + 2 * ALIGN
    small = build_load_plan([header], targets, ignore=lambda n: True, extent_bytes=ALIGN)
    assert all(e.nbytes <= ALIGN for e in small.extents)
    assert sum(p.nbytes for e in small.extents for p in e.pieces) == small.tensor_bytes


def evict(path: Path, start: int = 0, length: int = 0) -> float:
    """Drop a file range from the page cache; returns the share of the file still cached."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, start, length, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    f = CheckpointFile(path, want_direct=False)
    try:
        pages = resident_pages(f)
    finally:
        f.close()
    return 1.0 if pages is None else float(pages.mean())


@pytest.mark.parametrize("evicted", ["all", "second half"])
def test_auto_direct_io_on_uncached_files(tmp_path: Path, evicted: str) -> None:
    gen = torch.Generator().manual_seed(7)
    tensors = {f"t{i}": random_tensor(torch.bfloat16, (300, 100 + i), gen) for i in range(5)}
    write_checkpoint(tmp_path, tensors)
    path = tmp_path / "model.safetensors"
    targets = {n: torch.empty_like(t) for n, t in tensors.items()}
    plan = build_load_plan([read_header(path)], targets, extent_bytes=4 * ALIGN)
    # Evict after reading the header: its readahead would have cached this small file.
    size = path.stat().st_size
    still_cached = evict(path) if evicted == "all" else evict(path, size // 2)
    timings = execute_plan(plan, use_ring=True, num_threads=2, direct_io=None)
    for name, src in tensors.items():
        assert bits_equal(targets[name], src), name
    assert timings is not None
    direct, total = timings.direct_reads, timings.extents
    assert total == len(plan.extents)
    if still_cached == 0.0:  # the filesystem honoured the eviction: a cold file goes O_DIRECT
        assert direct == total, timings
    else:
        assert 0 <= direct < total, timings


def test_o_direct_refused_falls_back_to_page_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_preadv = os.preadv

    def refusing_preadv(fd: int, buffers: list[memoryview], offset: int, *flags: int) -> int:
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:  # like a filesystem without O_DIRECT reads
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", refusing_preadv)
    gen = torch.Generator().manual_seed(10)
    tensors = {f"t{i}": random_tensor(torch.float16, (200, 50 + i), gen) for i in range(4)}
    write_checkpoint(tmp_path, tensors)
    targets = {n: torch.empty_like(t) for n, t in tensors.items()}
    load_checkpoint_fast(
        tmp_path, targets, use_ring=True, direct_io=True, extent_bytes=2 * ALIGN, num_threads=3
    )
    for name, src in tensors.items():
        assert bits_equal(targets[name], src), name


def test_optional_ignored_and_unused_names(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_checkpoint(tmp_path, {"w": torch.ones(4), "inv_freq": torch.ones(2), "extra": torch.ones(3)})
    targets = {"w": torch.zeros(4), "lm_head": torch.zeros(2)}
    with caplog.at_level(logging.WARNING):
        stats = load_checkpoint_fast(
            tmp_path, targets, optional={"lm_head"}, ignore=lambda n: n == "inv_freq"
        )
    assert stats.num_tensors == 1 and torch.equal(targets["w"], torch.ones(4))
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "extra" in warned and "inv_freq" not in warned


@pytest.mark.parametrize("path", PATHS)
def test_progress_reports_every_byte(tmp_path: Path, path: dict[str, object]) -> None:
    gen = torch.Generator().manual_seed(4)
    tensors = {f"t{i}": random_tensor(torch.float32, (1000 + i,), gen) for i in range(6)}
    write_checkpoint(tmp_path, tensors, 2)
    calls: list[tuple[int, int]] = []
    targets = {n: torch.empty_like(t) for n, t in tensors.items()}
    load_checkpoint_fast(
        tmp_path, targets, extent_bytes=ALIGN, progress=lambda d, t: calls.append((d, t)), **path
    )
    total = calls[0][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert total >= sum(t.numel() * 4 for t in tensors.values())


def test_native_loop_reports_its_work(tmp_path: Path) -> None:
    # The C loop takes the same-dtype extents; a cast tensor's extents go to the Python ring.
    gen = torch.Generator().manual_seed(11)
    tensors = {
        "a": random_tensor(torch.bfloat16, (300, 64), gen),
        "b": random_tensor(torch.float32, (50,), gen),
    }
    write_checkpoint(tmp_path, tensors)
    targets = {"a": torch.empty(300, 64, dtype=torch.bfloat16), "b": torch.empty(50, dtype=torch.float64)}
    seen: list[tuple[int, int]] = []
    stats = load_checkpoint_fast(
        tmp_path,
        targets,
        native=True,
        extent_bytes=ALIGN,
        num_threads=2,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert stats.detail["native"] == 1 and stats.detail["extents"] >= 10  # 38 KB in 4 KiB extents
    assert seen[-1][0] == seen[-1][1] and all(a <= b for (a, _), (b, _) in zip(seen, seen[1:], strict=False))
    for name, src in tensors.items():
        assert bits_equal(targets[name], src.to(targets[name].dtype)), name


def test_without_a_compiler_the_python_loop_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("RTPLLM_CACHE_DIR", str(tmp_path / "cache"))
    native_library.cache_clear()
    try:
        assert native_library() is None
        write_checkpoint(tmp_path / "ckpt", {"w": torch.arange(100.0)})
        target = torch.empty(100)
        assert load_checkpoint_fast(tmp_path / "ckpt", {"w": target}, use_ring=True).detail["native"] == 0
        assert bits_equal(target, torch.arange(100.0))
        with pytest.raises(ValueError, match="native loader cannot run this load: it is not available"):
            load_checkpoint_fast(tmp_path / "ckpt", {"w": target}, native=True)
    finally:
        native_library.cache_clear()


def test_cpu_loads_leave_the_native_library_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # CPU destinations take the direct path unless native=True: no compiler run at start-up.
    def built() -> None:
        raise AssertionError("the native library was built or loaded")

    monkeypatch.setattr(fast_loader, "native_library", built)
    write_checkpoint(tmp_path, {"w": torch.arange(100.0)})
    for path in ({}, {"use_ring": True}):
        target = torch.empty(100)
        load_checkpoint_fast(tmp_path, {"w": target}, **path)
        assert bits_equal(target, torch.arange(100.0))


def test_native_refuses_o_direct(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"w": torch.arange(100.0)})
    with pytest.raises(ValueError, match="reads through the page cache"):
        load_checkpoint_fast(tmp_path, {"w": torch.empty(100)}, native=True, direct_io=True)


def test_progress_printer() -> None:
    out = io.StringIO()
    printer = ProgressPrinter("weights", stream=out, log_interval=0.0)
    for done in (0, 5 * 10**8, 10**9):
        printer(done, 10**9)
    printer(10**9, 10**9)  # a repeated final call draws nothing more
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "1.00/1.00 GB" in lines[-1] and "GB/s" in lines[-1]


# -- a real model -----------------------------------------------------------------------

TINY = {
    "vocab_size": 97,
    "hidden_size": 64,
    "intermediate_size": 88,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5,
}


@pytest.mark.parametrize(
    ("arch", "extra", "ckpt_dtype"),
    [
        ("LlamaForCausalLM", {}, torch.float32),
        ("LlamaForCausalLM", {}, torch.bfloat16),  # cast into a float32 model
        ("Qwen2ForCausalLM", {"tie_word_embeddings": True}, torch.float32),
        ("Qwen3ForCausalLM", {"head_dim": 16}, torch.bfloat16),
    ],
)
def test_tiny_model_matches_simple_loader(
    tmp_path: Path, arch: str, extra: dict[str, object], ckpt_dtype: torch.dtype
) -> None:
    config = ModelConfig.from_dict({"architectures": [arch], **TINY, **extra})

    def model() -> DecoderLM:
        return build_model(config, get_backend("torch", "cpu"), 64, torch.float32, "cpu")

    reference_model, fast_model, ring_model = model(), model(), model()
    gen = torch.Generator().manual_seed(5)
    ckpt = {
        name: random_tensor(ckpt_dtype, tuple(view.shape), gen)
        for name, view in reference_model.checkpoint_targets().items()
    }
    ckpt["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # ignored, as in old Llama files
    write_checkpoint(tmp_path, ckpt, num_shards=2)

    def load(loader: Callable[..., LoadStats], m: DecoderLM, **kw: object) -> None:
        loader(
            tmp_path,
            m.checkpoint_targets(),
            optional=m.optional_checkpoint_names(),
            ignore=lambda n: n.endswith(m.IGNORED_SUFFIXES),
            **kw,
        )

    load(load_checkpoint, reference_model)
    load(load_checkpoint_fast, fast_model)
    load(load_checkpoint_fast, ring_model, use_ring=True, extent_bytes=ALIGN, num_threads=3)
    ref_params = dict(reference_model.named_parameters())
    assert len(ref_params) > 10
    for other in (fast_model, ring_model):
        for name, p in other.named_parameters():
            assert bits_equal(p, ref_params[name]), name


# -- CUDA destinations (run on the GPU machine; skipped elsewhere) ------------------------


# (direct_io, native, extent_bytes, ring_depth, chunk_bytes): the Python ring with each
# read mode, and the C loop (same-dtype pieces; the cast ones go to the Python ring).
CUDA_PATHS = [
    *[
        (d, False, e, r, None)
        for d in (None, True, False)
        for e, r in [(ALIGN, 1), (2 * ALIGN, 3), (16 << 20, None)]
    ],
    (False, True, ALIGN, None, None),
    (False, True, 3 * ALIGN, 6, ALIGN),
    (False, True, 16 << 20, None, 2 * ALIGN),
    (False, None, 16 << 20, None, None),
]


@pytest.mark.gpu
@pytest.mark.parametrize(("direct_io", "native", "extent_bytes", "ring_depth", "chunk_bytes"), CUDA_PATHS)
def test_cuda_destinations_match_load_file(
    tmp_path: Path,
    direct_io: bool | None,
    native: bool | None,
    extent_bytes: int,
    ring_depth: int | None,
    chunk_bytes: int | None,
) -> None:
    gen = torch.Generator().manual_seed(8)
    tensors = {f"t{i}.{str(dt)[6:]}": random_tensor(dt, (37 + i, 29), gen) for i, dt in enumerate(DTYPES)}
    tensors["scalar"] = random_tensor(torch.float32, (), gen)
    tensors["empty"] = random_tensor(torch.bfloat16, (0, 5), gen)
    tensors["q"] = random_tensor(torch.bfloat16, (96, 64), gen)
    tensors["k"] = random_tensor(torch.bfloat16, (32, 64), gen)
    write_checkpoint(tmp_path, tensors, 2)
    ref = reference(tmp_path)
    targets = {n: torch.empty(t.shape, dtype=t.dtype, device="cuda") for n, t in ref.items()}
    fused = torch.empty(128, 64, dtype=torch.float32, device="cuda")  # fused and cast on the GPU
    targets["q"], targets["k"] = fused[:96], fused[96:]
    targets["t1.bfloat16"] = torch.empty(ref["t1.bfloat16"].shape, dtype=torch.float32, device="cuda")
    load_checkpoint_fast(
        tmp_path,
        targets,
        extent_bytes=extent_bytes,
        ring_depth=ring_depth,
        num_threads=3,
        direct_io=direct_io,
        native=native,
        chunk_bytes=chunk_bytes,
    )
    for name, src in ref.items():
        assert bits_equal(targets[name].cpu(), src.to(targets[name].dtype)), name


@pytest.mark.gpu
def test_cuda_tiny_model_matches_simple_loader(tmp_path: Path) -> None:
    config = ModelConfig.from_dict({"architectures": ["Qwen2ForCausalLM"], **TINY})
    models = [build_model(config, get_backend("torch", "cuda"), 64, torch.bfloat16, "cuda") for _ in range(2)]
    gen = torch.Generator().manual_seed(9)
    ckpt = {
        n: random_tensor(torch.float32, tuple(v.shape), gen)
        for n, v in models[0].checkpoint_targets().items()
    }
    write_checkpoint(tmp_path, ckpt, num_shards=3)
    load_checkpoint(tmp_path, models[0].checkpoint_targets())
    load_checkpoint_fast(tmp_path, models[1].checkpoint_targets(), extent_bytes=ALIGN)
    ref_params = dict(models[0].named_parameters())
    for name, p in models[1].named_parameters():
        assert bits_equal(p, ref_params[name]), name


@pytest.mark.gpu
def test_cuda_runtime_of_torch_is_found() -> None:
    # Without it the ring loader silently falls back to torch's slower copy_ launches.
    assert cuda_runtime() is not None


@pytest.mark.gpu
def test_cuda_default_load_runs_native(tmp_path: Path) -> None:
    # On the GPU machine (which has a C compiler: Triton needs one) engines get the C loop.
    write_checkpoint(tmp_path, {"w": torch.ones(64, 64, dtype=torch.bfloat16)})
    target = torch.empty(64, 64, dtype=torch.bfloat16, device="cuda")
    stats = load_checkpoint_fast(tmp_path, {"w": target})
    assert stats.detail["native"] == 1
    assert bits_equal(target.cpu(), torch.ones(64, 64, dtype=torch.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("nbytes", [ALIGN, (16 << 20) + ALIGN])
def test_pinned_buffer_is_registered_aligned_and_copies(nbytes: int) -> None:
    buf = PinnedBuffer(nbytes)
    try:
        t = buf.tensor
        assert t.numel() == nbytes and t.data_ptr() % ALIGN == 0
        assert t.is_pinned(), "huge-page memory registered with CUDA (or torch's pinned fallback)"
        t.copy_(torch.randint(0, 256, (nbytes,), dtype=torch.uint8))
        dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        dev.copy_(t, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(dev.cpu(), t)
    finally:
        buf.close()
    buf.close()  # idempotent


# -- errors -----------------------------------------------------------------------------


def test_missing_tensor_and_shape_mismatch(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"a": torch.ones(3, 4), "b": torch.ones(2)})
    with pytest.raises(CheckpointError, match=r"lacks tensors the model needs: c"):
        load_checkpoint_fast(tmp_path, {"a": torch.empty(3, 4), "c": torch.empty(1)})
    with pytest.raises(
        CheckpointError, match=r"tensor a in .*model.safetensors has shape \(3, 4\), model expects \(4, 3\)"
    ):
        load_checkpoint_fast(tmp_path, {"a": torch.empty(4, 3)})
    with pytest.raises(CheckpointError, match="no \\*.safetensors files"):
        load_checkpoint_fast(tmp_path / "nowhere", {})


def test_truncated_file(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"a": torch.ones(100), "b": torch.ones(50, dtype=torch.float64)})
    path = tmp_path / "model.safetensors"
    last = max(read_header(path).tensors, key=lambda t: t.end)
    os.truncate(path, path.stat().st_size - 10)
    with pytest.raises(
        CheckpointError, match=rf"tensor {last.name} in .*model.safetensors: file is truncated"
    ):
        load_checkpoint_fast(tmp_path, {"a": torch.empty(100), "b": torch.empty(50, dtype=torch.float64)})
    os.truncate(path, 5)
    with pytest.raises(CheckpointError, match="is truncated: 5 bytes"):
        load_checkpoint_fast(tmp_path, {"a": torch.empty(100)})


@pytest.mark.parametrize("path", PATHS)
def test_file_truncated_while_loading(tmp_path: Path, path: dict[str, object]) -> None:
    write_checkpoint(tmp_path, {"a": torch.ones(5000), "b": torch.ones(5000)})
    file = tmp_path / "model.safetensors"
    targets = {"a": torch.empty(5000), "b": torch.empty(5000)}
    plan = build_load_plan([read_header(file)], targets, extent_bytes=ALIGN)
    os.truncate(file, file.stat().st_size // 2)  # after the header was checked
    with pytest.raises(CheckpointError, match="truncated while loading"):
        execute_plan(plan, num_threads=2, **path)


F32_4 = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}


@pytest.mark.parametrize(
    ("header", "data", "header_len", "message"),
    [
        (b"{not json", b"", None, "not valid JSON"),
        (b"[1, 2]", b"", None, "expected a JSON object"),
        ({"w": F32_4}, bytes(16), 10_000, "header length 10000 exceeds the file size"),
        ({"w": F32_4}, bytes(8), None, "tensor w in .*: file is truncated or its header is corrupt"),
        ({"w": {**F32_4, "data_offsets": [0, 8]}}, bytes(16), None, "tensor w .* needs 16"),
        ({"w": {**F32_4, "data_offsets": [16, 0]}}, bytes(16), None, "end before begin"),
        ({"w": {**F32_4, "dtype": "X9"}}, bytes(16), None, "tensor w .* unsupported or corrupt dtype 'X9'"),
        ({"w": {**F32_4, "shape": [2, -2]}}, bytes(16), None, "corrupt shape"),
        (
            {"w": F32_4, "v": {**F32_4, "data_offsets": [8, 24]}},
            bytes(24),
            None,
            "tensors w and v overlap",
        ),
    ],
)
def test_corrupt_header(
    tmp_path: Path, header: object, data: bytes, header_len: int | None, message: str
) -> None:
    write_raw(tmp_path / "model.safetensors", header, data, header_len)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint_fast(tmp_path, {"w": torch.empty(4)})


def test_header_parser_agrees_with_safetensors(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(6)
    tensors = {f"t{i}": random_tensor(dt, (i, 3), gen) for i, dt in enumerate(DTYPES)}
    save_file(tensors, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    header = read_header(tmp_path / "m.safetensors")
    raw = (tmp_path / "m.safetensors").read_bytes()
    assert {t.name for t in header.tensors} == set(tensors)
    for t in header.tensors:
        data = bytearray(raw[t.start : t.end])
        loaded = torch.frombuffer(data, dtype=torch.uint8).view(t.dtype).view(t.shape) if t.nbytes else None
        assert loaded is None or bits_equal(loaded, tensors[t.name])
