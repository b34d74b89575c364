"""The prefix pass by another attention kernel: FlashAttention-3's varlen call, on Hopper.

Our Triton prefix pass runs the tensor cores at ~230-270 TFLOP/s; FA3's warp-specialized kernel
runs the same pass (every query of a group over its shared paged KV, not causal, the query heads
of a KV head packed into one tile) at ~350-520 TFLOP/s on an H200. Where a batch's prefix work is
large (a big GQA group over a long prefix) the backend may therefore hand the prefix pass to FA3
and keep the rest of the relay path: our suffix kernel folds FA3's (out, lse) in as its one
prefix part, exactly as it folds our own partial states (benchmarks/results/kernels).

The kernel is passed in as a `PrefixAttention` callable, so this package stays free of vLLM:

    prefix_attention(query, key_cache, value_cache, cu_seqlens_q, max_seqlen_q, block_table,
                     seqused_k, max_seqlen_k, softmax_scale, out, lse) -> None

    query        [num_tokens, num_q_heads, head_size]
    key_cache    [num_blocks, block_size, num_kv_heads, head_size] (value_cache alike)
    cu_seqlens_q [num_seqs + 1] int32: sequence i's queries are query[cu[i]:cu[i + 1]]
    block_table  [num_seqs, max_blocks] int32, seqused_k [num_seqs] int32: its keys
    out          [num_tokens, num_q_heads, head_size] (query dtype), lse [num_q_heads, num_tokens]
                 fp32 natural log: written for every token in [cu[0], cu[-1]); every query sees
                 all of its sequence's keys (not causal)

One sequence per group: group g's sequence holds its tokens and any ungrouped tokens up to the
next group's (RelayMetadata.prefix_seq_start_loc); those attend to g's prefix for nothing, and
the suffix kernel ignores a prefix state wherever prefix_lens is 0. The CUDA backend relays only
grouped requests, so there are none there.

The call goes through _launch.call, so kernels/replay.py records it with the Triton launches and
replays it at every later layer of the step with the layer's tensors swapped in.
"""

from collections.abc import Callable

import torch

from ._launch import call
from .paged_suffix import attend_ref

PrefixAttention = Callable[..., None]  # the contract above


def external_prefix_state(
    prefix_attention: PrefixAttention,
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    meta,  # RelayMetadata with prefix_seq_start_loc (not token lists)
    softmax_scale: float,
    state: tuple[torch.Tensor, torch.Tensor] | None = None,  # from external_state_buffers
) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups' prefix pass by `prefix_attention`, as paged_suffix's one-part prefix_state:
    ([1, num_tokens, num_q_heads, head_size] in the query dtype, [1, num_q_heads, num_tokens])."""
    if meta.prefix_seq_start_loc is None:
        raise ValueError(
            "an external prefix kernel needs the groups as contiguous request ranges in order "
            "(RelayMetadata.build sets prefix_seq_start_loc then), not token lists"
        )
    out, lse = state if state is not None else external_state_buffers(query)
    call(
        prefix_attention,
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        cu_seqlens_q=meta.prefix_seq_start_loc,
        max_seqlen_q=meta.max_prefix_seq_len,
        block_table=meta.group_block_table,
        seqused_k=meta.group_prefix_len,
        max_seqlen_k=meta.max_prefix_len,
        softmax_scale=softmax_scale,
        out=out[0],
        lse=lse[0],
    )
    return out, lse


def external_state_buffers(query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised ([1, num_tokens, num_q_heads, head_size] query dtype,
    [1, num_q_heads, num_tokens] fp32) for external_prefix_state."""
    num_tokens, num_q_heads, _ = query.shape
    return (
        torch.empty((1,) + tuple(query.shape), dtype=query.dtype, device=query.device),
        torch.empty(1, num_q_heads, num_tokens, dtype=torch.float32, device=query.device),
    )


def prefix_attention_ref(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    cu_seqlens_q: torch.Tensor,  # [num_seqs + 1] int32
    max_seqlen_q: int,
    block_table: torch.Tensor,  # [num_seqs, max_blocks] int32
    seqused_k: torch.Tensor,  # [num_seqs] int32
    max_seqlen_k: int,
    softmax_scale: float,
    out: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    lse: torch.Tensor,  # [num_q_heads, num_tokens] float32
) -> None:
    """The PrefixAttention contract in fp32 torch (CPU tests, and a stand-in that compiles the
    suffix kernel's variants for an external prefix state at warm-up)."""
    cu, used = cu_seqlens_q.tolist(), seqused_k.tolist()
    for i, n_keys in enumerate(used):
        t0, t1 = cu[i], cu[i + 1]
        assert t1 - t0 <= max_seqlen_q and n_keys <= max_seqlen_k, "max_seqlen_* below the data"
        o, s = attend_ref(query[t0:t1], key_cache, value_cache, block_table[i], 0, n_keys,
                          softmax_scale, first_query_pos=None)  # fmt: skip
        out[t0:t1], lse[:, t0:t1] = o.to(out.dtype), s
