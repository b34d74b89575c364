"""EdgePromptConnector: vLLM's KV connector API (kv_consumer), translating to the two sides.

    LLM(model, kv_transfer_config={"kv_connector": "EdgePromptConnector",
        "kv_connector_module_path": "edgeprompt_vllm.edge.connector", "kv_role": "kv_consumer",
        "kv_load_failure_policy": "recompute",   # a failed layer is recomputed on the edge
        "kv_connector_extra_config": {...EdgePromptConfig...}})

Scheduler role: scheduler_side.py. Worker role: worker_side.py. Nothing is saved. A failed
cloud load is recomputed where vLLM can do that exactly, else its requests fail
(edge/failure_policy.py).

Freed KV blocks go back to vLLM's pool at once (`_free_blocks_at_once`): vLLM 0.26+ defers the
frees of every kv_consumer under async scheduling, which under KV pressure costs steps (and in
0.26 preempts whole tails of the running batch); our loads never need it.
"""

import sys
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.edge.failure_policy import recomputes_failures, settle_failure_policy
from edgeprompt_vllm.edge.metadata import EdgePromptMetadata
from edgeprompt_vllm.fingerprint import model_fingerprint
from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)


def edge_fingerprint(vllm_config):
    mc = vllm_config.model_config
    return model_fingerprint(mc.model, mc.dtype, vllm_config.cache_config.block_size,
                             str(vllm_config.load_config.load_format), mc.quantization)


class EdgePromptConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        config = EdgePromptConfig.from_vllm_config(vllm_config)
        fp, bs = edge_fingerprint(vllm_config), vllm_config.cache_config.block_size
        self._sched = self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from edgeprompt_vllm.edge.scheduler_side import SchedulerSide

            recompute = settle_failure_policy(vllm_config) == "recompute"
            self._sched = SchedulerSide(config, fp, bs, recompute_failures=recompute)
        else:
            from edgeprompt_vllm.edge.worker_side import WorkerSide

            self._worker = WorkerSide(config, fp, bs,
                                      recompute_failures=recomputes_failures(vllm_config))

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
    def bind_gpu_block_pool(self, gpu_block_pool) -> None:
        """vLLM's Scheduler calls this from its __init__, after it decided defer_block_free."""
        super().bind_gpu_block_pool(gpu_block_pool)
        if self._sched is not None:
            _free_blocks_at_once(self)

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


def _free_blocks_at_once(connector: EdgePromptConnector) -> bool:
    """Switches off the deferred block frees vLLM's Scheduler turns on for a kv_consumer with more
    than one batch in flight (async scheduling: vllm/v1/core/sched/scheduler.py, defer_block_free;
    vLLM PR 45357). Returns whether the scheduler was found.

    Why vLLM defers: with step N+1 already queued, a block freed after step N may be handed to a
    request whose KV a connector writes *out of stream order* (an RDMA write, an async load
    started at scheduling), racing step N+1's stale write. EdgePrompt's loads are synchronous
    (get_num_new_matched_tokens returns load_kv_async=False) and stream-ordered: on CUDA the side
    stream first waits on everything the compute stream has queued, which includes step N+1
    (cuda_loader.py, SideStream.begin at start_load_kv); on CPU each layer is written inside the
    forward. So the race cannot happen here, and the deferral only costs: a preempted request's
    blocks come back a step late, so under KV pressure vLLM 0.26's preemption loop preempts the
    whole tail of the running batch (it retries allocation after each victim, and none frees a
    block), vLLM >= PR 49675 stops scheduling at that request instead. Either way fewer requests
    run per step: on the throughput benchmark's workload ~5-8% more engine steps than the same
    engine without a connector (and in 0.26 ~60 preempted requests per such event).

    vLLM offers no argument for this, and the Scheduler sets defer_block_free after creating the
    connector, so it is undone here, from its bind call: the Scheduler is found up the stack as the
    object whose `connector` is this one."""
    frame = sys._getframe(1)
    try:
        for _ in range(6):
            if frame is None:
                break
            owner = frame.f_locals.get("self")
            if owner is not connector and getattr(owner, "connector", None) is connector \
                    and hasattr(owner, "defer_block_free"):
                if owner.defer_block_free and not getattr(owner, "deferred_frees", None):
                    owner.defer_block_free = False
                    logger.info("EdgePrompt: freed KV blocks return to vLLM's pool at once (its "
                                "loads are stream-ordered; no deferred frees)")
                return True
            frame = frame.f_back
    finally:
        del frame
    vc = getattr(connector, "_vllm_config", None)
    kvt = getattr(vc, "kv_transfer_config", None)
    if getattr(vc, "max_concurrent_batches", 1) > 1 and getattr(kvt, "is_kv_consumer", False):
        logger.warning("EdgePrompt: cannot find vLLM's scheduler to switch off its deferred KV "
                       "block frees; under KV pressure the engine may run fewer requests per step")
    return False
