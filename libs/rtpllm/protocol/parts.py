"""Messages that grow with a KV pool, cut into parts under the NATS server's max_payload.

A NATS server refuses any message over its `max_payload` (1 MiB by default; a client
learns it from the server's INFO as `nc.max_payload`). A KV snapshot holds every block
key of a pool and its host tier (18 bytes a key: 1 MiB is about 58,000 blocks, which a
large pool or host tier passes), and one batch of KV events or one kvstore request can
carry as many. So:

- `snapshot_parts` / `events_parts` encode a KVSnapshot / KVEvents as one message when it
  fits, else as `parts` messages (`part` 0, 1, ...), each a run of the keys (events: a
  run of the events, a long BlocksStored/BlocksRemoved cut into shorter ones in order,
  which applies the same), every one checked against `max_payload`.
- `SnapshotParts` / `EventParts` put them back together on the receiving side: a
  snapshot is complete only with every part (a missing one is reported, and the asker
  asks again later), a batch of events is applied only whole (a missing part shows up
  as a gap in the batch numbers, which makes the router resync).
- `key_runs` cuts a kvstore request's key list into runs that fit one message each.

Anything that cannot be cut small enough raises MessageTooLarge naming the message type
and its size: never a message the server refuses on every retry.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import msgspec

from rtpllm.kvcache.events import BlocksRemoved, BlocksStored, KVEvent, KVEventBatch
from rtpllm.protocol.messages import KVEvents, KVSnapshot, ProtocolError, encode

# Room left in each part for what the size of an empty envelope does not show: list
# headers that grow from 1 to 5 bytes, `part`/`parts` ints of up to 5 bytes each.
SLACK_BYTES = 64
# No honest sender needs more: a snapshot of 10^9 keys in 1 MiB parts is ~17,000 parts.
MAX_PARTS = 1 << 20

_encoder = msgspec.msgpack.Encoder()


def bin_size(n: int) -> int:
    """Bytes msgpack takes for a bytes object of length n (bin 8/16/32 header + data)."""
    return n + (2 if n < 1 << 8 else 3 if n < 1 << 16 else 5)


def _runs(sizes: Iterable[int], budget: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) runs of items whose sizes add up to at most `budget`
    (an item larger than the budget gets a run of its own: the size check of its
    message then names it)."""
    runs: list[tuple[int, int]] = []
    start = used = count = 0
    for i, size in enumerate(sizes):
        if i > start and used + size > budget:
            runs.append((start, i))
            start, used = i, 0
        used += size
        count = i + 1
    if count > start:
        runs.append((start, count))
    return runs


def key_runs(keys: Sequence[bytes], budget: int) -> list[tuple[int, int]]:
    """Consecutive [start, end) runs of `keys` whose msgpack encoding as one list takes at
    most `budget` bytes (a list header of up to 5 bytes included); [] for no keys."""
    return _runs((bin_size(len(k)) for k in keys), budget - 5)


def budget_for(empty: msgspec.Struct, max_payload: int) -> int:
    """Bytes left for list items in a message whose encoding with empty lists is `empty`."""
    return max_payload - len(_encoder.encode(empty)) - SLACK_BYTES


# -- snapshots --------------------------------------------------------------------------


def snapshot_parts(snapshot: KVSnapshot, max_payload: int) -> list[bytes]:
    """`snapshot` encoded as one message, or as parts that each fit `max_payload`."""
    data = _encoder.encode(snapshot)
    if len(data) <= max_payload:
        return [data]
    empty = msgspec.structs.replace(snapshot, block_keys=[], host_block_keys=[], part=0, parts=1)
    keys = [*snapshot.block_keys, *snapshot.host_block_keys]
    # A second list header; no keys at all still makes one (oversized) part, which the
    # size check below names.
    runs = key_runs(keys, budget_for(empty, max_payload) - 5) or [(0, 0)]
    gpu = len(snapshot.block_keys)
    out = []
    for index, (start, end) in enumerate(runs):
        part = msgspec.structs.replace(
            empty,
            block_keys=keys[start : min(end, gpu)],
            host_block_keys=keys[max(start, gpu) : max(end, gpu)],
            part=index,
            parts=len(runs),
        )
        out.append(encode(part, max_payload))
    return out


class SnapshotParts:
    """Collects the parts of one snapshot (the replies to one request)."""

    def __init__(self) -> None:
        self._parts: dict[int, KVSnapshot] = {}
        self._first: KVSnapshot | None = None

    def add(self, part: KVSnapshot) -> KVSnapshot | None:
        """Take one reply; the whole snapshot once every part is in, else None.
        ProtocolError for a part that does not belong (another count, instance or seq)."""
        if not 1 <= part.parts <= MAX_PARTS or not 0 <= part.part < part.parts:
            raise ProtocolError(f"KVSnapshot part {part.part} of {part.parts} is out of range")
        first = self._first
        if first is None:
            first = self._first = part
        elif (part.parts, part.instance_id, part.seq) != (first.parts, first.instance_id, first.seq):
            raise ProtocolError(
                f"KVSnapshot part {part.part} ({part.instance_id}, seq {part.seq}, {part.parts} parts) does not "
                f"belong with part {first.part} ({first.instance_id}, seq {first.seq}, {first.parts} parts)"
            )
        self._parts[part.part] = part
        if len(self._parts) < first.parts:
            return None
        ordered = [self._parts[i] for i in range(first.parts)]
        return KVSnapshot(
            instance_id=first.instance_id,
            seq=first.seq,
            block_keys=[k for p in ordered for k in p.block_keys],
            host_block_keys=[k for p in ordered for k in p.host_block_keys],
        )

    @property
    def started(self) -> bool:
        """Whether any part has arrived."""
        return self._first is not None

    def describe(self) -> str:
        """What has arrived, for a log line about an incomplete snapshot."""
        if self._first is None:
            return "no part arrived"
        missing = [i for i in range(self._first.parts) if i not in self._parts]
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        return f"{len(self._parts)} of {self._first.parts} parts arrived, missing {shown}"


# -- KV events --------------------------------------------------------------------------


def _cut_event(event: KVEvent, budget: int) -> list[KVEvent]:
    """`event` as consecutive events that each encode within `budget` bytes (in order,
    they apply exactly as the one: a BlocksStored run's parent is the previous run's
    last key, and its tokens are its share of the event's)."""
    if not isinstance(event, BlocksStored | BlocksRemoved) or len(_encoder.encode(event)) <= budget:
        return [event]
    keys = event.block_keys
    empty = msgspec.structs.replace(event, block_keys=[])
    runs = key_runs(keys, budget - len(_encoder.encode(empty)) - SLACK_BYTES)
    if isinstance(event, BlocksRemoved):
        return [BlocksRemoved(block_keys=keys[a:b], tier=event.tier) for a, b in runs]
    n, tokens = len(keys), event.num_tokens
    return [
        BlocksStored(
            block_keys=keys[a:b],
            parent_key=event.parent_key if a == 0 else keys[a - 1],
            num_tokens=tokens * b // n - tokens * a // n,
            tier=event.tier,
        )
        for a, b in runs
    ]


def events_parts(message: KVEvents, max_payload: int) -> list[bytes]:
    """`message` encoded as one message, or as parts of its batch that each fit `max_payload`."""
    data = _encoder.encode(message)
    if len(data) <= max_payload:
        return [data]
    batch = message.batch
    empty = msgspec.structs.replace(
        message, batch=KVEventBatch(batch.engine_id, batch.seq, []), part=0, parts=1
    )
    budget = budget_for(empty, max_payload)
    events = [piece for event in batch.events for piece in _cut_event(event, budget)]
    runs = _runs((len(_encoder.encode(e)) for e in events), budget) or [(0, 0)]
    return [
        encode(
            msgspec.structs.replace(
                empty,
                batch=KVEventBatch(batch.engine_id, batch.seq, events[a:b]),
                part=index,
                parts=len(runs),
            ),
            max_payload,
        )
        for index, (a, b) in enumerate(runs)
    ]


class EventParts:
    """Puts KV event batches sent in parts back together, per publisher.

    Parts of a publisher's batch arrive in order (one publisher, one connection, NATS
    keeps its order). A batch whose parts are not all in when another batch of the same
    publisher starts is dropped: the router then sees a gap in `seq` and resyncs."""

    def __init__(self) -> None:
        self._pending: dict[str, list[KVEvents]] = {}

    def add(self, message: KVEvents) -> KVEvents | None:
        """The whole batch once `message` completes it (at once for a one-part batch)."""
        if message.parts <= 1:
            self._pending.pop(message.instance_id, None)
            return message
        if not 0 <= message.part < message.parts <= MAX_PARTS:
            raise ProtocolError(f"KVEvents part {message.part} of {message.parts} is out of range")
        if message.part == 0:  # a batch starts: one half-collected before it is lost
            got = self._pending[message.instance_id] = []
        else:
            got = self._pending.get(message.instance_id, [])
            if not got or (got[0].batch.seq, got[0].parts, len(got)) != (
                message.batch.seq,
                message.parts,
                message.part,
            ):
                # A part went missing: this batch is lost (a gap in seq follows).
                self._pending.pop(message.instance_id, None)
                return None
        got.append(message)
        if len(got) < message.parts:
            return None
        del self._pending[message.instance_id]
        first = got[0]
        events = [e for m in got for e in m.batch.events]
        return msgspec.structs.replace(
            first, batch=KVEventBatch(first.batch.engine_id, first.batch.seq, events), part=0, parts=1
        )

    def drop(self, instance_id: str) -> None:
        """The publisher is gone: forget its half-collected batch."""
        self._pending.pop(instance_id, None)
