"""Prometheus metrics (`GET /metrics`).

Request counters and latency histograms are updated by the server; engine gauges
(running/waiting, KV usage, prefix-cache hits) are read from `engine.stats()` at scrape
time, so the hot path never touches them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0)


class _EngineCollector(Collector):
    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Any]:
        try:
            s = self.engine.stats()
        except Exception:  # noqa: BLE001 - engine gone (shutdown): report nothing rather than fail the scrape
            return
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
        yield GaugeMetricFamily("dashchat_tensor_parallel_size", "Ranks sharing the model.", s.tensor_parallel_size)
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
    def __init__(self, engine: Any) -> None:
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
        r.register(_EngineCollector(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)
