"""One validated `EdgePromptConfig`, read from vLLM's `kv_connector_extra_config`.

    --kv-transfer-config '{"kv_connector": "EdgePromptConnector",
        "kv_connector_module_path": "edgeprompt_vllm.edge.connector", "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"ray_address": "10.0.0.5:6379", "namespace": "edgeprompt"}}'
"""

from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_NAMESPACE = "edgeprompt"
STRATEGIES = ("auto", "layerwise", "grouped", "bulk", "recompute")  # edge/planner.py
DEFAULT_ACTOR_NAME = "edgeprompt-cloud"
TRANSPORTS = ("auto", "pair", "object_store")


@dataclass(frozen=True, slots=True)
class EdgePromptConfig:
    ray_address: str | None = None  # GCS address "host:port"; None: "auto" (the local cluster)
    namespace: str = DEFAULT_NAMESPACE  # Ray namespace of the cloud actor
    actor_name: str = DEFAULT_ACTOR_NAME  # the named, detached CloudPromptService
    connect_timeout_s: float = 60.0  # finding the actor + handshake
    fetch_timeout_s: float = 60.0  # one layer, cloud compute included; then recompute on the edge
    # after a load of a cloud prompt failed (checksum, timeout), its requests compute it on the
    # edge this long: a prompt corrupted in the cloud's store fails one load, not every one
    failed_prompt_retry_s: float = 10.0
    min_prefix_blocks: int = 1  # shorter matches are computed on the edge
    emulated_layer_delay_s: float = 0.0  # tests/benchmarks: a serial link adds this per layer
    timeline_path: str | None = None  # append one JSON line per load (per-layer timeline)
    audit_path: str | None = None  # append every call the edge sends toward the cloud
    # --- the communication-model planner (edge/planner.py) and the wire ---
    strategy: str = "auto"  # auto | layerwise | grouped | bulk | recompute (per request:
    #                         kv_transfer_params["strategy"] overrides it)
    layers_per_message: int = 0  # grouped: layers per message; 0: the planner picks
    wire_codec: str = "none"  # none | zstd (lossless) | fp8 (lossy: only when asked here)
    planner_ewma: float = 0.3  # weight of a new measurement in the planner's estimates
    planner_min_gain_s: float = 0.01  # auto leaves layer-wise only for a predicted gain of at
    #                                   least this and 5% of T (noise must not flip strategies)
    emulated_rtt_s: float = 0.0  # tests/benchmarks: an EMULATED round trip added per message
    emulated_link_path: str | None = None  # tests/benchmarks: JSON {"rtt_s", "layer_delay_s"},
    #                                        re-read while it changes (a running engine's link)
    ray_node_ip: str | None = None  # this edge's Ray node, where one host runs several nodes
    # The API server (serving/middleware.py), for a request naming a cloud prompt while the cloud
    # does not answer: "recompute" serves it, the edge computing the cloud prompt itself (it knows
    # its text and tokens from the last registry it saw); "error" answers HTTP 503.
    on_cloud_unavailable: str = "recompute"
    health_timeout_s: float = 5.0  # the API server's registry refresh / health check
    # How layers travel (transport/pair_link.py): "auto" uses the GPU-pair channel (NCCL, cloud
    # GPU -> edge GPU) when the edge's KV cache and the cloud are on two different GPUs, else
    # the object store; "pair" asks for the pair channel (gloo between CPUs: tests);
    # "object_store" never pairs.
    transport: str = "auto"

    def __post_init__(self):
        for name in ("connect_timeout_s", "fetch_timeout_s", "health_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EdgePromptConfig.{name} must be > 0, not {getattr(self, name)!r}")
        if self.failed_prompt_retry_s < 0:
            raise ValueError("EdgePromptConfig.failed_prompt_retry_s must be >= 0")
        if self.emulated_layer_delay_s < 0:
            raise ValueError("EdgePromptConfig.emulated_layer_delay_s must be >= 0")
        if self.min_prefix_blocks < 1:
            raise ValueError("EdgePromptConfig.min_prefix_blocks must be >= 1")
        if self.on_cloud_unavailable not in ("recompute", "error"):
            raise ValueError("EdgePromptConfig.on_cloud_unavailable must be 'recompute' or 'error', "
                             f"not {self.on_cloud_unavailable!r}")
        if not self.namespace or not self.actor_name:
            raise ValueError("EdgePromptConfig.namespace and actor_name must be non-empty")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"EdgePromptConfig.strategy must be one of {list(STRATEGIES)}, "
                             f"not {self.strategy!r}")
        if self.layers_per_message < 0:
            raise ValueError("EdgePromptConfig.layers_per_message must be >= 0 (0: the planner picks)")
        from edgeprompt_vllm.transport.codecs import CODECS

        if self.wire_codec not in CODECS:
            raise ValueError(f"EdgePromptConfig.wire_codec must be one of {list(CODECS)}, "
                             f"not {self.wire_codec!r}")
        if not 0 < self.planner_ewma <= 1:
            raise ValueError("EdgePromptConfig.planner_ewma must be in (0, 1]")
        if self.planner_min_gain_s < 0:
            raise ValueError("EdgePromptConfig.planner_min_gain_s must be >= 0")
        if self.emulated_rtt_s < 0:
            raise ValueError("EdgePromptConfig.emulated_rtt_s must be >= 0")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"EdgePromptConfig.transport must be one of {list(TRANSPORTS)}, "
                             f"not {self.transport!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "EdgePromptConfig":
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"unknown EdgePrompt option(s) {unknown}; known: {sorted(known)}")
        return cls(**raw)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "EdgePromptConfig":
        return cls.from_dict(vllm_config.kv_transfer_config.kv_connector_extra_config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
