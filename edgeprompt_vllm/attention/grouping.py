"""Find the relay groups of a batch: requests whose block tables start with the same blocks.

vLLM's prefix cache (and the EdgePrompt connector, whose loaded cloud blocks become prefix-cache
blocks) gives requests with a common token prefix the *same physical blocks* at the start of
their block tables. Requests whose first block is the same form a group; its shared prefix is
the run of leading columns equal in every row, capped so that every query token of the group
sits after it (then the prefix pass needs no causal mask):

    request r:  |<-- context: seq_len - query_len -->|<- query ->|
                |<-- shared prefix (whole blocks) -->|
"""

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from edgeprompt_vllm.kernels.cost_model import GroupShape


@dataclass(frozen=True)
class RelayPlan:
    order: list[int]  # the batch's requests, reordered so that each group is contiguous
    groups: list[tuple[int, int, int]]  # (start, end, prefix_len) over positions in `order`

    @property
    def is_identity(self) -> bool:
        return self.order == list(range(len(self.order)))


def find_groups(block_table: np.ndarray, seq_lens: np.ndarray, query_lens: np.ndarray,
                block_size: int, min_group_size: int = 2,
                max_query_len: int | None = None) -> list[tuple[list[int], int]]:
    """block_table [num_reqs, >= max blocks] (host), seq_lens / query_lens [num_reqs] ->
    [(requests of the group, shared prefix tokens)], each group of >= `min_group_size`.
    Requests with more than `max_query_len` query tokens (prefill chunks) join no group."""
    context_blocks = (seq_lens - query_lens) // block_size  # whole blocks before the first query
    eligible = context_blocks > 0
    if max_query_len is not None:
        eligible &= query_lens <= max_query_len
    by_first_block = defaultdict(list)
    for r in np.flatnonzero(eligible):
        by_first_block[int(block_table[r, 0])].append(int(r))
    groups = []
    for reqs in by_first_block.values():
        if len(reqs) < min_group_size:
            continue
        limit = int(context_blocks[reqs].min())
        rows = block_table[reqs, :limit]
        same = (rows == rows[0]).all(axis=0)  # [limit] column equal across the group
        shared = limit if same.all() else int(np.argmin(same))
        if shared > 0:
            groups.append((reqs, shared * block_size))
    return groups


def group_shapes(groups: list[tuple[list[int], int]], query_lens: np.ndarray) -> list[GroupShape]:
    """find_groups' groups as the cost model sees them."""
    return [GroupShape(num_reqs=len(reqs), num_query_tokens=int(query_lens[reqs].sum()),
                       prefix_len=prefix_len) for reqs, prefix_len in groups]


def plan_relay(num_reqs: int, groups: list[tuple[list[int], int]]) -> RelayPlan:
    """Groups first (each contiguous), then every other request in batch order."""
    order, spans = [], []
    for reqs, prefix_len in groups:
        spans.append((len(order), len(order) + len(reqs), prefix_len))
        order.extend(reqs)
    grouped = set(order)
    order.extend(r for r in range(num_reqs) if r not in grouped)
    return RelayPlan(order=order, groups=spans)
