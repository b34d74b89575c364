"""One validated `EdgePromptConfig`, read from vLLM's `kv_connector_extra_config`.

    --kv-transfer-config '{"kv_connector": "EdgePromptConnector",
        "kv_connector_module_path": "edgeprompt_vllm.edge.connector", "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"ray_address": "10.0.0.5:6379", "namespace": "edgeprompt"}}'
"""

from dataclasses import asdict, dataclass, fields
from typing import Any

DEFAULT_NAMESPACE = "edgeprompt"
DEFAULT_ACTOR_NAME = "edgeprompt-cloud"


@dataclass(frozen=True, slots=True)
class EdgePromptConfig:
    ray_address: str | None = None  # GCS address "host:port"; None: "auto" (the local cluster)
    namespace: str = DEFAULT_NAMESPACE  # Ray namespace of the cloud actor
    actor_name: str = DEFAULT_ACTOR_NAME  # the named, detached CloudPromptService
    connect_timeout_s: float = 60.0  # finding the actor + handshake
    fetch_timeout_s: float = 60.0  # one layer, cloud compute included; then recompute on the edge
    min_prefix_blocks: int = 1  # shorter matches are computed on the edge
    emulated_layer_delay_s: float = 0.0  # tests/benchmarks: a serial link adds this per layer
    timeline_path: str | None = None  # append one JSON line per load (per-layer timeline)
    audit_path: str | None = None  # append every call the edge sends toward the cloud

    def __post_init__(self):
        for name in ("connect_timeout_s", "fetch_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EdgePromptConfig.{name} must be > 0, not {getattr(self, name)!r}")
        if self.emulated_layer_delay_s < 0:
            raise ValueError("EdgePromptConfig.emulated_layer_delay_s must be >= 0")
        if self.min_prefix_blocks < 1:
            raise ValueError("EdgePromptConfig.min_prefix_blocks must be >= 1")
        if not self.namespace or not self.actor_name:
            raise ValueError("EdgePromptConfig.namespace and actor_name must be non-empty")

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
