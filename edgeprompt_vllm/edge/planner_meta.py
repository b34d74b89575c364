"""The worker -> scheduler channel of the planner's measurements (vLLM's KV connector worker
metadata: KVConnectorOutput.kv_connector_worker_meta, handed to the scheduler-side connector's
update_connector_output every step it is set). vLLM runs the worker in another process than the
scheduler (MultiprocExecutor, also for one worker on CPU), so the measurements must travel.

Where a vLLM lacks that channel, the worker feeds its own process's planner directly (right
where scheduler and worker share a process, as vLLM's UniProcExecutor).
"""

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1 import base

HAS_WORKER_META = hasattr(base, "KVConnectorWorkerMetadata") and hasattr(
    base.KVConnectorBase_V1, "build_connector_worker_meta")
_Base = getattr(base, "KVConnectorWorkerMetadata", object)


@dataclass
class PlannerObservations(_Base):
    steps: list[dict] = field(default_factory=list)  # planner.step_observation(...) dicts

    def aggregate(self, other: "PlannerObservations") -> "PlannerObservations":
        return self  # every worker ran the same step: one worker's clock is enough
