"""The KV namespace names the weights by content (rtpllm.loader.checkpoint_digest): new
weights at an old path get a new namespace, the same weights at another path the same
one, and a second start reads the digest from the cache."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rtpllm.kvcache.block_hash import namespace_key
from rtpllm.loader.checkpoint_digest import DIGEST_VERSION, checkpoint_digest, weights_identity
from rtpllm.loader.random_checkpoint import write_random_checkpoint
from rtpllm.loader.safetensors_header import read_header


def namespace(model_dir: Path, cache: Path) -> bytes:
    """What an engine seeds its block keys with (llm_engine.py does the same)."""
    return namespace_key(weights_identity(model_dir, cache), "float32", 16)


def test_new_weights_at_the_same_path_get_a_new_namespace(tmp_path: Path) -> None:
    model, cache = tmp_path / "model", tmp_path / "cache"
    write_random_checkpoint(model, "llama", seed=0, tokenizer=False)
    first = namespace(model, cache)
    assert namespace(model, cache) == first  # from the cache
    shutil.rmtree(model)
    write_random_checkpoint(model, "llama", seed=1, tokenizer=False)  # same shapes, other values
    assert namespace(model, cache) != first


def test_one_changed_tensor_written_in_place_with_its_mtime_restored_is_noticed(tmp_path: Path) -> None:
    """The worst case for a cache keyed by file metadata: same path, inode and size, the
    mtime put back (as `touch -d`, `cp -p` or `rsync -t` would). ctime still moves."""
    model, cache = tmp_path / "model", tmp_path / "cache"
    write_random_checkpoint(model, "llama", seed=0, tokenizer=False)
    before = namespace(model, cache)
    path = model / "model.safetensors"
    st = path.stat()
    last = read_header(path).tensors[
        -1
    ]  # one tensor, a few bytes of it: no sampling would catch this reliably
    with open(path, "r+b") as f:
        f.seek(last.start + 5)
        byte = f.read(1)
        f.seek(last.start + 5)
        f.write(bytes([byte[0] ^ 0x40]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns, path.stat().st_ino) == (
        st.st_size,
        st.st_mtime_ns,
        st.st_ino,
    )
    assert namespace(model, cache) != before


def test_the_same_checkpoint_at_two_paths_gets_one_namespace(tmp_path: Path) -> None:
    a, cache = tmp_path / "a", tmp_path / "cache"
    write_random_checkpoint(a, "qwen2", seed=3, num_shards=2)
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)  # new inodes, mtimes
    (b / "tokenizer_config.json").write_text("{}")  # files outside the rule do not count
    assert namespace(a, cache) == namespace(b, cache)
    assert namespace(a, None) == namespace(a, cache)  # the cache changes nothing but the time
    (b / "config.json").write_text(
        json.dumps({**json.loads((a / "config.json").read_text()), "rope_theta": 1.0})
    )
    assert namespace(a, cache) != namespace(b, cache)  # config.json is part of it


def test_the_second_computation_hits_the_cache(tmp_path: Path) -> None:
    model, cache = tmp_path / "model", tmp_path / "cache"
    write_random_checkpoint(model, "llama", seed=0, num_shards=3, tokenizer=False)
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    first = checkpoint_digest(model, cache)
    assert (first.files, first.cached_files) == (4, 0) and first.bytes_hashed > weights
    second = checkpoint_digest(model, cache)
    assert second.digest == first.digest
    assert second.cached_files == 3 and second.bytes_hashed == (model / "config.json").stat().st_size
    entries = list(cache.glob("*.json"))
    assert len(entries) == 3 and all(json.loads(e.read_text())["version"] == DIGEST_VERSION for e in entries)
    # A corrupt entry is a miss, never an error.
    entries[0].write_text("{not json")
    third = checkpoint_digest(model, cache)
    assert third.digest == first.digest and third.cached_files == 2


def test_random_weights_are_named_by_config_seed_and_device(tmp_path: Path) -> None:
    model = write_random_checkpoint(tmp_path / "m", "llama", seed=0, tokenizer=False)
    ids = {
        weights_identity(model, None, random_seed=seed, device=device)
        for seed in (0, 1)
        for device in ("cpu", "cuda:0")
    }
    assert len(ids) == 4
    assert weights_identity(model, None, random_seed=0, device="cuda:0") == weights_identity(
        model, None, random_seed=0, device="cuda:1"
    )
    assert weights_identity(model, None, random_seed=0) != weights_identity(model, None)


def test_an_unusable_cache_directory_still_gives_the_digest(tmp_path: Path) -> None:
    model = write_random_checkpoint(tmp_path / "m", "llama", seed=0, tokenizer=False)
    cache = tmp_path / "not-a-directory"
    cache.write_text("")
    assert checkpoint_digest(model, cache).digest == checkpoint_digest(model, None).digest
