"""Handoff: the prefix pass beside the suffix pass with no merge launch after them.

The "overlap" schedule (relay_attention.py) runs the prefix pass on a side stream beside the
suffix kernel, which writes its own fp32 state; after the join, a merge kernel combines the two.
The join and the merge launch sit on the critical path. Here each suffix program folds the prefix
state in itself when the prefix pass has finished by the time the program's own keys are done
(most programs: the prefix pass is short), and otherwise hands its own state over to a finisher
that runs on the side stream right after the prefix pass:

    side stream:  prefix pass (writes prefix_state) -> handoff_finish
    main stream:  paged_suffix(..., handoff=h)
                  then the join (the side stream is long done: nothing left to wait for)

Per suffix program (one query tile x one KV head: an "item") two int32 counters, zero between
calls: arrivals and a ready flag. The suffix program, when its own keys are done, and the finisher
program of the same item each add 1 to the item's arrival count (acq_rel, GPU scope); what the
counter held tells each whether it came first:

    suffix first    writes its own state (out normalised, lse) to the handoff buffers, then sets
                    the ready flag (release); the finisher, second, waits for the flag (acquire),
                    merges the two states into out / lse, and zeroes both counters.
    finisher first  exits; the suffix program, second, sees the prefix pass's writes (the
                    finisher ran after it in stream order, and its release is acquired by the
                    suffix's add), folds the prefix state into its own as in the fused schedule,
                    writes out / lse and zeroes the arrival count.

Only the finisher ever waits, and only for a suffix program that has arrived, which is running
and never waits itself: no schedule of the two kernels on the GPU can deadlock. Ungrouped
requests (prefix_lens 0) take no part: their suffix program writes out directly and their
finisher program exits. The counters end each call at zero, so a recorded launch
(kernels/replay.py) can reuse them for the next layer.

Where it pays: FA3's unsplit pass beside the suffix, for decode batches of 12-24 suffix programs
per SM (cost_model.prefix_pass_beside_suffix; measured on an H200 in
benchmarks/results/kernels/decode_h200_session18.md).

Under TRITON_INTERPRET=1 one kernel's programs run before the next kernel's: finisher-first (the
side stream's order) folds everywhere in the suffix kernel, suffix-first defers every grouped
item to the finisher; tests/kernels/test_handoff.py runs both orders.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._launch import (
    check_lse,
    check_out,
    check_shape,
    check_tensor,
    device_sms,
    launch,
    next_pow2,
)
from ._tiles import program_tile, tile_rows
from .merge import absorb_splits, finalize_state


# The finisher's grid. Each program walks items pid, pid + programs, ...: an item costs it an
# atomic round trip (and, deferred, a merge), and while its programs are resident the suffix's
# pending programs wait for their slots. Measured on an H200 (decode, GQA batch 256-512 and MHA
# batch 256, sweep_relay_decode.py, decode_h200_session18.md runs 2-3): 132 programs 15-31%
# slower than the best grid (its last items end after the suffix: the join waits), ~1000 (8 per
# SM) the best or within 2.5% of it, one program per item within 4%; 1, 2 or 4 warps within 2%.
FINISH_PROGRAMS_PER_SM = 8


@dataclass
class Handoff:
    """The buffers of the handoff between a suffix launch and its finisher: new for each call,
    or kept from call to call of the same shapes (relay_attention's `handoff`, handoff_buffers)."""

    counters: torch.Tensor  # [2 * num_items] int32, zero: arrivals, then ready flags
    own_out: torch.Tensor  # [1, num_tokens, num_q_heads, head_size] fp32, a deferred item's own
    own_lse: torch.Tensor  # [1, num_q_heads, num_tokens] fp32 state (suffix keys only)
    finish_programs: int | None = None  # the finisher's grid (None: FINISH_PROGRAMS_PER_SM)
    finish_warps: int = 1  # its programs' warps

    @classmethod
    def new(cls, query: torch.Tensor, num_items: int, finish_programs: int | None = None,
            finish_warps: int = 1) -> "Handoff":  # fmt: skip
        """Buffers for a suffix launch of `num_items` (query tile, KV head) programs. They may
        serve call after call (the counters end each call at zero) for the same shapes."""
        num_tokens, num_q_heads, _ = query.shape
        f32 = dict(dtype=torch.float32, device=query.device)
        return cls(
            counters=torch.zeros(2 * num_items, dtype=torch.int32, device=query.device),
            own_out=torch.empty((1,) + tuple(query.shape), **f32),
            own_lse=torch.empty(1, num_q_heads, num_tokens, **f32),
            finish_programs=finish_programs,
            finish_warps=finish_warps,
        )

    def check(self, query: torch.Tensor, num_items: int) -> None:
        check_tensor("handoff.counters", self.counters, 1, (torch.int32,), query.device)
        check_shape("handoff.counters", self.counters, (2 * num_items,))
        check_tensor("handoff.own_out", self.own_out, 4, (torch.float32,), query.device)
        check_shape("handoff.own_out", self.own_out, (1,) + tuple(query.shape))
        check_tensor("handoff.own_lse", self.own_lse, 3, (torch.float32,), query.device)
        check_shape("handoff.own_lse", self.own_lse, (1, query.shape[1], query.shape[0]))


def handoff_finish(
    query: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    query_start_loc: torch.Tensor,  # [num_reqs + 1] int32
    seq_lens: torch.Tensor,  # [num_reqs] int32
    prefix_lens: torch.Tensor,  # [num_reqs] int32
    prefix_state: tuple[torch.Tensor, torch.Tensor],
    # ^ ([1, num_tokens, num_q_heads, head_size] fp32 or query dtype, [1, num_q_heads, num_tokens])
    handoff: Handoff,
    out: torch.Tensor,  # [num_tokens, num_q_heads, head_size]
    lse: torch.Tensor | None,  # [num_q_heads, num_tokens] float32
    *,
    max_query_len: int,
    max_seq_len: int,
    config: dict | None = None,
) -> None:
    """The finisher: launch on the prefix pass's stream right after it, with the arguments of the
    paged_suffix(..., handoff=handoff) launch it pairs with (same grid of items)."""
    from .paged_suffix import _check_prefix_state, suffix_tiling  # (paged_suffix imports this)

    num_tokens, num_q_heads, head_size = query.shape
    num_kv_heads, num_reqs = key_cache.shape[2], seq_lens.shape[0]
    _check_prefix_state(prefix_state, query)
    check_out("out", out, query)
    if lse is not None:
        check_lse("lse", lse, num_q_heads, num_tokens, query.device)
    if num_reqs == 0 or num_tokens == 0:
        return
    cfg, n_q_tiles, _ = suffix_tiling(query, key_cache, num_reqs, max_query_len, max_seq_len, 1,
                                      config)  # fmt: skip
    handoff.check(query, n_q_tiles * num_kv_heads)
    pre_out, pre_lse = prefix_state
    lse_arg = lse if lse is not None else handoff.own_lse[0]
    num_items = n_q_tiles * num_kv_heads
    programs = handoff.finish_programs or FINISH_PROGRAMS_PER_SM * device_sms(query)
    launch(
        _handoff_finish_kernel,
        (min(programs, num_items),),
        out_ptr=out,
        lse_ptr=lse_arg,
        own_out_ptr=handoff.own_out,
        own_lse_ptr=handoff.own_lse,
        prefix_out_ptr=pre_out,
        prefix_lse_ptr=pre_lse,
        handoff_ptr=handoff.counters,
        query_start_loc_ptr=query_start_loc,
        prefix_lens_ptr=prefix_lens,
        num_reqs=num_reqs,
        num_items=num_items,
        num_kv_heads=num_kv_heads,
        stride_o_tok=out.stride(0),
        stride_o_head=out.stride(1),
        stride_l_head=lse_arg.stride(0),
        stride_l_tok=lse_arg.stride(1),
        stride_po_tok=handoff.own_out.stride(1),
        stride_po_head=handoff.own_out.stride(2),
        stride_pl_head=handoff.own_lse.stride(1),
        stride_pl_tok=handoff.own_lse.stride(2),
        stride_xo_tok=pre_out.stride(1),
        stride_xo_head=pre_out.stride(2),
        stride_xl_head=pre_lse.stride(1),
        stride_xl_tok=pre_lse.stride(2),
        QUERIES_PER_KV=num_q_heads // num_kv_heads,
        QPK_PAD=cfg["QPK_PAD"],
        BLOCK_Q=cfg["BLOCK_Q"],
        BLOCK_M=cfg["BLOCK_M"],
        HEAD_SIZE=head_size,
        HEAD_PAD=max(next_pow2(head_size), 16),
        ONE_TILE_PER_REQ=cfg["ONE_TILE_PER_REQ"],
        STORE_LSE=lse is not None,
        num_warps=handoff.finish_warps,
    )


@triton.jit
def store_own_state(
    own_out_ptr,  # [1, num_tokens, num_q_heads, head_size] fp32
    own_lse_ptr,  # [1, num_q_heads, num_tokens] fp32
    out,  # [BLOCK_M, HEAD_PAD] fp32, normalised
    lse,  # [BLOCK_M] fp32, natural log
    token,  # [BLOCK_M] int64
    head,  # [BLOCK_M]
    row_valid,  # [BLOCK_M]
    offs_d,
    d_mask,
    stride_po_tok,
    stride_po_head,
    stride_pl_head,
    stride_pl_tok,
    ready_ptr,  # this item's ready flag
):
    """A suffix program that came first: its state for the finisher, then the ready flag."""
    tl.store(
        own_out_ptr + token[:, None] * stride_po_tok + head[:, None] * stride_po_head
        + offs_d[None, :],
        out,
        mask=row_valid[:, None] & d_mask[None, :],
    )  # fmt: skip
    tl.store(own_lse_ptr + head * stride_pl_head + token * stride_pl_tok, lse, mask=row_valid)
    tl.debug_barrier()  # every thread's stores come before the flag (then release: GPU scope)
    tl.atomic_xchg(ready_ptr, 1, sem="release")


@triton.jit(do_not_specialize=["num_reqs", "num_items", "stride_l_head", "stride_pl_head",
                               "stride_xl_head"])
def _handoff_finish_kernel(
    out_ptr,  # [num_tokens, num_q_heads, head_size]
    lse_ptr,  # [num_q_heads, num_tokens] float32 (written when STORE_LSE)
    own_out_ptr,  # [1, num_tokens, num_q_heads, head_size] fp32
    own_lse_ptr,  # [1, num_q_heads, num_tokens] fp32
    prefix_out_ptr,  # [1, num_tokens, num_q_heads, head_size]
    prefix_lse_ptr,  # [1, num_q_heads, num_tokens] fp32
    handoff_ptr,  # [2, num_items] int32: arrivals, then ready flags
    query_start_loc_ptr,  # [num_reqs + 1] int32
    prefix_lens_ptr,  # [num_reqs] int32
    num_reqs,
    num_items,  # the suffix launch's query tiles x KV heads
    num_kv_heads,
    stride_o_tok,
    stride_o_head,
    stride_l_head,
    stride_l_tok,
    stride_po_tok,
    stride_po_head,
    stride_pl_head,
    stride_pl_tok,
    stride_xo_tok,
    stride_xo_head,
    stride_xl_head,
    stride_xl_tok,
    QUERIES_PER_KV: tl.constexpr,
    QPK_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    ONE_TILE_PER_REQ: tl.constexpr,
    STORE_LSE: tl.constexpr,
):
    # few programs, each walking items pid, pid + programs, ... (item = query tile x KV heads +
    # KV head, as the suffix launch numbers them): most items need nothing, so a program per item
    # would mostly cost the GPU's program launches, ahead of the suffix's pending programs
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        pid_q = item // num_kv_heads
        kv_head = item % num_kv_heads
        req, q_tile = program_tile(query_start_loc_ptr, num_reqs, pid_q, BLOCK_Q,
                                   ONE_TILE_PER_REQ)  # fmt: skip
        q_start = tl.load(query_start_loc_ptr + req)
        q_len = tl.load(query_start_loc_ptr + req + 1) - q_start
        # a tile with no tokens has no suffix program; an ungrouped request's writes out itself
        if (q_tile * BLOCK_Q < q_len) & (tl.load(prefix_lens_ptr + req) > 0):
            # acq_rel: releases the prefix pass's writes (before this kernel in stream order) to
            # a suffix program that comes second; first, it leaves the item to that program
            if tl.atomic_add(handoff_ptr + item, 1, sem="acq_rel") == 1:
                ready_ptr = handoff_ptr + num_items + item
                while tl.atomic_add(ready_ptr, 0, sem="acquire") == 0:
                    pass  # the suffix program came first and is writing its state
                _, head, row_valid, token = tile_rows(
                    q_start, q_len, q_tile, kv_head, BLOCK_M, BLOCK_Q, QPK_PAD, QUERIES_PER_KV
                )
                _merge_item(out_ptr, lse_ptr, own_out_ptr, own_lse_ptr, prefix_out_ptr,
                            prefix_lse_ptr, token, head, row_valid, offs_d, d_mask, stride_o_tok,
                            stride_o_head, stride_l_head, stride_l_tok, stride_po_tok,
                            stride_po_head, stride_pl_head, stride_pl_tok, stride_xo_tok,
                            stride_xo_head, stride_xl_head, stride_xl_tok, BLOCK_M, HEAD_PAD,
                            STORE_LSE)  # fmt: skip
                tl.store(handoff_ptr + item, 0)  # both came: zero for the next call
                tl.store(ready_ptr, 0)


@triton.jit
def _merge_item(out_ptr, lse_ptr, own_out_ptr, own_lse_ptr, prefix_out_ptr, prefix_lse_ptr, token,
                head, row_valid, offs_d, d_mask, stride_o_tok, stride_o_head, stride_l_head,
                stride_l_tok, stride_po_tok, stride_po_head, stride_pl_head, stride_pl_tok,
                stride_xo_tok, stride_xo_head, stride_xl_head, stride_xl_tok,
                BLOCK_M: tl.constexpr, HEAD_PAD: tl.constexpr,
                STORE_LSE: tl.constexpr):  # fmt: skip
    """out / lse of a deferred item's rows: its own state merged with the prefix pass's (both
    written by other kernels while this one runs: loaded .cg, past the L1)."""
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], tl.float32)
    own_rows = token * stride_po_tok + head * stride_po_head
    own_lse_rows = head * stride_pl_head + token * stride_pl_tok
    m_i, l_i, acc = absorb_splits(m_i, l_i, acc, own_out_ptr, own_lse_ptr, own_rows, own_lse_rows,
                                  row_valid, 0, 0, offs_d, d_mask, 1, ".cg")
    prefix_rows = token * stride_xo_tok + head * stride_xo_head
    prefix_lse_rows = head * stride_xl_head + token * stride_xl_tok
    m_i, l_i, acc = absorb_splits(m_i, l_i, acc, prefix_out_ptr, prefix_lse_ptr, prefix_rows,
                                  prefix_lse_rows, row_valid, 0, 0, offs_d, d_mask, 1, ".cg")
    out, lse = finalize_state(m_i, l_i, acc)
    tl.store(
        out_ptr + token[:, None] * stride_o_tok + head[:, None] * stride_o_head + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=row_valid[:, None] & d_mask[None, :],
    )
    if STORE_LSE:
        tl.store(lse_ptr + head * stride_l_head + token * stride_l_tok, lse, mask=row_valid)
