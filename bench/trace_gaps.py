"""Where the GPU sat idle in a torch.profiler trace, and what the host was doing then.

A step whose wall time exceeds its kernels' time left the GPU idle: the host had not yet
launched the next kernel (Python, scheduling, a blocking copy or sync). The kernel tables
(`key_averages`) cannot say where: this reads the exported Chrome trace instead and
reports, inside a window (a `record_function` label, or the whole trace):

  - the window's wall time, the GPU's busy time (union of kernels, copies and memsets)
    and idle time;
  - the lead (window start -> first GPU work) and tail (last GPU work -> window end), and
    the host work in the lead up to the first launch: the outermost host spans, each with
    its largest direct children and its self time (Python between torch ops), and the
    window's own self time;
  - the longest idle gaps between GPU work, each with the next GPU work's name, when the
    host launched it, and the outermost host spans (torch ops, and `record_function`
    labels other than the window's) that ran between the gap's start and that launch:
    the host work the GPU waited for.

Usage: python bench/trace_gaps.py TRACE.json [--window LABEL] [--top N]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


@dataclass(frozen=True)
class Span:
    name: str
    start: float  # µs, the trace's clock
    end: float
    correlation: int | None = None


def _spans(events: list[dict[str, Any]], categories: set[str]) -> list[Span]:
    out = []
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in categories:
            start = float(e["ts"])
            out.append(Span(e.get("name", "?"), start, start + float(e.get("dur", 0.0)), (e.get("args") or {}).get("correlation")))
    return sorted(out, key=lambda s: s.start)


def _window(events: list[dict[str, Any]], label: str | None) -> tuple[float, float]:
    if label is not None:
        marks = [s for s in _spans(events, {"user_annotation"}) if s.name == label]
        if not marks:
            raise ValueError(f"no record_function span named {label!r} in the trace")
        return marks[0].start, marks[-1].end
    host = _spans(events, {"cpu_op", "cuda_runtime", "user_annotation"})
    if not host:
        raise ValueError("the trace has no host events")
    return host[0].start, max(s.end for s in host)


def _outermost(spans: list[Span]) -> list[Span]:
    """The spans no other span of the list holds."""
    return [o for o in spans if not any(p is not o and p.start <= o.start and o.end <= p.end for p in spans)]


def idle_gaps(trace: dict[str, Any], window: str | None = None, top: int = 10, min_gap_us: float = 20.0) -> dict[str, Any]:
    """The summary described in the module docstring, times in ms."""
    events = trace.get("traceEvents", [])
    w0, w1 = _window(events, window)
    gpu = [s for s in _spans(events, GPU_CATEGORIES) if s.end > w0 and s.start < w1]
    launches = {s.correlation: s for s in _spans(events, {"cuda_runtime"}) if s.correlation is not None}
    # Host work: torch ops, and record_function labels other than the window's own (the
    # bench labels the engine's phases: schedule, execute, finish).
    host_ops = [s for s in _spans(events, {"cpu_op", "user_annotation"}) if w0 <= s.start <= w1 and s.name != window]
    busy = 0.0
    gaps: list[tuple[float, float, Span]] = []
    edge = w0
    for s in gpu:
        start = max(s.start, w0)
        if start - edge >= min_gap_us and edge > w0:
            gaps.append((edge, start, s))
        if s.end > edge:
            busy += s.end - max(start, edge)
            edge = s.end
    first = gpu[0].start if gpu else w1
    last = edge if gpu else w0

    def explain(gap_start: float, nxt: Span) -> dict[str, Any]:
        launch = launches.get(nxt.correlation)
        until = launch.start if launch is not None else nxt.start
        # The outermost host ops in [gap start, launch]: the host work the GPU waited on.
        outer = _outermost([o for o in host_ops if o.end > gap_start and o.start < until])
        outer.sort(key=lambda o: min(o.end, until) - max(o.start, gap_start), reverse=True)
        return {
            "next_gpu": nxt.name[:80],
            "launched_after_gap_start_ms": (until - gap_start) / 1e3,
            "host_ops": [f"{o.name[:60]} {(min(o.end, until) - max(o.start, gap_start)) / 1e3:.3f} ms" for o in outer[:4]],
        }

    def lead_work() -> list[str]:
        """The host spans of the lead (window start -> the first GPU work's launch), one
        level of children deep: which phase, and which ops inside it, delayed the GPU."""
        if not gpu:
            return []
        launch = launches.get(gpu[0].correlation)
        until = launch.start if launch is not None else gpu[0].start

        def clip(o: Span) -> float:
            return max(0.0, min(o.end, until) - max(o.start, w0))

        inside = [o for o in host_ops if o.end > w0 and o.start < until]
        outer = sorted(_outermost(inside), key=clip, reverse=True)
        lines = []
        for o in outer[:4]:
            kids = sorted(_outermost([c for c in inside if c is not o and o.start <= c.start and c.end <= o.end]), key=clip, reverse=True)
            own = clip(o) - sum(clip(c) for c in kids)
            parts = [f"{c.name[:40]} {clip(c) / 1e3:.3f}" for c in kids[:4]] + [f"self {own / 1e3:.3f}"]
            lines.append(f"{o.name[:60]} {clip(o) / 1e3:.3f} ms [{', '.join(parts)}]")
        covered, edge = 0.0, w0  # the union of the outer spans (other threads' may overlap)
        for o in sorted(outer, key=lambda o: o.start):
            lo, hi = max(o.start, edge), min(o.end, until)
            covered += max(0.0, hi - lo)
            edge = max(edge, hi)
        lines.append(f"outside any span {(until - w0 - covered) / 1e3:.3f} ms")
        return lines

    gaps.sort(key=lambda g: g[1] - g[0], reverse=True)
    return {
        "window_ms": (w1 - w0) / 1e3,
        "gpu_busy_ms": busy / 1e3,
        "gpu_idle_ms": (w1 - w0 - busy) / 1e3,
        "lead_ms": (first - w0) / 1e3,
        "tail_ms": (w1 - last) / 1e3,
        "lead_host": lead_work(),
        "gaps_over_min": len(gaps),
        "gaps_over_min_ms": sum(b - a for a, b, _ in gaps) / 1e3,
        "top_gaps": [{"at_ms": (a - w0) / 1e3, "idle_ms": (b - a) / 1e3, **explain(a, nxt)} for a, b, nxt in gaps[:top]],
    }


def format_gaps(summary: dict[str, Any]) -> str:
    lines = [
        f"window {summary['window_ms']:.2f} ms: GPU busy {summary['gpu_busy_ms']:.2f}, idle {summary['gpu_idle_ms']:.2f} "
        f"(lead {summary['lead_ms']:.2f}, tail {summary['tail_ms']:.2f}, {summary['gaps_over_min']} gaps inside "
        f"{summary['gaps_over_min_ms']:.2f})"
    ]
    lines += [f"  lead: {line}" for line in summary.get("lead_host", [])]
    for g in summary["top_gaps"]:
        lines.append(
            f"  at {g['at_ms']:8.2f} ms idle {g['idle_ms']:.3f} ms before {g['next_gpu']} "
            f"(launched {g['launched_after_gap_start_ms']:.3f} ms in): {'; '.join(g['host_ops'])}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace", type=Path)
    ap.add_argument("--window", default=None, help="a record_function label bounding the analysis")
    ap.add_argument("--top", type=int, default=10)
    args = ap.parse_args()
    print(format_gaps(idle_gaps(json.loads(args.trace.read_text()), args.window, args.top)))


if __name__ == "__main__":
    main()
