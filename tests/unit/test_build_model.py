"""build_model: what it allocates, and that it stays cheap to call at engine start."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from rtpllm.attention import get_backend
from rtpllm.models import ModelConfig, build_model


def _config() -> ModelConfig:
    return ModelConfig.from_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 256,
            "max_position_embeddings": 128,
        }
    )


def test_parameters_allocated_in_dtype_on_device_without_grad() -> None:
    model = build_model(_config(), get_backend("torch", "cpu"), 64, torch.bfloat16, "cpu")
    params = dict(model.named_parameters())
    assert params and all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in params.values())
    assert not any(p.requires_grad for p in params.values())
    # Every checkpoint tensor lands in a parameter (views of fused ones: qkv, gate_up).
    storages = {p.untyped_storage().data_ptr() for p in params.values()}
    assert all(t.untyped_storage().data_ptr() in storages for t in model.checkpoint_targets().values())
    # Distinct storage per parameter: a load into one must not land in another.
    ptrs = [p.data_ptr() for p in params.values()]
    assert len(set(ptrs)) == len(ptrs)
    assert model.rotary.cos.shape == (64, 16) and model.rotary.cos.device.type == "cpu"


def test_build_model_imports_no_compiler_stack() -> None:
    # Initializers and Module.to_empty on meta tensors import torch._dynamo and sympy:
    # 1 s of an engine start on CPU, 5-7 s on the GPU machine. In a fresh interpreter:
    script = textwrap.dedent(
        """
        import sys, torch
        from rtpllm.attention import get_backend
        from rtpllm.models import ModelConfig, build_model
        from tests.unit.test_build_model import _config
        build_model(_config(), get_backend("torch", "cpu"), 64, torch.float32, "cpu")
        print(sorted(m for m in ("torch._dynamo", "sympy") if m in sys.modules))
        """
    )
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=root, timeout=120, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr
