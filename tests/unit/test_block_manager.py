"""Block-manager invariants under random operation sequences (hypothesis)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from rtpllm.kvcache.block_hash import block_keys, namespace_key
from rtpllm.kvcache.block_manager import BlockManager
from rtpllm.kvcache.events import BlocksRemoved, BlocksStored

BS = 4


@dataclass
class Req:
    request_id: str
    tokens: list[int] = field(default_factory=list)
    computed: int = 0

    @property
    def all_token_ids(self) -> list[int]:
        return self.tokens


def manager(num_blocks: int = 16) -> BlockManager:
    return BlockManager(num_blocks, BS, namespace_key("t", "float32", BS))


def run(bm: BlockManager, req: Req) -> bool:
    """Admit with prefix hits and compute everything; False if it did not fit."""
    hit = bm.find_prefix(req)
    if not bm.allocate(req, len(req.tokens), hit):
        return False
    req.computed = len(req.tokens)
    bm.commit(req, req.computed)
    return True


def test_prefix_hit_after_commit_and_free() -> None:
    bm = manager()
    a = Req("a", list(range(10)))
    assert run(bm, a)
    a_blocks = list(bm.block_table("a"))
    bm.free("a")
    keys = block_keys(a.tokens, BS, bm.namespace)  # 2 full blocks; then one not cached
    assert bm.cached_block_ids([*keys, b"elsewhere", keys[0]]) == a_blocks[:2]
    b = Req("b", list(range(8)) + [99, 98, 97])
    hit = bm.find_prefix(b)
    assert hit.num_tokens == 8
    assert bm.allocate(b, len(b.tokens), hit)
    assert bm.block_table("b")[:2] == a_blocks[:2]
    assert bm.block_table("b")[2] not in a_blocks[:2]


def test_last_token_is_never_a_hit() -> None:
    bm = manager()
    assert run(bm, Req("a", list(range(8))))
    bm.free("a")
    # 8 tokens = 2 full cached blocks, but at most 7 may hit: only the first block.
    assert bm.find_prefix(Req("b", list(range(8)))).num_tokens == 4


def test_allocation_failure_changes_nothing() -> None:
    bm = manager(num_blocks=2)
    assert not bm.allocate(Req("a", list(range(12))), 12)
    assert bm.num_free_blocks == 2
    bm.free("a")
    bm.check_invariants(set())


def test_eviction_emits_removed_events_lru_first() -> None:
    bm = manager(num_blocks=4)
    assert run(bm, Req("a", list(range(8))))
    assert run(bm, Req("b", list(range(100, 108))))
    stored = [e for e in bm.take_events() if isinstance(e, BlocksStored)]
    assert sum(len(e.block_keys) for e in stored) == 4
    bm.free("a")
    bm.free("b")
    assert run(bm, Req("c", list(range(200, 204))))
    removed = [k for e in bm.take_events() if isinstance(e, BlocksRemoved) for k in e.block_keys]
    assert len(removed) == 1
    # a was freed first, and a's tail first: a's second block goes first.
    assert bm.find_prefix(Req("a2", list(range(8)) + [1])).num_tokens == 4


def test_duplicate_content_is_not_cached_twice() -> None:
    bm = manager()
    a, b = Req("a", list(range(9))), Req("b", list(range(9)))
    assert bm.allocate(a, 9) and bm.allocate(b, 9)
    bm.commit(a, 9)
    bm.commit(b, 9)
    bm.check_invariants({"a", "b"})
    bm.free("a")
    bm.free("b")
    bm.check_invariants(set())
    assert bm.num_free_blocks == 16


def test_a_background_restore_holds_its_blocks_private_until_cached() -> None:
    """reserve_restore: the prefix hit is protected, the new blocks are referenced and
    not findable while a restore writes them; cache_restored then offers them (a key
    computed meanwhile keeps its first block) and freeing the owner makes them hits."""
    bm = manager(num_blocks=8)
    tokens = list(range(17))  # 4 full blocks
    a = Req("a", tokens[:5])
    assert run(bm, a)
    bm.free("a")
    keys = block_keys(tokens, BS, bm.namespace)
    hit = bm.find_prefix(Req("b", tokens))
    assert hit.num_tokens == 4
    new = bm.reserve_restore("\0restore", hit.block_ids, 3)
    assert len(new) == 3 and not set(new) & set(hit.block_ids)
    assert bm.find_prefix(Req("c", tokens)).num_tokens == 4, "restoring blocks are not hits yet"
    assert bm.num_free_blocks == 8 - 4
    # Another request computes the second and third blocks meanwhile: theirs stay cached.
    d = Req("d", tokens[:13])
    assert run(bm, d)
    bm.take_events()
    assert bm.cache_restored(new, keys[1:4], keys[0]) == 1
    events = [e for e in bm.take_events() if isinstance(e, BlocksStored)]
    assert [(e.block_keys, e.parent_key) for e in events] == [([keys[3]], keys[2])]
    for owner in ("\0restore", "b", "c", "d"):  # b, c: tables of find_prefix's keys only
        bm.free(owner)
    bm.check_invariants(set())
    assert bm.find_prefix(Req("e", tokens)).num_tokens == 16
    assert bm.num_free_blocks == 8
    assert bm.reserve_restore("\0r2", (), 99) and bm.num_free_blocks == 0, "at most what is free"


ops = st.lists(
    st.tuples(st.sampled_from(["add", "free", "grow"]), st.integers(0, 5), st.integers(1, 20), st.integers(0, 3)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_invariants_hold_under_random_operations(seq: list[tuple[str, int, int, int]]) -> None:
    bm = manager(num_blocks=12)
    live: dict[str, Req] = {}
    for op, rid_n, length, prefix in seq:
        rid = f"r{rid_n}"
        if op == "add" and rid not in live:
            # Few distinct prefixes so hits and shared blocks happen often.
            req = Req(rid, [prefix] * 6 + list(range(length)))
            if run(bm, req):
                live[rid] = req
            else:
                bm.free(rid)
        elif op == "free" and rid in live:
            bm.free(rid)
            del live[rid]
        elif op == "grow" and rid in live:
            req = live[rid]
            req.tokens.extend(range(1000, 1000 + length))
            if bm.allocate(req, len(req.tokens)):
                bm.commit(req, len(req.tokens))
            else:
                bm.free(rid)
                del live[rid]
        bm.check_invariants(set(live))
        used = sum(len(bm.block_table(r)) for r in live)
        assert bm.num_free_blocks >= bm.num_blocks - used
    for rid in list(live):
        bm.free(rid)
    bm.check_invariants(set())
    assert bm.num_free_blocks == bm.num_blocks
