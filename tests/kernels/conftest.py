"""Kernel-test fixtures: the tolerance table and a paged-batch builder."""

from dataclasses import dataclass

import pytest
import torch

# TRITON_INTERPRET (CPU) is set by tests/conftest.py before any kernel is imported.
from edgeprompt_vllm.kernels import RelayMetadata

# From vLLM tests/kernels/allclose_default.py, which takes them from PyTorch's
# test/test_transformers.py (default_atol / default_rtol).
DEFAULT_ATOL = {torch.float16: 1e-3, torch.bfloat16: 1e-3, torch.float32: 1e-5}
DEFAULT_RTOL = {torch.float16: 1e-3, torch.bfloat16: 1.6e-2, torch.float32: 1.3e-6}


def get_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) for a `dtype` kernel output against its fp32 reference cast to `dtype`."""
    return DEFAULT_ATOL[dtype], DEFAULT_RTOL[dtype]


# LSEs are fp32 whatever the input dtype: the scores are exact products accumulated in fp32 in
# kernel and reference alike, so only the summation order differs (atol, rtol).
LSE_TOL = (1e-4, 1e-5)


@pytest.fixture(name="tol")
def _tol():
    return get_tolerance


@pytest.fixture(name="assert_close")
def _assert_close():
    return assert_close


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float, what: str
) -> None:
    """torch.testing.assert_close that first fails on any NaN left in `actual`: outputs start
    NaN-poisoned, so a NaN means an element the kernel never wrote (or a NaN it produced)."""
    assert not torch.isnan(actual).any(), f"{what}: NaN left in output (unwritten element?)"
    torch.testing.assert_close(
        actual.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )


# NOTE: attention kernels round the probabilities P to the input dtype before P @ V, as
# FlashAttention does. For bf16 (8 significant bits) that alone gives |error| ~ 2^-9 * |V| *
# sqrt(sum p^2), about 2e-3 at the 4-sigma tail of a few thousand outputs, above the table's 1e-3
# atol; bf16 attention outputs therefore get atol 1e-2 (rtol unchanged).
ATTENTION_ATOL = {torch.bfloat16: 1e-2}


def check_attention(got: tuple, want: tuple, dtype: torch.dtype) -> None:
    """(out, lse) of a kernel against (out, lse) of its reference; lse may be None on both sides."""
    atol, rtol = get_tolerance(dtype)
    assert_close(got[0], want[0], ATTENTION_ATOL.get(dtype, atol), rtol, "out")
    if want[1] is not None:
        assert torch.equal(torch.isneginf(got[1]), torch.isneginf(want[1])), (
            "empty (-inf) rows differ"
        )
        assert_close(got[1], want[1], *LSE_TOL, "lse")


@pytest.fixture(name="check_attention")
def _check_attention():
    return check_attention


@dataclass
class Batch:
    query: torch.Tensor  # [num_tokens, num_q_heads, head_size]
    key_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_size]
    meta: RelayMetadata
    scale: float


def make_batch(
    *,
    query_lens: list[int],
    own_lens: list[int],
    groups: list[tuple[int, int, int]] = (),
    dtype=torch.float16,
    num_kv_heads: int = 2,
    queries_per_kv: int = 1,
    head_size: int = 64,
    block_size: int = 16,
    seed: int = 0,
    spare_blocks: int = 3,
) -> Batch:
    """A random paged batch. Request r has prefix_len (from its group, else 0) + own_lens[r] tokens;
    shared blocks are the same physical ids in every row of a group (as vLLM's prefix cache makes);
    all block ids are randomly permuted; every slot no sequence owns (tails of last blocks, spare
    blocks) holds NaN, so a kernel that reads past a sequence fails loudly."""
    gen = torch.Generator().manual_seed(seed)
    prefix = [0] * len(own_lens)
    for r0, r1, plen in groups:
        prefix[r0:r1] = [plen] * (r1 - r0)
    seq_lens = [p + n for p, n in zip(prefix, own_lens)]
    n_shared = [-(-plen // block_size) for _, _, plen in groups]
    n_own = [-(-s // block_size) - (-(-p // block_size)) for s, p in zip(seq_lens, prefix)]
    num_blocks = sum(n_shared) + sum(n_own) + spare_blocks
    ids = torch.randperm(num_blocks, generator=gen).to(torch.int32).tolist()
    width = max(-(-s // block_size) for s in seq_lens) + 1  # one padding column (0, as vLLM pads)
    table = torch.zeros(len(seq_lens), width, dtype=torch.int32)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    k = torch.full(shape, float("nan"), dtype=dtype)  # then fill only the slots sequences own
    v = torch.full(shape, float("nan"), dtype=dtype)
    kf, vf = (
        torch.randn(shape, generator=gen).to(dtype),
        torch.randn(shape, generator=gen).to(dtype),
    )
    for g, (r0, r1, plen) in enumerate(groups):
        blocks = [ids.pop() for _ in range(n_shared[g])]
        table[r0:r1, : n_shared[g]] = torch.tensor(blocks, dtype=torch.int32)
        _own_slots(k, v, kf, vf, blocks, 0, plen, block_size)
    for r, (s, p) in enumerate(zip(seq_lens, prefix)):
        first = -(-p // block_size)
        blocks = [ids.pop() for _ in range(n_own[r])]
        table[r, first : first + n_own[r]] = torch.tensor(blocks, dtype=torch.int32)
        _own_slots(k, v, kf, vf, table[r].tolist(), first * block_size, s, block_size)
    num_q_heads = num_kv_heads * queries_per_kv
    query = torch.randn(sum(query_lens), num_q_heads, head_size, generator=gen).to(dtype)
    meta = RelayMetadata.build(query_lens, seq_lens, table, list(groups), block_size)
    return Batch(query, k, v, meta, head_size**-0.5)


def _own_slots(k, v, kf, vf, row: list[int], lo: int, hi: int, block_size: int) -> None:
    for pos in range(lo, hi):
        b, s = row[pos // block_size], pos % block_size
        k[b, s], v[b, s] = kf[b, s], vf[b, s]


@pytest.fixture(name="make_batch")
def _make_batch():
    return make_batch


def poisoned_like(t: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    """A NaN-filled output buffer: every element the kernel must write starts as NaN."""
    return torch.full(shape or t.shape, float("nan"), dtype=dtype or t.dtype, device=t.device)


@pytest.fixture(name="poisoned")
def _poisoned():
    return poisoned_like
