"""Speculative decoding's switches and reports: CLI flags and environment variables to
EngineConfig, the per-request field across the API and the wire, the heartbeat's
counters to Prometheus metrics."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from rtpllm.cli import build_parser
from rtpllm.cli.serve import worker_settings
from rtpllm.config import SpeculativeConfig
from rtpllm.protocol.convert import params_from_spec, spec_from_params
from rtpllm.protocol.messages import InstanceLoad, SamplingSpec, decode, encode
from rtpllm.sampling_params import SamplingParams
from rtpllm.serving.metrics import _add_spec_metrics


def engine_of(*flags: str) -> SpeculativeConfig:
    args = build_parser().parse_args(["serve", "worker", "--device", "cpu", *flags])
    return worker_settings(args).engine.speculative


def test_off_by_default_and_switched_by_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not engine_of().enabled
    spec = engine_of("--speculative", "suffix", "--num-speculative-tokens", "6", "--no-speculative-adaptive")
    assert (spec.method, spec.num_speculative_tokens, spec.adaptive) == ("suffix", 6, False)
    monkeypatch.setenv("RTPLLM_SPECULATIVE", "ngram")
    assert engine_of().method == "ngram"
    with pytest.raises(SystemExit):
        engine_of("--speculative", "eagle")
    with pytest.raises(SystemExit):
        engine_of("--speculative", "ngram", "--num-speculative-tokens", "0")


def test_config_validates() -> None:
    with pytest.raises(ValueError, match="method"):
        SpeculativeConfig(method="draft")
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(method="ngram", num_speculative_tokens=33)


def test_per_request_switch_crosses_the_wire() -> None:
    params = SamplingParams(speculative=False)
    wire = decode(encode(spec_from_params(params)), SamplingSpec)
    assert params_from_spec(wire).speculative is False
    assert params_from_spec(decode(encode(spec_from_params(SamplingParams())), SamplingSpec)).speculative is True
    with pytest.raises(ValueError, match="speculative"):
        SamplingParams(speculative="no")  # type: ignore[arg-type]


def test_heartbeat_counters_become_metrics() -> None:
    load = InstanceLoad(spec_proposed_tokens=10, spec_accepted_tokens=6, spec_acceptance_lengths={0: 1, 2: 1, 4: 1}, spec_chosen_k={0: 2, 4: 3})
    load = decode(encode(load), InstanceLoad)  # survives the heartbeat's encoding

    class One(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            fams = (
                CounterMetricFamily("rtpllm_spec_proposed_tokens", "p", labels=["instance"]),
                CounterMetricFamily("rtpllm_spec_accepted_tokens", "a", labels=["instance"]),
                HistogramMetricFamily("rtpllm_spec_acceptance_length", "h", labels=["instance"]),
                CounterMetricFamily("rtpllm_spec_chosen_k", "k", labels=["instance", "k"]),
            )
            _add_spec_metrics("d0", load, *fams)
            _add_spec_metrics("d1", InstanceLoad(), *fams)  # no speculation: no series
            yield from fams

    registry = CollectorRegistry()
    registry.register(One())
    text = generate_latest(registry).decode()
    assert 'rtpllm_spec_proposed_tokens_total{instance="d0"} 10.0' in text
    assert 'rtpllm_spec_accepted_tokens_total{instance="d0"} 6.0' in text
    assert 'rtpllm_spec_acceptance_length_bucket{instance="d0",le="2.0"} 2.0' in text
    assert 'rtpllm_spec_acceptance_length_sum{instance="d0"} 6.0' in text
    assert 'rtpllm_spec_chosen_k_total{instance="d0",k="4"} 3.0' in text
    assert 'instance="d1"' not in text
