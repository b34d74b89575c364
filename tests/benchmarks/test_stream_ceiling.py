"""benchmarks/stream_ceiling.py's read probes on the CPU (TRITON_INTERPRET): the gather walk and
the TMA page walk read exactly each request's own KV (the same bytes the suffix pass reads), so
their times on a GPU measure that stream and nothing else."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
stream_ceiling = pytest.importorskip("stream_ceiling")


@pytest.mark.parametrize("model", ["gqa", "llama2-7b"])
def test_probes_sum_each_requests_own_kv(model):
    bk = stream_ceiling.bk
    s = bk._shape(model, "decode", 3, 64, 40, "fp16")  # 3 requests, 40 own keys after 64 shared
    query, kc, vc, meta = bk.shape_batch(stream_ceiling.kernels, s, "cpu")
    want = torch.zeros(s.batch, s.num_kv_heads)  # [num_reqs, num_kv_heads]
    for r in range(s.batch):
        for pos in range(int(meta.prefix_lens[r]), int(meta.seq_lens[r])):
            blk, slot = meta.block_table[r, pos // s.block_size], pos % s.block_size
            want[r] += (kc[blk, slot].float() + vc[blk, slot].float()).sum(-1)
    runs = stream_ceiling.schemes(s, query, kc, vc, meta)
    probes = [n for n in runs if n.startswith(("gather", "tma"))]
    assert any(n.startswith("tma") for n in probes)
    for name in probes:
        torch.testing.assert_close(runs[name]().clone(), want, rtol=1e-4, atol=1e-2,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip


def test_suffix_probes_give_the_suffix_kernels_output():
    """The suffix_* probes (other tiles, a register cap) compute the same attention as the suffix
    kernel as the backend configures it: their GPU times are of the same work."""
    bk = stream_ceiling.bk
    s = bk._shape("gqa", "decode", 3, 64, 40, "fp16")
    runs = stream_ceiling.schemes(s, *bk.shape_batch(stream_ceiling.kernels, s, "cpu"))
    want = runs["suffix"]().clone()
    probes = [n for n in runs if n.startswith("suffix_")]
    assert probes
    for name in probes:
        torch.testing.assert_close(runs[name](), want, rtol=1e-2, atol=2e-3,
                                   msg=lambda m, n=name: f"{n}: {m}")  # fmt: skip
