"""The inner loop shared by the prefix and suffix kernels: online softmax of one query tile over a
range of paged KV.

State convention inside kernels: (m, l, acc) in base 2, i.e. m = running max of the log2-scaled
scores, l = sum 2^(s - m), acc = sum 2^(s - m) * v (unnormalised, fp32). Launchers convert to the
public convention (lse: float32, natural log, [num_heads, num_tokens]) when a state leaves a kernel.
"""

import triton
import triton.language as tl


@triton.jit
def tile_dot(a, b, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """tl.dot with fp32 accumulation; UPCAST_DOT works around the interpreter's bf16 dot."""
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def paged_attend(
    q,  # [BLOCK_M, HEAD_PAD] query tile, input dtype; padded rows/cols are 0
    m_i,  # [BLOCK_M] fp32 running max (log2 units), -inf when empty
    l_i,  # [BLOCK_M] fp32 running sum of 2^(s - m)
    acc,  # [BLOCK_M, HEAD_PAD] fp32 running sum of 2^(s - m) * v
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
    BLOCK_SIZE: tl.constexpr,  # tokens per KV page, power of 2
    TILE_N: tl.constexpr,  # keys per iteration, power of 2 (a page, several pages or part of one)
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,  # next power of 2 of HEAD_SIZE
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    for t in range(tile_begin, tile_end):
        key_pos = kv_lo + t * TILE_N + offs_n  # [TILE_N]
        in_range = key_pos < kv_hi
        page = key_pos // BLOCK_SIZE
        blk = tl.load(block_row_ptr + page, mask=in_range, other=0).to(tl.int64)  # [TILE_N]
        slot = key_pos % BLOCK_SIZE
        k_off = blk * stride_k_blk + slot * stride_k_slot + kv_head * stride_k_head
        v_off = blk * stride_v_blk + slot * stride_v_slot + kv_head * stride_v_head
        # NOTE: slots past kv_hi are masked on load, not only in the scores: an unwritten slot may
        # hold NaN, and 0 * NaN in P @ V would poison the row.
        k_mask = d_mask[:, None] & in_range[None, :]
        k = tl.load(key_cache_ptr + k_off[None, :] + offs_d[:, None], mask=k_mask, other=0.0)
        # K^T : (HEAD_PAD, TILE_N)
        v_mask = in_range[:, None] & d_mask[None, :]
        v = tl.load(value_cache_ptr + v_off[:, None] + offs_d[None, :], mask=v_mask, other=0.0)
        # V : (TILE_N, HEAD_PAD)
        s = tile_dot(q, k, UPCAST_DOT, DOT_PRECISION) * qk_scale  # S : (BLOCK_M, TILE_N)
        visible = (key_pos[None, :] <= row_last_key[:, None]) & in_range[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(
            m_new == float("-inf"), 0.0, m_new
        )  # an all-masked row stays empty, not NaN
        p = tl.math.exp2(s - m_safe[:, None])  # P : (BLOCK_M, TILE_N)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc
