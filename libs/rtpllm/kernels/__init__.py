"""Triton kernels for the CUDA path, each beside its torch reference.

Every module exposes `<op>_triton` (the kernel launcher), `<op>_ref` (plain torch, the
exact computation the CPU path runs; same signature) and `<op>` (the dispatcher: Triton
on CUDA tensors, the reference elsewhere). See docs/kernels.md for the designs, their
byte/flop floors and the launch parameters a CUDA graph must fix.
"""
