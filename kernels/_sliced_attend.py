"""The suffix's inner loop with the keys of each tile split into KEY_SLICES slices, one online-
softmax state per slice, combined once after the loop (flash-decoding's split, inside a program).

Why: a decode query tile at GQA 4 has 4 real rows of the 16 a dot needs, and with 4 warps Triton
lays the (16, TILE_N) score tile out with the warps side by side along the keys (mma layout
warpsPerCTA [1, 4], sm_90). Every row max and row sum of the online softmax then crosses warps
through shared memory, and so does P (each warp's P @ V needs the whole row), three barriers per
tile. Session 16 measured that softmax as the suffix's whole cost over a plain read of the own KV
while FA3's prefix pass holds half the SMs (benchmarks/results/kernels/decode_h200_session16.md).

Here the tile is a batch of KEY_SLICES dots, (KEY_SLICES, BLOCK_M, HEAD) x (KEY_SLICES, HEAD,
SLICE_N): Triton gives a batched dot's batch axis to the warps (warpsPerCTA [num_warps, 1, 1]), so
with num_warps == KEY_SLICES each warp owns one slice, its max, sum and P, and no reduction in the
loop leaves the warp. The cost: KEY_SLICES accumulators (fp32, BLOCK_M x HEAD each, one per warp)
instead of one shared by the warps, and one cross-warp combine per program.

Same state convention as _paged_attend.py (base 2: m = running max of log2-scaled scores, l = sum
2^(s - m), acc = sum 2^(s - m) * v). Same masking (every tile masked; slots past kv_hi are masked on
load, as unwritten slots may hold NaN). Block ids are loaded one tile ahead (PREFETCH_BLOCK_IDS in
_paged_attend.py), so the K/V copies are software pipelined.
"""

import triton
import triton.language as tl

from ._paged_attend import tile_dot


@triton.jit
def sliced_attend(
    q,  # [BLOCK_M, HEAD_PAD] query tile, input dtype; padded rows/cols are 0
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_row_ptr,  # [max_blocks] int32: the block-table row that maps key position // BLOCK_SIZE
    kv_head,  # scalar: KV head of this program
    tile_begin,  # scalar: first tile (of TILE_N keys, counted from kv_lo) to visit
    tile_end,  # scalar: one past the last tile
    kv_lo,  # scalar: first key position of tile 0
    kv_hi,  # scalar: keys at positions >= kv_hi are never loaded
    row_last_key,  # [BLOCK_M] int32: last key position each row may attend to (-1: none)
    qk_scale,  # softmax_scale * log2(e)
    stride_k_blk,
    stride_k_slot,
    stride_k_head,
    stride_v_blk,
    stride_v_slot,
    stride_v_head,
    BLOCK_M: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV page, power of 2
    TILE_N: tl.constexpr,  # keys per iteration, power of 2
    KEY_SLICES: tl.constexpr,  # slices per tile (one per warp), power of 2, TILE_N / it >= 16
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """(m [BLOCK_M], l [BLOCK_M], acc [BLOCK_M, HEAD_PAD]) of tiles [tile_begin, tile_end)."""
    SLICE_N: tl.constexpr = TILE_N // KEY_SLICES
    # key offset within a tile: [KEY_SLICES, SLICE_N], slice j holds keys j*SLICE_N ...
    offs_n = tl.arange(0, KEY_SLICES)[:, None] * SLICE_N + tl.arange(0, SLICE_N)[None, :]
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    q3 = tl.broadcast_to(q[None, :, :], (KEY_SLICES, BLOCK_M, HEAD_PAD))
    m_i = tl.full([KEY_SLICES, BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([KEY_SLICES, BLOCK_M], tl.float32)
    acc = tl.zeros([KEY_SLICES, BLOCK_M, HEAD_PAD], tl.float32)
    first = kv_lo + tile_begin * TILE_N + offs_n
    next_blk = tl.load(block_row_ptr + first // BLOCK_SIZE, mask=first < kv_hi, other=0)
    for t in range(tile_begin, tile_end):
        key_pos = kv_lo + t * TILE_N + offs_n  # [KEY_SLICES, SLICE_N]
        in_range = key_pos < kv_hi
        blk = next_blk.to(tl.int64)
        ahead = key_pos + TILE_N
        next_blk = tl.load(block_row_ptr + ahead // BLOCK_SIZE, mask=ahead < kv_hi, other=0)
        slot = key_pos % BLOCK_SIZE
        k_off = blk * stride_k_blk + slot * stride_k_slot + kv_head * stride_k_head
        v_off = blk * stride_v_blk + slot * stride_v_slot + kv_head * stride_v_head
        # K^T : (KEY_SLICES, HEAD_PAD, SLICE_N), V : (KEY_SLICES, SLICE_N, HEAD_PAD)
        k = tl.load(
            key_cache_ptr + k_off[:, None, :] + offs_d[None, :, None],
            mask=d_mask[None, :, None] & in_range[:, None, :],
            other=0.0,
        )
        v = tl.load(
            value_cache_ptr + v_off[:, :, None] + offs_d[None, None, :],
            mask=in_range[:, :, None] & d_mask[None, None, :],
            other=0.0,
        )
        s = tile_dot(q3, k, UPCAST_DOT, DOT_PRECISION) * qk_scale  # (KEY_SLICES, BLOCK_M, SLICE_N)
        visible = (key_pos[:, None, :] <= row_last_key[None, :, None]) & in_range[:, None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 2))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # an all-masked row stays empty
        p = tl.math.exp2(s - m_safe[:, :, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 2)
        acc = acc * alpha[:, :, None] + tile_dot(p.to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
    # combine the slices (exact: the same merge as merge.py's, in base 2)
    m = tl.max(m_i, 0)  # [BLOCK_M]
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(m_i - m_safe[None, :])  # [KEY_SLICES, BLOCK_M]; 0 for empty slices
    return m, tl.sum(l_i * w, 0), tl.sum(acc * w[:, :, None], 0)
