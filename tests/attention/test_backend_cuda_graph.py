"""The CUDA relay backend's FULL-graph path on the CPU: builder step and impl forward.

vLLM's FlashAttention builder and impl classes are real (vLLM 0.32's); FA3's varlen function,
absent from the CPU wheel, is replaced by one that fails if called; the relay kernels run under
the Triton interpreter. The batch is padded as vLLM pads a FULL graph's (decode_batch.py). What
a real CUDA graph adds (frozen launches) is covered by test_graph_relay.py's frozen self-check
and, on a GPU, by test_relay_backend.py."""

from types import SimpleNamespace

import pytest
import torch
from attention.cuda_backend_on_cpu import cuda_backend_with
from attention.decode_batch import decode_batch
from edgeprompt_vllm.kernels import plain_attention_ref
from edgeprompt_vllm.kernels.cost_model import AttentionShape

from edgeprompt_vllm.attention import graph_mode
from edgeprompt_vllm.attention.graph_relay import GraphRelay, GraphRelayTable

HEADS, HEAD_SIZE, BLOCK = 2, 64, 16


def _flash_attention_must_not_run(*args, **kwargs):
    raise AssertionError("a FULL-graph relay step must not call FlashAttention")


@pytest.fixture
def backend_cuda(monkeypatch):
    return cuda_backend_with(monkeypatch, _flash_attention_must_not_run, "FULL")


def _builder(backend_cuda):
    b = object.__new__(backend_cuda.RelayFlashMetadataBuilder)
    b.block_size, b.num_heads_q, b.num_heads_kv, b.headdim = BLOCK, HEADS, HEADS, HEAD_SIZE
    b.shape = AttentionShape(num_q_heads=32, num_kv_heads=32, head_size=128)  # cost: Llama-2-7b
    b.model_config = SimpleNamespace(max_model_len=2048)
    b.device, b.graph_pdl, b.relay_enabled = torch.device("cpu"), False, True
    b.graph_table = GraphRelayTable(12, 12, 2048 // BLOCK, "cpu")
    return b


def _impl(backend_cuda):
    from vllm.v1.attention.backend import AttentionType

    impl = object.__new__(backend_cuda.RelayFlashImpl)
    impl.head_size, impl.scale, impl.attn_type = HEAD_SIZE, HEAD_SIZE ** -0.5, AttentionType.DECODER
    impl.alibi_slopes = impl.sliding_window = impl.logits_soft_cap = None
    return impl


def test_full_step_relays_the_padded_batch_exactly(backend_cuda):
    common = decode_batch()
    relay = _builder(backend_cuda)._graph_step(common)
    assert isinstance(relay, GraphRelay) and relay.groups == [(0, 6, 1024)]
    assert backend_cuda.RELAY_STATS.full_graph_relay_batches == 1

    gen = torch.Generator().manual_seed(0)
    kv_cache = torch.randn(170, HEADS, BLOCK, 2 * HEAD_SIZE, generator=gen)  # [B, H, N, 2D]
    query = torch.randn(common.num_reqs, HEADS, HEAD_SIZE, generator=gen)  # 4 padding rows
    output = torch.full_like(query, float("nan"))
    _impl(backend_cuda).forward(None, query, None, None, kv_cache,
                                SimpleNamespace(relay=relay), output)

    key_cache, value_cache = kv_cache.transpose(1, 2).split(HEAD_SIZE, dim=-1)
    real = common.num_actual_tokens
    want = plain_attention_ref(query[:real], key_cache, value_cache,
                               common.query_start_loc[: real + 1], common.seq_lens[:real],
                               common.block_table_tensor[:real], HEAD_SIZE ** -0.5)
    torch.testing.assert_close(output[:real], want, atol=1e-4, rtol=1e-4)
    assert torch.isnan(output[real:]).all()  # padding rows: not written


def test_a_step_that_is_not_full_still_rewrites_the_table(backend_cuda, monkeypatch):
    """The table describes the latest decode batch whatever mode its step ran in."""
    builder = _builder(backend_cuda)
    builder._graph_step(decode_batch())
    monkeypatch.setattr(graph_mode, "STEP", graph_mode._Step(mode="PIECEWISE"))
    common = decode_batch()
    common.block_table_tensor[:, 0] = torch.arange(common.num_reqs)  # nothing shared any more
    relay = builder._graph_step(common)
    assert relay.groups == [] and not builder.graph_table.prefix_lens.any()
    assert backend_cuda.RELAY_STATS.full_graph_relay_batches == 1  # the FULL step only
