"""Relay decode in one pass: a block of decode requests x one KV head per program, the shared
prefix and every request's own keys folded into one online-softmax state.

The prefix pass and the suffix pass of relay_attention run as separate programs: on an H200 the
GQA prefix pass of 256 requests over 4096 shared tokens is tensor work (17 GFLOP) that runs
before the suffix's stream of the own KV (benchmarks/results/kernels/
prefix_overlap_h200_session15.md), so the two add up. Here each program owns BLOCK_R decode
requests of one group and one KV head, and its M rows (BLOCK_R requests x the query heads of
the KV head) walk one sequence of key tiles of TILE_N columns:

    prefix tile: TILE_N consecutive shared keys (group_block_table), seen by every row;
    own tile:    SLAB keys of each of the BLOCK_R requests side by side (TILE_N = BLOCK_R x
                 SLAB columns), row r sees only its own request's SLAB columns (block diagonal).

Both kinds go through the same loop (the software pipeliner keeps K/V copies of both in
flight while the tensor cores work), interleaved evenly, so every SM streams own pages while
it computes prefix tiles. One state per row means no partial states, no merge and no second
launch. The price: an own tile multiplies each row with BLOCK_R x more keys than it needs
(the block-diagonal mask), which the tensor cores do while the memory system is the limit.

    |<------------------------------ seq_lens[r] ------------------------------->|
    |<---- prefix_lens[r] = group_prefix_len[g] ---->|<------- own keys -------->|
                                                                          query ^

Decode only: every request of a row block has one query token, at the end of its sequence,
so no key is causally hidden from it. Requests in no group (prefix_lens 0) form row blocks
with group -1: own tiles only. `row_blocks` lists the blocks (`row_blocks_for`).

Convention: lse: float32, natural log, [num_heads, num_tokens].
"""

import torch
import triton
import triton.language as tl

from ._launch import (
    check_int32,
    check_kv_cache,
    check_lse,
    check_out,
    check_query,
    check_shape,
    dot_flags,
    launch,
    next_pow2,
)
from ._paged_attend import tile_dot
from .merge import finalize_state
from .paged_suffix import attend_ref

DEFAULT_CONFIG = dict(BLOCK_R=16, SLAB=8, num_warps=4, num_stages=3, INTERLEAVE=True)

# ---------------------------------------------------------------- host helpers


def row_blocks_for(
    groups: list[tuple[int, int, int]], num_reqs: int, block_r: int
) -> list[tuple[int, int, int]]:
    """(first request, one past the last, group or -1) of each row block: every group's request
    range [r0, r1) cut into blocks of at most `block_r` requests, and the requests in no group
    likewise (runs of consecutive ones). `groups` holds (r0, r1, prefix_len) as
    RelayMetadata.build takes them."""
    in_group = [-1] * num_reqs
    for g, (r0, r1, _) in enumerate(groups):
        in_group[r0:r1] = [g] * (r1 - r0)
    blocks, r = [], 0
    while r < num_reqs:
        g, end = in_group[r], r
        while end < num_reqs and in_group[end] == g and end - r < block_r:
            end += 1
        blocks.append((r, end, g))
        r = end
    return blocks


def row_blocks_tensor(blocks: list[tuple[int, int, int]], device) -> torch.Tensor:
    """[3, num_row_blocks] int32: first requests, ends, groups (the launcher's `row_blocks`)."""
    return torch.tensor(blocks, dtype=torch.int32).reshape(-1, 3).t().contiguous().to(device)


# ---------------------------------------------------------------- launcher


def block_decode(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32; one token per request covered
    seq_lens: torch.Tensor,  # [num_reqs] int32
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32, full tables
    prefix_lens: torch.Tensor,  # [num_reqs] int32, the group's prefix length (0: no group)
    row_blocks: torch.Tensor,  # [3, num_row_blocks] int32 (row_blocks_tensor)
    group_block_table: torch.Tensor,  # [num_groups, max_prefix_blocks] int32
    group_prefix_len: torch.Tensor,  # [num_groups] int32
    softmax_scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_size]
    lse: torch.Tensor | None = None,  # [num_q_heads, num_tokens] float32
    *,
    return_lse: bool = False,
    config: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of each covered request's one query token over (its group's shared prefix ||
    its own keys); `out` (and lse). Rows of requests in no row block are not written. The row
    blocks' BLOCK_R must equal the config's (DEFAULT_CONFIG unless `config` says otherwise)."""
    check_query(query)
    num_tokens, num_q_heads, head_size = query.shape
    block_size, num_kv_heads, _ = check_kv_cache(key_cache, value_cache, query)
    dev = query.device
    for name, t, ndim in (("query_start_loc", query_start_loc, 1), ("seq_lens", seq_lens, 1),
                          ("block_table", block_table, 2), ("prefix_lens", prefix_lens, 1),
                          ("row_blocks", row_blocks, 2),
                          ("group_block_table", group_block_table, 2),
                          ("group_prefix_len", group_prefix_len, 1)):  # fmt: skip
        check_int32(name, t, ndim, dev)
    num_reqs = seq_lens.shape[0]
    check_shape("query_start_loc", query_start_loc, (num_reqs + 1,))
    check_shape("block_table", block_table, (num_reqs, None))
    check_shape("prefix_lens", prefix_lens, (num_reqs,))
    check_shape("row_blocks", row_blocks, (3, None))
    check_shape("group_prefix_len", group_prefix_len, (group_block_table.shape[0],))
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    unknown = set(cfg) - set(DEFAULT_CONFIG)
    if unknown:
        raise ValueError(f"config: unknown keys {sorted(unknown)}")
    for key in ("BLOCK_R", "SLAB"):
        if cfg[key] < 1 or cfg[key] & (cfg[key] - 1):
            raise ValueError(f"config {key} must be a power of two, got {cfg[key]}")
    out = torch.empty_like(query) if out is None else out
    check_out("out", out, query)
    if return_lse and lse is None:
        lse = torch.empty(num_q_heads, num_tokens, dtype=torch.float32, device=dev)
    if lse is not None:
        check_lse("lse", lse, num_q_heads, num_tokens, dev)
    num_row_blocks = row_blocks.shape[1]
    if num_row_blocks and num_tokens:
        gqa = num_q_heads // num_kv_heads
        upcast, precision = dot_flags(query.dtype)
        launch(
            _block_decode_kernel,
            (num_row_blocks, num_kv_heads),
            out_ptr=out,
            lse_ptr=lse if lse is not None else out,  # not written unless STORE_LSE
            query_ptr=query,
            key_cache_ptr=key_cache,
            value_cache_ptr=value_cache,
            query_start_loc_ptr=query_start_loc,
            seq_lens_ptr=seq_lens,
            block_table_ptr=block_table,
            prefix_lens_ptr=prefix_lens,
            row_blocks_ptr=row_blocks,
            group_block_table_ptr=group_block_table,
            qk_scale=softmax_scale * 1.4426950408889634,  # log2(e): the kernel works in base 2
            stride_qt=query.stride(0),
            stride_qh=query.stride(1),
            stride_ot=out.stride(0),
            stride_oh=out.stride(1),
            stride_lse_h=lse.stride(0) if lse is not None else 0,
            stride_k_blk=key_cache.stride(0),
            stride_k_slot=key_cache.stride(1),
            stride_k_head=key_cache.stride(2),
            stride_v_blk=value_cache.stride(0),
            stride_v_slot=value_cache.stride(1),
            stride_v_head=value_cache.stride(2),
            stride_bt=block_table.stride(0),
            stride_rb=row_blocks.stride(0),
            stride_gbt=group_block_table.stride(0),
            group_prefix_len_ptr=group_prefix_len,
            STORE_LSE=lse is not None,
            BLOCK_R=cfg["BLOCK_R"],
            GQA=gqa,
            GQA_PAD=max(next_pow2(gqa), 1),
            SLAB=cfg["SLAB"],
            BLOCK_SIZE=block_size,
            HEAD_SIZE=head_size,
            HEAD_PAD=next_pow2(head_size),
            INTERLEAVE=bool(cfg["INTERLEAVE"]),
            UPCAST_DOT=upcast,
            DOT_PRECISION=precision,
            num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"],
        )
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------- kernel


@triton.jit
def _tile_columns(
    t,  # scalar: tile index in [0, n_tiles)
    n_pre,  # scalar: prefix tiles
    n_tiles,  # scalar: prefix + own tiles
    prefix_len,  # scalar: shared keys of the row block's group (0: none)
    offs_n,  # [TILE_N] column
    col_own_start,  # [TILE_N] first own key position of the column's request
    col_seq_len,  # [TILE_N] its sequence length (0: no request)
    gbt_row_ptr,  # the group's row of group_block_table
    bt_col_ptr,  # [TILE_N] the column's request's row of block_table
    TILE_N: tl.constexpr,
    SLAB: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    INTERLEAVE: tl.constexpr,
):
    """(is_prefix, key position [TILE_N], in range [TILE_N], block id [TILE_N] int64) of tile t.
    Interleaved, tile t is the prefix tile P(t) = t * n_pre // n_tiles when P(t + 1) > P(t) (the
    n_pre prefix tiles spread evenly), else own tile t - P(t); otherwise prefix tiles first."""
    if INTERLEAVE:
        denom = tl.maximum(n_tiles, 1)
        p_idx = t * n_pre // denom
        is_pre = (t + 1) * n_pre // denom > p_idx
        o_idx = t - p_idx
    else:
        p_idx = t
        is_pre = t < n_pre
        o_idx = t - n_pre
    pre_pos = p_idx * TILE_N + offs_n
    own_pos = col_own_start + o_idx * SLAB + offs_n % SLAB
    pos = tl.where(is_pre, pre_pos, own_pos)
    # past the last tile (t = n_tiles, the prefetch) every column is out of range either way
    ok = tl.where(is_pre, pre_pos < prefix_len, own_pos < col_seq_len)
    id_ptr = tl.where(
        is_pre, gbt_row_ptr + pre_pos // BLOCK_SIZE, bt_col_ptr + own_pos // BLOCK_SIZE
    )
    blk = tl.load(id_ptr, mask=ok, other=0).to(tl.int64)
    return is_pre, pos, ok, blk


@triton.jit
def _block_decode_kernel(
    out_ptr, lse_ptr, query_ptr, key_cache_ptr, value_cache_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_table_ptr, prefix_lens_ptr, row_blocks_ptr,
    group_block_table_ptr, group_prefix_len_ptr, qk_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_lse_h,
    stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
    stride_bt, stride_rb, stride_gbt,
    STORE_LSE: tl.constexpr,
    BLOCK_R: tl.constexpr,  # requests per program
    GQA: tl.constexpr,  # query heads per KV head
    GQA_PAD: tl.constexpr,  # next power of 2
    SLAB: tl.constexpr,  # own keys per request per own tile
    BLOCK_SIZE: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    INTERLEAVE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    BLOCK_M: tl.constexpr = BLOCK_R * GQA_PAD  # rows: request-major, then query head
    TILE_N: tl.constexpr = BLOCK_R * SLAB  # columns: request-major, then SLAB keys
    rb = tl.program_id(0)
    kv_head = tl.program_id(1)
    req0 = tl.load(row_blocks_ptr + rb)
    req1 = tl.load(row_blocks_ptr + stride_rb + rb)
    group = tl.load(row_blocks_ptr + 2 * stride_rb + rb)

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    row_req = req0 + offs_m // GQA_PAD  # [BLOCK_M]
    row_head = kv_head * GQA + offs_m % GQA_PAD
    row_ok = (row_req < req1) & (offs_m % GQA_PAD < GQA)
    row_tok = tl.load(query_start_loc_ptr + row_req, mask=row_ok, other=0).to(tl.int64)
    q_ptrs = query_ptr + row_tok[:, None] * stride_qt + row_head[:, None] * stride_qh
    q = tl.load(q_ptrs + offs_d[None, :], mask=row_ok[:, None] & d_mask[None, :], other=0.0)

    col_req = req0 + offs_n // SLAB  # [TILE_N]
    col_has_req = col_req < req1
    col_seq_len = tl.load(seq_lens_ptr + col_req, mask=col_has_req, other=0)
    col_own_start = tl.load(prefix_lens_ptr + col_req, mask=col_has_req, other=0)
    bt_col_ptr = block_table_ptr + col_req.to(tl.int64) * stride_bt
    grouped = group >= 0
    g = tl.maximum(group, 0)
    prefix_len = tl.load(group_prefix_len_ptr + g, mask=grouped, other=0)  # no groups: 0 rows
    gbt_row_ptr = group_block_table_ptr + g.to(tl.int64) * stride_gbt
    n_pre = tl.cdiv(prefix_len, TILE_N)
    n_own = tl.cdiv(tl.max(col_seq_len - col_own_start, 0), SLAB)
    n_tiles = n_pre + n_own
    own_cols = (offs_m // GQA_PAD)[:, None] == (offs_n // SLAB)[None, :]  # [BLOCK_M, TILE_N]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    # each iteration loads the next tile's block ids (see _paged_attend.py: a block-id load in the
    # same iteration as its K/V tile keeps the pipeliner from running copies ahead)
    is_pre, pos, ok, blk = _tile_columns(
        0, n_pre, n_tiles, prefix_len, offs_n, col_own_start, col_seq_len, gbt_row_ptr,
        bt_col_ptr, TILE_N, SLAB, BLOCK_SIZE, INTERLEAVE,
    )  # fmt: skip
    for t in range(0, n_tiles):
        slot = pos % BLOCK_SIZE
        k_off = blk * stride_k_blk + slot * stride_k_slot + kv_head * stride_k_head
        v_off = blk * stride_v_blk + slot * stride_v_slot + kv_head * stride_v_head
        # K^T : (HEAD_PAD, TILE_N), V : (TILE_N, HEAD_PAD); masked on load: an unwritten slot may
        # hold NaN, and 0 * NaN in P @ V would poison the row
        k = tl.load(key_cache_ptr + k_off[None, :] + offs_d[:, None],
                    mask=d_mask[:, None] & ok[None, :], other=0.0)  # fmt: skip
        v = tl.load(value_cache_ptr + v_off[:, None] + offs_d[None, :],
                    mask=ok[:, None] & d_mask[None, :], other=0.0)  # fmt: skip
        s = tile_dot(q, k, UPCAST_DOT, DOT_PRECISION) * qk_scale  # (BLOCK_M, TILE_N)
        visible = tl.where(is_pre, ok[None, :], ok[None, :] & own_cols)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row stays empty
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
        is_pre, pos, ok, blk = _tile_columns(
            t + 1, n_pre, n_tiles, prefix_len, offs_n, col_own_start, col_seq_len, gbt_row_ptr,
            bt_col_ptr, TILE_N, SLAB, BLOCK_SIZE, INTERLEAVE,
        )  # fmt: skip

    o, row_lse = finalize_state(m_i, l_i, acc)
    o_ptrs = out_ptr + row_tok[:, None] * stride_ot + row_head[:, None] * stride_oh
    tl.store(o_ptrs + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_mask[None, :])  # fmt: skip
    if STORE_LSE:
        tl.store(lse_ptr + row_head * stride_lse_h + row_tok, row_lse, mask=row_ok)


# ---------------------------------------------------------------- reference


def block_decode_ref(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    row_blocks: torch.Tensor,
    group_block_table: torch.Tensor,
    group_prefix_len: torch.Tensor,
    softmax_scale: float,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
    config: dict | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """fp32 torch version of `block_decode` (the config is accepted and ignored): each covered
    request's token over its group's shared blocks then its own, as one softmax."""
    out = torch.empty_like(query) if out is None else out
    if return_lse and lse is None:
        lse = torch.empty(query.shape[1], query.shape[0], dtype=torch.float32, device=query.device)
    qsl, sl, pl = query_start_loc.tolist(), seq_lens.tolist(), prefix_lens.tolist()
    gpl = group_prefix_len.tolist()
    for r0, r1, g in row_blocks.t().tolist():
        for r in range(r0, r1):
            q = query[qsl[r] : qsl[r] + 1]
            o_own, l_own = attend_ref(q, key_cache, value_cache, block_table[r], pl[r], sl[r],
                                      softmax_scale, None)  # fmt: skip
            o_pre, l_pre = (
                attend_ref(q, key_cache, value_cache, group_block_table[g], 0, gpl[g],
                           softmax_scale, None)  # fmt: skip
                if g >= 0
                else (torch.zeros_like(o_own), torch.full_like(l_own, float("-inf")))
            )
            both = torch.logaddexp(l_pre, l_own)  # [H, 1]
            safe = torch.where(both == float("-inf"), 0.0, both)
            w_pre, w_own = torch.exp(l_pre - safe), torch.exp(l_own - safe)  # [H, 1]
            o = o_pre * w_pre.t()[:, :, None] + o_own * w_own.t()[:, :, None]
            out[qsl[r]] = o[0].to(out.dtype)
            if lse is not None:
                lse[:, qsl[r]] = both[:, 0]
    return (out, lse) if return_lse else out
