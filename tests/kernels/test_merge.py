"""merge_attn_states / merge_partial_states against their torch references and against attention."""

import pytest
import torch
from edgeprompt_vllm.kernels import (
    merge_attn_states,
    merge_attn_states_ref,
    merge_partial_states,
    merge_partial_states_ref,
)
from edgeprompt_vllm.kernels.paged_suffix import attend_ref

INF = float("inf")


def _states(num_splits, num_tokens, num_heads, head_size, dtype, gen):
    out = torch.randn(num_splits, num_tokens, num_heads, head_size, generator=gen).to(dtype)
    lse = torch.randn(num_splits, num_heads, num_tokens, generator=gen) * 3
    # Edge values on purpose: empty sides (-inf, and FA2's +inf), one token empty on every side.
    lse[0, 0, 1] = -INF
    lse[-1, 1, 2] = INF
    lse[:, :, 3] = -INF
    out[:, 3] = float("nan")  # an empty side's output must not leak, even as NaN
    return out, lse


@pytest.mark.parametrize(
    "dtype,head_size,num_heads",
    [
        (torch.float32, 64, 4),
        (torch.float16, 128, 3),
        (torch.bfloat16, 80, 20),  # head size not a power of 2; heads > one BLOCK_H
    ],
)
def test_merge_attn_states_matches_ref(dtype, head_size, num_heads, tol, assert_close, poisoned):
    gen = torch.Generator().manual_seed(1)
    num_tokens = 7
    out, lse = _states(2, num_tokens, num_heads, head_size, dtype, gen)
    got, got_lse = poisoned(out[0]), poisoned(lse[0])
    merge_attn_states(got, out[0], lse[0], out[1], lse[1], got_lse)
    want, want_lse = torch.empty_like(out[0]), torch.empty_like(lse[0])
    merge_attn_states_ref(want, out[0], lse[0], out[1], lse[1], want_lse)
    assert_close(got, want, *tol(dtype), "out")
    assert torch.equal(torch.isneginf(got_lse), torch.isneginf(want_lse))
    assert_close(got_lse, want_lse, 1e-5, 1e-5, "lse")
    assert torch.all(got[3] == 0) and torch.all(torch.isneginf(got_lse[:, 3])), "all-empty token"


def test_merge_partial_states_matches_ref(tol, assert_close, poisoned):
    gen = torch.Generator().manual_seed(2)
    out, lse = _states(5, 6, 4, 64, torch.float32, gen)
    got, got_lse = poisoned(out[0]), poisoned(lse[0])
    merge_partial_states(got, out, lse, got_lse)
    want, want_lse = torch.empty_like(out[0]), torch.empty_like(lse[0])
    merge_partial_states_ref(want, out, lse, want_lse)
    assert_close(got, want, *tol(torch.float32), "out")
    assert_close(got_lse, want_lse, 1e-5, 1e-5, "lse")


def test_merge_of_two_halves_equals_attention_over_all(assert_close):
    """The algebra the relay path rests on: merge(attn(K_a), attn(K_b)) == attn(K_a || K_b)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(5, 4, 64, generator=gen)
    cache_k = torch.randn(6, 16, 2, 64, generator=gen)
    cache_v = torch.randn(6, 16, 2, 64, generator=gen)
    row = torch.randperm(6, generator=gen).to(torch.int32)
    full, full_lse = attend_ref(q, cache_k, cache_v, row, 0, 90, 0.125, None)
    a, a_lse = attend_ref(q, cache_k, cache_v, row, 0, 37, 0.125, None)
    b, b_lse = attend_ref(q, cache_k, cache_v, row, 37, 90, 0.125, None)
    got, got_lse = torch.empty_like(q), torch.empty_like(full_lse)
    merge_attn_states(got, a, a_lse, b, b_lse, got_lse)
    assert_close(got, full, 1e-5, 1e-5, "out")
    assert_close(got_lse, full_lse, 1e-5, 1e-5, "lse")


def test_merge_rejects_bad_arguments():
    out = torch.zeros(3, 2, 64)
    lse = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="prefix_lse"):
        merge_attn_states(out, out, lse.half(), out, lse)
    with pytest.raises(ValueError, match="suffix_lse"):
        merge_attn_states(out, out, lse, out, lse.t().contiguous())
    with pytest.raises(ValueError, match="suffix_output"):
        merge_attn_states(out, out, lse, out[:2], lse)
