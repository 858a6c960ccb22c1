"""The gateway's Prometheus metrics.

Counters and histograms are updated as requests run; gauges (queue depth, running
requests, per-instance KV usage and prefix hit ratio) are read at scrape time from the
admission controller and the instance registry, so a dropped instance disappears.

The core metrics also exist under vLLM's names (`vllm:*`, label `model_name`, and
`engine` for per-instance gauges), fed by the same observations: dashboards, alerts and
autoscalers built for vLLM read them unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from rtpllm.routing.instances import InstanceRegistry
from rtpllm.serving.admission import AdmissionController
from rtpllm.serving.vision_registry import VisionRegistry

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 20, 40, 80)
_ITL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2.5)


class _Fanout:
    """One observation into several metrics (rtpllm's and its vLLM alias); counters
    also keep their total, which the periodic stats line reads."""

    def __init__(self, *metrics: Any) -> None:
        self._metrics = metrics
        self.total = 0.0

    def observe(self, value: float) -> None:
        for m in self._metrics:
            m.observe(value)

    def inc(self, amount: float = 1.0) -> None:
        self.total += amount
        for m in self._metrics:
            m.inc(amount)


class GatewayMetrics:
    """All gateway metrics, in a registry of their own (several gateways may share a
    process in tests). `model`: the served model's name, vLLM's `model_name` label."""

    def __init__(
        self,
        admission: AdmissionController,
        instances: InstanceRegistry,
        visions: VisionRegistry | None = None,
        model: str = "",
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.model = model
        self.requests = Counter("rtpllm_requests", "Finished HTTP requests by endpoint and status code", ["endpoint", "status"], registry=r)

        def vllm_histogram(name: str, text: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(f"vllm:{name}", text, ["model_name"], buckets=buckets, registry=r).labels(model)

        self.ttft = _Fanout(
            Histogram("rtpllm_time_to_first_token_seconds", "Time from request arrival to its first token", buckets=_LATENCY_BUCKETS, registry=r),
            vllm_histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds (rtpllm: arrival at the gateway to first token)", _LATENCY_BUCKETS),
        )
        self.itl = _Fanout(
            Histogram("rtpllm_inter_token_latency_seconds", "Time between consecutive tokens of a request", buckets=_ITL_BUCKETS, registry=r),
            vllm_histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds", _ITL_BUCKETS),
            vllm_histogram("time_per_output_token_seconds", "Histogram of time per output token in seconds (the inter-token latencies)", _ITL_BUCKETS),
        )
        self.e2e = _Fanout(
            Histogram("rtpllm_e2e_request_latency_seconds", "Time from request arrival to its last token", buckets=_LATENCY_BUCKETS, registry=r),
            vllm_histogram("e2e_request_latency_seconds", "Histogram of end to end request latency in seconds", _LATENCY_BUCKETS),
        )
        self.prompt_tokens = _Fanout(
            Counter("rtpllm_prompt_tokens", "Prompt tokens of served requests", registry=r),
            Counter("vllm:prompt_tokens", "Number of prefill tokens processed", ["model_name"], registry=r).labels(model),
        )
        self.cached_tokens = _Fanout(Counter("rtpllm_cached_prompt_tokens", "Prompt tokens served from the prefix cache", registry=r))
        self.generation_tokens = _Fanout(
            Counter("rtpllm_generation_tokens", "Generated tokens", registry=r),
            Counter("vllm:generation_tokens", "Number of generation tokens processed", ["model_name"], registry=r).labels(model),
        )
        self._success = Counter("vllm:request_success", "Count of successfully processed sequences, by finish reason", ["model_name", "finished_reason"], registry=r)
        self.routing_decisions = Counter("rtpllm_routing_decisions", "Requests routed, by policy and reason (cache: a cached prefix decided; load: no prefix cached anywhere; skew: load overrode the cache)", ["policy", "reason"], registry=r)
        self.instances_lost = Counter("rtpllm_instances_lost", "Engine instances dropped, by reason", ["reason"], registry=r)
        r.register(_StateCollector(admission, instances))
        r.register(_ImageCollector(instances, visions))
        r.register(_VLLMStateCollector(instances, model))

    def finished(self, reason: str) -> None:
        """A sequence finished successfully (`stop`, `length`, ...)."""
        self._success.labels(self.model, reason).inc()


class _StateCollector(Collector):
    def __init__(self, admission: AdmissionController, instances: InstanceRegistry) -> None:
        self._admission = admission
        self._instances = instances

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("rtpllm_queue_depth", "Requests waiting for admission", value=self._admission.queued)
        yield GaugeMetricFamily("rtpllm_running_requests", "Requests admitted and not finished", value=self._admission.running)
        alive = GaugeMetricFamily("rtpllm_instances", "Live engine instances by model and state", labels=["model", "state"])
        kv = GaugeMetricFamily("rtpllm_kv_usage", "Fraction of KV blocks in use, per instance", labels=["instance", "model"])
        hit = GaugeMetricFamily("rtpllm_prefix_cache_hit_ratio", "Prefix-cache hit ratio (tokens), per instance", labels=["instance", "model"])
        running = GaugeMetricFamily("rtpllm_instance_running", "Sequences running in the engine, per instance", labels=["instance", "model"])
        waiting = GaugeMetricFamily("rtpllm_instance_waiting", "Sequences waiting in the engine, per instance", labels=["instance", "model"])
        prefills = CounterMetricFamily("rtpllm_prefills", "Prompts a decode instance prefilled locally, got from a prefill instance (remote), or redid after a failed remote prefill (fallback)", labels=["instance", "kind"])
        transfers = CounterMetricFamily("rtpllm_kv_transfers", "KV transfers completed, per instance (sent or received) and data-plane backend", labels=["instance", "backend"])
        failures = CounterMetricFamily("rtpllm_kv_transfer_failures", "KV transfers that failed (timeout, abort, checksum)", labels=["instance", "backend"])
        nbytes = CounterMetricFamily("rtpllm_kv_transfer_bytes", "KV bytes moved over the data plane", labels=["instance", "backend"])
        seconds = CounterMetricFamily("rtpllm_kv_transfer_seconds", "Seconds spent in KV transfers", labels=["instance", "backend"])
        tier_hits = CounterMetricFamily("rtpllm_kv_tier_hit_tokens", "Prompt tokens served from a KV tier instead of recomputed, per instance and tier (gpu, host, ssd, redis)", labels=["instance", "tier"])
        tier_ratio = GaugeMetricFamily("rtpllm_kv_tier_hit_ratio", "Share of looked-up prompt tokens served from each KV tier, per instance", labels=["instance", "tier"])
        spec_proposed = CounterMetricFamily("rtpllm_spec_proposed_tokens", "Speculative decoding: draft tokens verified, per instance", labels=["instance"])
        spec_accepted = CounterMetricFamily("rtpllm_spec_accepted_tokens", "Speculative decoding: draft tokens accepted, per instance", labels=["instance"])
        spec_lengths = HistogramMetricFamily("rtpllm_spec_acceptance_length", "Speculative decoding: draft tokens accepted per request-step that verified drafts, per instance", labels=["instance"])
        spec_k = CounterMetricFamily("rtpllm_spec_chosen_k", "Speculative decoding: draft lengths the adaptive policy chose (0: none), per instance and length", labels=["instance", "k"])
        counts: dict[tuple[str, str], int] = {}
        for inst in self._instances:
            hb = inst.heartbeat
            _add_spec_metrics(hb.instance_id, hb.load, spec_proposed, spec_accepted, spec_lengths, spec_k)
            for tier, tokens in hb.load.tier_hit_tokens.items():
                tier_hits.add_metric([hb.instance_id, tier], tokens)
                tier_ratio.add_metric([hb.instance_id, tier], tokens / hb.load.prefix_queried_tokens if hb.load.prefix_queried_tokens else 0.0)
            if hb.disagg is not None:
                d = hb.disagg
                for kind, value in (("local", d.local_prefills), ("remote", d.remote_prefills), ("fallback", d.remote_fallbacks)):
                    prefills.add_metric([hb.instance_id, kind], value)
                for backend, c in d.transfers.items():
                    transfers.add_metric([hb.instance_id, backend], c.transfers)
                    failures.add_metric([hb.instance_id, backend], c.failures)
                    nbytes.add_metric([hb.instance_id, backend], c.bytes)
                    seconds.add_metric([hb.instance_id, backend], c.seconds)
            key = (hb.model, hb.state)
            counts[key] = counts.get(key, 0) + 1
            labels = [hb.instance_id, hb.model]
            kv.add_metric(labels, hb.load.kv_usage)
            hit.add_metric(labels, hb.load.prefix_hit_ratio)
            running.add_metric(labels, hb.load.num_running)
            waiting.add_metric(labels, hb.load.num_waiting)
        for (model, state), n in counts.items():
            alive.add_metric([model, state], n)
        yield from (alive, kv, hit, running, waiting, prefills, transfers, failures, nbytes, seconds, tier_hits, tier_ratio)
        yield from (spec_proposed, spec_accepted, spec_lengths, spec_k)


def _add_spec_metrics(instance: str, load: Any, proposed: Any, accepted: Any, lengths: Any, chosen: Any) -> None:
    """An instance's speculative-decoding counters (none for an instance without them)."""
    if not load.spec_proposed_tokens and not load.spec_chosen_k:
        return
    proposed.add_metric([instance], load.spec_proposed_tokens)
    accepted.add_metric([instance], load.spec_accepted_tokens)
    hist = sorted(load.spec_acceptance_lengths.items())
    buckets, running = [], 0
    for length, n in hist:
        running += n
        buckets.append((str(float(length)), running))
    buckets.append(("+Inf", running))
    lengths.add_metric([instance], buckets, sum_value=float(sum(length * n for length, n in hist)))
    for k, n in sorted(load.spec_chosen_k.items()):
        chosen.add_metric([instance, str(k)], n)


class _VLLMStateCollector(Collector):
    """vLLM's engine gauges, one series per engine instance (label `engine`), from the
    instances' heartbeats."""

    def __init__(self, instances: InstanceRegistry, model: str) -> None:
        self._instances = instances
        self._model = model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed", labels=labels)
        kv = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage", labels=labels)
        gpu = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent usage (the older name of vllm:kv_cache_usage_perc)", labels=labels)
        for inst in self._instances:
            hb = inst.heartbeat
            if self._model and hb.model != self._model:
                continue
            series = [hb.model, hb.instance_id]
            running.add_metric(series, hb.load.num_running)
            waiting.add_metric(series, hb.load.num_waiting)
            kv.add_metric(series, hb.load.kv_usage)
            gpu.add_metric(series, hb.load.kv_usage)
        yield from (running, waiting, kv, gpu)


class _ImageCollector(Collector):
    """Image encoding: the vision services' counters (their heartbeats) and how each
    engine instance got its requests' embeddings."""

    def __init__(self, instances: InstanceRegistry, visions: VisionRegistry | None) -> None:
        self._instances = instances
        self._visions = visions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        images = CounterMetricFamily("rtpllm_images", "Images of requests per engine instance, by how their embeddings came: remote (a vision service), local (this engine's tower), fallback (requests the vision service failed, encoded by the engine)", labels=["instance", "path"])
        engine_encoded = CounterMetricFamily("rtpllm_engine_images_encoded", "Images an engine instance's own tower ran (images inside a prefix-cache hit are skipped)", labels=["instance"])
        for inst in self._instances:
            c = inst.heartbeat.images
            if c is None:
                continue
            iid = inst.heartbeat.instance_id
            for path, value in (("remote", c.remote), ("local", c.local), ("fallback", c.fallbacks)):
                images.add_metric([iid, path], value)
            engine_encoded.add_metric([iid], c.encoded_here)
        yield from (images, engine_encoded)
        if self._visions is None:
            return
        live = self._visions.live()
        alive = GaugeMetricFamily("rtpllm_vision_instances", "Live vision service instances by model", labels=["model"])
        encoded = CounterMetricFamily("rtpllm_vision_images_encoded", "Images a vision instance ran through its tower", labels=["instance"])
        hits = CounterMetricFamily("rtpllm_vision_cache_hits", "Images a vision instance found encoded, by cache (memory, tier: the kvstore's tiers)", labels=["instance", "cache"])
        misses = CounterMetricFamily("rtpllm_vision_cache_misses", "Images a vision instance found in no cache", labels=["instance"])
        seconds = CounterMetricFamily("rtpllm_vision_encode_seconds", "Seconds a vision instance's tower ran", labels=["instance"])
        batches = CounterMetricFamily("rtpllm_vision_batches", "Tower calls of a vision instance (images per second and per batch follow)", labels=["instance"])
        nbytes = CounterMetricFamily("rtpllm_vision_embedding_bytes", "Embedding bytes a vision instance shipped over the data plane", labels=["instance"])
        failures = CounterMetricFamily("rtpllm_vision_failures", "Encode requests a vision instance failed (not counting bad images)", labels=["instance"])
        queued = GaugeMetricFamily("rtpllm_vision_queued_images", "Images waiting for a vision instance's tower", labels=["instance"])
        models: dict[str, int] = {}
        for hb in live:
            c = hb.counters
            models[hb.model] = models.get(hb.model, 0) + 1
            encoded.add_metric([hb.instance_id], c.images_encoded)
            hits.add_metric([hb.instance_id, "memory"], c.memory_hits)
            hits.add_metric([hb.instance_id, "tier"], c.tier_hits)
            misses.add_metric([hb.instance_id], c.misses)
            seconds.add_metric([hb.instance_id], c.encode_seconds)
            batches.add_metric([hb.instance_id], c.batches)
            nbytes.add_metric([hb.instance_id], c.bytes_sent)
            failures.add_metric([hb.instance_id], c.failures)
            queued.add_metric([hb.instance_id], hb.queued_images)
        for model, n in models.items():
            alive.add_metric([model], n)
        yield from (alive, encoded, hits, misses, seconds, batches, nbytes, failures, queued)
