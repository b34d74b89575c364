"""Prefix pass of relay attention: all query tokens of a group over the group's shared paged KV.

A group is a contiguous range of requests [group_req_start[g], group_req_end[g]) whose sequences
begin with the same `group_prefix_len[g]` tokens, stored once in the blocks of
`group_block_table[g]`. The shared KV is read once per batch for the whole group, instead of once
per request (RelayAttention, Zhu et al., ACL 2024). Requires every query position of the group to
be >= its prefix length (true for decode and for edge-prompt prefill after a cloud prompt), so the
pass is not causal. Groups may come in any order and need not cover every request; tokens of
requests outside all groups get out = 0, lse = -inf.

Token lists (`group_token_index`, for CUDA graphs, see attention/graph_relay.py): a group may
instead name its tokens in any order, group_token_index[group_req_start[g]:group_req_end[g]]
(the two arrays then hold positions in that list, not requests), so a batch keeps its request
order and the grid depends only on bounds.

Design: one program per (group x M tile, KV head, prefix split). The M dimension of tl.dot packs
BLOCK_T tokens of the group x all query heads of one KV head (GQA: one K/V tile load serves every
query head that shares it). The prefix is split over NUM_SPLITS programs where the group is small
(flash-decoding style: one decode group of 64 tokens has only num_kv_heads M tiles); each split
writes an fp32 partial state. `relay_prefix` reduces the splits itself (merge_partial_states; the
"overlap" schedule of relay_attention runs it on a side stream); `relay_prefix_partials` leaves
them to the suffix kernel's epilogue (the default "fused" schedule, see paged_suffix.py).

Convention: lse: float32, natural log, [num_heads, num_tokens] (vLLM's merge_attn_states layout).
"""

import torch
import triton
import triton.language as tl

from ._launch import (
    cdiv,
    check_int32,
    check_kv_cache,
    check_lse,
    check_out,
    check_query,
    check_shape,
    device_sms,
    dot_flags,
    host_int,
    launch,
    next_pow2,
    supports_pdl,
)
from ._paged_attend import grid_dependency_launch_dependents, paged_attend
from .merge import finalize_state, merge_partial_states
from .paged_suffix import attend_ref

MAX_FUSED_SPLITS, MAX_SPLITS = 4, 16  # see _pick_num_splits
BIG_ROWS = 4096  # rows (tokens x padded heads per KV head) from which prefill tiles are used
LARGE_DECODE_ROWS = 512  # rows from which decode tiles take 32 keys (see _prefix_config)
SPLIT_POLICIES = ("fill", "balanced")  # see _pick_num_splits
# Launcher knobs a `config` may carry besides tile sizes, with their defaults (for measuring).
LAUNCH_KNOBS = dict(big_rows=BIG_ROWS, split_policy="fill")

# ---------------------------------------------------------------- launchers


def relay_prefix(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    group_req_start: torch.Tensor,  # [num_groups] int32, first request of each group
    group_req_end: torch.Tensor,  # [num_groups] int32, one past its last request
    group_block_table: torch.Tensor,  # [num_groups, max_prefix_blocks] int32, the shared blocks
    group_prefix_len: torch.Tensor,  # [num_groups] int32, shared tokens (block-aligned in practice)
    softmax_scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_size]
    lse: torch.Tensor | None = None,  # [num_q_heads, num_tokens] float32
    *,
    max_group_query_len: int | None = None,
    max_prefix_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
    group_token_index: torch.Tensor | None = None,  # [num_positions] int32, see the module doc
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each group's tokens over its shared prefix; returns (out, lse).

    `max_group_query_len` (most query tokens in one group) and `max_prefix_len` size the grid; pass
    them as host ints to avoid a device sync. `num_splits` overrides the prefix split, `config` the
    tile choices of `_prefix_config` and the LAUNCH_KNOBS (for tuning).
    """
    check_query(query)
    num_tokens, num_q_heads, _ = query.shape
    out = torch.empty_like(query) if out is None else out
    check_out("out", out, query, dtypes=(query.dtype, torch.float32))
    lse = (
        torch.empty(num_q_heads, num_tokens, dtype=torch.float32, device=query.device)
        if lse is None
        else lse
    )
    check_lse("lse", lse, num_q_heads, num_tokens, query.device)
    part_out, part_lse = relay_prefix_partials(
        query,
        key_cache,
        value_cache,
        query_start_loc,
        group_req_start,
        group_req_end,
        group_block_table,
        group_prefix_len,
        softmax_scale,
        max_group_query_len=max_group_query_len,
        max_prefix_len=max_prefix_len,
        num_splits=num_splits,
        config=config,
        fused=False,
        fill_empty=True,
        group_token_index=group_token_index,
    )
    merge_partial_states(out, part_out, part_lse, lse)
    return out, lse


def relay_prefix_partials(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    group_req_start: torch.Tensor,  # [num_groups] int32
    group_req_end: torch.Tensor,  # [num_groups] int32
    group_block_table: torch.Tensor,  # [num_groups, max_prefix_blocks] int32
    group_prefix_len: torch.Tensor,  # [num_groups] int32
    softmax_scale: float,
    *,
    max_group_query_len: int | None = None,
    max_prefix_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
    fused: bool = True,
    fill_empty: bool = False,
    group_token_index: torch.Tensor | None = None,  # [num_positions] int32, see the module doc
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unreduced prefix states: ([num_splits, num_tokens, num_q_heads, head_size] fp32,
    [num_splits, num_q_heads, num_tokens] fp32). Rows of tokens outside every group are left
    unwritten unless `fill_empty` (then their lse is -inf). `fused`: the states go to the suffix
    kernel's epilogue (at most MAX_FUSED_SPLITS), not to a merge kernel."""
    _check_prefix_args(
        query, query_start_loc, group_req_start, group_req_end, group_block_table, group_prefix_len
    )
    gather = group_token_index is not None
    if gather:
        check_int32("group_token_index", group_token_index, 1, query.device)
    num_tokens, num_q_heads, head_size = query.shape
    block_size, num_kv_heads, _ = check_kv_cache(key_cache, value_cache, query)
    num_groups = group_req_start.shape[0]
    if num_groups:
        max_group_query_len = host_int(
            max_group_query_len,
            lambda: (group_req_end - group_req_start).max()
            if gather
            else (
                query_start_loc[group_req_end.long()] - query_start_loc[group_req_start.long()]
            ).max(),
        )
        max_prefix_len = host_int(max_prefix_len, lambda: group_prefix_len.max())
    else:
        max_group_query_len = max_prefix_len = 0
    knobs, tiles = split_launch_knobs(config)
    cfg = _prefix_config(
        num_q_heads // num_kv_heads, head_size, max_group_query_len, tiles, knobs["big_rows"]
    )
    m_tiles = max(cdiv(max_group_query_len, cfg["BLOCK_T"]), 1)
    if num_splits is None:
        num_splits = _pick_num_splits(
            num_groups * m_tiles * num_kv_heads,
            max_prefix_len,
            cfg["TILE_N"],
            device_sms(query),
            fused,
            knobs["split_policy"],
        )
    alloc = torch.full if fill_empty else torch.empty
    extra = (float("-inf"),) if fill_empty else ()
    part_out = torch.empty(
        (num_splits,) + tuple(query.shape), dtype=torch.float32, device=query.device
    )
    part_lse = alloc(
        (num_splits, num_q_heads, num_tokens), *extra, dtype=torch.float32, device=query.device
    )
    if num_groups == 0 or num_tokens == 0 or max_group_query_len == 0:
        return part_out, part_lse
    upcast, precision = dot_flags(query.dtype)
    cfg["LAUNCH_DEPENDENTS"] = bool(cfg["LAUNCH_DEPENDENTS"]) and supports_pdl(query)
    grid = (num_groups * m_tiles, num_kv_heads, num_splits)
    launch(
        _relay_prefix_kernel,
        grid,
        part_out_ptr=part_out,
        part_lse_ptr=part_lse,
        query_ptr=query,
        key_cache_ptr=key_cache,
        value_cache_ptr=value_cache,
        query_start_loc_ptr=query_start_loc,
        group_req_start_ptr=group_req_start,
        group_req_end_ptr=group_req_end,
        group_block_table_ptr=group_block_table,
        group_prefix_len_ptr=group_prefix_len,
        token_index_ptr=group_token_index if gather else group_prefix_len,  # (unused dummy)
        m_tiles_per_group=m_tiles,
        qk_scale=softmax_scale * 1.4426950408889634,
        stride_q_tok=query.stride(0),
        stride_q_head=query.stride(1),
        stride_po_split=part_out.stride(0),
        stride_po_tok=part_out.stride(1),
        stride_po_head=part_out.stride(2),
        stride_pl_split=part_lse.stride(0),
        stride_pl_head=part_lse.stride(1),
        stride_pl_tok=part_lse.stride(2),
        stride_gbt=group_block_table.stride(0),
        stride_k_blk=key_cache.stride(0),
        stride_k_slot=key_cache.stride(1),
        stride_k_head=key_cache.stride(2),
        stride_v_blk=value_cache.stride(0),
        stride_v_slot=value_cache.stride(1),
        stride_v_head=value_cache.stride(2),
        QUERIES_PER_KV=num_q_heads // num_kv_heads,
        HEAD_SIZE=head_size,
        HEAD_PAD=max(next_pow2(head_size), 16),
        BLOCK_SIZE=block_size,
        GATHER_TOKENS=gather,
        UPCAST_DOT=upcast,
        DOT_PRECISION=precision,
        **cfg,
    )
    return part_out, part_lse


def one_group_prefix_splits(
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    group_query_len: int,
    prefix_len: int,
    sms: int,
) -> int:
    """The fused schedule's prefix split count for one group of `group_query_len` tokens over
    `prefix_len` shared tokens (what a CUDA graph sized by those bounds fixes, graph_relay.py)."""
    cfg = _prefix_config(num_q_heads // num_kv_heads, head_size, group_query_len)
    m_tiles = max(cdiv(group_query_len, cfg["BLOCK_T"]), 1)
    return _pick_num_splits(m_tiles * num_kv_heads, prefix_len, cfg["TILE_N"], sms, fused=True)


def split_launch_knobs(config: dict | None) -> tuple[dict, dict]:
    """Split a prefix `config` into (the launcher knobs, LAUNCH_KNOBS' defaults filling in those
    it lacks; the rest: tile sizes and kernel switches)."""
    tiles = dict(config or {})
    knobs = {k: tiles.pop(k, default) for k, default in LAUNCH_KNOBS.items()}
    if knobs["split_policy"] not in SPLIT_POLICIES:
        raise ValueError(
            f"split_policy must be one of {SPLIT_POLICIES}, got {knobs['split_policy']!r}"
        )
    return knobs, tiles


def _prefix_config(
    queries_per_kv: int,
    head_size: int,
    max_group_query_len: int,
    override: dict | None = None,
    big_rows: int = BIG_ROWS,
) -> dict:
    """Tile sizes (chosen here, no autotune at serve time).

    M rows = BLOCK_T tokens x QPK_PAD heads, as many as the group has, from 16 (tl.dot minimum) to
    64 for decode-sized groups: a 64-request MHA decode group is one 64-row tile per KV head. On an
    H100 (benchmarks/benchmark_kernels.py, batch 64, prefix 1024) 64 rows beat 16 and 32 by 1-3 us
    for MHA and GQA alike (measured). Prefill-sized groups (>= 4096 rows) take 128 rows x 32 keys,
    4 warps, 2 stages: the best of 24 configurations for 8 x 512 queries on an H100, 227 TFLOP/s,
    6% ahead of 128 x 64 x 8 warps (measured; FA3 does ~2.4x better, so route prefill to FA3).
    Decode-sized: TILE_N = 64 keys (16 KB per K/V tile at head 128 fp16), 4 warps, 3 stages: with
    PREFETCH_BLOCK_IDS three K/V buffers (112 KB, 214 registers: 2 programs per SM), two tiles in
    flight; 2 stages were 10-20% slower on the GQA prefix passes of batch 128-256 on an H100.
    From LARGE_DECODE_ROWS rows (a GQA-4 group of over 64 requests) 32-key tiles (64 KB, 172
    registers): the pass itself is 5-8% slower, but two of its programs leave room for a suffix
    program on the SM, so the fused call was up to 4% faster at batch 256-512 (within 0.3% at
    batch 128 and at (512, 4096); benchmarks/results/kernels/prefetch_h100_session13.md).
    `big_rows` is where the prefill tiles start: 4096, so that a GQA-4 decode group of 256
    requests (1024 rows) keeps the decode tiles (1-2% faster at prefix 2048-4096 with PDL on an
    H100, benchmarks/results/kernels/gqa_sweep_h100.md; the backend sends prefill to FA3).
    UNMASKED_FULL_TILES (off by default; not faster, same sweep): see _paged_attend.py.
    LAUNCH_DEPENDENTS (on by default; acts on CUDA sm_90+ only): every program first signals that the
    next kernel may start (griddepcontrol.launch_dependents), so a suffix kernel launched with PDL
    (paged_suffix's PDL) streams its own KV while this pass computes. This kernel itself must be
    launched without PDL: the suffix reads the query / KV the kernels before this one wrote.
    """
    qpk_pad = next_pow2(queries_per_kv)
    rows = next_pow2(max(max_group_query_len, 1) * qpk_pad)
    big = rows >= big_rows
    block_m = max(128 if big else min(max(rows, 16), 64), qpk_pad)
    cfg = dict(
        BLOCK_M=block_m,
        TILE_N=32 if big or head_size > 128 or rows >= LARGE_DECODE_ROWS else 64,
        num_warps=4,
        num_stages=2 if big else 3,
        UNMASKED_FULL_TILES=False,
        PREFETCH_BLOCK_IDS=True,
        LAUNCH_DEPENDENTS=True,
    )
    cfg.update(override or {})
    return dict(cfg, QPK_PAD=qpk_pad, BLOCK_T=max(cfg["BLOCK_M"] // qpk_pad, 1))


def _pick_num_splits(
    num_programs: int,
    max_prefix_len: int,
    tile_n: int,
    sms: int,
    fused: bool,
    policy: str = "fill",
) -> int:
    """Enough splits for ~1 program per SM, at >= 2 tiles (128 keys) per split.

    Each split costs an fp32 partial state per (token, head). Folded in by the suffix kernel's
    epilogue (`fused`), registers and latency grow with the count: on an H100 (MHA, batch 64,
    prefix 1024) the fused suffix took +4 / +9 / +32 / +60 us for 2 / 4 / 8 / 16 splits while the
    prefix pass itself was fastest at 4-8, so 4 is the cap there (measured). Reduced by
    merge_partial_states instead, 16 is the cap, for long prefixes with few programs (8 GQA
    requests, prefix 4096: 8 programs without splits). The count is rebalanced so no split is empty.
    policy "balanced" (a knob, for measuring): when splitting, take the count in [that one, the cap]
    whose programs fill their waves best (64 programs, 132 SMs: 3 splits leave the second wave 45%
    full, 4 splits fill 97% of two waves; the fewest splits of the best).
    """
    cap = MAX_FUSED_SPLITS if fused else MAX_SPLITS
    max_tiles = max(cdiv(max_prefix_len, tile_n), 1)
    limit = max(1, min(cdiv(max_tiles, 2), cap))
    num_programs = max(num_programs, 1)
    splits = max(1, min(cdiv(sms, num_programs), limit))
    if policy == "balanced" and num_programs < sms:
        fill = {s: round(wave_fill(num_programs * s, sms), 6) for s in range(splits, limit + 1)}
        splits = max(fill, key=lambda s: (fill[s], -s))
    return cdiv(max_tiles, cdiv(max_tiles, splits))


def wave_fill(programs: int, sms: int) -> float:
    """Share of the SM slots that `programs` equal programs keep busy, one per SM per wave."""
    return programs / (cdiv(programs, sms) * sms)


def _check_prefix_args(
    query, query_start_loc, group_req_start, group_req_end, group_block_table, group_prefix_len
) -> None:
    check_query(query)
    dev = query.device
    check_int32("query_start_loc", query_start_loc, 1, dev)
    check_int32("group_req_start", group_req_start, 1, dev)
    num_groups = group_req_start.shape[0]
    check_int32("group_req_end", group_req_end, 1, dev)
    check_shape("group_req_end", group_req_end, (num_groups,))
    check_int32("group_block_table", group_block_table, 2, dev)
    check_shape("group_block_table", group_block_table, (num_groups, None))
    check_int32("group_prefix_len", group_prefix_len, 1, dev)
    check_shape("group_prefix_len", group_prefix_len, (num_groups,))


# ---------------------------------------------------------------- kernel


@triton.jit(do_not_specialize=["m_tiles_per_group", "stride_pl_head", "stride_gbt"])  # per-step
def _relay_prefix_kernel(
    part_out_ptr,  # [num_splits, num_tokens, num_q_heads, head_size] float32
    part_lse_ptr,  # [num_splits, num_q_heads, num_tokens] float32
    query_ptr,  # [num_tokens, num_q_heads, head_size]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    query_start_loc_ptr,  # [num_reqs + 1] int32
    group_req_start_ptr,  # [num_groups] int32
    group_req_end_ptr,  # [num_groups] int32
    group_block_table_ptr,  # [num_groups, max_prefix_blocks] int32
    group_prefix_len_ptr,  # [num_groups] int32
    token_index_ptr,  # [num_positions] int32 (GATHER_TOKENS: the groups' token lists)
    m_tiles_per_group,
    qk_scale,  # softmax_scale * log2(e)
    stride_q_tok,
    stride_q_head,
    stride_po_split,
    stride_po_tok,
    stride_po_head,
    stride_pl_split,
    stride_pl_head,
    stride_pl_tok,
    stride_gbt,
    stride_k_blk,
    stride_k_slot,
    stride_k_head,
    stride_v_blk,
    stride_v_slot,
    stride_v_head,
    QUERIES_PER_KV: tl.constexpr,  # query heads per KV head
    QPK_PAD: tl.constexpr,  # next power of 2 of QUERIES_PER_KV
    BLOCK_T: tl.constexpr,  # group tokens per program
    BLOCK_M: tl.constexpr,  # rows of the dot: >= BLOCK_T * QPK_PAD and >= 16
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    UNMASKED_FULL_TILES: tl.constexpr,  # see _paged_attend.py
    PREFETCH_BLOCK_IDS: tl.constexpr,  # see _paged_attend.py
    LAUNCH_DEPENDENTS: tl.constexpr,  # let a PDL-launched suffix kernel start now (_prefix_config)
    GATHER_TOKENS: tl.constexpr,  # group g's tokens: token_index[start[g]:end[g]] (module doc)
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    if LAUNCH_DEPENDENTS:
        grid_dependency_launch_dependents()
    group = tl.program_id(0) // m_tiles_per_group
    m_tile = tl.program_id(0) % m_tiles_per_group
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    if GATHER_TOKENS:  # positions in the groups' token lists
        tok_begin = tl.load(group_req_start_ptr + group)
        tok_end = tl.load(group_req_end_ptr + group)
    else:  # tokens of the group's requests
        tok_begin = tl.load(query_start_loc_ptr + tl.load(group_req_start_ptr + group))
        tok_end = tl.load(query_start_loc_ptr + tl.load(group_req_end_ptr + group))
    if tok_begin + m_tile * BLOCK_T >= tok_end:
        return
    prefix_len = tl.load(group_prefix_len_ptr + group)

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    position = tok_begin + m_tile * BLOCK_T + offs_m // QPK_PAD
    head = kv_head * QUERIES_PER_KV + offs_m % QPK_PAD
    row_valid = (
        (offs_m // QPK_PAD < BLOCK_T) & (position < tok_end) & (offs_m % QPK_PAD < QUERIES_PER_KV)
    )
    if GATHER_TOKENS:
        token = tl.load(token_index_ptr + position, mask=row_valid, other=0).to(tl.int64)
    else:
        token = position.to(tl.int64)
    q = tl.load(
        query_ptr + token[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :],
        mask=row_valid[:, None] & d_mask[None, :],
        other=0.0,
    )  # Q : (BLOCK_M, HEAD_PAD)
    row_last_key = tl.where(row_valid, prefix_len - 1, -1)  # not causal: every row sees the prefix

    num_tiles = tl.cdiv(prefix_len, TILE_N)
    tiles_per_split = tl.cdiv(num_tiles, num_splits)
    tile_begin = split * tiles_per_split
    tile_end = tl.minimum(tile_begin + tiles_per_split, num_tiles)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    m_i, l_i, acc = paged_attend(
        q,
        m_i,
        l_i,
        acc,
        key_cache_ptr,
        value_cache_ptr,
        group_block_table_ptr + group.to(tl.int64) * stride_gbt,
        kv_head,
        tile_begin,
        tile_end,
        prefix_len // TILE_N,  # full tiles: every row sees the whole prefix
        0,
        prefix_len,
        row_last_key,
        qk_scale,
        stride_k_blk,
        stride_k_slot,
        stride_k_head,
        stride_v_blk,
        stride_v_slot,
        stride_v_head,
        BLOCK_SIZE,
        TILE_N,
        HEAD_SIZE,
        HEAD_PAD,
        UPCAST_DOT,
        DOT_PRECISION,
        UNMASKED_FULL_TILES,
        PREFETCH_BLOCK_IDS,
    )
    out, lse = finalize_state(m_i, l_i, acc)  # an empty split writes (0, -inf)
    tl.store(
        part_out_ptr
        + split * stride_po_split
        + token[:, None] * stride_po_tok
        + head[:, None] * stride_po_head
        + offs_d[None, :],
        out,
        mask=row_valid[:, None] & d_mask[None, :],
    )
    tl.store(
        part_lse_ptr + split * stride_pl_split + head * stride_pl_head + token * stride_pl_tok,
        lse,
        mask=row_valid,
    )


# ---------------------------------------------------------------- torch reference


def relay_prefix_ref(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    group_req_start: torch.Tensor,  # [num_groups] int32
    group_req_end: torch.Tensor,  # [num_groups] int32
    group_block_table: torch.Tensor,  # [num_groups, max_prefix_blocks] int32
    group_prefix_len: torch.Tensor,  # [num_groups] int32
    softmax_scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_size]
    lse: torch.Tensor | None = None,  # [num_q_heads, num_tokens] float32
    *,
    max_group_query_len: int | None = None,
    max_prefix_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
    group_token_index: torch.Tensor | None = None,  # [num_positions] int32, see the module doc
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 torch version of `relay_prefix` (tuning arguments are accepted and ignored)."""
    num_tokens, num_q_heads, _ = query.shape
    out = torch.empty_like(query) if out is None else out
    lse = (
        torch.empty(num_q_heads, num_tokens, dtype=torch.float32, device=query.device)
        if lse is None
        else lse
    )
    out.zero_()
    lse.fill_(float("-inf"))
    qsl = query_start_loc.tolist()
    for g, (r0, r1, plen) in enumerate(
        zip(group_req_start.tolist(), group_req_end.tolist(), group_prefix_len.tolist())
    ):
        tokens = (
            group_token_index[r0:r1].long()
            if group_token_index is not None
            else torch.arange(qsl[r0], qsl[r1], device=query.device)
        )
        o, l_ = attend_ref(
            query[tokens],
            key_cache,
            value_cache,
            group_block_table[g],
            0,
            plen,
            softmax_scale,
            first_query_pos=None,
        )
        out[tokens], lse[:, tokens] = o.to(out.dtype), l_
    return out, lse
