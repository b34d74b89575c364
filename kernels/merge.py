"""Exact log-sum-exp merge of partial attention states.

Two attentions of the same queries over disjoint key sets A and B combine exactly:

    lse = log(exp(lse_a) + exp(lse_b))
    out = exp(lse_a - lse) * out_a + exp(lse_b - lse) * out_b

(flash-decoding's split-KV reduce; the cascade / RelayAttention merge, Zhu et al., ACL 2024; section
2.2 of https://arxiv.org/abs/2501.01005). Everything is computed in fp32.

Convention: lse: float32, natural log, [num_heads, num_tokens] (vLLM's `merge_attn_states`).
An empty side has lse = -inf and contributes nothing, whatever its output holds. As vLLM does, +inf
(FA2's value for an empty sequence) is normalised to -inf. When every side is empty, out = 0 and
lse = -inf.

`merge_attn_states` keeps vLLM's signature; `merge_partial_states` reduces a leading split dim
([num_splits, num_tokens, num_heads, head_size]), as the split-KV suffix path needs.
The @triton.jit helpers `absorb_partial` / `finalize_state` are the same merge, used inside the
prefix and suffix kernels' epilogues (that is how the merge is fused into the suffix kernel).
"""

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

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------- launchers


def merge_attn_states(
    output: torch.Tensor,  # [num_tokens, num_heads, head_size]
    prefix_output: torch.Tensor,  # [num_tokens, num_heads, head_size]
    prefix_lse: torch.Tensor,  # [num_heads, num_tokens] float32
    suffix_output: torch.Tensor,  # [num_tokens, num_heads, head_size]
    suffix_lse: torch.Tensor,  # [num_heads, num_tokens] float32
    output_lse: torch.Tensor | None = None,  # [num_heads, num_tokens] float32
) -> None:
    """Two-way merge into `output` (and `output_lse`), vLLM's signature."""
    num_tokens, num_heads, _ = output.shape
    for name, t in (("prefix_output", prefix_output), ("suffix_output", suffix_output)):
        check_out(name, t, output, dtypes=(torch.float16, torch.bfloat16, torch.float32))
    for name, t in (("prefix_lse", prefix_lse), ("suffix_lse", suffix_lse)):
        check_lse(name, t, num_heads, num_tokens, output.device)
    _launch_merge(
        output,
        output_lse,
        prefix_output.unsqueeze(0),
        prefix_lse.unsqueeze(0),
        suffix_output.unsqueeze(0),
        suffix_lse.unsqueeze(0),
    )


def merge_partial_states(
    output: torch.Tensor,  # [num_tokens, num_heads, head_size]
    partial_output: torch.Tensor,  # [num_splits, num_tokens, num_heads, head_size]
    partial_lse: torch.Tensor,  # [num_splits, num_heads, num_tokens] float32
    output_lse: torch.Tensor | None = None,  # [num_heads, num_tokens] float32
) -> None:
    """Reduce the split dim of partial states into `output` (and `output_lse`)."""
    check_tensor("partial_output", partial_output, 4, None, output.device)
    num_splits = partial_output.shape[0]
    check_shape("partial_output", partial_output, (None,) + tuple(output.shape))
    check_tensor("partial_lse", partial_lse, 3, (torch.float32,), output.device)
    check_shape("partial_lse", partial_lse, (num_splits, output.shape[1], output.shape[0]))
    _launch_merge(
        output, output_lse, partial_output, partial_lse, partial_output[:0], partial_lse[:0]
    )


def _launch_merge(output, output_lse, a_out, a_lse, b_out, b_lse) -> None:
    """output = merge(all splits of a, all splits of b); b may have 0 splits."""
    check_tensor("output", output, 3, (torch.float16, torch.bfloat16, torch.float32))
    if output.stride(-1) != 1:
        raise ValueError(
            f"output must be contiguous in its last dim, got strides {output.stride()}"
        )
    num_tokens, num_heads, head_size = output.shape
    if output_lse is not None:
        check_lse("output_lse", output_lse, num_heads, num_tokens, output.device)
    for name, t in (("partial outputs", a_out), ("partial outputs", b_out)):
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(
                f"{name} must be contiguous in their last dim, got strides {t.stride()}"
            )
    if num_tokens == 0:
        return
    # One program per (token, BLOCK_H heads), each split's [BLOCK_H, head_size] load issued together
    # (the split counts are constexprs, the loop unrolled). BLOCK_H shrinks from 16 until there are
    # >= 4 programs per SM: with 16 heads, a 64-token decode batch had 128 programs and the merge
    # was latency-bound (12 us for 8 splits on an H100, measured).
    block_h = min(next_pow2(num_heads), 16)
    while block_h > 1 and num_tokens * triton.cdiv(num_heads, block_h) < 4 * device_sms(output):
        block_h //= 2
    grid = (num_tokens, triton.cdiv(num_heads, block_h))
    lse_out = output_lse if output_lse is not None else a_lse  # a dummy pointer when not stored
    launch(
        _merge_states_kernel,
        grid,
        out_ptr=output,
        out_lse_ptr=lse_out,
        a_out_ptr=a_out,
        a_lse_ptr=a_lse,
        b_out_ptr=b_out if b_out.shape[0] else a_out,
        b_lse_ptr=b_lse if b_lse.shape[0] else a_lse,
        num_heads=num_heads,
        stride_o_tok=output.stride(0),
        stride_o_head=output.stride(1),
        stride_ol_head=lse_out.stride(-2),
        stride_ol_tok=lse_out.stride(-1),
        stride_a_split=a_out.stride(0),
        stride_a_tok=a_out.stride(1),
        stride_a_head=a_out.stride(2),
        stride_al_split=a_lse.stride(0),
        stride_al_head=a_lse.stride(1),
        stride_al_tok=a_lse.stride(2),
        stride_b_split=b_out.stride(0),
        stride_b_tok=b_out.stride(1),
        stride_b_head=b_out.stride(2),
        stride_bl_split=b_lse.stride(0),
        stride_bl_head=b_lse.stride(1),
        stride_bl_tok=b_lse.stride(2),
        NUM_A=a_out.shape[0],
        NUM_B=b_out.shape[0],
        HEAD_SIZE=head_size,
        HEAD_PAD=max(next_pow2(head_size), 16),
        BLOCK_H=block_h,
        STORE_LSE=output_lse is not None,
    )


# ---------------------------------------------------------------- kernels


@triton.jit
def absorb_partial(
    m_i,  # [M] fp32 running max, log2 units
    l_i,  # [M] fp32 running sum
    acc,  # [M, D] fp32 unnormalised output
    o,  # [M, D] fp32 normalised partial output (may hold garbage where lse = -inf)
    lse,  # [M] fp32 partial lse, natural log; -inf = empty
):
    """Fold a normalised partial state into an online-softmax state (see _paged_attend.py)."""
    lse2 = lse * 1.4426950408889634
    m_new = tl.maximum(m_i, lse2)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_safe)
    beta = tl.math.exp2(lse2 - m_safe)
    l_i = l_i * alpha + beta
    acc = acc * alpha[:, None] + tl.where(beta[:, None] > 0.0, o, 0.0) * beta[:, None]
    return m_new, l_i, acc


@triton.jit
def finalize_state(m_i, l_i, acc):
    """(out [M, D] fp32, lse [M] natural log) of a state; an empty row gives (0, -inf)."""
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_keys, (m_i + tl.log2(l_safe)) * 0.6931471805599453, float("-inf"))
    return out, lse


@triton.jit
def absorb_splits(
    m_i,
    l_i,
    acc,
    out_ptr,
    lse_ptr,
    row_off,
    lse_row_off,
    mask,
    stride_split,
    stride_lse_split,
    offs_d,
    d_mask,
    NUM_SPLITS: tl.constexpr,
    CACHE: tl.constexpr = "",  # the loads' cache modifier (".cg": written by a concurrent kernel)
):
    """Fold NUM_SPLITS normalised states (out rows at out_ptr + row_off, lse at lse_ptr +
    lse_row_off, one split apart by the strides) into an online-softmax state."""
    for s in tl.static_range(NUM_SPLITS):
        lse = tl.load(lse_ptr + s * stride_lse_split + lse_row_off, mask=mask, other=float("-inf"),
                      cache_modifier=CACHE)  # fmt: skip
        lse = tl.where(lse == float("inf"), float("-inf"), lse)  # FA2's empty marker
        o = tl.load(
            out_ptr + s * stride_split + row_off[:, None] + offs_d[None, :],
            mask=mask[:, None] & d_mask[None, :],
            other=0.0,
            cache_modifier=CACHE,
        ).to(tl.float32)
        m_i, l_i, acc = absorb_partial(m_i, l_i, acc, o, lse)
    return m_i, l_i, acc


@triton.jit(do_not_specialize=["stride_ol_head", "stride_al_head", "stride_bl_head"])  # per-step
def _merge_states_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    out_lse_ptr,  # [num_heads, num_tokens] float32 (written when STORE_LSE)
    a_out_ptr,  # [num_a, num_tokens, num_heads, head_size]
    a_lse_ptr,  # [num_a, num_heads, num_tokens] float32
    b_out_ptr,  # [num_b, num_tokens, num_heads, head_size]
    b_lse_ptr,  # [num_b, num_heads, num_tokens] float32
    num_heads,
    stride_o_tok,
    stride_o_head,
    stride_ol_head,
    stride_ol_tok,
    stride_a_split,
    stride_a_tok,
    stride_a_head,
    stride_al_split,
    stride_al_head,
    stride_al_tok,
    stride_b_split,
    stride_b_tok,
    stride_b_head,
    stride_bl_split,
    stride_bl_head,
    stride_bl_tok,
    NUM_A: tl.constexpr,  # splits of state a
    NUM_B: tl.constexpr,  # splits of state b (may be 0)
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_H: tl.constexpr,  # heads per program
    STORE_LSE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    h_mask = heads < num_heads
    offs_d = tl.arange(0, HEAD_PAD)
    d_mask = offs_d < HEAD_SIZE
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_PAD], tl.float32)
    m_i, l_i, acc = absorb_splits(
        m_i,
        l_i,
        acc,
        a_out_ptr,
        a_lse_ptr,
        tok * stride_a_tok + heads * stride_a_head,
        heads * stride_al_head + tok * stride_al_tok,
        h_mask,
        stride_a_split,
        stride_al_split,
        offs_d,
        d_mask,
        NUM_A,
    )
    m_i, l_i, acc = absorb_splits(
        m_i,
        l_i,
        acc,
        b_out_ptr,
        b_lse_ptr,
        tok * stride_b_tok + heads * stride_b_head,
        heads * stride_bl_head + tok * stride_bl_tok,
        h_mask,
        stride_b_split,
        stride_bl_split,
        offs_d,
        d_mask,
        NUM_B,
    )
    out, lse = finalize_state(m_i, l_i, acc)
    o_ptrs = out_ptr + tok * stride_o_tok + heads[:, None] * stride_o_head + offs_d[None, :]
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    if STORE_LSE:
        tl.store(out_lse_ptr + heads * stride_ol_head + tok * stride_ol_tok, lse, mask=h_mask)


# ---------------------------------------------------------------- torch references


def merge_attn_states_ref(
    output: torch.Tensor,  # [num_tokens, num_heads, head_size]
    prefix_output: torch.Tensor,  # [num_tokens, num_heads, head_size]
    prefix_lse: torch.Tensor,  # [num_heads, num_tokens] float32
    suffix_output: torch.Tensor,  # [num_tokens, num_heads, head_size]
    suffix_lse: torch.Tensor,  # [num_heads, num_tokens] float32
    output_lse: torch.Tensor | None = None,  # [num_heads, num_tokens] float32
) -> None:
    merge_partial_states_ref(
        output,
        torch.stack([prefix_output.float(), suffix_output.float()]),
        torch.stack([prefix_lse, suffix_lse]),
        output_lse,
    )


def merge_partial_states_ref(
    output: torch.Tensor,  # [num_tokens, num_heads, head_size]
    partial_output: torch.Tensor,  # [num_splits, num_tokens, num_heads, head_size]
    partial_lse: torch.Tensor,  # [num_splits, num_heads, num_tokens] float32
    output_lse: torch.Tensor | None = None,  # [num_heads, num_tokens] float32
) -> None:
    lse = partial_lse.float().masked_fill(partial_lse == float("inf"), float("-inf"))  # [S, H, T]
    m = lse.max(dim=0).values if lse.shape[0] else torch.full_like(lse[0], float("-inf"))
    m_safe = torch.where(m == float("-inf"), torch.zeros_like(m), m)  # [H, T]
    w = torch.exp(lse - m_safe)  # [S, H, T]; 0 for empty splits
    denom = w.sum(dim=0)  # [H, T]
    w_tok = w.permute(0, 2, 1).unsqueeze(-1)  # [S, T, H, 1]
    num = torch.where(w_tok > 0, partial_output.float() * w_tok, torch.zeros(())).sum(dim=0)
    has = denom > 0
    out = num / torch.where(has, denom, torch.ones_like(denom)).t().unsqueeze(-1)
    output.copy_(out.to(output.dtype))
    if output_lse is not None:
        output_lse.copy_(
            torch.where(has, m_safe + torch.log(denom), torch.full_like(denom, float("-inf")))
        )
