"""What the scheduler-side connector tells the workers each step."""

from dataclasses import dataclass, field

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass(frozen=True)
class LoadSpec:
    """Load cloud prompt tokens [start, end) of `prompt_id` into the request's blocks."""

    req_id: str
    prompt_id: str
    block_ids: tuple[int, ...]  # the request's block table (group 0)
    start: int  # first token to load (tokens before it were already in vLLM's prefix cache)
    end: int  # block-aligned end
    layers_per_message: int = 1  # the planner's choice (edge/planner.py): 1 layerwise, L bulk
    cloud_cold: bool = False  # the planner expected the cloud to compute it (for its estimates)

    def slot_mapping(self, block_size: int) -> torch.Tensor:
        """-> [end - start] int64 slots: block_ids[t // bs] * bs + t % bs."""
        t = torch.arange(self.start, self.end, dtype=torch.int64)
        blocks = torch.tensor(self.block_ids, dtype=torch.int64)[t // block_size]
        return blocks * block_size + t % block_size

    def loaded_block_ids(self, block_size: int) -> set[int]:
        return set(self.block_ids[self.start // block_size: self.end // block_size])


@dataclass
class EdgePromptMetadata(KVConnectorMetadata):
    loads: list[LoadSpec] = field(default_factory=list)
    # the step's work for the planner's edge-compute estimate: (new tokens, sum over requests
    # of new * (context before + new / 2)); None: not a prefill-sized step
    step_work: tuple[int, float] | None = None
