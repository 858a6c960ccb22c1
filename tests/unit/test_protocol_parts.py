"""Messages in parts (rtpllm.protocol.parts): every part fits max_payload, the parts put
back together equal the message (events: apply exactly as the batch would), a lost or
foreign part is noticed, and what cannot be cut is MessageTooLarge naming it."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtpllm.kvcache.events import AllBlocksCleared, BlocksRemoved, BlocksStored, KVEvent, KVEventBatch
from rtpllm.protocol.messages import KVEvents, KVSnapshot, MessageTooLarge, ProtocolError, decode, encode
from rtpllm.protocol.parts import EventParts, SnapshotParts, events_parts, key_runs, snapshot_parts
from rtpllm.routing.prefix_index import PrefixIndex


def keys(n: int, rng: random.Random) -> list[bytes]:
    return [rng.randbytes(16) for _ in range(n)]


def test_encode_names_a_message_over_the_limit() -> None:
    snap = KVSnapshot(instance_id="w", seq=1, block_keys=[b"k" * 16] * 100)
    size = len(encode(snap))
    assert encode(snap, size) == encode(snap)
    with pytest.raises(
        MessageTooLarge,
        match=f"a KVSnapshot message of {size} bytes exceeds the NATS server's max_payload of {size - 1} bytes",
    ) as info:
        encode(snap, size - 1)
    assert isinstance(info.value, ProtocolError) and info.value.message_type == "KVSnapshot"


@given(st.integers(0, 3000), st.integers(0, 700), st.integers(200, 20_000), st.randoms(use_true_random=False))
def test_a_snapshot_in_parts_fits_and_comes_back_whole(
    gpu: int, host: int, max_payload: int, rng: random.Random
) -> None:
    snap = KVSnapshot(
        instance_id="worker-1", seq=42, block_keys=keys(gpu, rng), host_block_keys=keys(host, rng)
    )
    parts = snapshot_parts(snap, max_payload)
    assert all(len(p) <= max_payload for p in parts)
    if len(encode(snap)) <= max_payload:
        assert parts == [encode(snap)]
    decoded = [decode(p, KVSnapshot) for p in parts]
    rng.shuffle(decoded)  # the assembler does not rely on their order
    assembler = SnapshotParts()
    results = [assembler.add(p) for p in decoded]
    assert all(r is None for r in results[:-1])
    assert results[-1] == snap


def test_a_snapshot_with_a_part_missing_or_foreign_is_not_complete() -> None:
    rng = random.Random(0)
    snap = KVSnapshot(instance_id="w", seq=3, block_keys=keys(1000, rng))
    parts = [decode(p, KVSnapshot) for p in snapshot_parts(snap, 4096)]
    assert len(parts) >= 5
    assembler = SnapshotParts()
    assert not assembler.started
    for p in parts[:2] + parts[3:]:
        assert assembler.add(p) is None
    assert assembler.started and "missing 2" in assembler.describe()
    other = msgspec.structs.replace(parts[2], seq=4)  # a part of another snapshot
    with pytest.raises(ProtocolError, match="does not belong"):
        assembler.add(other)
    with pytest.raises(ProtocolError, match="out of range"):
        SnapshotParts().add(msgspec.structs.replace(parts[0], part=9, parts=9))
    assert assembler.add(parts[2]) == snap


def test_what_cannot_be_cut_small_enough_is_too_large() -> None:
    snap = KVSnapshot(instance_id="w" * 100, seq=1, block_keys=[b"k" * 16] * 10)
    with pytest.raises(MessageTooLarge, match="KVSnapshot"):
        snapshot_parts(snap, 100)  # smaller than the envelope alone
    batch = KVEventBatch("w", 0, [BlocksRemoved([b"k" * 5000])])  # one key over the limit
    with pytest.raises(MessageTooLarge, match="KVEvents"):
        events_parts(KVEvents(instance_id="w", model="m", batch=batch), 4096)


def random_events(rng: random.Random, n: int) -> list[KVEvent]:
    out: list[KVEvent] = []
    pool: list[bytes] = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.5:
            new = keys(rng.randint(1, 700), rng)
            parent = pool[-1] if pool and rng.random() < 0.5 else None
            out.append(BlocksStored(new, parent, len(new) * 16, tier=rng.choice(["gpu", "host"])))
            pool += new
        elif kind < 0.9 and pool:
            gone = rng.sample(pool, rng.randint(1, len(pool)))
            out.append(BlocksRemoved(gone, tier=rng.choice(["gpu", "host"])))
        else:
            out.append(AllBlocksCleared())
    return out


@given(st.integers(1, 12), st.integers(300, 20_000), st.randoms(use_true_random=False))
def test_an_event_batch_in_parts_fits_and_applies_as_the_batch(
    n: int, max_payload: int, rng: random.Random
) -> None:
    batch = KVEventBatch("worker-1", 5, random_events(rng, n))
    message = KVEvents(instance_id="worker-1", model="m", batch=batch)
    parts = events_parts(message, max_payload)
    assert all(len(p) <= max_payload for p in parts)
    assembler = EventParts()
    results = [assembler.add(decode(p, KVEvents)) for p in parts]
    assert all(r is None for r in results[:-1])
    whole = results[-1]
    assert whole is not None and whole.parts == 1 and whole.batch.seq == 5
    # Cut events chain on: the same keys in the same order, tokens summing up.
    stored = [e for e in whole.batch.events if isinstance(e, BlocksStored)]
    assert sum(e.num_tokens for e in stored) == sum(
        e.num_tokens for e in batch.events if isinstance(e, BlocksStored)
    )
    direct, rebuilt = PrefixIndex(), PrefixIndex()
    direct.apply("w", batch)
    rebuilt.apply("w", whole.batch)
    assert (direct.num_keys("w"), direct.num_host_keys("w")) == (
        rebuilt.num_keys("w"),
        rebuilt.num_host_keys("w"),
    )
    assert direct._instances["w"] == rebuilt._instances["w"]


def test_a_long_blocks_stored_is_cut_into_a_chain() -> None:
    rng = random.Random(1)
    k = keys(1000, rng)
    parent = b"p" * 16
    message = KVEvents(
        instance_id="w", model="m", batch=KVEventBatch("w", 0, [BlocksStored(k, parent, 16_000)])
    )
    parts = [decode(p, KVEvents) for p in events_parts(message, 4096)]
    events = [e for p in parts for e in p.batch.events]
    assert len(events) >= 5 and all(isinstance(e, BlocksStored) for e in events)
    assert [key for e in events for key in e.block_keys] == k
    assert events[0].parent_key == parent
    for before, after in zip(events, events[1:], strict=False):
        assert after.parent_key == before.block_keys[-1]
    assert [e.num_tokens for e in events] == [16 * len(e.block_keys) for e in events]


def test_a_batch_with_a_lost_part_is_dropped_and_shows_as_a_gap() -> None:
    rng = random.Random(2)

    def batch_parts(seq: int) -> list[KVEvents]:
        batch = KVEventBatch("w", seq, [BlocksStored(keys(600, rng), None, 600 * 16)])
        return [
            decode(p, KVEvents) for p in events_parts(KVEvents(instance_id="w", model="m", batch=batch), 4096)
        ]

    assembler, index = EventParts(), PrefixIndex()
    first, second, third = batch_parts(0), batch_parts(1), batch_parts(2)
    for p in first:
        got = assembler.add(p)
    assert got is not None and index.apply("w", got.batch)
    for p in second[:1] + second[2:]:  # part 1 lost
        assert assembler.add(p) is None
    for p in third:
        got = assembler.add(p)
    assert got is not None and got.batch.seq == 2
    assert not index.apply("w", got.batch) and index.needs_resync("w")  # the router resyncs
    # A one-part batch in the middle of another's parts ends that one too.
    for p in batch_parts(3)[:2]:
        assembler.add(p)
    single = KVEvents(instance_id="w", model="m", batch=KVEventBatch("w", 4, []))
    assert assembler.add(single) is single


@given(st.lists(st.integers(0, 300), max_size=200), st.integers(10, 2000))
def test_key_runs_cover_the_keys_in_order_within_the_budget(lengths: list[int], budget: int) -> None:
    ks = [b"x" * n for n in lengths]
    runs = key_runs(ks, budget)
    assert [i for a, b in runs for i in range(a, b)] == list(range(len(ks)))
    for a, b in runs:
        size = len(msgspec.msgpack.encode(ks[a:b]))
        assert size <= budget or b - a == 1  # a single oversized key gets a run of its own
