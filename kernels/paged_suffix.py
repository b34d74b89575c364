"""Suffix pass of relay attention: each request's queries over its own paged KV, causal.

Request r attends to keys at positions [prefix_lens[r], seq_lens[r]) read through its own block
table row (absolute positions: key p lives in block_table[r, p // block_size]). Its query tokens are
the last query_len tokens of its sequence (vLLM's convention), so query i (0-based within the
request) sees positions < seq_len - query_len + i + 1. With prefix_lens = 0 this is plain paged
attention. A row that sees no key (empty suffix) gets out = 0 and lse = -inf.

    |<------------------------------- seq_len ------------------------------->|
    |<---- prefix_len (shared; relay_prefix) ---->|<---- own blocks: here ---->|
                                                             |<-- query_len -->|

Design (flash-decoding, Dao et al. 2023, with GQA packing): one program per (query tile of one
request, KV head, KV split). The M dimension of tl.dot packs BLOCK_Q query tokens x all query heads
of one KV head, so each K/V tile is loaded once for the whole GQA group. Keys are walked in tiles of
TILE_N positions gathered through the block table (a tile is one or several pages, or part of one).
When there are too few (request, KV head) programs to fill the GPU, the keys are split over
NUM_SPLITS programs that write fp32 partial states, reduced by `merge_partial_states`.

Fused merge: given the prefix pass's partial states (`prefix_state`), the split-0 program of each
grouped request (prefix_lens > 0) folds them into its own online-softmax state before the epilogue,
so an unsplit decode batch needs no separate merge launch (RelayAttention, Zhu et al., ACL 2024).
With `handoff` the prefix pass runs concurrently: a program folds its state in only if it is
already written, else leaves its own state to handoff.py's finisher.

Convention: lse: float32, natural log, [num_heads, num_tokens].
Rows of `out` past query_start_loc[-1] (CUDA-graph padding) are not written without a KV split;
with one, the merge writes them from unwritten partial states (padding: never read).
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
    check_tensor,
    device_sms,
    dot_flags,
    follows_launch_of,
    host_int,
    launch,
    next_pow2,
    supports_pdl,
)
from ._paged_attend import grid_dependency_wait, paged_attend
from ._tiles import program_tile, tile_rows
from .handoff import Handoff, store_own_state
from .merge import absorb_partial, finalize_state, merge_partial_states

MAX_GRID_Y = 65535  # CUDA's limit on grid axes 1 and 2
DEEP_PIPELINE_PROGRAMS_PER_SM = 24  # decode: 3 stages from here on, else 2 (see _suffix_config)

# ---------------------------------------------------------------- launcher


def paged_suffix(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32, total tokens incl. prefix and queries
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32, the request's full table
    prefix_lens: torch.Tensor,  # [num_reqs] int32, keys before this are skipped (0: none)
    softmax_scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_size]
    lse: torch.Tensor | None = None,  # [num_q_heads, num_tokens] float32
    *,
    return_lse: bool = True,
    prefix_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    # ^ ([num_parts, num_tokens, num_q_heads, head_size] fp32 (or the query dtype: FA3's output,
    #    external_prefix.py), [num_parts, num_q_heads, num_tokens] fp32)
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
    handoff: Handoff | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal paged attention over each request's keys from prefix_lens on; returns (out, lse).

    `prefix_state` (from `relay_prefix_partials`) is merged into the rows of requests with
    prefix_lens > 0; the returned lse then covers prefix + suffix. `max_query_len` / `max_seq_len`
    size the grid; pass them (host ints) to avoid a device sync. `num_splits` overrides the KV
    split, `config` the tile choices of `_suffix_config` (for tuning; BLOCK_Q follows BLOCK_M).
    `handoff` (handoff.py): the prefix pass that writes `prefix_state` runs concurrently; a
    program folds it in if it is complete, else leaves its own state to `handoff_finish` (unsplit).
    """
    _check_suffix_args(
        query, key_cache, value_cache, query_start_loc, seq_lens, block_table, prefix_lens
    )
    num_tokens, num_q_heads, head_size = query.shape
    block_size, num_kv_heads, _ = check_kv_cache(key_cache, value_cache, query)
    out = torch.empty_like(query) if out is None else out
    check_out("out", out, query, dtypes=(query.dtype, torch.float32))
    if lse is None and return_lse:
        lse = torch.empty(num_q_heads, num_tokens, dtype=torch.float32, device=query.device)
    if lse is not None:
        check_lse("lse", lse, num_q_heads, num_tokens, query.device)
    if prefix_state is not None:
        _check_prefix_state(prefix_state, query)
    if handoff is not None:
        if prefix_state is None:
            raise ValueError("handoff needs the prefix_state it folds in")
        if num_splits not in (None, 1):
            raise ValueError(f"handoff runs the suffix unsplit, got num_splits={num_splits}")
        num_splits = 1
    num_reqs = seq_lens.shape[0]
    if num_reqs == 0 or num_tokens == 0:
        return out, lse
    max_query_len = host_int(
        max_query_len, lambda: (query_start_loc[1:] - query_start_loc[:-1]).max()
    )
    max_seq_len = host_int(max_seq_len, lambda: seq_lens.max())
    cfg, n_q_tiles, num_splits = suffix_tiling(
        query, key_cache, num_reqs, max_query_len, max_seq_len, num_splits, config
    )
    split_kv = num_splits > 1
    if split_kv:
        part_out = torch.empty(
            (num_splits,) + tuple(query.shape), dtype=torch.float32, device=query.device
        )
        part_lse = torch.empty(
            num_splits, num_q_heads, num_tokens, dtype=torch.float32, device=query.device
        )
    elif handoff is not None:  # a deferred request's own state goes to the handoff's buffers
        part_out, part_lse = handoff.own_out, handoff.own_lse
        handoff.check(query, n_q_tiles * num_kv_heads)
    else:  # the kernel writes out / lse directly; part_* are unused dummies (not views of
        # out or lse, so that replay.LayerReplay can re-point a recorded launch at another layer)
        part_out = torch.empty((1, 1, 1, 1), dtype=torch.float32, device=query.device)
        part_lse = torch.empty((1, 1, 1), dtype=torch.float32, device=query.device)
    if prefix_state is not None:
        pre_out, pre_lse = prefix_state
    else:
        pre_out, pre_lse = part_out, part_lse  # dummies, NUM_PREFIX_PARTS is 0
    lse_arg = lse if lse is not None else part_lse[0]
    upcast, precision = dot_flags(query.dtype)
    cfg["HEAD_FASTEST"] = bool(cfg["HEAD_FASTEST"]) and n_q_tiles <= MAX_GRID_Y
    cfg["PDL"] = bool(cfg["PDL"]) and prefix_state is not None and _follows_prefix_pass(query)
    pdl = dict(launch_pdl=True) if cfg["PDL"] else {}
    if cfg["HEAD_FASTEST"]:  # a request's KV-head programs adjacent in launch order
        grid = (num_kv_heads, n_q_tiles, num_splits)
    else:
        grid = (n_q_tiles, num_kv_heads, num_splits)
    launch(
        _paged_suffix_kernel,
        grid,
        out_ptr=out,
        lse_ptr=lse_arg,
        part_out_ptr=part_out,
        part_lse_ptr=part_lse,
        query_ptr=query,
        key_cache_ptr=key_cache,
        value_cache_ptr=value_cache,
        query_start_loc_ptr=query_start_loc,
        seq_lens_ptr=seq_lens,
        prefix_lens_ptr=prefix_lens,
        block_table_ptr=block_table,
        prefix_out_ptr=pre_out,
        prefix_lse_ptr=pre_lse,
        handoff_ptr=handoff.counters if handoff is not None else seq_lens,
        num_reqs=num_reqs,
        qk_scale=softmax_scale * 1.4426950408889634,
        stride_q_tok=query.stride(0),
        stride_q_head=query.stride(1),
        stride_o_tok=out.stride(0),
        stride_o_head=out.stride(1),
        stride_l_head=lse_arg.stride(-2),
        stride_l_tok=lse_arg.stride(-1),
        stride_po_split=part_out.stride(0),
        stride_po_tok=part_out.stride(1),
        stride_po_head=part_out.stride(2),
        stride_pl_split=part_lse.stride(0),
        stride_pl_head=part_lse.stride(1),
        stride_pl_tok=part_lse.stride(2),
        stride_xo_split=pre_out.stride(0),
        stride_xo_tok=pre_out.stride(1),
        stride_xo_head=pre_out.stride(2),
        stride_xl_split=pre_lse.stride(0),
        stride_xl_head=pre_lse.stride(1),
        stride_xl_tok=pre_lse.stride(2),
        stride_bt_req=block_table.stride(0),
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
        NUM_PREFIX_PARTS=pre_out.shape[0] if prefix_state is not None else 0,
        SPLIT_KV=split_kv,
        HANDOFF=handoff is not None,
        STORE_LSE=lse is not None,
        UPCAST_DOT=upcast,
        DOT_PRECISION=precision,
        **cfg,
        **pdl,
    )
    if split_kv:
        merge_partial_states(out, part_out, part_lse, lse)
    return out, lse


def suffix_tiling(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    num_reqs: int,
    max_query_len: int,
    max_seq_len: int,
    num_splits: int | None = None,
    config: dict | None = None,
) -> tuple[dict, int, int]:
    """(tile config, query tiles, KV splits) of a paged_suffix launch: its grid holds
    query tiles x KV heads x splits programs (handoff.py launches its finisher over the same)."""
    num_tokens, num_q_heads, head_size = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    qpk, sms = num_q_heads // num_kv_heads, device_sms(query)
    cfg = _suffix_config(qpk, head_size, block_size, max_query_len, config)
    n_q_tiles = num_reqs if cfg["ONE_TILE_PER_REQ"] else num_tokens // cfg["BLOCK_Q"] + num_reqs
    if num_splits is None:
        num_splits = _pick_num_splits(n_q_tiles * num_kv_heads, max_seq_len, cfg["TILE_N"], sms)
    programs_per_sm = n_q_tiles * num_kv_heads * num_splits / sms
    cfg = _suffix_config(qpk, head_size, block_size, max_query_len, config, programs_per_sm)
    return cfg, n_q_tiles, num_splits


def _follows_prefix_pass(query: torch.Tensor) -> bool:
    """Whether a launch now may use PDL: sm_90+ and the latest launch was the prefix kernel
    (relay_attention's fused schedule launches the two back to back)."""
    from .relay_prefix import _relay_prefix_kernel  # (relay_prefix imports this module)

    return supports_pdl(query) and follows_launch_of(_relay_prefix_kernel)


def _suffix_config(
    queries_per_kv: int,
    head_size: int,
    block_size: int,
    max_query_len: int,
    override: dict | None = None,
    programs_per_sm: float | None = None,
) -> dict:
    """Tile sizes, chosen here (no autotune at serve time: the kernel runs under CUDA graphs).

    BLOCK_M rows = BLOCK_Q tokens x QPK_PAD heads. tl.dot needs M >= 16, so a decode row block
    (one token) is padded to 16 rows (GQA 4: 4 real rows of 16; the K/V tile is loaded once for the
    4 heads). Decode: TILE_N = 64 keys (16 KB per K or V tile at head 128 fp16), 4 warps; TILE_N
    32/128 and 2/8 warps were within 2% or slower (measured, benchmark_kernels.py --tune).
    Decode stages (Triton 3.6 for sm_90, compiled on a CPU, with PREFETCH_BLOCK_IDS: see
    _paged_attend.py): at 3, two K/V buffers (70 KB, 96 registers: 3 programs per SM), so the next
    tile is in flight while a program computes; at 2, one buffer (38 KB, 119 registers: 4 programs
    per SM). On an H100 (benchmarks/results/kernels/prefetch_h100_session13.md) 2 stages were
    1-10% faster where a launch has fewer than DEEP_PIPELINE_PROGRAMS_PER_SM programs per SM (GQA
    batch 64-256, MHA batch 32-64: at most 16) and 1-2% slower from 31 on (MHA batch 128-256), so
    `programs_per_sm` (the launch's grid over the SMs; None: 3 stages) picks between them.
    Prefill: 128 rows x 32 keys, 4 warps, 2 stages, the best of 24 configurations (measured; ~2.4x
    behind FA3, see relay_prefix).
    Switches, off by default (measured no faster there): HEAD_FASTEST launches the KV heads of one
    request next to each other (they read adjacent 256-byte pieces of the same pages) instead of
    the same KV head of consecutive requests (relay_attention turns it on behind an external
    prefix pass, where it measured faster: EXTERNAL_PREFIX_SUFFIX_CONFIG); UNMASKED_FULL_TILES
    (see _paged_attend.py).
    PDL, on by default (5-14% faster relay decode on an H100, GQA and MHA, same results), with
    prefix_state: when this launch directly follows the prefix
    kernel's (CUDA sm_90+), launch with programmatic dependent launch, so that (with the prefix's
    LAUNCH_DEPENDENTS) this kernel streams its own KV while the prefix pass runs and waits for it
    only before its epilogue reads the prefix states. The caller must enqueue no other kernel
    between the two launches (the launcher checks only that no other launcher ran in between).
    """
    qpk_pad = next_pow2(queries_per_kv)
    rows = next_pow2(max(max_query_len, 1) * qpk_pad)
    block_m = min(max(rows, 16, qpk_pad), max(128, qpk_pad))
    big = block_m >= 128
    shallow = programs_per_sm is not None and programs_per_sm < DEEP_PIPELINE_PROGRAMS_PER_SM
    cfg = dict(
        BLOCK_M=block_m,
        TILE_N=32 if big or head_size > 128 else 64,
        num_warps=4,
        num_stages=2 if big or shallow else 3,
        HEAD_FASTEST=False,
        UNMASKED_FULL_TILES=False,
        PREFETCH_BLOCK_IDS=True,
        PDL=True,
    )
    cfg.update(override or {})
    block_q = max(cfg["BLOCK_M"] // qpk_pad, 1)
    return dict(cfg, QPK_PAD=qpk_pad, BLOCK_Q=block_q, ONE_TILE_PER_REQ=max_query_len <= block_q)


def _pick_num_splits(num_programs: int, max_seq_len: int, tile_n: int, sms: int) -> int:
    """Split the keys only when (request tile, KV head) programs cannot fill one wave.

    Splitting costs a merge launch plus fp32 partial traffic, so a batch that already has >= one
    program per SM stays unsplit (and then gets the fused prefix merge with no extra launch).
    Otherwise aim at ~2 programs per SM, keeping >= 4 tiles (256 keys) per split (guessed).
    The count is rounded down to a power of two: the merge kernel is compiled per split count,
    and five counts (2..32) are quick to compile at start-up (attention/warmup.py).
    """
    if num_programs >= sms:
        return 1
    max_useful = max(cdiv(max_seq_len, 4 * tile_n), 1)
    splits = max(1, min(cdiv(2 * sms, num_programs), max_useful, 32))
    return 1 << (splits.bit_length() - 1)


def _check_suffix_args(
    query, key_cache, value_cache, query_start_loc, seq_lens, block_table, prefix_lens
):
    check_query(query)
    dev = query.device
    check_int32("seq_lens", seq_lens, 1, dev)
    num_reqs = seq_lens.shape[0]
    check_int32("query_start_loc", query_start_loc, 1, dev)
    check_shape("query_start_loc", query_start_loc, (num_reqs + 1,))
    check_int32("prefix_lens", prefix_lens, 1, dev)
    check_shape("prefix_lens", prefix_lens, (num_reqs,))
    check_int32("block_table", block_table, 2, dev)
    check_shape("block_table", block_table, (num_reqs, None))


def _check_prefix_state(prefix_state, query) -> None:
    if not (isinstance(prefix_state, tuple) and len(prefix_state) == 2):
        raise ValueError("prefix_state must be a tuple (partial_out, partial_lse)")
    part_out, part_lse = prefix_state
    check_tensor("prefix_state[0]", part_out, 4, (torch.float32, query.dtype), query.device)
    check_shape("prefix_state[0]", part_out, (None,) + tuple(query.shape))
    check_tensor("prefix_state[1]", part_lse, 3, (torch.float32,), query.device)
    check_shape("prefix_state[1]", part_lse, (part_out.shape[0], query.shape[1], query.shape[0]))
    if part_out.stride(-1) != 1:
        raise ValueError("prefix_state[0] must be contiguous in its last dim")


# ---------------------------------------------------------------- kernel


# Per-step sizes are not specialized (Triton would compile a variant per divisibility by 16):
# a decode step compiles nothing new once its tile and split choices have been seen.
@triton.jit(do_not_specialize=["num_reqs", "stride_l_head", "stride_pl_head", "stride_xl_head",
                               "stride_bt_req"])
def _paged_suffix_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_size] (written when not SPLIT_KV)
    lse_ptr,  # [num_q_heads, num_tokens] float32 (written when STORE_LSE and not SPLIT_KV)
    part_out_ptr,  # [num_splits, num_tokens, num_q_heads, head_size] float32 (when SPLIT_KV)
    part_lse_ptr,  # [num_splits, num_q_heads, num_tokens] float32 (when SPLIT_KV)
    query_ptr,  # [num_tokens, num_q_heads, head_size]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    query_start_loc_ptr,  # [num_reqs + 1] int32
    seq_lens_ptr,  # [num_reqs] int32
    prefix_lens_ptr,  # [num_reqs] int32
    block_table_ptr,  # [num_reqs, max_blocks] int32
    prefix_out_ptr,  # [NUM_PREFIX_PARTS, num_tokens, num_q_heads, head_size] float32
    prefix_lse_ptr,  # [NUM_PREFIX_PARTS, num_q_heads, num_tokens] float32
    handoff_ptr,  # [2, query tiles x KV heads] int32 (HANDOFF): arrivals, then ready flags
    num_reqs,
    qk_scale,  # softmax_scale * log2(e)
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_l_head,
    stride_l_tok,
    stride_po_split,
    stride_po_tok,
    stride_po_head,
    stride_pl_split,
    stride_pl_head,
    stride_pl_tok,
    stride_xo_split,
    stride_xo_tok,
    stride_xo_head,
    stride_xl_split,
    stride_xl_head,
    stride_xl_tok,
    stride_bt_req,
    stride_k_blk,
    stride_k_slot,
    stride_k_head,
    stride_v_blk,
    stride_v_slot,
    stride_v_head,
    QUERIES_PER_KV: tl.constexpr,  # query heads per KV head
    QPK_PAD: tl.constexpr,  # next power of 2 of QUERIES_PER_KV
    BLOCK_Q: tl.constexpr,  # query tokens per program
    BLOCK_M: tl.constexpr,  # rows of the dot: >= BLOCK_Q * QPK_PAD and >= 16
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    ONE_TILE_PER_REQ: tl.constexpr,  # max_query_len <= BLOCK_Q: query tile index = request
    HEAD_FASTEST: tl.constexpr,  # grid (kv heads, query tiles, splits), else (query tiles, ...)
    UNMASKED_FULL_TILES: tl.constexpr,  # see _paged_attend.py
    PREFETCH_BLOCK_IDS: tl.constexpr,  # see _paged_attend.py
    PDL: tl.constexpr,  # launched with PDL after the prefix kernel: wait before reading its states
    NUM_PREFIX_PARTS: tl.constexpr,  # prefix partial states to fold in (fused merge); 0: none
    SPLIT_KV: tl.constexpr,  # write partial states instead of the output
    HANDOFF: tl.constexpr,  # the prefix pass runs concurrently: see handoff.py
    STORE_LSE: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    if HEAD_FASTEST:
        kv_head = tl.program_id(0)
        pid_q = tl.program_id(1)
        num_kv_heads = tl.num_programs(0)
    else:
        pid_q = tl.program_id(0)
        kv_head = tl.program_id(1)
        num_kv_heads = tl.num_programs(1)
    split = tl.program_id(2)
    num_splits = tl.num_programs(2)
    req, q_tile = program_tile(query_start_loc_ptr, num_reqs, pid_q, BLOCK_Q, ONE_TILE_PER_REQ)
    q_start = tl.load(query_start_loc_ptr + req)
    q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + req)
    prefix_len = tl.load(prefix_lens_ptr + req)
    context_len = seq_len - q_len  # keys before the first query token

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    row_q, head, row_valid, token = tile_rows(
        q_start, q_len, q_tile, kv_head, BLOCK_M, BLOCK_Q, QPK_PAD, QUERIES_PER_KV
    )
    q = tl.load(
        query_ptr + token[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :],
        mask=row_valid[:, None] & d_mask[None, :],
        other=0.0,
    )  # Q : (BLOCK_M, HEAD_PAD)
    row_last_key = tl.where(row_valid, context_len + row_q, -1)

    kv_lo = prefix_len
    # causal bound of the tile: its last query token sees up to position context_len + last row
    kv_hi = tl.minimum(seq_len, context_len + q_tile * BLOCK_Q + BLOCK_Q)
    # keys every row of the tile sees: those up to its first query token's position (decode: all)
    all_see = tl.minimum(kv_hi, context_len + q_tile * BLOCK_Q + 1)
    full_tiles = tl.maximum(all_see - kv_lo, 0) // TILE_N
    num_tiles = tl.maximum(tl.cdiv(kv_hi - kv_lo, TILE_N), 0)
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
        block_table_ptr + req.to(tl.int64) * stride_bt_req,
        kv_head,
        tile_begin,
        tile_end,
        full_tiles,
        kv_lo,
        kv_hi,
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
    # Fused merge: split 0 of a grouped request folds in the shared-prefix partial states. The
    # loop is unrolled (constexpr count) so the loads of all parts are in flight together; masked
    # rows (other splits, ungrouped requests) read nothing and absorb an empty (-inf) state.
    # (Nested tl.where, not `row_valid & (split == 0) & ...`: a block & scalar-bool mask fails
    # under the interpreter with "mask has unsupported dtype".)
    prefix_here = tl.where(split == 0, prefix_len, 0)
    deferred = prefix_len < 0  # False; True: the prefix pass is not done, handoff_finish merges
    if HANDOFF:  # (handoff.py) unsplit; the prefix pass runs beside this kernel
        item = pid_q * num_kv_heads + kv_head
        if prefix_len > 0:
            # acq_rel: if the finisher arrived first, the prefix pass's writes are visible now
            arrived_first = tl.atomic_add(handoff_ptr + item, 1, sem="acq_rel") == 0
            if arrived_first:
                deferred = prefix_len > 0
                prefix_here = prefix_here * 0
            else:  # second of the two: reset for the next call
                tl.store(handoff_ptr + item, 0)
    x_mask = tl.where(row_valid, prefix_here, 0) > 0
    if PDL:  # the prefix kernel may still be running: wait for it (and its writes)
        grid_dependency_wait()
    for j in tl.static_range(NUM_PREFIX_PARTS):
        x_lse = tl.load(
            prefix_lse_ptr + j * stride_xl_split + head * stride_xl_head + token * stride_xl_tok,
            mask=x_mask,
            other=float("-inf"),
            cache_modifier=".cg" if HANDOFF else "",  # written by a concurrent kernel: not L1
        )
        x_out = tl.load(
            prefix_out_ptr
            + j * stride_xo_split
            + token[:, None] * stride_xo_tok
            + head[:, None] * stride_xo_head
            + offs_d[None, :],
            mask=x_mask[:, None] & d_mask[None, :],
            other=0.0,
            cache_modifier=".cg" if HANDOFF else "",
        )
        m_i, l_i, acc = absorb_partial(m_i, l_i, acc, x_out, x_lse)
    out, lse = finalize_state(m_i, l_i, acc)
    if HANDOFF:  # a deferred program's rows go to the handoff's buffers, not to out
        if deferred:
            store_own_state(
                part_out_ptr, part_lse_ptr, out, lse, token, head, row_valid, offs_d, d_mask,
                stride_po_tok, stride_po_head, stride_pl_head, stride_pl_tok,
                handoff_ptr + tl.num_programs(0) * tl.num_programs(1) + item,
            )  # fmt: skip
        row_valid = row_valid & (offs_m < tl.where(deferred, 0, BLOCK_M))
    o_mask = row_valid[:, None] & d_mask[None, :]
    if SPLIT_KV:
        tl.store(
            part_out_ptr
            + split * stride_po_split
            + token[:, None] * stride_po_tok
            + head[:, None] * stride_po_head
            + offs_d[None, :],
            out,
            mask=o_mask,
        )
        tl.store(
            part_lse_ptr + split * stride_pl_split + head * stride_pl_head + token * stride_pl_tok,
            lse,
            mask=row_valid,
        )
    else:
        tl.store(
            out_ptr
            + token[:, None] * stride_o_tok
            + head[:, None] * stride_o_head
            + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=o_mask,
        )
        if STORE_LSE:
            tl.store(lse_ptr + head * stride_l_head + token * stride_l_tok, lse, mask=row_valid)


# ---------------------------------------------------------------- torch reference


def paged_suffix_ref(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    block_table: torch.Tensor,  # [num_reqs, max_blocks] int32
    prefix_lens: torch.Tensor,  # [num_reqs] int32
    softmax_scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_q_heads, head_size]
    lse: torch.Tensor | None = None,  # [num_q_heads, num_tokens] float32
    *,
    return_lse: bool = True,
    prefix_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_splits: int | None = None,
    config: dict | None = None,
    handoff: Handoff | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 torch version of `paged_suffix` (tuning arguments and `handoff` are accepted and
    ignored: the reference folds `prefix_state` in everywhere)."""
    from .merge import merge_partial_states_ref

    num_tokens, num_q_heads, _ = query.shape
    out = torch.empty_like(query) if out is None else out
    if lse is None and (return_lse or prefix_state is not None):
        lse = torch.empty(num_q_heads, num_tokens, dtype=torch.float32, device=query.device)
    qsl, sl, pl = query_start_loc.tolist(), seq_lens.tolist(), prefix_lens.tolist()
    own_out = torch.zeros(
        num_tokens, num_q_heads, query.shape[2], dtype=torch.float32, device=query.device
    )
    own_lse = torch.full((num_q_heads, num_tokens), float("-inf"), device=query.device)
    for r in range(len(sl)):
        q_lo, q_hi = qsl[r], qsl[r + 1]
        o, l_ = attend_ref(
            query[q_lo:q_hi],
            key_cache,
            value_cache,
            block_table[r],
            pl[r],
            sl[r],
            softmax_scale,
            first_query_pos=sl[r] - (q_hi - q_lo),
        )
        own_out[q_lo:q_hi], own_lse[:, q_lo:q_hi] = o, l_
    if prefix_state is not None:
        grouped = torch.zeros(num_tokens, dtype=torch.bool, device=query.device)
        for r in range(len(sl)):
            grouped[qsl[r] : qsl[r + 1]] = pl[r] > 0
        pre_out, pre_lse = prefix_state
        pre_lse = torch.where(grouped, pre_lse, torch.full_like(pre_lse, float("-inf")))
        parts_out = torch.cat([own_out.unsqueeze(0), pre_out.float()])
        merge_partial_states_ref(out, parts_out, torch.cat([own_lse.unsqueeze(0), pre_lse]), lse)
        return out, lse
    out.copy_(own_out.to(out.dtype))
    if lse is not None:
        lse.copy_(own_lse)
    return out, lse


def gather_kv(cache: torch.Tensor, block_row: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Keys/values at positions [lo, hi) of one block-table row: [hi - lo, num_kv_heads, head]."""
    pos = torch.arange(lo, hi, device=cache.device)
    block_size = cache.shape[1]
    return cache[block_row.long()[pos // block_size], pos % block_size]


def attend_ref(
    q: torch.Tensor,  # [n_q, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_row: torch.Tensor,  # [max_blocks] int32
    kv_lo: int,
    kv_hi: int,
    softmax_scale: float,
    first_query_pos: int | None,  # position of q[0] (causal); None: every query sees [kv_lo, kv_hi)
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 attention of q over keys [kv_lo, kv_hi) of one row; ([n_q, H, D] fp32, [H, n_q] lse)."""
    n_q, num_q_heads, head_size = q.shape
    if n_q == 0 or kv_hi <= kv_lo:
        return (
            torch.zeros(n_q, num_q_heads, head_size, device=q.device),
            torch.full((num_q_heads, n_q), float("-inf"), device=q.device),
        )
    k = gather_kv(key_cache, block_row, kv_lo, kv_hi).float()  # [n_k, Hkv, D]
    v = gather_kv(value_cache, block_row, kv_lo, kv_hi).float()
    rep = num_q_heads // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [n_k, H, D]
    s = torch.einsum("qhd,khd->hqk", q.float(), k) * softmax_scale  # [H, n_q, n_k]
    if first_query_pos is not None:
        q_pos = first_query_pos + torch.arange(n_q, device=q.device)
        k_pos = torch.arange(kv_lo, kv_hi, device=q.device)
        s = s.masked_fill(k_pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, n_q]; -inf for rows that see nothing
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse).unsqueeze(-1))
    return torch.einsum("hqk,khd->qhd", p, v), lse
