"""The suffix kernel's grid axis of query tiles: which request and which rows a program holds.

Request r's query tokens [query_start_loc[r], query_start_loc[r + 1]) are cut into tiles of
BLOCK_Q tokens; global tile ids of request r start at query_start_loc[r] // BLOCK_Q + r (an upper
bound that needs no prefix sum of tile counts: some ids hold no tokens, and their programs exit).
A tile's BLOCK_M rows are BLOCK_Q tokens x QPK_PAD query heads of one KV head (GQA packing).
Shared by paged_suffix.py and handoff.py, whose finisher walks the same grid.
"""

import triton
import triton.language as tl


@triton.jit
def program_tile(query_start_loc_ptr, num_reqs, pid_q, BLOCK_Q: tl.constexpr,
                 ONE_TILE_PER_REQ: tl.constexpr):  # fmt: skip
    """(request, its query tile) of global query tile `pid_q` (the grid's query-tile axis)."""
    if ONE_TILE_PER_REQ:
        req = pid_q
        q_tile = pid_q * 0
    else:
        req = _find_request(query_start_loc_ptr, num_reqs, pid_q, BLOCK_Q)
        q_tile = pid_q - (tl.load(query_start_loc_ptr + req) // BLOCK_Q + req)
    return req, q_tile


@triton.jit
def tile_rows(q_start, q_len, q_tile, kv_head, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr,
              QPK_PAD: tl.constexpr, QUERIES_PER_KV: tl.constexpr):  # fmt: skip
    """The BLOCK_M rows of a query tile, BLOCK_Q tokens x QPK_PAD heads of one KV head: each row's
    query index within the request, query head, validity and token (int64), all [BLOCK_M]."""
    offs_m = tl.arange(0, BLOCK_M)
    row_q = q_tile * BLOCK_Q + offs_m // QPK_PAD  # query index within the request
    head = kv_head * QUERIES_PER_KV + offs_m % QPK_PAD
    row_valid = (
        (offs_m // QPK_PAD < BLOCK_Q) & (row_q < q_len) & (offs_m % QPK_PAD < QUERIES_PER_KV)
    )
    return row_q, head, row_valid, (q_start + row_q).to(tl.int64)


@triton.jit
def _find_request(query_start_loc_ptr, num_reqs, q_tile_idx, BLOCK_Q: tl.constexpr):
    """Request owning global query tile `q_tile_idx`, where request r's tiles start at
    query_start_loc[r] // BLOCK_Q + r (an upper bound that needs no prefix sum of tile counts)."""
    lo: tl.int32 = 0
    hi = num_reqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if start <= q_tile_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1
