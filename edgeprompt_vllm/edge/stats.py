"""EdgePrompt's Prometheus metrics, through vLLM's own KV-connector stats path (no shared files).

    worker:    WorkerSide counts cloud bytes/layers, per-layer waits and relay groups per step
               -> KVConnectorOutput.kv_connector_stats (every step, with the model output)
    EngineCore: the scheduler aggregates them with SchedulerSide's hits / misses
               -> SchedulerStats.kv_connector_stats (a plain dict) -> the API server
    API server: vLLM's PrometheusStatLogger calls EdgePromptConnector.build_prom_metrics once and
               EdgePromptPromMetrics.observe(...) per update; /metrics serves them.

Names (all with labels model_name, engine):
    edgeprompt_cloud_kv_bytes_total              KV bytes received from the cloud
    edgeprompt_cloud_layers_received_total       (cloud prompt, layer) pieces received
    edgeprompt_cloud_layer_failures_total        pieces that failed (timeout, checksum, dead cloud)
    edgeprompt_cloud_loads_total                 load steps (a cloud prompt's KV into edge blocks)
    edgeprompt_cloud_loaded_tokens_total         cloud-prompt tokens written into edge blocks
    edgeprompt_layer_wait_seconds                histogram: a layer's forward waited for its KV
    edgeprompt_cloud_load_seconds                histogram: start of a load -> its last layer here
    edgeprompt_cloud_prompt_hits_total{kind}     requests served with cloud KV: loaded | cached
    edgeprompt_cloud_prompt_misses_total{reason} requests that named / matched a cloud prompt and
                                                 were computed on the edge: unknown_cloud_prompt |
                                                 prefix_mismatch | load_failed | planned_recompute |
                                                 cloud_unavailable | lora_adapter |
                                                 prefix_reuse_off
    edgeprompt_relay_groups_total                relay groups (requests sharing cloud blocks)
    edgeprompt_relay_groups_per_step             histogram: relay groups in one step
"""

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)

_COUNTERS = ("cloud_bytes", "cloud_layers", "layer_failures", "loads", "loaded_tokens",
             "hits_loaded", "hits_cached", "relay_groups")
_LISTS = ("layer_waits", "load_seconds", "relay_groups_per_step")
MISS_REASONS = {"unknown_cloud_prompt": "unknown_cloud_prompt",
                "prefix_mismatch": "prefix_mismatch", "load_failed_recomputed": "load_failed",
                "load_failed": "load_failed",  # the request failed (edge/failure_policy.py)
                "load_failed_recently": "load_failed_recently",  # computed here for a while
                "recompute": "planned_recompute",  # the planner chose to compute it on the edge
                "cloud_unavailable": "cloud_unavailable",  # a dead or stalled cloud
                "lora_adapter": "lora_adapter",  # the cloud's base-model KV does not fit an adapter
                "prefix_reuse_off": "prefix_reuse_off"}  # e.g. prompt logprobs: computed here
_MAX_LIST = 4096  # observations kept per list between two collections (bounded memory)


def _empty() -> dict[str, Any]:
    return {**{k: 0 for k in _COUNTERS}, **{k: [] for k in _LISTS}, "misses": {}}


@dataclass
class EdgePromptStats(KVConnectorStats):
    data: dict[str, Any] = field(default_factory=_empty)

    def __post_init__(self):
        full = _empty()
        full.update(self.data or {})
        self.data = full

    # -- recording (worker and scheduler) --
    def add(self, key: str, n: float = 1) -> None:
        self.data[key] += n

    def observe(self, key: str, value: float) -> None:
        if len(self.data[key]) < _MAX_LIST:
            self.data[key].append(value)

    def miss(self, reason: str) -> None:
        self.data["misses"][reason] = self.data["misses"].get(reason, 0) + 1

    def request_finished(self, status: dict | None) -> None:
        """SchedulerSide: one finished request's final EdgePrompt status."""
        s = (status or {}).get("status")
        if s == "loaded":
            self.add("hits_loaded")
        elif s == "cached":
            self.add("hits_cached")
        elif s in MISS_REASONS:
            self.miss(MISS_REASONS[s])

    # -- vLLM's KVConnectorStats API --
    def reset(self) -> None:
        self.data = _empty()

    def aggregate(self, other: KVConnectorStats) -> "EdgePromptStats":
        o = other.data if other is not None else {}
        for k in _COUNTERS:
            self.data[k] += o.get(k, 0)
        for k in _LISTS:
            self.data[k] = (self.data[k] + list(o.get(k, [])))[:_MAX_LIST]
        for r, n in o.get("misses", {}).items():
            self.data["misses"][r] = self.data["misses"].get(r, 0) + n
        return self

    def reduce(self) -> dict[str, int | float]:
        waits = self.data["layer_waits"]
        return {"cloud_kv_bytes": self.data["cloud_bytes"], "cloud_layers": self.data["cloud_layers"],
                "avg_layer_wait_ms": round(1e3 * sum(waits) / len(waits), 3) if waits else 0.0,
                "hits_loaded": self.data["hits_loaded"], "hits_cached": self.data["hits_cached"],
                "misses": sum(self.data["misses"].values()), "relay_groups": self.data["relay_groups"]}

    def is_empty(self) -> bool:
        return not (any(self.data[k] for k in _COUNTERS) or any(self.data[k] for k in _LISTS)
                    or self.data["misses"])

    def to_dict(self) -> dict[str, Any]:
        return self.data


_CREATED: list = []  # our collectors in this process: a second logger replaces them


def _forget_previous() -> None:
    from prometheus_client import REGISTRY

    while _CREATED:
        try:
            REGISTRY.unregister(_CREATED.pop())
        except KeyError:  # not in the default registry (e.g. Ray's metric wrappers)
            pass


_COUNTER_DOCS = {  # stats key -> (Prometheus name, help); counters get "_total"
    "cloud_bytes": ("edgeprompt_cloud_kv_bytes", "KV bytes received from the cloud."),
    "cloud_layers": ("edgeprompt_cloud_layers_received",
                     "Cloud prompt layers received (one per cloud prompt and layer)."),
    "layer_failures": ("edgeprompt_cloud_layer_failures",
                       "Cloud prompt layers that failed to load (recomputed on the edge)."),
    "loads": ("edgeprompt_cloud_loads", "Cloud prompt loads into edge KV blocks."),
    "loaded_tokens": ("edgeprompt_cloud_loaded_tokens",
                      "Cloud prompt tokens whose KV came from the cloud."),
    "relay_groups": ("edgeprompt_relay_groups",
                     "Relay attention groups (requests sharing cloud blocks), over steps."),
}
_WAIT_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                 2.5, 5.0, 10.0, 30.0)
_GROUP_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64)
_HISTOGRAM_DOCS = {
    "layer_waits": ("edgeprompt_layer_wait_seconds",
                    "Time a layer's forward waited for its cloud KV.", _WAIT_BUCKETS),
    "load_seconds": ("edgeprompt_cloud_load_seconds",
                     "From the start of a load to its last layer on the edge.", _WAIT_BUCKETS),
    "relay_groups_per_step": ("edgeprompt_relay_groups_per_step",
                              "Relay attention groups in one step (relay selected).", _GROUP_BUCKETS),
}


class EdgePromptPromMetrics(KVConnectorPromMetrics):
    """Lives in the API server; made by EdgePromptConnector.build_prom_metrics."""

    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._labels = list(labelnames)
        _forget_previous()

        def per_engine(cls, name, doc, extra_label=None, values=(), **kw):
            names = self._labels + ([extra_label] if extra_label else [])
            metric = cls(name=name, documentation=doc, labelnames=names, **kw)
            _CREATED.append(metric)
            if extra_label is None:
                return {i: metric.labels(*lv) for i, lv in per_engine_labelvalues.items()}
            return {i: {v: metric.labels(*lv, v) for v in values}
                    for i, lv in per_engine_labelvalues.items()}

        C, H = self._counter_cls, self._histogram_cls
        self.counters = {key: per_engine(C, name, doc) for key, (name, doc) in _COUNTER_DOCS.items()}
        self.hits = per_engine(C, "edgeprompt_cloud_prompt_hits",
                               "Requests served with cloud KV: loaded from the cloud, or cached "
                               "on the edge.", "kind", ("loaded", "cached"))
        self.misses = per_engine(C, "edgeprompt_cloud_prompt_misses",
                                 "Requests naming or matching a cloud prompt that were computed "
                                 "on the edge.", "reason", tuple(sorted(set(MISS_REASONS.values()))))
        self.hists = {key: per_engine(H, name, doc, buckets=list(buckets))
                      for key, (name, doc, buckets) in _HISTOGRAM_DOCS.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0):
        d = EdgePromptStats(data=dict(transfer_stats_data)).data
        for key, metric in self.counters.items():
            if d[key]:
                metric[engine_idx].inc(d[key])
        if d["hits_loaded"]:
            self.hits[engine_idx]["loaded"].inc(d["hits_loaded"])
        if d["hits_cached"]:
            self.hits[engine_idx]["cached"].inc(d["hits_cached"])
        for reason, n in d["misses"].items():
            if reason in self.misses[engine_idx]:
                self.misses[engine_idx][reason].inc(n)
        for key, hist in self.hists.items():
            for v in d[key]:
                hist[engine_idx].observe(v)
