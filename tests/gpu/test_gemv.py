"""The small-batch GEMV kernel against the exact product, and the `linear` dispatcher.

The reference is x @ W.T in float64 on upcast copies of the same inputs. The kernel sums
exact products (16-bit x 16-bit fits fp32) in fp32 in its own order and rounds once to
the output dtype, so it must lie within half an output ulp of the exact value plus the
fp32 accumulation error, bounded by a few units of 2^-24 times |x| @ |W|.T (statistically
far less; the bound below allows a K-independent 2^-14 of it).

On a GPU the shapes include the Llama-3.1-8B ones; under TRITON_INTERPRET=1 on the CPU
the same tests run on small shapes with the same code paths (FMA and tensor-core, split-K,
masked K tails, row tails, bias).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from gpu_env import ON_GPU

from rtpllm.kernels import gemv as gemv_mod
from rtpllm.kernels.gemv import (
    CONFIG_TABLE,
    DOT_CANDIDATES,
    FMA_CANDIDATES,
    GemvConfig,
    gemv_config,
    gemv_ref,
    gemv_triton,
    linear,
)

pytestmark = pytest.mark.gpu

# (N, K): multiples of the tiles, row tails (N % BLOCK_N), K tails (K % BLOCK_K, K % 16).
SHAPES = (
    [(4096, 4096), (6144, 4096), (4096, 14336), (1000, 4096), (4101, 1032), (77, 200), (33, 4112)]
    if ON_GPU
    else [(40, 64), (37, 200), (70, 336), (16, 1024), (9, 48)]
)
DTYPES = [torch.bfloat16, torch.float32, torch.float16]
# Half an ulp of the output, relative.
OUT_ROUNDING = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-23}


def _inputs(
    m: int, n: int, k: int, dtype: torch.dtype, device: str, bias: bool, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    # nn.Linear-like scale, so bf16 outputs are O(1).
    w = (torch.randn(n, k, generator=gen) * k**-0.5).to(dtype).to(device)
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return x, w, b


def _assert_exact_within_rounding(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None
) -> None:
    assert y.shape == (x.shape[0], w.shape[0]) and y.dtype == x.dtype
    assert not torch.isnan(y).any()
    exact = x.double() @ w.double().T
    if b is not None:
        exact = exact + b.double()
    scale = x.double().abs() @ w.double().abs().T + (b.double().abs() if b is not None else 0)
    bound = OUT_ROUNDING[y.dtype] * exact.abs() + 2**-14 * scale + 1e-30
    err = (y.double() - exact).abs()
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error {worst:.3g}x the bound"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8] if ON_GPU else [1, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_default_config(kernel_device: str, dtype: torch.dtype, m: int, bias: bool) -> None:
    """The per-shape config `gemv_triton` picks itself, over every shape."""
    for i, (n, k) in enumerate(SHAPES):
        x, w, b = _inputs(m, n, k, dtype, kernel_device, bias, seed=100 * m + i)
        _assert_exact_within_rounding(gemv_triton(x, w, b), x, w, b)


@pytest.mark.parametrize("m", [1, 4, 8])
@pytest.mark.parametrize(
    "cfg",
    FMA_CANDIDATES + DOT_CANDIDATES + sorted(set(CONFIG_TABLE.values()), key=str),
    ids=str,
)
def test_gemv_every_config(kernel_device: str, cfg: GemvConfig, m: int) -> None:
    """Every candidate and table config gives the exact product (FMA configs take M=1),
    and a second launch gives bitwise the same result (split-K reduces in split order).
    PDL configs launch without it where the device lacks it (and in the interpreter)."""
    if not cfg.dot and m != 1:
        pytest.skip("the FMA path takes one row")
    shapes = [(4096, 4096), (4101, 1032)] if ON_GPU else [(37, 200), (20, 1056)]
    for i, (n, k) in enumerate(shapes):
        x, w, b = _inputs(m, n, k, torch.bfloat16, kernel_device, bias=i == 1, seed=i)
        y = gemv_triton(x, w, b, config=cfg)
        _assert_exact_within_rounding(y, x, w, b)
        assert torch.equal(y, gemv_triton(x, w, b, config=cfg))


def test_gemv_strided_rows(kernel_device: str) -> None:
    """x may be a row-strided view (last dim contiguous)."""
    x, w, _ = _inputs(3, 24, 64, torch.float32, kernel_device, bias=False, seed=7)
    wide = torch.zeros(3, 96, device=kernel_device)
    wide[:, 16:80] = x
    view = wide[:, 16:80]
    assert view.stride(0) == 96
    _assert_exact_within_rounding(gemv_triton(view, w, config=GemvConfig(16, 32, dot=True)), x, w, None)
    _assert_exact_within_rounding(gemv_triton(view[:1], w, config=GemvConfig(4, 32)), x[:1], w, None)


def test_split_k_counters_return_to_zero(kernel_device: str) -> None:
    x, w, _ = _inputs(2, 50, 256, torch.float32, kernel_device, bias=False, seed=3)
    gemv_triton(x, w, config=GemvConfig(16, 32, split_k=4, dot=True))
    gemv_triton(x[:1], w, config=GemvConfig(4, 32, split_k=8))
    counters = gemv_mod._COUNTERS[x.device]
    assert int(counters.abs().sum()) == 0


def test_config_choice() -> None:
    """Table entries for the 8B shapes; otherwise the rule, with enough programs."""
    assert gemv_config(1, 4096, 4096) == CONFIG_TABLE[("m1", 4096, 4096)]
    assert gemv_config(8, 4096, 14336) == CONFIG_TABLE[("m>1", 4096, 14336)]
    for m, n, k in [(1, 2048, 2048), (1, 1024, 8192), (4, 2048, 2048), (1, 100000, 2048), (2, 64, 8192)]:
        cfg = gemv_config(m, n, k)
        assert cfg.dot == (m > 1)
        programs = -(-n // cfg.block_n) * cfg.split_k
        assert programs >= 132 or cfg.split_k == 8 or -(-k // cfg.block_k) < 8 * cfg.split_k, cfg
    assert gemv_config(1, 1024, 8192).split_k == 1  # 1024 one-row programs fill the SMs
    assert gemv_config(1, 64, 65536).split_k > 1


# ----------------------------------------------------------------------------- dispatch


@pytest.mark.parametrize("m", [1, 8, 9, 40])
def test_linear_on_cpu_is_f_linear(m: int) -> None:
    """The CPU path is unchanged: bitwise F.linear, for any batch."""
    gen = torch.Generator().manual_seed(m)
    x, w, b = (
        torch.randn(m, 64, generator=gen),
        torch.randn(48, 64, generator=gen),
        torch.randn(48, generator=gen),
    )
    assert torch.equal(linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(linear(x.view(1, m, 64), w), F.linear(x.view(1, m, 64), w))
    assert torch.equal(gemv_ref(x, w, b), F.linear(x, w, b))


def test_linear_dispatch_on_cuda(cuda_device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Token counts and weight widths of `gemv_wins` -> the kernel; more tokens, wider
    weights, K % 16 != 0 or RTPLLM_GEMV=0 -> F.linear (bitwise)."""
    monkeypatch.setattr(gemv_mod, "GEMV_ENABLED", True)
    monkeypatch.setattr(gemv_mod, "GEMV_MAX_M", 8)
    monkeypatch.setattr(gemv_mod, "GEMV_MAX_N", 8192)
    monkeypatch.setattr(gemv_mod, "GEMV_MAX_N_ONE_TOKEN", None)
    x, w, b = _inputs(16, 4096, 4096, torch.bfloat16, cuda_device, bias=True, seed=0)
    for m in (1, 2, 8):
        assert torch.equal(linear(x[:m], w, b), gemv_triton(x[:m], w, b))
    for m in (9, 16):
        assert torch.equal(linear(x[:m], w, b), F.linear(x[:m], w, b))
    wide = torch.randn(10000, 4096, device=cuda_device, dtype=torch.bfloat16)
    assert torch.equal(linear(x[:1], wide), gemv_triton(x[:1], wide))
    assert torch.equal(linear(x[:2], wide), F.linear(x[:2], wide))
    odd = w[:, :4088]
    assert torch.equal(linear(x[:1, :4088], odd), F.linear(x[:1, :4088], odd))
    # A leading batch dim is flattened.
    assert torch.equal(linear(x[:4].view(2, 2, 4096), w), gemv_triton(x[:4], w).view(2, 2, 4096))
    monkeypatch.setattr(gemv_mod, "GEMV_MAX_N_ONE_TOKEN", 8192)
    assert torch.equal(linear(x[:1], wide), F.linear(x[:1], wide))
    monkeypatch.setattr(gemv_mod, "GEMV_ENABLED", False)
    assert torch.equal(linear(x[:1], w), F.linear(x[:1], w))


def test_gemv_cuda_graph_replay(cuda_device: str) -> None:
    """Captured once per batch size (split-K and not, with and without PDL), the launch
    replays correctly for new x written into the same buffer."""
    n, k = 4096, 14336
    w = (torch.randn(n, k, device=cuda_device) * k**-0.5).to(torch.bfloat16)
    x = torch.empty(8, k, device=cuda_device, dtype=torch.bfloat16)
    pdl = torch.cuda.get_device_capability()[0] >= 9
    configs = [
        GemvConfig(4, 512, split_k=4, pdl=pdl),
        GemvConfig(8, 512),
        GemvConfig(32, 256, split_k=4, num_stages=4, dot=True, pdl=pdl),
    ]
    for cfg in configs:
        for m in (1, 8) if cfg.dot else (1,):
            x.normal_()
            gemv_triton(x[:m], w, config=cfg)  # compile and allocate outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = gemv_triton(x[:m], w, config=cfg)
            for _ in range(3):
                x.normal_()
                y.fill_(float("nan"))
                graph.replay()
                torch.cuda.synchronize()
                _assert_exact_within_rounding(y, x[:m], w, None)
