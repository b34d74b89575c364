"""The inner loop shared by the prefix and suffix kernels: online softmax of one query tile over a
range of paged KV.

State convention inside kernels: (m, l, acc) in base 2, i.e. m = running max of the log2-scaled
scores, l = sum 2^(s - m), acc = sum 2^(s - m) * v (unnormalised, fp32). Launchers convert to the
public convention (lse: float32, natural log, [num_heads, num_tokens]) when a state leaves a kernel.

Masking: a tile is "full" when every key of it is in range and visible to every row of the query
tile. With UNMASKED_FULL_TILES the full tiles run a loop without any mask (no predicated loads, no
score select), and only the rest (the partial last tile, causal diagonal tiles) the masked loop.
Off (the default), every tile takes the masked loop. Rows that are padding (no query) see real
scores in the unmasked loop; their q is 0, so their state stays finite, and it is never stored.

Block ids one tile ahead (PREFETCH_BLOCK_IDS, on by default): a K/V tile's addresses come from the
block table. Loaded in the same iteration, that load made Triton 3.6's software pipeliner (sm_90)
wait for every outstanding copy at the top of each iteration (TTGIR: async_wait {num = 0}), so no
K/V tile was ever in flight while a program computed, whatever num_stages said. Loading the next
tile's block ids at the end of each iteration (a loop-carried value) lets the K/V copies run
num_stages - 1 tiles ahead (async_wait {num = 2} at 3 stages); tests/kernels/test_compile_sm90.py
checks it. On an H100 the GQA prefix pass of a 256-request group got 25% faster (prefix 4096:
0.093 -> 0.070 ms; benchmarks/results/kernels/prefetch_h100_session13.md). Same arithmetic, same
results.
"""

import triton
import triton.language as tl

from ._launch import interpreting

# Programmatic dependent launch (PDL, sm_90+): griddepcontrol as inline PTX, not Triton's
# tl.extra.cuda.gdc_* (whose form changed between releases, and an older launch_dependents was
# marked pure, so an unused result could be dropped). The interpreter runs programs one after
# another and has no PTX: there they are no-ops.
if not interpreting():

    @triton.jit
    def grid_dependency_wait():
        """Wait until the kernel this one was launched after (with PDL) has finished and its
        writes are visible. Valid, and immediate, when the launch did not use PDL."""
        tl.inline_asm_elementwise(
            "griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32, is_pure=False, pack=1
        )

    @triton.jit
    def grid_dependency_launch_dependents():
        """Let the next kernel, if launched with PDL, start once every program got here."""
        tl.inline_asm_elementwise(
            "griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32, is_pure=False,
            pack=1,
        )  # fmt: skip

else:

    @triton.jit
    def grid_dependency_wait():
        pass

    @triton.jit
    def grid_dependency_launch_dependents():
        pass


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
    full_tiles,  # scalar: tiles [0, full_tiles) are full (in range, visible to every row)
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
    UNMASKED_FULL_TILES: tl.constexpr,  # full tiles skip every mask (see the module docstring)
    PREFETCH_BLOCK_IDS: tl.constexpr,  # load a tile's block ids one iteration ahead (module doc)
):
    """Tiles [tile_begin, tile_end) folded into (m_i, l_i, acc)."""
    masked_begin = tile_begin
    if UNMASKED_FULL_TILES:
        masked_begin = tl.maximum(tl.minimum(tile_end, full_tiles), tile_begin)
        m_i, l_i, acc = _attend_loop(
            q, m_i, l_i, acc, key_cache_ptr, value_cache_ptr, block_row_ptr, kv_head,
            tile_begin, masked_begin, kv_lo, kv_hi, row_last_key, qk_scale,
            stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
            BLOCK_SIZE, TILE_N, HEAD_SIZE, HEAD_PAD, UPCAST_DOT, DOT_PRECISION, False,
            PREFETCH_BLOCK_IDS,
        )  # fmt: skip
    return _attend_loop(
        q, m_i, l_i, acc, key_cache_ptr, value_cache_ptr, block_row_ptr, kv_head,
        masked_begin, tile_end, kv_lo, kv_hi, row_last_key, qk_scale,
        stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
        BLOCK_SIZE, TILE_N, HEAD_SIZE, HEAD_PAD, UPCAST_DOT, DOT_PRECISION, True,
        PREFETCH_BLOCK_IDS,
    )  # fmt: skip


@triton.jit
def _tile_block_ids(block_row_ptr, key_pos, kv_hi, BLOCK_SIZE: tl.constexpr):
    """[TILE_N] int64 block ids of the keys at `key_pos` (0 past kv_hi: never read)."""
    return tl.load(block_row_ptr + key_pos // BLOCK_SIZE, mask=key_pos < kv_hi, other=0).to(
        tl.int64
    )


@triton.jit
def _attend_loop(
    q, m_i, l_i, acc,  # as in paged_attend
    key_cache_ptr, value_cache_ptr, block_row_ptr, kv_head,
    tile_begin, tile_end, kv_lo, kv_hi, row_last_key, qk_scale,
    stride_k_blk, stride_k_slot, stride_k_head, stride_v_blk, stride_v_slot, stride_v_head,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASKED: tl.constexpr,  # False: every tile visited is full (the caller guarantees it)
    PREFETCH_BLOCK_IDS: tl.constexpr,
):  # fmt: skip
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    if PREFETCH_BLOCK_IDS:  # the first tile's block ids; each iteration then loads the next one's
        next_blk = _tile_block_ids(block_row_ptr, kv_lo + tile_begin * TILE_N + offs_n, kv_hi,
                                   BLOCK_SIZE)  # fmt: skip
    for t in range(tile_begin, tile_end):
        key_pos = kv_lo + t * TILE_N + offs_n  # [TILE_N]
        in_range = key_pos < kv_hi
        if PREFETCH_BLOCK_IDS:
            blk = next_blk
            next_blk = _tile_block_ids(block_row_ptr, key_pos + TILE_N, kv_hi, BLOCK_SIZE)
        elif MASKED:
            blk = _tile_block_ids(block_row_ptr, key_pos, kv_hi, BLOCK_SIZE)
        else:
            blk = tl.load(block_row_ptr + key_pos // BLOCK_SIZE).to(tl.int64)
        slot = key_pos % BLOCK_SIZE
        k_off = blk * stride_k_blk + slot * stride_k_slot + kv_head * stride_k_head
        v_off = blk * stride_v_blk + slot * stride_v_slot + kv_head * stride_v_head
        # K^T : (HEAD_PAD, TILE_N), V : (TILE_N, HEAD_PAD)
        k_ptrs = key_cache_ptr + k_off[None, :] + offs_d[:, None]
        v_ptrs = value_cache_ptr + v_off[:, None] + offs_d[None, :]
        if MASKED:
            # NOTE: slots past kv_hi are masked on load, not only in the scores: an unwritten slot
            # may hold NaN, and 0 * NaN in P @ V would poison the row.
            k = tl.load(k_ptrs, mask=d_mask[:, None] & in_range[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=in_range[:, None] & d_mask[None, :], other=0.0)
        elif HEAD_PAD != HEAD_SIZE:
            k = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        s = tile_dot(q, k, UPCAST_DOT, DOT_PRECISION) * qk_scale  # S : (BLOCK_M, TILE_N)
        if MASKED:
            visible = (key_pos[None, :] <= row_last_key[:, None]) & in_range[None, :]
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED:  # an all-masked row stays empty, not NaN
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:  # every score is finite, so m_new is
            m_safe = m_new
        p = tl.math.exp2(s - m_safe[:, None])  # P : (BLOCK_M, TILE_N)
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc
