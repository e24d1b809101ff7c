"""/metrics through prometheus_client: HTTP responses, request latency, masked PII, and the engine's
counters and gauges read at scrape time. Each server has its own registry (tests start several)."""

from collections import Counter

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ENGINE_COUNTERS = {
    "requests": "requests accepted by the engine",
    "prompt_tokens": "prompt tokens computed (not counting those reused from the prefix cache)",
    "generated_tokens": "tokens generated",
    "decode_steps": "batched decode steps",
    "decode_rows": "rows decoded, summed over steps (divided by decode_steps: the mean batch)",
    "prefill_chunks": "prefill forwards",
    "prefix_queries": "prompts long enough to look up in the prefix cache",
    "prefix_hits": "prompts that reused a cached prefix",
    "prefix_cached_tokens": "prompt tokens copied from the prefix cache instead of computed",
    "rejected_queue_full": "requests refused with 429",
    "engine_errors": "failures inside the engine (each ended the requests it touched)",
    "finished_stop": "requests that ended at the end of text or a stop string",
    "finished_length": "requests that ended at max_tokens",
    "finished_cancelled": "requests whose client left or whose stop string was seen",
    "finished_abort": "requests ended by a shutdown",
    "finished_error": "requests ended by an error",
}


class _EngineCollector:
    def __init__(self, server):
        self.server = server

    def collect(self):
        engine = self.server.engine
        stats = dict(engine.stats) if engine else {}
        for key, text in ENGINE_COUNTERS.items():
            family = CounterMetricFamily(f"neoxko_engine_{key}", text)
            family.add_metric([], stats.get(key, 0))
            yield family
        for name, text, value in (
                ("neoxko_running_requests", "requests holding a cache row", engine.busy_rows if engine else 0),
                ("neoxko_waiting_requests", "requests waiting for a row", engine.waiting.qsize() if engine else 0),
                ("neoxko_batch_rows", "cache rows for requests", engine.max_batch if engine else 0),
                ("neoxko_ready", "1 once the model is loaded", int(engine is not None))):
            yield GaugeMetricFamily(name, text, value=value)


class Metrics:
    def __init__(self, server):
        self.registry = CollectorRegistry()
        self.responses = PromCounter("neoxko_http_responses", "HTTP responses by route and status",
                                     ["path", "status"], registry=self.registry)
        self.latency = Histogram("neoxko_request_seconds", "completion and chat request latency, submit to end",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.pii = PromCounter("neoxko_pii_masked", "PII values masked in responses", ["label"],
                               registry=self.registry)
        for label in ("tel", "acc", "rrn"):
            self.pii.labels(label)
        self.registry.register(_EngineCollector(server))

    def response(self, path: str, status: int) -> None:
        self.responses.labels(path, str(status)).inc()

    def completed(self, seconds: float, masked: Counter) -> None:
        self.latency.observe(seconds)
        for label, count in masked.items():
            self.pii.labels(label).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)
