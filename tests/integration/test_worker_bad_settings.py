"""A worker started with a setting its model cannot take exits with one clear line and
status 2 (it printed a traceback): a real nats-server, the real `rtpllm serve worker`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.models.config import ModelConfig
from rtpllm.runtime.processes import rtpllm_command, start_nats


def test_a_tensor_parallel_size_the_model_cannot_split_is_one_line_and_status_2(tmp_path: Path) -> None:
    model = write_random_checkpoint(tmp_path / "m", "llama")
    heads = ModelConfig.from_dir(model).num_heads
    size = next(n for n in range(2, 64) if heads % n)
    nats, url = start_nats()
    try:
        argv = rtpllm_command("serve", "worker", "--model", str(model), "--device", "cpu", "-tp", str(size), "--nats", url)
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    finally:
        nats.stop()
    said = done.stdout + done.stderr
    assert done.returncode == 2, said
    assert "Traceback" not in said, said
    assert f"cannot serve {model}: tensor_parallel_size={size} does not divide the model's {heads} attention heads" in said
