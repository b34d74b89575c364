"""Per-step relay state, built once per batch by a metadata builder and used by every layer."""

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from edgeprompt_vllm.attention.grouping import find_groups, plan_relay
from edgeprompt_vllm.attention.host_block_table import host_rows
from edgeprompt_vllm.kernels import RelayMetadata
from edgeprompt_vllm.kernels.relay_attention import upload

# Decides which groups relay: ([(requests, prefix_len)], query_lens) -> the kept groups.
GroupFilter = Callable[[list[tuple[list[int], int]], np.ndarray], list[tuple[list[int], int]]]


@dataclass
class RestBatch:
    """The requests of a batch that no group relays, for the platform's stock kernel."""

    token_index: torch.Tensor  # [num_rest_tokens] int64: their tokens' positions in the batch
    query_start_loc: torch.Tensor  # [num_rest + 1] int32
    seq_lens: torch.Tensor  # [num_rest] int32
    block_table: torch.Tensor  # [num_rest, max_blocks] int32
    max_query_len: int
    max_seq_len: int


@dataclass
class RelayBatch:
    meta: RelayMetadata  # the relayed requests, each group contiguous
    token_order: torch.Tensor | None  # [num_relay_tokens] int64: relay position i is batch token token_order[i]
    num_tokens: int  # query tokens in the whole batch
    groups: list[tuple[int, int, int]]  # host copy of the groups: (req start, req end, prefix_len)
    used_blocks: torch.Tensor | None = None  # CPU only: [n] block ids meta.block_table indexes into
    rest: RestBatch | None = None  # CUDA only: requests left to FlashAttention
    replays: dict = field(default_factory=dict)  # CUDA only: softmax scale -> kernels' LayerReplay
    flash_prefix: bool = False  # CUDA only: the prefix pass by FA3 (attention/flash_prefix.py)
    prefix_beside: bool = False  # ... and beside the suffix kernel ("handoff" schedule)


def host_batch(common, block_size: int, num_reqs: int | None = None
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """query_start_loc [R+1], seq_lens [R], block_table [R, W] (W: blocks of the longest
    sequence) on the host, from vLLM's CommonAttentionMetadata and the runners' host copies
    (host_block_table.py); a device sync only where vLLM keeps none. R: `num_reqs`, default all
    (a FULL graph's batch passes its real requests, without the padding rows)."""
    num_reqs = common.num_reqs if num_reqs is None else num_reqs
    qsl = common.query_start_loc_cpu[: num_reqs + 1].numpy()
    seq_lens = common.seq_lens[:num_reqs]
    if seq_lens.device.type != "cpu":
        host = getattr(common, "seq_lens_cpu_upper_bound", None)
        seq_lens = host[:num_reqs] if host is not None else seq_lens.cpu()
    seq_lens = seq_lens.numpy()
    return qsl, seq_lens, host_rows(common.block_table_tensor, -(-seq_lens // block_size))


def _tokens_of(qsl: np.ndarray, reqs) -> np.ndarray:
    return np.concatenate([np.arange(qsl[r], qsl[r + 1]) for r in reqs]) if len(reqs) else np.zeros(0, np.int64)


def build_relay_batch(common, block_size: int, keep: GroupFilter, remap_blocks: bool = False,
                      split_rest: bool = False, max_group_query_len: int | None = None) -> RelayBatch | None:
    """None when no group is worth relaying: the layer then runs the stock kernel.

    remap_blocks (CPU): every request goes through the relay path, over the blocks the batch
    reads renumbered 0..n-1 (`used_blocks`). split_rest (CUDA): only the relayed groups' requests
    go through the relay kernels; the others are described in `rest` for FlashAttention.
    Requests with more than `max_group_query_len` query tokens join no group.
    """
    qsl, seq_lens, block_table = host_batch(common, block_size)
    query_lens = np.diff(qsl)
    groups = keep(find_groups(block_table, seq_lens, query_lens, block_size,
                             max_query_len=max_group_query_len), query_lens)
    if not groups:
        return None
    plan = plan_relay(common.num_reqs, groups)
    order = np.asarray(plan.order)
    rest = None
    if split_rest:
        num_grouped = plan.groups[-1][1]
        order, rest_reqs = order[:num_grouped], order[num_grouped:]
        rest = _rest_batch(common, qsl, seq_lens, rest_reqs) if len(rest_reqs) else None
    device = common.block_table_tensor.device
    table = common.block_table_tensor[:common.num_reqs][upload(order, device, torch.int64)]
    used = None
    if remap_blocks:
        width = int(-(-seq_lens.max() // block_size))
        used, inverse = torch.unique(table[:, :width].long(), return_inverse=True)
        table = inverse.to(torch.int32)
    meta = RelayMetadata.build(query_lens[order].tolist(), seq_lens[order].tolist(), table,
                               plan.groups, block_size)
    token_order = None
    if not (len(order) == common.num_reqs and plan.is_identity):
        token_order = upload(_tokens_of(qsl, order), device, torch.int64)
    return RelayBatch(meta=meta, token_order=token_order, num_tokens=int(qsl[-1]), groups=plan.groups,
                      used_blocks=used, rest=rest)


def _rest_batch(common, qsl: np.ndarray, seq_lens: np.ndarray, reqs: np.ndarray) -> RestBatch:
    device = common.query_start_loc.device
    q_lens = np.diff(qsl)[reqs]
    rest_qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    index = upload(reqs, device, torch.int64)
    return RestBatch(
        token_index=upload(_tokens_of(qsl, reqs), device, torch.int64),
        query_start_loc=upload(rest_qsl, device),
        seq_lens=upload(seq_lens[reqs], device),
        block_table=common.block_table_tensor[:common.num_reqs][index],
        max_query_len=int(q_lens.max()), max_seq_len=int(seq_lens[reqs].max()))
