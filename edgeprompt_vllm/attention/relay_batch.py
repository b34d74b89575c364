"""Per-step relay state, built once per batch by a metadata builder and used by every layer."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from edgeprompt_vllm.attention.grouping import find_groups, plan_relay
from edgeprompt_vllm.kernels import RelayMetadata

# Decides which groups relay: [(requests, prefix_len)] -> the same list, filtered.
GroupFilter = Callable[[list[tuple[list[int], int]], np.ndarray], list[tuple[list[int], int]]]


@dataclass
class RelayBatch:
    meta: RelayMetadata  # requests in relay order: each group contiguous
    token_order: torch.Tensor | None  # [num_tokens] int64: relay position i holds batch token token_order[i]
    num_tokens: int
    used_blocks: torch.Tensor | None = None  # CPU only: [n] block ids meta.block_table indexes into


def host_batch(common) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """query_start_loc [R+1], seq_lens [R], block_table [R, W] on the host, from vLLM's
    CommonAttentionMetadata (a device sync only where vLLM keeps no host copy)."""
    num_reqs = common.num_reqs
    qsl = common.query_start_loc_cpu[: num_reqs + 1].numpy()
    seq_lens = common.seq_lens[:num_reqs]
    if seq_lens.device.type != "cpu":
        host = getattr(common, "seq_lens_cpu_upper_bound", None)
        seq_lens = host[:num_reqs] if host is not None else seq_lens.cpu()
    block_table = common.block_table_tensor[:num_reqs].cpu().numpy()
    return qsl, seq_lens.numpy(), block_table


def build_relay_batch(common, block_size: int, keep: GroupFilter, remap_blocks: bool = False
                      ) -> RelayBatch | None:
    """None when no group is worth relaying: the layer then runs the stock kernel."""
    qsl, seq_lens, block_table = host_batch(common)
    query_lens = np.diff(qsl)
    groups = keep(find_groups(block_table, seq_lens, query_lens, block_size), query_lens)
    if not groups:
        return None
    plan = plan_relay(common.num_reqs, groups)
    order = np.asarray(plan.order)
    table = common.block_table_tensor[:common.num_reqs][torch.from_numpy(order).to(
        common.block_table_tensor.device)]
    used = None
    if remap_blocks:  # CPU: gather the blocks the batch reads, renumbered 0..n-1
        width = int(-(-seq_lens.max() // block_size))
        table = table[:, :width]
        used, inverse = torch.unique(table.long(), return_inverse=True)
        table = inverse.to(torch.int32)
    meta = RelayMetadata.build(query_lens[order].tolist(), seq_lens[order].tolist(), table,
                               plan.groups, block_size)
    token_order = None
    if not plan.is_identity:
        token_order = torch.from_numpy(np.concatenate(
            [np.arange(qsl[r], qsl[r + 1]) for r in order])).to(common.query_start_loc.device)
    return RelayBatch(meta=meta, token_order=token_order, num_tokens=int(qsl[-1]), used_blocks=used)
