"""Cache-aware routing: the prefix index fed by KV events (gaps, snapshots, guesses) and
the policy that scores instances by the prompt tokens they would have to prefill."""

from __future__ import annotations

import pytest

from rtpllm.kvcache.block_hash import block_keys, namespace_key
from rtpllm.kvcache.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KVEventBatch
from rtpllm.protocol.messages import Heartbeat, InstanceLoad
from rtpllm.routing.instances import Instance
from rtpllm.routing.policy import CacheAware, RouteRequest, make_policy
from rtpllm.routing.prefix_index import PrefixIndex, PrefixMatch

NS = namespace_key("m", "float32", 4)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def batch(seq: int, *events) -> KVEventBatch:  # type: ignore[no-untyped-def]
    return KVEventBatch(engine_id="e", seq=seq, events=list(events))


def inst(instance_id: str, pending: int = 0) -> Instance:
    hb = Heartbeat(
        instance_id=instance_id, model="m", max_model_len=64, max_num_seqs=8, block_size=4, kv_namespace=NS, lease_s=3.0, seq=1,
        load=InstanceLoad(num_running=pending),
    )  # fmt: skip
    return Instance(hb, 0.0)


def test_events_build_the_index_and_gaps_ask_for_a_snapshot() -> None:
    keys = block_keys(list(range(12)), 4, NS)
    idx = PrefixIndex()
    assert idx.apply("a", batch(0, BlocksStored(keys, None, 12)))
    assert idx.match("a", keys).gpu == 3
    assert idx.apply("a", batch(1, BlocksRemoved([keys[1]])))
    assert idx.match("a", keys).gpu == 1, "the chain stops at the first missing block"
    assert not idx.apply("a", batch(3, AllBlocksCleared()))  # batch 2 went missing
    assert idx.needs_resync("a")
    idx.replace("a", keys[:2], seq=5)
    assert not idx.needs_resync("a") and idx.match("a", keys).gpu == 2
    assert idx.apply("a", batch(4, AllBlocksCleared())), "older than the snapshot: ignored"
    assert idx.match("a", keys).gpu == 2
    assert idx.apply("a", batch(6, BlocksStored([keys[2]], keys[1], 4)))
    assert idx.match("a", keys).gpu == 3


def test_host_tier_events_extend_the_chain_after_the_pool() -> None:
    keys = block_keys(list(range(24)), 4, NS)  # 6 blocks
    idx = PrefixIndex()
    idx.apply("a", batch(0, BlocksStored(keys[:2], None, 8)))
    idx.apply("a", batch(1, BlocksStored(keys[1:5], None, 16, tier="host")))
    m = idx.match("a", keys)
    assert (m.gpu, m.host) == (2, 3), "pool first, then the host tier continues the chain"
    assert idx.num_keys("a") == 2 and idx.num_host_keys("a") == 4
    idx.apply("a", batch(2, BlocksRemoved([keys[3]], tier="host")))
    assert (idx.match("a", keys).gpu, idx.match("a", keys).host) == (2, 1)
    idx.apply("a", batch(3, BlocksRemoved([keys[0]])))  # a pool eviction leaves the host tier alone
    assert idx.match("a", keys).gpu == 0 and idx.num_host_keys("a") == 3
    assert idx.match("a", keys).host == 0, "the chain starts at block 0, which is nowhere now"
    idx.apply("a", batch(4, AllBlocksCleared()))
    assert idx.num_keys("a") == 0 and idx.num_host_keys("a") == 0
    idx.replace("a", keys[:1], seq=9, host_keys=keys[1:3])
    assert (idx.match("a", keys).gpu, idx.match("a", keys).host) == (1, 2)


def test_a_shared_kvstore_host_tier_and_its_restart() -> None:
    keys = block_keys(list(range(24)), 4, NS)  # 6 blocks
    idx = PrefixIndex()
    kvstore = "kvstore-h1"
    idx.apply("a", batch(0, BlocksStored(keys[:1], None, 4)))
    idx.apply(kvstore, batch(0, AllBlocksCleared(), BlocksStored(keys, None, 0, tier="host")))
    assert idx.match("a", keys) == PrefixMatch(1, 0), "without naming its kvstore, an instance gets no credit"
    assert idx.match("a", keys, kvstore) == PrefixMatch(1, 5)
    idx.apply(kvstore, batch(1, BlocksRemoved([keys[3]], tier="host")))
    assert idx.match("a", keys, kvstore) == PrefixMatch(1, 2)
    # The kvstore restarts under the same id: its seq starts over at 0 with a clear.
    assert idx.apply(kvstore, batch(0, AllBlocksCleared()))
    assert idx.match("a", keys, kvstore) == PrefixMatch(1, 0) and idx.last_seq(kvstore) == 0


def test_joining_late_is_a_gap() -> None:
    idx = PrefixIndex()
    assert not idx.apply("a", batch(7, BlocksStored([b"k" * 16], None, 4)))
    idx.drop("a")
    assert idx.last_seq("a") == -1 and idx.num_keys("a") == 0


def test_guesses_expire() -> None:
    clock = Clock()
    idx = PrefixIndex(guess_ttl_s=10, clock=clock)
    keys = block_keys(list(range(8)), 4, NS)
    idx.note_routed("a", keys)
    assert idx.match("a", keys).gpu == 2 and idx.match("b", keys).gpu == 0
    clock.now = 11
    assert idx.match("a", keys).gpu == 0
    idx.expire_guesses()
    assert not idx._guesses


def test_cache_aware_prefers_the_instance_holding_the_prefix() -> None:
    idx = PrefixIndex()
    system = list(range(40))
    idx.apply("b", batch(0, BlocksStored(block_keys(system, 4, NS), None, 40)))
    policy = CacheAware(idx, queue_tokens=8)
    candidates = [inst("a"), inst("b", pending=2), inst("c")]
    assert policy.choose(RouteRequest("r", "m", system + [7, 8, 9]), candidates).instance_id == "b"
    assert policy.last_reason == "cache"
    # A prompt nobody holds goes by load, and the choice is remembered as a guess:
    other = [100 + i for i in range(20)]
    first = policy.choose(RouteRequest("r2", "m", other), candidates)
    assert policy.last_reason == "load" and first.instance_id in ("a", "c")
    # ... so the next request with that prefix follows it before any event arrives.
    again = policy.choose(RouteRequest("r3", "m", other + [1]), candidates)
    assert again.instance_id == first.instance_id and policy.last_reason == "cache"


def test_host_tier_blocks_count_at_their_credit() -> None:
    system = list(range(40))  # 10 blocks of 4 tokens
    keys = block_keys(system, 4, NS)

    def index() -> PrefixIndex:  # a fresh one per policy: a choice leaves guesses behind
        idx = PrefixIndex()
        idx.apply("a", batch(0, BlocksStored(keys[:4], None, 16)))  # 4 blocks in a's pool
        idx.apply("b", batch(0, BlocksStored(keys, None, 40, tier="host")))  # all 10 in b's host tier
        return idx

    request = RouteRequest("r", "m", system + [1])
    # b saves 10 x 0.5 = 5 blocks' prefill, a saves 4: b.
    assert CacheAware(index(), queue_tokens=1, host_credit=0.5).choose(request, [inst("a"), inst("b")]).instance_id == "b"
    # Restoring barely beats recomputing here: a's 4 pool blocks win.
    assert CacheAware(index(), queue_tokens=1, host_credit=0.3).choose(request, [inst("a"), inst("b")]).instance_id == "a"
    # A host-tier hit alone is a cache decision, not a load one.
    policy = CacheAware(index(), queue_tokens=1)
    assert policy.choose(request, [inst("b"), inst("c")]).instance_id == "b" and policy.last_reason == "cache"


def test_host_credit_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="host_credit"):
        CacheAware(host_credit=1.5)


def test_skewed_load_overrides_the_cache() -> None:
    idx = PrefixIndex()
    system = list(range(40))
    idx.apply("b", batch(0, BlocksStored(block_keys(system, 4, NS), None, 40)))
    policy = CacheAware(idx, queue_tokens=1, skew_slack=4)
    chosen = policy.choose(RouteRequest("r", "m", system + [1]), [inst("a", pending=1), inst("b", pending=7)])
    assert chosen.instance_id == "a" and policy.last_reason == "skew"


def test_make_policy_cache_aware_shares_the_index() -> None:
    idx = PrefixIndex()
    policy = make_policy("cache-aware", idx)
    assert isinstance(policy, CacheAware) and policy.index is idx
