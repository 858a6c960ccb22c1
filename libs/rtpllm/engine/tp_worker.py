"""A worker rank (1..N-1) of a tensor-parallel engine: `python -m rtpllm.engine.tp_worker`.

Started by rank 0 (rtpllm.parallel.launch) with the torchrun variables in its
environment (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE) and a start-up payload on
stdin (the engine config, the resolved model directory, torch's thread count). It
builds and loads its shard of the model, sizes its KV pool with rank 0, then runs
every batch rank 0 sends until told to stop; meanwhile a thread of its own reads and
writes the pool's blocks for rank 0's PD data plane (engine/tp_kv.py). No scheduler,
sampler or tokenizer here.

It exits when rank 0 says stop, when rank 0 is gone (stdin reaches end of file, or the
parent process changes), or on any error (a peer's death ends its waits at once), and
never lingers: an error exits at once, without interpreter teardown that could wait on
a broken group.
"""

from __future__ import annotations

import logging
import os
import pickle
import select
import struct
import sys
import threading

import torch
import torch.distributed as dist

from rtpllm.attention import get_backend
from rtpllm.config import EngineConfig, parse_dtype
from rtpllm.engine.cuda_graphs import plain_graph_rows, verify_graph_rows, verify_span
from rtpllm.engine.model_runner import ModelRunner
from rtpllm.engine.piecewise_graphs import mixed_graph_tokens
from rtpllm.engine.tensor_parallel import WorkerPayload
from rtpllm.engine.tp_kv import KVShardServer
from rtpllm.engine.tp_step import StepChannel
from rtpllm.kvcache.kv_plan import cache_spec, load_plan
from rtpllm.kvcache.kv_pool import KVPool, bytes_per_block
from rtpllm.loader import load_checkpoint_fast
from rtpllm.models import ModelConfig, build_model, fill_random
from rtpllm.models.k_centering import apply_key_transforms
from rtpllm.parallel.group import TPGroup, init_tp_group
from rtpllm.parallel.launch import JOINED_KEY, STORE_TIMEOUT, rank_device

log = logging.getLogger("rtpllm.tp_worker")


class ShardWorker:
    """One rank's model shard, KV pool and runner, driven by rank 0's steps."""

    def __init__(self, payload: WorkerPayload, group: TPGroup, device: str) -> None:
        config = payload.config
        self.group = group
        self.channel = StepChannel(group)
        model_config = ModelConfig.from_dir(payload.model_dir)
        dtype = parse_dtype(config.dtype, config.device)
        max_len = config.max_model_len or model_config.max_position_embeddings
        backend = get_backend(config.attention_backend, device)
        # As LLMEngine._load_model, for this rank's shard.
        model = build_model(model_config, backend, max_len, dtype, device, group)
        if config.load_format == "dummy":
            fill_random(model, config.seed + group.rank)
        else:
            load_checkpoint_fast(
                payload.model_dir,
                model.checkpoint_targets(),
                optional=model.optional_checkpoint_names(),
                ignore=model.ignores_checkpoint_tensor,
            )
        plan = load_plan(config.cache)
        spec = cache_spec(config.cache, model_config.num_layers, dtype, plan)  # as rank 0's
        if plan is not None:
            apply_key_transforms(model, plan)  # as rank 0, for this rank's heads
        per_block = bytes_per_block(model_config, config.cache.block_size, dtype, group.size, spec)
        group.min_control(_num_blocks(config, model_config, per_block, device))
        num_blocks, max_len = self.channel.recv_shape()
        pool = KVPool(model_config, num_blocks, config.cache.block_size, dtype, device, group.size, spec)
        self.runner = ModelRunner(model, pool, None, backend, device)
        self.runner.native_logits = True  # as rank 0's (its logits are dropped here)
        # Rank 0's KV reads and writes (built on the thread that runs the steps: on CUDA
        # its copies follow this thread's stream).
        self.kv_server = KVShardServer(group, pool.kv)
        if config.cuda_graphs:
            # Captured with rank 0, collectives included: same sizes, same order.
            self.runner.enable_cuda_graphs(
                plain_graph_rows(config), max_len, verify_graph_rows(config), verify_span(config), mixed_graph_tokens(config)
            )
        # After the capture: no other thread may use the device while a graph is captured.
        self.kv_server.start()

    def serve(self) -> bool:
        """Run rank 0's steps until it says stop; False if the KV server thread did not
        end (rank 0 stops it first), so leaving the groups could wait on it."""
        while (step := self.channel.recv()) is not None:
            self.runner.run_batch(step.batch, step.fill, step.spans, step.observe, step.use_graph)
        return self.kv_server.join(timeout_s=5.0)


def _num_blocks(config: EngineConfig, model_config: ModelConfig, per_block: int, device: str) -> int:
    """This rank's KV pool budget in blocks, as LLMEngine._num_blocks computes rank 0's
    (the smallest over the ranks is used)."""
    cache = config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    if not device.startswith("cuda"):
        return max(1, cache.cpu_kv_bytes // per_block)
    # Imported here: the engine module (tokenizer, sampler, grammars) is not otherwise
    # needed on a worker rank.
    from rtpllm.engine.llm_engine import _activation_reserve

    free, total = torch.cuda.mem_get_info(torch.device(device))
    budget = (
        int(total * cache.gpu_memory_utilization) - (total - free) - _activation_reserve(config, model_config)
    )
    if budget < per_block:
        raise RuntimeError(f"no GPU memory left on {device} for the KV cache; raise gpu_memory_utilization")
    return budget // per_block - 1  # the pool adds one scratch block


def _read_exact(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise EOFError("rank 0 closed the pipe before the start-up payload was complete")
        out += chunk
    return bytes(out)


def _watch_parent(fd: int, parent: int) -> None:
    """Exit at once when rank 0 is gone: end of file on the pipe (rank 0 exited, however
    it died, or stopped this worker) or a new parent process (re-parented)."""

    def run() -> None:
        while True:
            readable, _, _ = select.select([fd], [], [], 0.5)
            if readable and not os.read(fd, 4096):
                break
            if os.getppid() != parent:
                break
        os._exit(0)

    threading.Thread(target=run, name="rtpllm-tp-parent", daemon=True).start()


def main() -> None:
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    fd = sys.stdin.fileno()
    (length,) = struct.unpack("<Q", _read_exact(fd, 8))
    payload: WorkerPayload = pickle.loads(_read_exact(fd, length))
    logging.basicConfig(
        level=payload.log_level, format=f"%(asctime)s tp-rank-{rank} %(levelname)s %(name)s: %(message)s"
    )
    _watch_parent(fd, os.getppid())
    torch.set_num_threads(payload.num_threads)
    device = rank_device(payload.config.device, rank)
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            size,
            is_master=False,
            timeout=STORE_TIMEOUT,
        )
        store.set(JOINED_KEY.format(rank=rank), "1")
        group = init_tp_group(rank, size, store, device)
        if ShardWorker(payload, group, device).serve():
            group.destroy()
    except BaseException:
        log.exception("tensor-parallel rank %d failed", rank)
        sys.stderr.flush()
        os._exit(1)
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
