"""Prometheus metrics (`GET /metrics`).

Request counters and latency histograms are updated by the server; engine gauges
(running/waiting, KV usage, prefix-cache hits) are read from the loaded engines' `stats()` at scrape
time, so the hot path never touches them: unlabelled, the totals over the loaded models, and per
model under `dashchat_model_*{model="..."}` (with whether it is loaded, its loads and unloads).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dashchat.engine.types import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineCollector(Collector):
    """The loaded engines' gauges: unlabelled, the server's totals (as with one model); the
    `dashchat_model_*` families carry a `model` label, one series per served model."""

    def __init__(self, source: Any) -> None:
        # A model pool (the server), or an engine alone (engine tests and benches read its gauges).
        self.pool = source if hasattr(source, "entries") else None
        self.engine = None if self.pool is not None else source

    def _stats(self) -> dict[str, EngineStats]:
        engines = ([(e.name, e.served.engine) for e in self.pool.entries if e.served is not None]
                   if self.pool is not None else [("", self.engine)])
        out = {}
        for name, engine in engines:
            try:
                out[name] = engine.stats()
            except Exception:  # noqa: BLE001 - engine gone (shutdown): report nothing rather than fail the scrape
                continue
        return out

    def collect(self) -> Iterator[Any]:
        stats = self._stats()
        if stats:
            yield from _totals(EngineStats(**{f: sum(getattr(s, f) for s in stats.values()) for f in _FIELDS}),
                               max(s.tensor_parallel_size for s in stats.values()))
        if self.pool is not None:
            yield from self._per_model(stats)

    def _per_model(self, stats: dict[str, EngineStats]) -> Iterator[Any]:
        loaded = GaugeMetricFamily("dashchat_model_loaded", "1 while the model is loaded.", labels=["model"])
        leases = GaugeMetricFamily("dashchat_model_requests_in_flight", "Requests holding the model.",
                                   labels=["model"])
        loads = CounterMetricFamily("dashchat_model_loads", "Times the model was loaded.", labels=["model"])
        unloads = CounterMetricFamily("dashchat_model_unloads", "Times the model was unloaded, by reason.",
                                      labels=["model", "reason"])
        running = GaugeMetricFamily("dashchat_model_num_requests_running", "Sequences being generated.",
                                    labels=["model"])
        waiting = GaugeMetricFamily("dashchat_model_num_requests_waiting", "Requests waiting for admission.",
                                    labels=["model"])
        kv = GaugeMetricFamily("dashchat_model_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.",
                               labels=["model"])
        for entry in self.pool.entries:
            name = entry.name
            loaded.add_metric([name], 1.0 if entry.served is not None else 0.0)
            leases.add_metric([name], entry.refs)
            loads.add_metric([name], entry.loads)
            for reason, n in sorted(entry.unloads.items()):
                unloads.add_metric([name, reason], n)
            s = stats.get(name)
            if s is not None:
                running.add_metric([name], s.num_running)
                waiting.add_metric([name], s.num_waiting)
                kv.add_metric([name], s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        yield from (loaded, leases, loads, unloads, running, waiting, kv)


_FIELDS = [f for f in EngineStats.__dataclass_fields__ if f != "tensor_parallel_size"]


def _totals(s: EngineStats, tensor_parallel_size: int) -> Iterator[Any]:
    yield GaugeMetricFamily("dashchat_num_requests_running", "Sequences being generated.", s.num_running)
    yield GaugeMetricFamily("dashchat_num_requests_waiting", "Requests waiting for admission.", s.num_waiting)
    yield GaugeMetricFamily("dashchat_kv_cache_blocks_total", "KV-cache blocks in all.", s.kv_blocks_total)
    yield GaugeMetricFamily("dashchat_kv_cache_blocks_used", "KV-cache blocks in use.", s.kv_blocks_used)
    usage = s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0
    yield GaugeMetricFamily("dashchat_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", usage)
    hit = s.prefix_cache_hits / s.prefix_cache_queries if s.prefix_cache_queries else 0.0
    yield GaugeMetricFamily("dashchat_prefix_cache_hit_rate", "Prompt tokens found in the prefix cache.", hit)
    yield CounterMetricFamily("dashchat_prefix_cache_queries", "Prompt tokens looked up.", s.prefix_cache_queries)
    yield CounterMetricFamily("dashchat_prefix_cache_hits", "Prompt tokens found cached.", s.prefix_cache_hits)
    yield CounterMetricFamily("dashchat_num_preemptions", "Sequences preempted.", s.num_preemptions)
    yield GaugeMetricFamily("dashchat_tensor_parallel_size", "Ranks sharing the model.", tensor_parallel_size)
    yield CounterMetricFamily("dashchat_tensor_parallel_collective_seconds",
                              "Rank 0's host time in tensor-parallel collectives.", s.collective_seconds)
    yield CounterMetricFamily("dashchat_spec_decode_num_drafts",
                              "Speculative decoding: sequence steps that verified proposals.", s.spec_drafts)
    yield CounterMetricFamily("dashchat_spec_decode_num_draft_tokens", "Speculative decoding: tokens proposed.",
                              s.spec_draft_tokens)
    yield CounterMetricFamily("dashchat_spec_decode_num_accepted_tokens",
                              "Speculative decoding: proposed tokens the model kept.", s.spec_accepted_tokens)
    rate = s.spec_accepted_tokens / s.spec_draft_tokens if s.spec_draft_tokens else 0.0
    yield GaugeMetricFamily("dashchat_spec_decode_acceptance_rate",
                            "Speculative decoding: accepted / proposed tokens.", rate)


class Metrics:
    def __init__(self, source: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("dashchat_http_requests", "HTTP requests by route and status.",
                                ["route", "status"], registry=r)
        self.prompt_tokens = Counter("dashchat_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("dashchat_generation_tokens", "Tokens generated.", registry=r)
        self.aborted = Counter("dashchat_requests_aborted", "Generations ended early, by reason.",
                               ["reason"], registry=r)
        self.ttft = Histogram("dashchat_time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("dashchat_inter_token_latency_seconds", "Time between engine outputs.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("dashchat_e2e_request_latency_seconds", "Request latency, end to end.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.model_generation_tokens = Counter("dashchat_model_generation_tokens", "Tokens generated, by model.",
                                             ["model"], registry=r)
        r.register(_EngineCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)
