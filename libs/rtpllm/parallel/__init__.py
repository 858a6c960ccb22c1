"""Tensor parallelism: how a model is cut across ranks (`layout`) and the
torch.distributed groups the ranks talk over (`group`). The engine side (rank 0
driving the others, the worker processes) is in rtpllm.engine.tensor_parallel and
rtpllm.engine.tp_worker; docs/tensor_parallel.md has the design."""
