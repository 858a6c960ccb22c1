"""vLLM's `/tokenize` and `/detokenize`, with its request and response shapes.

`/tokenize` takes a `prompt` (tokenized as /v1/completions would, BOS included unless
`add_special_tokens: false`) or `messages` (rendered and tokenized as
/v1/chat/completions would, with the same chat options), and answers `tokens`, `count`
and `max_model_len` (the smallest context window among the live instances; null while
none is live), plus `token_strs` when asked. `/detokenize` turns `tokens` back into
`prompt`, special tokens included, so a round trip gives the text back.
"""

from __future__ import annotations

from typing import Any

import msgspec

from rtpllm.api.errors import bad_request
from rtpllm.api.prompts import template_kwargs
from rtpllm.api.requests import ChatMessage, _Strict
from rtpllm.tokenizer import Tokenizer


class TokenizeCompletionRequest(_Strict):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_Strict):
    model: str | None = None
    messages: list[ChatMessage]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    documents: list[dict[str, Any]] | None = None
    return_token_strs: bool = False
    # Accepted at their defaults only, as by /v1/chat/completions.
    chat_template: str | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # rendered as chat renders them


class DetokenizeRequest(_Strict):
    model: str | None = None
    tokens: list[int]


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | msgspec.UnsetType = msgspec.UNSET


class DetokenizeResponse(msgspec.Struct):
    prompt: str


def check_tokenize_chat(req: TokenizeChatRequest) -> dict[str, Any]:
    """400 for what /v1/chat/completions refuses too; the template's extra variables."""
    if req.chat_template is not None:
        raise bad_request(
            "A chat template in the request is not accepted; the model's own template is used.",
            "chat_template",
        )
    if req.mm_processor_kwargs:
        raise bad_request("mm_processor_kwargs is not supported.", "mm_processor_kwargs")
    if req.add_special_tokens:
        raise bad_request(
            "add_special_tokens: true is not supported for chat: the chat template writes the model's special tokens.",
            "add_special_tokens",
        )
    if (
        req.continue_final_message
        and "add_generation_prompt" in req.model_fields_set
        and req.add_generation_prompt
    ):
        raise bad_request(
            "Cannot set both continue_final_message and add_generation_prompt to true.",
            "continue_final_message",
        )
    return template_kwargs(req.chat_template_kwargs, req.documents)


def tokenize_response(
    tokenizer: Tokenizer, tokens: list[int], max_model_len: int | None, token_strs: bool
) -> TokenizeResponse:
    strs: list[str] | msgspec.UnsetType = msgspec.UNSET
    if token_strs:
        strs = [tokenizer.id_to_token(t) or "" for t in tokens]
    return TokenizeResponse(count=len(tokens), max_model_len=max_model_len, tokens=tokens, token_strs=strs)


def detokenize(tokenizer: Tokenizer, req: DetokenizeRequest) -> DetokenizeResponse:
    bad = next((t for t in req.tokens if not 0 <= t < tokenizer.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size}).", "tokens")
    return DetokenizeResponse(prompt=tokenizer.decode(req.tokens, skip_special_tokens=False))
