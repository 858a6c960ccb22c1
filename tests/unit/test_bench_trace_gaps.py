"""bench/trace_gaps.py: the GPU's idle time inside a window of a torch.profiler trace,
and the host ops the GPU waited on, on a hand-built trace whose answer is known."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import trace_gaps  # noqa: E402


def _x(cat: str, name: str, ts: float, dur: float, **args: int) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


def _trace() -> dict:
    # Window 0..1000 µs. Kernels: A 100-300, B 250-400 (overlaps A), C 700-900.
    # C's launch (correlation 3) is at 650, after a 500 µs host op that began at 350.
    return {
        "traceEvents": [
            _x("user_annotation", "timed", 0, 1000),
            _x("cpu_op", "prepare_inputs", 0, 90),
            _x("cpu_op", "slow_python", 350, 290),
            _x("cpu_op", "inner", 400, 100),  # nested in slow_python: not reported on its own
            _x("cuda_runtime", "cudaLaunchKernel", 95, 2, correlation=1),
            _x("cuda_runtime", "cudaLaunchKernel", 97, 2, correlation=2),
            _x("cuda_runtime", "cudaLaunchKernel", 650, 2, correlation=3),
            _x("kernel", "A", 100, 200, correlation=1),
            _x("kernel", "B", 250, 150, correlation=2),
            _x("kernel", "C", 700, 200, correlation=3),
            _x("kernel", "outside", 1500, 10, correlation=9),
        ]
    }


def test_busy_idle_lead_tail() -> None:
    s = trace_gaps.idle_gaps(_trace(), window="timed")
    assert s["window_ms"] == pytest.approx(1.0)
    assert s["gpu_busy_ms"] == pytest.approx(0.5)  # 100-400 and 700-900; overlap counted once
    assert s["gpu_idle_ms"] == pytest.approx(0.5)
    assert s["lead_ms"] == pytest.approx(0.1) and s["tail_ms"] == pytest.approx(0.1)
    assert s["gaps_over_min"] == 1 and s["gaps_over_min_ms"] == pytest.approx(0.3)


def test_gap_names_the_host_work_it_waited_on() -> None:
    (gap,) = trace_gaps.idle_gaps(_trace(), window="timed")["top_gaps"]
    assert gap["at_ms"] == pytest.approx(0.4) and gap["idle_ms"] == pytest.approx(0.3)
    assert gap["next_gpu"] == "C"
    assert gap["launched_after_gap_start_ms"] == pytest.approx(0.25)
    assert gap["host_ops"] == ["slow_python 0.240 ms"]  # the outer op, clipped to [400, 650]
    assert "idle 0.300 ms before C" in trace_gaps.format_gaps(trace_gaps.idle_gaps(_trace(), window="timed"))


def test_unknown_window_is_an_error() -> None:
    with pytest.raises(ValueError, match="no record_function span"):
        trace_gaps.idle_gaps(_trace(), window="missing")


def test_a_phase_label_is_the_outer_host_span() -> None:
    """The bench's record_function labels of engine phases count as host work, and the
    window's own label does not (it spans everything)."""
    trace = _trace()
    trace["traceEvents"].append(_x("user_annotation", "engine.execute", 340, 305))  # holds slow_python
    (gap,) = trace_gaps.idle_gaps(trace, window="timed")["top_gaps"]
    assert gap["host_ops"] == ["engine.execute 0.245 ms"]


def test_the_lead_names_its_phases_and_their_ops() -> None:
    """The lead (window start -> the first launch, at 95) is broken into its outermost
    host spans, each with its direct children and the self time left between them."""
    trace = _trace()
    trace["traceEvents"].append(_x("user_annotation", "engine.execute", 5, 95))  # overlaps prepare_inputs, not holding it
    trace["traceEvents"].append(_x("cpu_op", "aten::pin_memory", 92, 2))  # inside engine.execute only
    s = trace_gaps.idle_gaps(trace, window="timed")
    assert s["lead_host"] == [
        "prepare_inputs 0.090 ms [self 0.090]",  # equal lengths keep the trace's order
        "engine.execute 0.090 ms [aten::pin_memory 0.002, self 0.088]",
        "outside any span 0.000 ms",  # the two overlap (other threads): time is counted once
    ]
    assert "  lead: prepare_inputs 0.090 ms" in trace_gaps.format_gaps(s)


def test_the_lead_of_nested_phases() -> None:
    trace = _trace()
    trace["traceEvents"].append(_x("user_annotation", "engine.execute", 0, 98))  # holds prepare_inputs (0..90)
    s = trace_gaps.idle_gaps(trace, window="timed")
    assert s["lead_host"] == ["engine.execute 0.095 ms [prepare_inputs 0.090, self 0.005]", "outside any span 0.000 ms"]
