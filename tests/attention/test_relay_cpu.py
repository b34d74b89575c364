"""The CPU relay path against vLLM's own CPU attention kernel, on a real CPU paged cache."""

from types import SimpleNamespace

import pytest
import torch

from edgeprompt_vllm.attention.cpu_layout import CpuKVLayout, split_cpu_kv_cache
from edgeprompt_vllm.attention.relay_batch import build_relay_batch
from edgeprompt_vllm.kernels import relay_attention_ref

ops = pytest.importorskip("vllm._custom_ops")

H_Q, H_KV, HS, BS = 8, 2, 64, 32


def _fill_cache(num_blocks, dtype, isa, gen):
    kv = torch.zeros(num_blocks, H_KV, BS, 2 * HS, dtype=dtype)
    key_cache, value_cache = split_cpu_kv_cache(kv)
    k = torch.randn(num_blocks * BS, H_KV, HS, generator=gen).to(dtype)
    v = torch.randn(num_blocks * BS, H_KV, HS, generator=gen).to(dtype)
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, torch.arange(num_blocks * BS), isa)
    return kv, k.view(num_blocks, BS, H_KV, HS), v.view(num_blocks, BS, H_KV, HS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layout_probe_reads_back_what_vllm_wrote(dtype):
    gen = torch.Generator().manual_seed(0)
    kv, k, v = _fill_cache(6, dtype, "vec", gen)
    layout = CpuKVLayout.probe(H_KV, BS, HS, dtype, "vec")
    ids = torch.tensor([4, 1, 5])
    key, value = layout.gather(kv, ids)
    assert torch.equal(key, k[ids]) and torch.equal(value, v[ids])


def _stock_cpu_attention(query, kv, qsl, seq_lens, block_table, scale):
    key_cache, value_cache = split_cpu_kv_cache(kv)
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=len(seq_lens), num_heads=H_Q, num_kv_heads=H_KV, head_dim=HS, seq_lens=seq_lens,
        dtype=query.dtype, query_start_loc=qsl, causal=True, sliding_window_size=-1, isa="vec",
        enable_kv_split=False)
    out = torch.empty_like(query)
    ops.cpu_attention_with_kv_cache(
        query=query, key_cache=key_cache, value_cache=value_cache, output=out, query_start_loc=qsl,
        seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
        block_table=block_table, softcap=0, scheduler_metadata=sched, s_aux=None)
    return out


def test_relay_equals_stock_cpu_kernel_with_several_groups():
    gen = torch.Generator().manual_seed(1)
    kv, _, _ = _fill_cache(40, torch.float32, "vec", gen)
    # Requests 0, 3, 5 share blocks 30-32 (cloud A); 1 and 4 share 10-11 (cloud B); 2 is alone.
    # Mixed: request 4 prefills 20 tokens, the rest decode one token.
    rows = [[30, 31, 32, 5], [10, 11, 6, 0], [12, 13, 0, 0], [30, 31, 32, 7], [10, 11, 8, 9], [30, 31, 32, 14]]
    seq_lens = torch.tensor([3 * BS + 17, 2 * BS + 5, BS + 9, 3 * BS + 1, 3 * BS + 30, 4 * BS], dtype=torch.int32)
    query_lens = [1, 1, 1, 1, 20, 1]
    qsl = torch.tensor([0] + torch.tensor(query_lens).cumsum(0).tolist(), dtype=torch.int32)
    block_table = torch.tensor(rows, dtype=torch.int32)
    query = torch.randn(int(qsl[-1]), H_Q, HS, generator=gen)
    scale = HS ** -0.5
    expected = _stock_cpu_attention(query, kv, qsl, seq_lens, block_table, scale)

    common = SimpleNamespace(num_reqs=6, query_start_loc=qsl, query_start_loc_cpu=qsl, seq_lens=seq_lens,
                             block_table_tensor=block_table)
    relay = build_relay_batch(common, BS, keep=lambda groups, _: groups, remap_blocks=True)
    assert relay.meta.num_groups == 2 and relay.token_order is not None
    layout = CpuKVLayout.probe(H_KV, BS, HS, torch.float32, "vec")
    key_cache, value_cache = layout.gather(kv, relay.used_blocks)
    out = torch.full_like(query, float("nan"))
    out[relay.token_order] = relay_attention_ref(query[relay.token_order], key_cache, value_cache,
                                                 relay.meta, scale)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)
