"""Turning OpenAI prompts and chats into token ids (the gateway tokenizes: routing needs
the tokens), and the context-length checks.

Given the context window (`max_model_len`, None when no worker is known yet), a text is
checked before it is tokenized: when its length alone proves it has too many tokens
(rtpllm.tokenizer.length_bound), it is refused without paying for the tokenization.

A chat with images (loaded beforehand by rtpllm.api.images, since fetching is async and
this runs off the event loop for big bodies) is rendered with the template's own image
token per image, and each is expanded to the image's placeholder tokens from its size
alone: the expanded ids are what the engine runs, routes by and counts as prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rtpllm.api.errors import bad_request
from rtpllm.api.images import LoadedImage, is_image_part
from rtpllm.api.requests import ChatMessage
from rtpllm.api.tools import template_tool_calls
from rtpllm.protocol.messages import ImageSpec
from rtpllm.sampling_params import MAX_TOKEN_ID
from rtpllm.tokenizer import Tokenizer
from rtpllm.tokenizer.chat_template import ChatTemplateError

if TYPE_CHECKING:
    from rtpllm.multimodal.families import VisionFamily


# Names a chat template gets from the server (or that name the renderer's own
# arguments); chat_template_kwargs cannot replace them.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "bos_token",
        "eos_token", "template", "special_tokens", "rendered",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Prompt:
    """One prompt to generate from: its token ids, its text when known (for echo), and
    its images in prompt order (their runs index `token_ids`)."""

    token_ids: list[int]
    text: str | None = None
    images: list[ImageSpec] = field(default_factory=list)


def chat_prompt(
    tokenizer: Tokenizer,
    messages: list[ChatMessage],
    add_generation_prompt: bool = True,
    max_model_len: int | None = None,
    max_tokens: int | None = None,
    images: Sequence[LoadedImage] = (),
    vision: VisionFamily | None = None,
    continue_final_message: bool = False,
    template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> Prompt:
    """The prompt of a chat. `images`: the loaded images of its `image_url` parts, in
    order (ImageLoader.load), with `vision` the model's family. `continue_final_message`:
    the last message is left open for the model to continue (no generation prompt);
    `template_kwargs`: more variables for the chat template (vLLM's
    chat_template_kwargs and documents, e.g. Qwen3's enable_thinking); `tools`: the
    request's tools (checked: rtpllm.api.tools), which the template renders as it was
    trained to (Qwen2.5 and Llama-3.1 in their system or first user message)."""
    if not messages:
        raise bad_request("messages must contain at least one message.", "messages")
    count = sum(1 for msg in messages if isinstance(msg.content, list) for part in msg.content if is_image_part(part))
    if count and vision is None:
        raise bad_request("This model does not take images.", "messages", "images_not_supported")
    if count != len(images):  # the caller skipped ImageLoader.load: a bug, not the client's
        raise ValueError(f"the chat has {count} image parts but {len(images)} images were loaded")
    conversation = [_message(msg, i) for i, msg in enumerate(messages)]
    render: dict[str, Any] = {
        "add_generation_prompt": add_generation_prompt and not continue_final_message,
        "continue_final_message": continue_final_message,
        **(template_kwargs or {}),
    }
    if tools:
        render["tools"] = tools
    try:
        text = tokenizer.apply_chat_template(conversation, **render)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None
    # The rendered text, not the messages: a template may drop or add text. With images
    # it holds one image token per image, fewer than expanded: still a lower bound.
    check_text_fits(tokenizer, text, max_tokens, max_model_len, "messages")
    try:
        # Special tokens are parsed only where the template wrote them: a client whose
        # text spells `<|im_end|>` or an image placeholder gets plain text, not a forged
        # turn or image slot.
        ids = tokenizer.encode_chat(conversation, rendered=text, **render)
    except ChatTemplateError as exc:
        raise bad_request(str(exc), "messages") from None
    if not ids:
        raise bad_request("The chat renders to an empty prompt.", "messages")
    specs: list[ImageSpec] = []
    if images:
        assert vision is not None
        ids, specs = _expand_images(tokenizer, ids, images, vision)
    return Prompt(ids, text, specs)


def template_kwargs(chat_template_kwargs: dict[str, Any] | None, documents: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The chat template's extra variables: vLLM's `chat_template_kwargs` (Qwen3's
    `enable_thinking`, say) and `documents` (RAG templates)."""
    kwargs = dict(chat_template_kwargs or {})
    clash = sorted(RESERVED_TEMPLATE_KWARGS & set(kwargs))
    if clash:
        raise bad_request(
            f"chat_template_kwargs cannot set {', '.join(clash)}: use the request fields of those names.",
            "chat_template_kwargs",
        )
    if documents is not None:
        kwargs["documents"] = documents
    return kwargs


def truncate_prompt(prompt: Prompt, keep: int | None) -> Prompt:
    """vLLM's truncate_prompt_tokens: only the prompt's last `keep` tokens."""
    if keep is None or len(prompt.token_ids) <= keep:
        return prompt
    if prompt.images:  # cutting would move or split the images' placeholder runs
        raise bad_request("truncate_prompt_tokens cannot cut a prompt with images.", "truncate_prompt_tokens")
    return Prompt(prompt.token_ids[-keep:], None)


def last_assistant_text(messages: list[ChatMessage]) -> str:
    """The text of the last message when it is the assistant's (vLLM's chat `echo`)."""
    if not messages or messages[-1].role != "assistant":
        return ""
    return _content_text(messages[-1].content, len(messages) - 1)


def _expand_images(
    tokenizer: Tokenizer, ids: list[int], images: Sequence[LoadedImage], vision: VisionFamily
) -> tuple[list[int], list[ImageSpec]]:
    # Imported here: a text-only gateway never loads the multimodal stack.
    from rtpllm.multimodal.prompt import expand_image_placeholders

    try:
        expanded, placements = expand_image_placeholders(
            vision, tokenizer, ids, [(image.width, image.height) for image in images]
        )
    except ValueError as exc:
        # A template that drops image parts (of some role, say) or writes its own.
        raise bad_request(f"The chat template does not place every image: {exc}.", "messages") from None
    specs = [
        ImageSpec(content_hash=image.content_hash, runs=list(placement.runs), grid_thw=placement.grid_thw, data=image.data)
        for image, placement in zip(images, placements, strict=True)
    ]
    return expanded, specs


def _message(msg: ChatMessage, index: int) -> dict[str, Any]:
    """A message as HF chat templates take it. Only an assistant message that has calls
    gets `tool_calls` (Llama-3.1's template tests for the key, not for its length)."""
    item: dict[str, Any] = {"role": msg.role, "content": _content(msg.content, index)}
    if msg.name is not None:
        item["name"] = msg.name
    if msg.tool_calls:
        if msg.role != "assistant":
            raise bad_request(
                f"messages[{index}]: only assistant messages have tool_calls.", f"messages.{index}.tool_calls"
            )
        item["tool_calls"] = template_tool_calls(msg.tool_calls, f"messages.{index}.tool_calls")
    if msg.tool_call_id is not None:
        item["tool_call_id"] = msg.tool_call_id
    return item


def _content(content: str | list[dict[str, Any]] | None, index: int) -> str | list[dict[str, Any]]:
    """A message's content for the template: its text, or, when it has images, its text
    and `{"type": "image"}` parts (what chat templates render as their image token)."""
    if isinstance(content, list) and any(is_image_part(part) for part in content):
        return [
            {"type": "image"} if is_image_part(part) else {"type": "text", "text": _part_text(part, index, j)}
            for j, part in enumerate(content)
        ]
    return _content_text(content, index)


def _content_text(content: str | list[dict[str, Any]] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(_part_text(part, index, j) for j, part in enumerate(content))


def _part_text(part: Any, index: int, j: int) -> str:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        kind = part.get("type") if isinstance(part, dict) else None
        raise bad_request(
            f"messages[{index}].content[{j}]: only text and image_url content parts are supported, got type {kind!r}.",
            f"messages.{index}.content.{j}",
        )
    return part["text"]


def completion_prompts(
    tokenizer: Tokenizer,
    prompt: str | list[str] | list[int] | list[list[int]],
    max_model_len: int | None = None,
    max_tokens: int | None = None,
    add_special_tokens: bool = True,
) -> list[Prompt]:
    """The prompts of a /v1/completions request: a string, a batch of strings, token ids
    or a batch of token-id lists. `add_special_tokens`: the tokenizer's BOS etc. around
    each text (vLLM's field; token ids are taken as they are)."""
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
            ids = tokenizer.encode(item, add_special_tokens=add_special_tokens)
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
