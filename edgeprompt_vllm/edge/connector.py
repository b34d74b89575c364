"""EdgePromptConnector: vLLM's KV connector API (kv_consumer), translating to the two sides.

    LLM(model, kv_transfer_config={"kv_connector": "EdgePromptConnector",
        "kv_connector_module_path": "edgeprompt_vllm.edge.connector", "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute",   # a failed layer is recomputed on the edge
        "kv_connector_extra_config": {...EdgePromptConfig...}})

Scheduler role: scheduler_side.py. Worker role: worker_side.py. Nothing is saved.
"""

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.edge.metadata import EdgePromptMetadata
from edgeprompt_vllm.fingerprint import model_fingerprint


def edge_fingerprint(vllm_config):
    mc = vllm_config.model_config
    return model_fingerprint(mc.model, mc.dtype, vllm_config.cache_config.block_size,
                             str(vllm_config.load_config.load_format))


class EdgePromptConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = EdgePromptConfig.from_vllm_config(vllm_config)
        fp, bs = edge_fingerprint(vllm_config), vllm_config.cache_config.block_size
        self._sched = self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from edgeprompt_vllm.edge.scheduler_side import SchedulerSide

            self._sched = SchedulerSide(config, fp, bs)
        else:
            from edgeprompt_vllm.edge.worker_side import WorkerSide

            self._worker = WorkerSide(config, fp, bs)

    # ==================== worker side ====================
    def register_kv_caches(self, kv_caches) -> None:
        self._worker.register_kv_caches(kv_caches)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, EdgePromptMetadata)
        if forward_context.attn_metadata is None and not meta.loads:
            return
        self._worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs: Any) -> None:
        return  # a consumer: nothing goes from the edge to the cloud

    def wait_for_save(self) -> None:
        self._worker.wait_for_save()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.take_invalid_block_ids()

    def build_connector_worker_meta(self):
        """The planner's measurements of this step -> the scheduler side (planner_meta.py)."""
        return self._worker.take_planner_observations()

    # ==================== scheduler side ====================
    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self._sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        self._sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output) -> KVConnectorMetadata:
        return self._sched.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output) -> None:
        self._sched.update_connector_output(connector_output)

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        return self._sched.request_finished(request, block_ids)

    # ==================== metrics (both sides; edge/stats.py) ====================
    def get_kv_connector_stats(self):
        side = self._sched if self._sched is not None else self._worker
        return side.take_stats()

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        from edgeprompt_vllm.edge.stats import EdgePromptStats

        return EdgePromptStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        from edgeprompt_vllm.edge.stats import EdgePromptPromMetrics

        return EdgePromptPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
