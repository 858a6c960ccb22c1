"""Chat templates with tools, modelled on the real ones, and tiny checkpoints that use
them (random weights, byte-level tokenizers with each family's special tokens).

- `QWEN2_TOOLS_TEMPLATE` follows Qwen2.5-Instruct's: tools as JSON lines inside
  `<tools></tools>` in the system message, the assistant's calls as `<tool_call>` JSON
  (`arguments | tojson`: the template expects an object), consecutive tool results
  in one user turn inside `<tool_response>`.
- `LLAMA31_TOOLS_TEMPLATE` follows Llama-3.1-Instruct's JSON tool calling: tools in
  the first user message, a call rendered as `{"name": ..., "parameters": ...}` (the
  template tests `'tool_calls' in message` and refuses more than one call), tool
  results in `ipython` turns.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.tokenizer.byte_tokenizer import SPECIALS, byte_alphabet

QWEN2_TOOLS_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n" }}
{{- "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n" }}
{{- '<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == "user" or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == "assistant" %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == "tool" %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != "tool" %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""

LLAMA31_TOOLS_TEMPLATE = """\
{{- bos_token }}
{%- if not tools is defined %}{%- set tools = none %}{%- endif %}
{%- if messages[0]['role'] == 'system' %}
{%- set system_message = messages[0]['content'] | trim %}
{%- set messages = messages[1:] %}
{%- else %}
{%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- if tools is not none %}
{%- if messages | length == 0 %}{{- raise_exception("Tools go in the first user message, and there is none.") }}{%- endif %}
{%- set first_user_message = messages[0]['content'] | trim %}
{%- set messages = messages[1:] %}
{{- "<|start_header_id|>user<|end_header_id|>\\n\\n" }}
{{- "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\\n\\n" }}
{{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}. Do not use variables.\\n\\n' }}
{%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}
{%- elif 'tool_calls' in message %}
{%- if message.tool_calls | length != 1 %}{{- raise_exception("This model only supports single tool-calls at once!") }}{%- endif %}
{%- set tool_call = message.tool_calls[0].function %}
{%- if builtin_tools is defined and tool_call.name in builtin_tools %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n<|python_tag|>' + tool_call.name + '.call()<|eom_id|>' }}
{%- else %}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{{- '{"name": "' + tool_call.name + '", "parameters": ' }}{{- tool_call.arguments | tojson }}{{- "}<|eot_id|>" }}
{%- endif %}
{%- else %}
{{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
{%- if message.content is mapping or message.content is iterable %}{{- message.content | tojson }}{%- else %}{{- message.content }}{%- endif %}
{{- "<|eot_id|>" }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}
"""

LLAMA3_SPECIALS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>",
    "<|python_tag|>",
]  # fmt: skip

FAMILIES = {
    # family: (template, special tokens, bos, end-of-turn tokens (the first is eos))
    "qwen2": (QWEN2_TOOLS_TEMPLATE, SPECIALS, None, ["<|im_end|>", "<|endoftext|>"]),
    "llama3": (
        LLAMA31_TOOLS_TEMPLATE,
        LLAMA3_SPECIALS,
        "<|begin_of_text|>",
        ["<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"],
    ),
}


def write_tools_tokenizer(out: Path, family: str, vocab_size: int = 320) -> list[int]:
    """A byte-level tokenizer with `family`'s special tokens (then reserved ones up to
    `vocab_size`) and its tool template; returns the end-of-turn token ids."""
    template, specials, bos, ends = FAMILIES[family]
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(byte_alphabet())}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    names = list(specials) + [f"<|reserved_{i}|>" for i in range(vocab_size - 256 - len(specials))]
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": ends[0],
        "add_bos_token": False,
        "chat_template": template,
        "model_max_length": 1 << 20,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return [256 + specials.index(t) for t in ends]


def write_tools_checkpoint(out: Path, family: str) -> Path:
    """A tiny random checkpoint (Qwen2 for "qwen2", Llama for "llama3") whose tokenizer
    has the family's special tokens and tool template."""
    out.mkdir(parents=True, exist_ok=True)
    ends = write_tools_tokenizer(out, family)
    arch = "qwen2" if family == "qwen2" else "llama"
    # A byte per token: a prompt with tools runs to a thousand tokens.
    write_random_checkpoint(
        out, arch, tokenizer=False, eos_token_id=ends[0], seed=3, max_position_embeddings=4096
    )
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}))
    return out
