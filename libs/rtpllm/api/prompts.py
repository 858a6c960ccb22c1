"""Turning OpenAI prompts and chats into token ids (the gateway tokenizes: routing needs
the tokens), and the context-length checks.

Given the context window (`max_model_len`, None when no worker is known yet), a text is
checked before it is tokenized: when its length alone proves it has too many tokens
(rtpllm.tokenizer.length_bound), it is refused without paying for the tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rtpllm.api.errors import bad_request
from rtpllm.api.requests import ChatMessage
from rtpllm.sampling_params import MAX_TOKEN_ID
from rtpllm.tokenizer import Tokenizer
from rtpllm.tokenizer.chat_template import ChatTemplateError


@dataclass(frozen=True)
class Prompt:
    """One prompt to generate from: its token ids, and its text when known (for echo)."""

    token_ids: list[int]
    text: str | None = None


def chat_prompt(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    max_model_len: int | None = None,
    max_tokens: int | None = None,
) -> Prompt:
    if not messages:
        raise bad_request("messages must contain at least one message.", "messages")
    conversation: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        item: dict[str, Any] = {"role": msg.role, "content": _content_text(msg.content, i)}
        if msg.name is not None:
            item["name"] = msg.name
        conversation.append(item)
    try:
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None
    # The rendered text, not the messages: a template may drop or add text.
    check_text_fits(tokenizer, text, max_tokens, max_model_len, "messages")
    try:
        # Special tokens are parsed only where the template wrote them: a client whose
        # text spells `<|im_end|>` or an image placeholder gets plain text, not a forged
        # turn or image slot.
        ids = tokenizer.encode_chat(conversation, add_generation_prompt=add_generation_prompt, rendered=text)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None
    if not ids:
        raise bad_request("The chat renders to an empty prompt.", "messages")
    return Prompt(ids, text)


def _content_text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise bad_request(
                f"messages[{index}].content: only text content parts are supported, got type {part.get('type')!r}.",
                f"messages.{index}.content",
            )
        parts.append(part["text"])
    return "".join(parts)


def completion_prompts(
    tokenizer: Tokenizer,
    prompt: str | list[str] | list[int] | list[list[int]],
    max_model_len: int | None = None,
    max_tokens: int | None = None,
) -> list[Prompt]:
    """The prompts of a /v1/completions request: a string, a batch of strings, token ids
    or a batch of token-id lists."""
    if isinstance(prompt, str):
        items: list[str | list[int]] = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        items = [prompt]  # type: ignore[list-item]
    else:
        items = list(prompt)  # type: ignore[arg-type]
    if not items:
        raise bad_request("prompt must not be empty.", "prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            check_text_fits(tokenizer, item, max_tokens, max_model_len, "prompt")
            ids = tokenizer.encode(item)
            out.append(Prompt(ids, item))
        else:
            if any(not 0 <= t < MAX_TOKEN_ID for t in item):
                raise bad_request(f"prompt token ids must be in [0, {MAX_TOKEN_ID}).", "prompt")
            ids = list(item)
            out.append(Prompt(ids, None))
        if not ids:
            raise bad_request("prompt must not be empty.", "prompt")
    return out


def check_text_fits(
    tokenizer: Tokenizer, text: str, max_tokens: int | None, max_model_len: int | None, param: str
) -> None:
    """400 before tokenizing, when the text's length alone proves the prompt cannot fit."""
    bound = tokenizer.length_bound
    if max_model_len is None or bound is None:
        return
    check_context_length(bound.min_tokens(text), max_tokens, max_model_len, param, at_least=True)


def check_context_length(
    prompt_tokens: int, max_tokens: int | None, max_model_len: int, prompt_param: str, at_least: bool = False
) -> None:
    """400 when the prompt (plus an explicit max_tokens) does not fit the context window.
    `at_least`: `prompt_tokens` is a lower bound (the prompt is not tokenized yet)."""
    has = f"at least {prompt_tokens}" if at_least else f"{prompt_tokens}"
    if prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your prompt has "
            f"{has} tokens. Please reduce the length of the prompt.",
            prompt_param,
            "context_length_exceeded",
        )
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested "
            f"{'at least ' if at_least else ''}{prompt_tokens + max_tokens} tokens ({has} in the prompt, {max_tokens} for the completion). "
            "Please reduce the length of the prompt or the completion.",
            "max_tokens",
            "context_length_exceeded",
        )
