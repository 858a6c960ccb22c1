"""Tokenization, chat templates and streaming-safe detokenization."""

from rtpllm.tokenizer.detokenizer import IncrementalDetokenizer
from rtpllm.tokenizer.tokenizer import Tokenizer

__all__ = ["IncrementalDetokenizer", "Tokenizer"]
