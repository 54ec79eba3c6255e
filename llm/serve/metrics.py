"""The server's Prometheus metrics (`GET /metrics`), in a registry of its own.

Latencies are observed by the server as its clients see them: time to first token,
inter-token latency and end-to-end latency per request. Requests are counted by endpoint
and HTTP status, and finished ones by finish reason. The engine's own counters and
gauges (tokens, running and waiting requests, KV pages, prefix-cache hits, preemptions,
speculative decoding's drafts and acceptances)
are read from `Engine.metrics()` at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0)


class _EngineCollector:
  def __init__(self, get_metrics):
    self._get = get_metrics

  def collect(self):
    m = self._get()
    if m is None:
      return
    for name, key, doc in (("prompt_tokens", "prompt_tokens", "Prompt tokens admitted"),
                           ("generation_tokens", "generation_tokens", "Tokens generated"),
                           ("preemptions", "preemptions", "Sequences preempted for pages"),
                           ("prefix_cache_queries", "prefix_cache_queried_tokens",
                            "Prompt tokens looked up in the prefix cache"),
                           ("prefix_cache_hits", "prefix_cache_hit_tokens",
                            "Prompt tokens found in the prefix cache"),
                           ("engine_steps", "steps", "Engine steps run"),
                           ("spec_decode_num_drafts", "spec_decode_num_drafts",
                            "Verification steps of a sequence that carried draft tokens"),
                           ("spec_decode_num_draft_tokens", "spec_decode_num_draft_tokens",
                            "Draft tokens proposed"),
                           ("spec_decode_num_accepted_tokens",
                            "spec_decode_num_accepted_tokens", "Draft tokens accepted")):
      c = CounterMetricFamily(f"llm_{name}", doc)
      c.add_metric([], m[key])
      yield c
    for name, value, doc in (
        ("requests_running", m["running"], "Requests running in the engine"),
        ("requests_waiting", m["waiting"], "Requests waiting for the engine"),
        ("kv_pages_used", m["pages_used"], "KV pages held by sequences"),
        ("kv_pages_free", m["pages_total"] - m["pages_used"],
         "KV pages free or holding an evictable cached prefix"),
        ("kv_pages_cached", m["pages_cached"], "KV pages holding a cached prefix"),
        ("prefix_cache_hit_rate", m["prefix_cache_hit_rate"],
         "Share of looked-up prompt tokens found in the prefix cache")):
      g = GaugeMetricFamily(f"llm_{name}", doc)
      g.add_metric([], value)
      yield g


class ServerMetrics:
  """Request counters and latency histograms, plus the engine's own numbers."""

  def __init__(self, engine_metrics):
    self.registry = CollectorRegistry()
    self.requests = Counter("llm_requests", "HTTP requests by endpoint and status",
                            ["endpoint", "status"], registry=self.registry)
    self.finished = Counter("llm_request_finish", "Generated choices by finish reason",
                            ["reason"], registry=self.registry)
    self.ttft = Histogram("llm_time_to_first_token_seconds", "Time to first token",
                          buckets=LATENCY_BUCKETS, registry=self.registry)
    self.itl = Histogram("llm_inter_token_latency_seconds", "Time between tokens",
                         buckets=LATENCY_BUCKETS, registry=self.registry)
    self.e2e = Histogram("llm_e2e_request_latency_seconds", "Request latency, end to end",
                         buckets=LATENCY_BUCKETS, registry=self.registry)
    self.registry.register(_EngineCollector(engine_metrics))

  def render(self) -> bytes:
    return generate_latest(self.registry)
