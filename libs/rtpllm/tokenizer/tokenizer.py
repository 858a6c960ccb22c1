"""HF `tokenizers` + the checkpoint's chat template and special tokens."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from rtpllm.tokenizer.chat_template import ChatTemplateError, render_chat
from rtpllm.tokenizer.length_bound import LengthBound, length_bound

# Above this many characters, encode through `encode_batch`, which releases the GIL: the
# plain `encode` holds it (4-5 s for 8 MB on one core), which would stall every thread of
# the process (the gateway's heartbeat thread included), not only the caller.
_GIL_FREE_CHARS = 16 * 1024

# Wrap message text while a guarded chat renders (private-use code points: no tokenizer
# gives them meaning, and they are stripped from the text first).
_OPEN, _CLOSE = "\ue000", "\ue001"


def _token_text(value: Any) -> str | None:
    # tokenizer_config stores special tokens as strings or AddedToken dicts.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    """Encodes prompts, renders chats and decodes ids for one model directory."""

    def __init__(
        self,
        tokenizer: HFTokenizer,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        extra_eos_ids: Sequence[int] = (),
        add_bos_token: bool | None = None,
    ) -> None:
        self._tok = tokenizer
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.bos_token_id = tokenizer.token_to_id(bos_token) if bos_token else None
        eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.eos_token_ids: tuple[int, ...] = tuple(
            dict.fromkeys([*([eos_id] if eos_id is not None else []), *extra_eos_ids])
        )
        self._add_bos = add_bos_token
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._special_ids = {i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special}

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        root = Path(model_dir)
        path = root / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{root} has no tokenizer.json")
        tok = HFTokenizer.from_file(str(path))
        cfg: dict[str, Any] = {}
        if (root / "tokenizer_config.json").is_file():
            cfg = json.loads((root / "tokenizer_config.json").read_text())
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        # A processor's template (vision-language models) renders image parts; it wins
        # over the tokenizer's, as in HF's processors.
        if (root / "chat_template.json").is_file():
            template = json.loads((root / "chat_template.json").read_text()).get("chat_template") or template
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text()
        extra_eos: list[int] = []
        for name in ("generation_config.json", "config.json"):
            if (root / name).is_file():
                eos = json.loads((root / name).read_text()).get("eos_token_id")
                extra_eos.extend(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
        return cls(
            tok,
            template,
            _token_text(cfg.get("bos_token")),
            _token_text(cfg.get("eos_token")),
            extra_eos,
            cfg.get("add_bos_token"),
        )

    @cached_property
    def length_bound(self) -> LengthBound | None:
        """The fewest tokens a text can have from its length alone, when this tokenizer
        guarantees one (rtpllm.tokenizer.length_bound). Computed once (~0.2 s for a 49k
        vocabulary): touch it at startup, off the event loop."""
        return length_bound(self._tok.to_str())

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > _GIL_FREE_CHARS:
            ids = self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        else:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if (
            add_special_tokens
            and self._add_bos
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def backend_json(self) -> str:
        """The HF `tokenizers` tokenizer as its JSON (what grammar engines load)."""
        return self._tok.to_str()

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """Render a conversation to prompt text (tokenize it with add_special_tokens=False).
        `continue_final_message`: the text ends right after the last message's text,
        without its end-of-turn tokens, so the model continues it (as HF does)."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; send a plain prompt instead")
        text = render_chat(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt and not continue_final_message,
            special_tokens={"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""},
            tools=tools,
            **extra,
        )
        return _open_final_message(text, messages) if continue_final_message else text

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        rendered: str | None = None,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> list[int]:
        """Render a conversation and tokenize it, parsing special tokens only where the
        template wrote them.

        Message text is the client's: if it spells a special token (`<|im_end|>`, an
        image placeholder such as `<|image_pad|>`), it is tokenized as plain text, so a
        client cannot forge turns or image slots. Text without any is tokenized with
        the rest of the prompt, exactly as HF does.
        """
        if not any(self._special_pattern.search(text) for text in _message_texts(messages)):
            # `rendered`: the caller's own rendering of the same messages, not done twice.
            if rendered is None:
                rendered = self.apply_chat_template(
                    messages, add_generation_prompt, continue_final_message=continue_final_message, **extra
                )
            return self.encode(rendered, add_special_tokens=False)
        marked = [_mark_text(message) for message in messages]
        rendered = self.apply_chat_template(
            marked, add_generation_prompt, continue_final_message=continue_final_message, **extra
        )
        ids: list[int] = []
        inside = False
        for piece in re.split(f"([{_OPEN}{_CLOSE}])", rendered):
            if piece in (_OPEN, _CLOSE):
                if inside == (piece == _OPEN):
                    # The template cut or reordered message text: its bounds are lost.
                    raise ChatTemplateError("message text spells special tokens in a way this chat template cannot keep apart")
                inside = piece == _OPEN
            elif piece:
                tok = self._plain_text_tokenizer if inside else self._tok
                ids.extend(tok.encode(piece, add_special_tokens=False).ids)
        if inside:
            raise ChatTemplateError("message text spells special tokens in a way this chat template cannot keep apart")
        return ids

    @cached_property
    def _special_pattern(self) -> re.Pattern[str]:
        """Matches the text of any special token (never matches when there are none)."""
        texts = sorted(
            (tok.content for tok in self._tok.get_added_tokens_decoder().values() if tok.special and tok.content),
            key=len,
            reverse=True,
        )
        return re.compile("|".join(map(re.escape, texts)) if texts else r"(?!)")

    @cached_property
    def _plain_text_tokenizer(self) -> HFTokenizer:
        """A copy that tokenizes special-token text as ordinary text (a copy, because the
        switch is a property of the tokenizer object, shared between threads)."""
        tok = HFTokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = True
        return tok


def _message_texts(messages: list[dict[str, Any]]) -> Iterator[str]:
    """The client-written text of a conversation: string contents and text parts, and
    the names and argument strings of tool calls."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield part["text"]
        for call in message.get("tool_calls") or ():
            yield from _strings(call)
        if isinstance(message.get("tool_call_id"), str):
            yield message["tool_call_id"]


def _strings(value: Any) -> Iterator[str]:
    """Every string in a JSON-like value, keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _strings(key)
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _open_final_message(rendered: str, messages: list[dict[str, Any]]) -> str:
    """The rendered chat cut right after the last message's text (its last text part)."""
    content = messages[-1].get("content") if messages else None
    if isinstance(content, list):
        texts = [part["text"] for part in content if isinstance(part, dict) and isinstance(part.get("text"), str)]
        content = texts[-1] if texts else None
    if not isinstance(content, str) or not content.strip():
        raise ChatTemplateError("continue_final_message needs a final message with text to continue")
    for final in (content, content.strip()):  # a template may trim the text it writes
        end = rendered.rfind(final)
        if end >= 0:
            return rendered[: end + len(final)]
    raise ChatTemplateError("the chat template does not write the final message's text as is, so it cannot be continued")


def _mark_text(message: dict[str, Any]) -> dict[str, Any]:
    """A copy of the message whose texts are wrapped in the guard characters."""

    def wrap(text: str) -> str:
        if not text:
            return text  # nothing to guard, and a template may test it for truth
        return _OPEN + text.replace(_OPEN, "").replace(_CLOSE, "") + _CLOSE

    def wrap_all(value: Any) -> Any:
        if isinstance(value, str):
            return wrap(value)
        if isinstance(value, dict):
            return {wrap(k): wrap_all(v) for k, v in value.items()}
        if isinstance(value, list):
            return [wrap_all(v) for v in value]
        return value

    marked = dict(message)
    content = message.get("content")
    if isinstance(content, str):
        marked["content"] = wrap(content)
    elif isinstance(content, list):
        marked["content"] = [
            {**part, "text": wrap(part["text"])} if isinstance(part, dict) and isinstance(part.get("text"), str) else part
            for part in content
        ]
    if message.get("tool_calls"):
        # The call's name and arguments (keys and string values): templates write them
        # out, the arguments through tojson, which keeps these characters as they are.
        marked["tool_calls"] = [
            {
                **call,
                **({"id": wrap(call["id"])} if isinstance(call.get("id"), str) else {}),
                "function": {
                    "name": wrap(call["function"]["name"]),
                    "arguments": wrap_all(call["function"]["arguments"]),
                },
            }
            for call in message["tool_calls"]
        ]
    if isinstance(message.get("tool_call_id"), str):
        marked["tool_call_id"] = wrap(message["tool_call_id"])
    return marked
