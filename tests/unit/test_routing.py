"""Instance leases and router policies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rtpllm.protocol.messages import Heartbeat, InstanceLoad
from rtpllm.routing import InstanceRegistry, LeastLoaded, RoundRobin, RouteRequest, make_policy
from rtpllm.routing.instances import Instance
from rtpllm.routing.lease import MAX_STRETCH, WINDOW, BeatIntervals


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def hb(
    instance_id: str,
    model: str = "m",
    state: str = "ready",
    lease: float = 3.0,
    running: int = 0,
    waiting: int = 0,
    kv: float = 0.0,
    role: str = "worker",
) -> Heartbeat:
    return Heartbeat(
        instance_id=instance_id, role=role, model=model, max_model_len=1024, max_num_seqs=8, block_size=16, lease_s=lease, seq=1, state=state,
        load=InstanceLoad(num_running=running, num_waiting=waiting, kv_usage=kv),
    )  # fmt: skip


REQ = RouteRequest("r", "m", [1, 2, 3])


def test_heartbeat_registers_renews_and_lease_expires() -> None:
    clock = Clock()
    reg = InstanceRegistry(clock)
    _, new = reg.upsert(hb("a", lease=3.0))
    assert new
    clock.now += 1.0
    _, new = reg.upsert(hb("a", lease=3.0))
    assert not new
    clock.now += 2.9
    assert reg.expire() == []
    clock.now += 0.2
    assert [i.instance_id for i in reg.expire()] == ["a"]
    assert len(reg) == 0


def test_expired_instance_comes_back_with_its_next_heartbeat_one_that_left_does_not() -> None:
    clock = Clock()
    reg = InstanceRegistry(clock)
    reg.upsert(hb("a", lease=1.0))
    reg.upsert(hb("b", lease=1.0))
    clock.now += 1.5
    assert sorted(i.instance_id for i in reg.expire()) == ["a", "b"]
    assert reg.silenced_at("a") == clock.now
    # Silence may have been a stall, not a death: the next heartbeat re-admits.
    assert reg.accepts("a")
    inst, new = reg.upsert(hb("a", lease=1.0))
    assert new and inst.inflight == 0 and [i.instance_id for i in reg.candidates("m")] == ["a"]
    # A goodbye is final: a heartbeat still in flight after it must not resurrect.
    reg.remove("a")
    assert not reg.accepts("a")


def test_lease_covers_the_observed_heartbeat_intervals() -> None:
    clock = Clock()
    reg = InstanceRegistry(clock)
    reg.upsert(hb("a", lease=3.0))
    for _ in range(3):  # beats 2 s apart: announced 3 s would flap; 3 intervals = 6 s
        clock.now += 2.0
        inst, _ = reg.upsert(hb("a", lease=3.0))
    assert inst.lease_s == pytest.approx(6.0)
    clock.now += 5.9
    assert reg.expire() == []
    clock.now += 0.2
    assert [i.instance_id for i in reg.expire()] == ["a"]


def test_observed_intervals_stretch_a_lease_boundedly_and_only_for_a_while() -> None:
    beats = BeatIntervals()
    t = 0.0
    for gap in (1.0, 1.0, 100.0):  # one long gap (a stalled host) ...
        beats.beat(t)
        t += gap
    beats.beat(t)
    assert beats.lease_s(3.0) == pytest.approx(MAX_STRETCH * 3.0), "never beyond MAX_STRETCH x announced"
    for _ in range(WINDOW):  # ... is forgotten after WINDOW regular beats
        t += 1.0
        beats.beat(t)
    assert beats.lease_s(3.0) == pytest.approx(3.0)
    burst = BeatIntervals()
    for _ in range(5):  # beats read late, all at once, do not shorten it below the announced lease
        burst.beat(10.0)
    assert burst.lease_s(3.0) == 3.0


def test_touch_renews_any_message_counts() -> None:
    clock = Clock()
    reg = InstanceRegistry(clock)
    reg.upsert(hb("a", lease=1.0))
    clock.now += 0.9
    reg.touch("a")
    clock.now += 0.9
    assert reg.expire() == []


def test_candidates_filter_model_state_role_and_unreachable() -> None:
    reg = InstanceRegistry(Clock())
    reg.upsert(hb("a"))
    reg.upsert(hb("b", model="other"))
    reg.upsert(hb("c", state="draining"))
    reg.upsert(hb("d", role="prefill"))
    reg.upsert(hb("e"))
    reg.mark_unreachable("e")
    assert [i.instance_id for i in reg.candidates("m")] == ["a"]
    reg.upsert(hb("e"))  # a heartbeat proves it alive again
    assert sorted(i.instance_id for i in reg.candidates("m")) == ["a", "e"]
    assert reg.models() == ["m", "other"]


def test_round_robin_cycles() -> None:
    insts = [Instance(hb(x), 0.0) for x in ("b", "a", "c")]
    rr = RoundRobin()
    assert [rr.choose(REQ, insts).instance_id for _ in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_least_loaded_prefers_fewer_pending_then_lower_kv() -> None:
    a = Instance(hb("a", running=5), 0.0)
    b = Instance(hb("b", running=1, waiting=1), 0.0)
    c = Instance(hb("c", running=2, kv=0.1), 0.0)
    assert LeastLoaded().choose(REQ, [a, b, c]).instance_id == "b"
    b.inflight = 3  # this gateway's own count is fresher than the heartbeat
    c.heartbeat = hb("c", running=2, kv=0.9)
    d = Instance(hb("d", running=2, kv=0.2), 0.0)
    assert LeastLoaded().choose(REQ, [a, b, c, d]).instance_id == "d"


def test_least_loaded_spreads_ties() -> None:
    insts = [Instance(hb(x), 0.0) for x in ("a", "b")]
    policy = LeastLoaded()
    assert {policy.choose(REQ, insts).instance_id for _ in range(4)} == {"a", "b"}


@given(
    st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=8)
)
def test_least_loaded_always_picks_a_minimum(loads: list[tuple[int, int, int]]) -> None:
    insts = []
    for i, (running, waiting, inflight) in enumerate(loads):
        inst = Instance(hb(f"i{i}", running=running, waiting=waiting), 0.0)
        inst.inflight = inflight
        insts.append(inst)
    chosen = LeastLoaded().choose(REQ, insts)
    assert chosen.pending == min(i.pending for i in insts)


def test_make_policy() -> None:
    assert isinstance(make_policy("least-loaded"), LeastLoaded)
    assert isinstance(make_policy("round-robin"), RoundRobin)
    with pytest.raises(ValueError, match="unknown router"):
        make_policy("cache-aware-someday")


def test_a_decode_instance_spreads_hand_offs_over_idle_prefill_instances() -> None:
    """Between heartbeats every prefill instance reports no load: ties rotate, and the
    decode instance's own hand-offs in flight count (the lowest id took every request
    before, so a second prefill replica sat idle)."""
    from rtpllm.serving.disagg_decode import choose_prefill

    a, b = Instance(hb("a", role="prefill"), 0.0), Instance(hb("b", role="prefill"), 0.0)
    assert {choose_prefill([a, b], turn).instance_id for turn in range(2)} == {"a", "b"}
    a.inflight = 1
    assert [choose_prefill([a, b], turn).instance_id for turn in range(4)] == ["b"] * 4
    busy = Instance(hb("c", role="prefill", running=3), 0.0)
    assert choose_prefill([busy, b], 0).instance_id == "b"
