"""Small-batch linear layers (decode GEMV): y = x @ W.T for x [M <= 16, K], W [N, K].

At decode batch sizes a linear layer is a stream over its weight: batch-1 Llama-3.1-8B
reads 16 GB of weights per token and does 2 flops per weight byte. cuBLAS streams the big
matrices (gate_up, lm_head) at 93-94% of copy bandwidth on the H100 but the 4096-row ones
(qkv, o_proj, down) at 72-89%; this kernel streams all five faster (measurements at
CONFIG_TABLE; batch-1 8B decode 162.5 -> 181.1 tok/s on an H100, docs/benchmarks.md).

Design:
- Grid (row tiles, K splits). A program owns BLOCK_N output rows and one contiguous
  slice of K, and streams its [BLOCK_N, K/SPLIT_K] block of W once in [BLOCK_N, BLOCK_K]
  tiles: 16-byte loads along K, marked evict-first (W is read once; keep L2 for the
  activations). Rows past N are clamped to row N-1 for the loads (only the stores are
  masked), so the weight loads carry no mask when K is a multiple of the split.
- M == 1 ("FMA" path): the product tile is accumulated elementwise in fp32 and reduced
  across K once at the end: no shuffles inside the loop. x is loaded in the weight tile's
  layout (a broadcast, L1 hits), so nothing goes through shared memory in the loop. One
  row x 2048 columns per program (8 warps, one 16-byte load per thread per tile) was the
  fastest on the H100: a 4096-row matrix gets 4096 small programs, ~15 resident per SM,
  which keeps enough loads in flight and leaves almost no tail.
- M >= 2 (tensor-core path): y^T = W x^T with one `tl.dot` per tile, x^T padded to
  BLOCK_M (8 or 16) columns; the weight tile is the dot's A operand (row-major as stored)
  and num_stages pipelines its loads.
- Split-K (SPLIT_K > 1) is reduced in the same launch and deterministically: each
  program stores its fp32 partial tile to a scratch buffer, then bumps a per-row-tile
  counter (an acq_rel atomic); the program that arrives last sums the SPLIT_K partials
  in split order (so the result does not depend on arrival order), adds the bias, writes
  y and resets the counter to 0. No second launch, no zero-fill, no float atomics. The
  counters live in one per-device int32 buffer allocated on first use (warm up before
  capturing a CUDA graph) and are back to 0 after every launch; launches that run
  concurrently on different streams must not share it (the engine runs one stream).
- CUDA-graph safe: no host sync; the output and the split-K scratch are `torch.empty`
  of sizes fixed by the shapes. M is a runtime argument: the compiled variants are
  BLOCK_M in {1, 8, 16} per (dtype, K, config).
- Programmatic dependent launch (`GemvConfig.pdl`, on by default; sm_90+ only): the
  kernel starts with `griddepcontrol.wait`, so its launch overlaps the end of the
  previous kernel; nothing is read or written before the wait, so it is always safe. It
  also works inside captured CUDA graphs.

`gemv_triton(x, w, bias, config=...)` is the launcher (config overrides the per-shape
choice of `gemv_config`), `gemv_ref` the torch computation (`F.linear`) and `linear` the
dispatcher the model's linears call: the kernel on CUDA for <= GEMV_MAX_M tokens and the
weight widths where it beat cuBLAS (`gemv_wins`, measured with `bench/ops.py --gemv-only`),
`F.linear` otherwise and always on the CPU. RTPLLM_GEMV=0 in the environment routes
everything to `F.linear`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rtpllm.kernels._triton import (
    HAS_TRITON,
    cdiv,
    device_sms,
    dot_precision,
    next_power_of_2,
    tl,
    triton,
    use_triton,
)

if HAS_TRITON:
    from triton.language.extra.cuda import gdc_wait
else:  # pragma: no cover - CPU-only installs never launch the kernel
    gdc_wait = None

# Dispatch (`linear`). RTPLLM_GEMV=0 turns the kernel off (read once, at import).
GEMV_ENABLED = os.environ.get("RTPLLM_GEMV", "1") != "0"
# Largest token count sent to the kernel (the decode CUDA-graph buckets 1, 2, 4, 8).
GEMV_MAX_M = 8
# Widest weight (output rows) sent to the kernel, at one token and at 2..GEMV_MAX_M tokens
# (None: no limit). `bench/ops.py --gemv-only` on an H100: the kernel beat cuBLAS on every
# Llama-8B weight at 1, 4 and 8 tokens (1.03-1.28x, lm_head's 128256 rows included).
GEMV_MAX_N_ONE_TOKEN: int | None = None
GEMV_MAX_N: int | None = None

# Split-K counters per device (see the module docstring); grown, never shrunk.
_COUNTERS: dict[torch.device, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters. `dot` selects the tensor-core path (required for M > 1; for
    M == 1 it pads x to 8 columns); `split_k` is an upper bound (fewer splits when K has
    fewer BLOCK_K tiles); `num_stages` pipelines the dot path's loads (the FMA path's
    loads are not pipelined by Triton 3.6: its bytes in flight come from the tile size and
    the programs per SM); `pdl` launches with programmatic dependent launch where the
    device has it (sm_90+; ignored elsewhere and in the interpreter)."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    dot: bool = False
    pdl: bool = False

    def __str__(self) -> str:
        path = "dot" if self.dot else "fma"
        pdl = " pdl" if self.pdl else ""
        return f"{path} n{self.block_n} k{self.block_k} s{self.split_k} w{self.num_warps} st{self.num_stages}{pdl}"


# Per-shape choices, keyed by ("m1", N, K) for one token and ("m>1", N, K) for 2..16 tokens
# (which need a `dot` config); other shapes get `_rule`. Values: the fastest configs of
# `bench/ops.py --gemv-only` on an H100 SXM (2 sweeps), us per call in a CUDA graph with W
# from DRAM, cuBLAS in brackets:
#   M=1 (1 row x 2048 per program, 8 warps, within 0.6% of the best config everywhere):
#     qkv 17.3 (20.2), o_proj 12.0 (15.3), gate_up 74.8 (83.9), down 39.4 (43.5),
#     lm_head 328.3 (375.1)
#   M=4/8: qkv 19.5 (21.0), o_proj 13.4 (15.4), gate_up 79.9 (85.7 / 82.3),
#     down 41.2 (43.7), lm_head 341.7 / 344.6 (375.9 / 378.1)
# PDL saved 0.1-0.6 us per call on every shape. Split-K was slower on every shape (~2.5 us
# on the 4096-row ones): row tiles alone give these weights enough programs.
_M1 = GemvConfig(1, 2048, num_warps=8, pdl=True)
CONFIG_TABLE: dict[tuple[str, int, int], GemvConfig] = {
    ("m1", 6144, 4096): _M1,
    ("m1", 4096, 4096): _M1,
    ("m1", 28672, 4096): _M1,
    ("m1", 4096, 14336): _M1,
    ("m1", 128256, 4096): _M1,
    ("m>1", 6144, 4096): GemvConfig(16, 256, num_warps=2, num_stages=4, dot=True, pdl=True),
    ("m>1", 4096, 4096): GemvConfig(32, 512, num_stages=3, dot=True, pdl=True),
    ("m>1", 28672, 4096): GemvConfig(32, 256, num_stages=3, dot=True, pdl=True),
    ("m>1", 4096, 14336): GemvConfig(32, 512, num_stages=3, dot=True, pdl=True),
    ("m>1", 128256, 4096): GemvConfig(32, 512, num_stages=3, dot=True, pdl=True),
}

# What `bench/ops.py --gemv-only` sweeps besides the chosen config, per path (one split-K
# config each, to keep measuring what it costs).
FMA_CANDIDATES: list[GemvConfig] = [
    GemvConfig(1, 1024),
    GemvConfig(1, 1024, pdl=True),
    GemvConfig(1, 2048, num_warps=4, pdl=True),
    GemvConfig(1, 2048, num_warps=8),
    GemvConfig(1, 2048, num_warps=8, pdl=True),
    GemvConfig(1, 4096, num_warps=16, pdl=True),
    GemvConfig(2, 1024, num_warps=8, pdl=True),
    GemvConfig(2, 2048, num_warps=8, pdl=True),
    GemvConfig(4, 512, pdl=True),
    GemvConfig(4, 1024, pdl=True),
    GemvConfig(4, 512, split_k=2, pdl=True),
    GemvConfig(16, 256, num_stages=4, dot=True, pdl=True),
]
DOT_CANDIDATES: list[GemvConfig] = [
    GemvConfig(16, 256, num_stages=4, num_warps=2, dot=True, pdl=True),
    GemvConfig(16, 512, num_stages=3, dot=True, pdl=True),
    GemvConfig(32, 128, num_stages=6, dot=True, pdl=True),
    GemvConfig(32, 256, num_stages=3, dot=True, pdl=True),
    GemvConfig(32, 256, num_stages=4, dot=True),
    GemvConfig(32, 256, num_stages=4, dot=True, pdl=True),
    GemvConfig(32, 512, num_stages=3, dot=True, pdl=True),
    GemvConfig(32, 512, num_stages=2, dot=True, pdl=True),
    GemvConfig(64, 128, num_stages=4, dot=True, pdl=True),
    GemvConfig(32, 256, split_k=2, num_stages=4, dot=True, pdl=True),
]


def _rule(n: int, k: int, dot: bool, sms: int) -> GemvConfig:
    """Fallback for shapes without a table entry, after what the table's measurements
    showed: FMA programs of one row x up to 2048 columns (8 warps at 2048), dot programs of
    32 rows x up to 512, three stages; PDL. Split-K only where the row tiles alone leave SMs
    idle, each split keeping >= 8 K tiles."""
    if not dot:
        block_n, block_k = 1, min(2048, max(16, next_power_of_2(k)))
        warps = min(max(block_k // 256, 1), 8)
    else:
        block_n, block_k, warps = 32, min(512, max(16, next_power_of_2(k))), 4
    k_tiles = cdiv(k, block_k)
    split = 1
    while split < 8 and cdiv(n, block_n) * split < sms and k_tiles >= 8 * split:
        split *= 2
    stages = 3 if dot else 1
    return GemvConfig(block_n, block_k, split, num_warps=warps, num_stages=stages, dot=dot, pdl=True)


def gemv_config(m: int, n: int, k: int, sms: int = 132) -> GemvConfig:
    """The launch config for an [m, k] x [n, k]^T product: table entry, else `_rule`."""
    cfg = CONFIG_TABLE.get(("m1" if m == 1 else "m>1", n, k))
    return cfg if cfg is not None else _rule(n, k, m > 1, sms)


@triton.jit(do_not_specialize=["M"])
def _gemv_kernel(
    X,
    W,
    Bias,
    Y,
    Part,
    Counters,
    M,
    N,
    stride_xm,
    stride_wn,
    stride_ym,
    K: tl.constexpr,
    K_SPLIT: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:
        # Everything below may depend on the previous kernel (x, and the memory y and the
        # scratch reuse); the launch itself overlaps its tail.
        gdc_wait()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    # Clamped rows: the weight loads need no row mask (only the stores do).
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    k_begin = pid_k * K_SPLIT
    w_ptrs = W + rows[:, None] * stride_wn + (k_begin + offs_k)[None, :]
    # Splits cover K exactly when K is a multiple of K_SPLIT (a multiple of BLOCK_K): the
    # loads are then unmasked and vectorised; otherwise the K tail is masked.
    MASK_K: tl.constexpr = K % K_SPLIT != 0
    if not USE_DOT:
        # x as a [BLOCK_N, BLOCK_K] broadcast (L1 hits): it then gets the weight tile's
        # layout, where a 1-D x would be re-laid out through shared memory every tile.
        x_ptrs = X + tl.broadcast_to((k_begin + offs_k)[None, :], (BLOCK_N, BLOCK_K))
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for i in range(0, K_SPLIT, BLOCK_K):
            if MASK_K:
                k_ok = k_begin + i + offs_k < K
                w = tl.load(w_ptrs + i, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs + i, mask=k_ok[None, :], other=0.0)
            else:
                w = tl.load(w_ptrs + i, eviction_policy="evict_first")
                x = tl.load(x_ptrs + i)
            acc += w.to(tl.float32) * x.to(tl.float32)
        out = tl.sum(acc, axis=1)[None, :]  # [1, BLOCK_N]
    else:
        m_ok = offs_m < M
        x_ptrs = X + offs_m[:, None] * stride_xm + (k_begin + offs_k)[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for i in range(0, K_SPLIT, BLOCK_K):
            if MASK_K:
                k_ok = k_begin + i + offs_k < K
                w = tl.load(w_ptrs + i, mask=k_ok[None, :], other=0.0, eviction_policy="evict_first")
                x = tl.load(x_ptrs + i, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            else:
                w = tl.load(w_ptrs + i, eviction_policy="evict_first")
                x = tl.load(x_ptrs + i, mask=m_ok[:, None], other=0.0)
            acc = tl.dot(w, tl.trans(x), acc, input_precision=PRECISION)
        out = tl.trans(acc)  # [BLOCK_M, BLOCK_N]

    n_ok = offs_n < N
    y_mask = (offs_m < M)[:, None] & n_ok[None, :]
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, out.to(Y.dtype.element_ty), mask=y_mask)
    else:
        # Part is [row tiles, SPLIT_K, BLOCK_M, BLOCK_N] fp32.
        tile = offs_m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        part = Part + pid_n.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N) + tile
        tl.store(part + pid_k * (BLOCK_M * BLOCK_N), out, mask=y_mask)
        # All threads' partial stores precede the release of the counter increment.
        tl.debug_barrier()
        arrived = tl.atomic_add(Counters + pid_n, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            # Last of the tile's splits: sum the partials in split order (deterministic),
            # reading through L2 (.cg) since L1 is not coherent with the other programs.
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(part + s * (BLOCK_M * BLOCK_N), mask=y_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=y_mask)
            tl.atomic_xchg(Counters + pid_n, 0)


def _counters(device: torch.device, size: int) -> torch.Tensor:
    """The device's split-K counters, at least `size` of them, all 0 between launches."""
    buf = _COUNTERS.get(device)
    if buf is None or buf.numel() < size:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            # Inside a capture the zero-fill would only run at replay: a graph captured
            # later could see garbage. The engine's warm-up launch allocates them first.
            raise RuntimeError(
                "gemv split-K counters must be allocated before CUDA-graph capture: warm up first"
            )
        if buf is not None:
            _RETIRED.append(buf)  # graphs captured earlier still point at it
        buf = torch.zeros(max(size, 1 << 16), dtype=torch.int32, device=device)
        _COUNTERS[device] = buf
    return buf


def _has_pdl(x: torch.Tensor) -> bool:
    """Programmatic dependent launch (griddepcontrol) needs sm_90+; not in the interpreter."""
    return x.is_cuda and _capability(x.device.index if x.device.index is not None else -1)[0] >= 9


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(None if index < 0 else index)


def gemv_triton(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """Triton version of `gemv_ref` for x [M, K] (M <= 16, last dim contiguous), weight
    [N, K] (row-major, x's dtype), bias [N] or None -> [M, N] in x's dtype. `config`
    overrides `gemv_config`."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.dtype == x.dtype, (x.shape, x.dtype, weight.shape, weight.dtype)
    assert x.stride(-1) == 1 and weight.stride(-1) == 1 and 1 <= m <= 16, (x.shape, x.stride())
    cfg = config if config is not None else gemv_config(m, n, k, device_sms(x))
    pdl = cfg.pdl and _has_pdl(x)
    assert cfg.dot or m == 1, f"the FMA path takes one row, got M={m}"
    block_m = 1 if not cfg.dot else (8 if m <= 8 else 16)
    k_split = cdiv(cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k
    split_k = cdiv(k, k_split)
    tiles = cdiv(n, cfg.block_n)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if split_k > 1:
        part = torch.empty(tiles * split_k * block_m * cfg.block_n, dtype=torch.float32, device=x.device)
        counters = _counters(x.device, tiles)
    else:
        part = counters = y  # unused
    extra = {"launch_pdl": True} if pdl else {}
    _gemv_kernel[(tiles, split_k)](
        x,
        weight,
        bias if bias is not None else weight,
        y,
        part,
        counters,
        m,
        n,
        x.stride(0),
        weight.stride(0),
        y.stride(0),
        K=k,
        K_SPLIT=k_split,
        SPLIT_K=split_k,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        USE_DOT=cfg.dot,
        HAS_BIAS=bias is not None,
        PRECISION=dot_precision(x.dtype),
        PDL=pdl,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **extra,
    )
    return y


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias): `F.linear`, what the CPU path and large batches run."""
    return F.linear(x, weight, bias)


def gemv_wins(m: int, n: int) -> bool:
    """Whether `linear` sends m tokens through a weight of n output rows to the kernel."""
    if not 1 <= m <= GEMV_MAX_M:
        return False
    limit = GEMV_MAX_N_ONE_TOKEN if m == 1 else GEMV_MAX_N
    return limit is None or n <= limit


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Dispatcher for the model's linear layers: `gemv_triton` on CUDA for the token counts
    and weight widths of `gemv_wins` when K % 16 == 0; `F.linear` otherwise (always on the
    CPU, so that path is unchanged)."""
    if GEMV_ENABLED and use_triton(x):
        n, k = weight.shape
        x2 = x.reshape(-1, k)
        if (
            gemv_wins(x2.shape[0], n)
            and k % 16 == 0
            and x.dtype == weight.dtype
            and x2.stride(-1) == 1
            and weight.stride(-1) == 1
        ):
            return gemv_triton(x2, weight, bias).view(*x.shape[:-1], n)
    return F.linear(x, weight, bias)
