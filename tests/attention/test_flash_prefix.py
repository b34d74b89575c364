"""The prefix pass on FlashAttention-3 (attention/flash_prefix.py): when the builder chooses it, and
an eager relay step through the CUDA backend's forward with it, on the CPU. FA3 itself is faked by
a torch FlashAttention (the neighbour: varlen, paged, causal or not, with its LSE); the GPU test of
tests/attention/test_relay_backend.py runs the real one."""

from types import SimpleNamespace

import pytest
import torch
from attention.cuda_backend_on_cpu import cuda_backend_with
from attention.decode_batch import SHARED, Common
from edgeprompt_vllm.kernels import cost_model as cm
from edgeprompt_vllm.kernels import plain_attention_ref
from edgeprompt_vllm.kernels.paged_suffix import attend_ref

from edgeprompt_vllm.attention.flash_prefix import (
    flash_prefix_beside,
    prefix_pass_setting,
    use_flash_prefix,
)
from edgeprompt_vllm.attention.relay_batch import build_relay_batch

HEADS, KV_HEADS, HEAD_SIZE, BLOCK = 4, 2, 64, 16
GQA = cm.AttentionShape(num_q_heads=32, num_kv_heads=8, head_size=128)


def test_the_setting_is_checked(monkeypatch):
    assert prefix_pass_setting() == "auto"
    monkeypatch.setenv("EDGEPROMPT_PREFIX_PASS", "fa3")
    with pytest.raises(ValueError, match="EDGEPROMPT_PREFIX_PASS must be one of"):
        prefix_pass_setting()


@pytest.mark.parametrize("setting,fa_version,num_reqs,prefix_len,flash", [
    ("auto", 3, 256, 4096, True),  # a large GQA group over a long prefix: FA3's FLOP rate wins
    ("auto", 3, 32, 1024, False),  # a small one: FA3's fixed cost does not pay
    ("auto", 2, 256, 4096, False),  # FA3 only (the cost model's numbers are FA3's)
    ("triton", 3, 256, 4096, False),
    ("flash", 3, 32, 1024, True),
])  # fmt: skip
def test_the_batch_takes_flash_where_the_setting_and_cost_model_say(setting, fa_version, num_reqs,
                                                                   prefix_len, flash):
    groups = [cm.GroupShape(num_reqs=num_reqs, num_query_tokens=num_reqs, prefix_len=prefix_len)]
    decisions = cm.choose_relay(groups, GQA)
    assert decisions[0].relay
    assert use_flash_prefix(setting, fa_version, groups, decisions, GQA) == flash


@pytest.mark.parametrize("setting,num_reqs,query_len,beside", [
    ("auto", 256, 1, True),  # GQA: 2048 suffix programs, 15.5 per SM (measured: beside wins)
    ("auto", 384, 1, True),  # 23 per SM
    ("auto", 512, 1, False),  # 31 per SM: FA3's pass, then the suffix (measured faster)
    ("auto", 128, 1, False),  # 7.8 per SM: no faster beside
    ("auto", 256, 2, False),  # not decode (not measured)
    ("flash", 256, 1, False),
    ("flash-beside", 128, 1, True),
    ("triton", 256, 1, False),
])  # fmt: skip
def test_flash_prefix_runs_beside_the_suffix_where_the_cost_model_says(setting, num_reqs,
                                                                       query_len, beside):
    groups = [cm.GroupShape(num_reqs=num_reqs, num_query_tokens=num_reqs * query_len,
                            prefix_len=4096)]  # fmt: skip
    decisions = cm.choose_relay(groups, GQA)
    assert decisions[0].relay
    assert flash_prefix_beside(setting, groups, decisions, GQA, num_sms=132) == beside


def test_no_relaying_group_no_flash_prefix():
    groups = [cm.GroupShape(num_reqs=1, num_query_tokens=1, prefix_len=4096)]
    assert not use_flash_prefix("flash", 3, groups, cm.choose_relay(groups, GQA), GQA)


CALLS = []


def _fake_flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k,
                                 softmax_scale, causal, block_table, out=None,
                                 return_softmax_lse=False, fa_version=None, **unused):
    """FlashAttention's varlen paged call in fp32 torch: sequence i's queries see its first
    seqused_k[i] keys (causal: aligned to the end)."""
    CALLS.append(dict(causal=causal, fa_version=fa_version, num_seqs=len(seqused_k),
                      num_splits=unused.get("num_splits", 0)))
    out = torch.empty_like(q) if out is None else out
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"))
    cu = cu_seqlens_q.tolist()
    for i, n_keys in enumerate(seqused_k.tolist()):
        t0, t1 = cu[i], cu[i + 1]
        assert t1 - t0 <= max_seqlen_q and n_keys <= max_seqlen_k
        o, s = attend_ref(q[t0:t1], k, v, block_table[i], 0, n_keys, softmax_scale,
                          first_query_pos=n_keys - (t1 - t0) if causal else None)
        out[t0:t1], lse[:, t0:t1] = o.to(out.dtype), s
    return (out, lse) if return_softmax_lse else out


@pytest.fixture
def backend_cuda(monkeypatch):
    CALLS.clear()
    return cuda_backend_with(monkeypatch, _fake_flash_attn_varlen_func, "PIECEWISE")


@pytest.mark.parametrize("setting", ["flash", "flash-beside"])
def test_an_eager_step_with_the_prefix_pass_on_flash_equals_plain_attention(backend_cuda, setting):
    """flash-beside: the "handoff" schedule (on the CPU its two streams are one: the finisher
    runs after FA3's pass and before the suffix kernel, which folds every item in)."""
    from vllm.v1.attention.backend import AttentionType

    # 8 decode requests: 0, 2, 4-7 share a 1024-token prefix; 1 and 3 one block (not relayed:
    # FlashAttention runs them, causal)
    short = [7]
    rows = [SHARED + [1, 2], short + [3], SHARED + [4], short + [5, 6]] + \
        [SHARED + [10 + r] for r in range(4)]
    seq_lens = [1024 + 20, 16 + 10, 1024 + 5, 16 + 30] + [1024 + 1 + 5 * r for r in range(4)]
    common = Common(seq_lens, rows, padded_reqs=8)
    builder = object.__new__(backend_cuda.RelayFlashMetadataBuilder)
    builder.shape = cm.AttentionShape(num_q_heads=32, num_kv_heads=32, head_size=128)  # Llama-2
    builder.num_layers, builder.piecewise_step_s = 1, 0.0
    builder.prefix_pass, builder.fa_version, builder.device = setting, 3, "cpu"
    relay = build_relay_batch(common, BLOCK, keep=builder._worth_relaying, split_rest=True,
                              max_group_query_len=16)
    relay.flash_prefix, relay.prefix_beside = builder._flash_prefix, builder._prefix_beside
    assert relay.flash_prefix and relay.groups == [(0, 6, 1024)] and relay.rest is not None
    assert relay.prefix_beside == (setting == "flash-beside")

    impl = object.__new__(backend_cuda.RelayFlashImpl)
    impl.head_size, impl.scale, impl.attn_type = HEAD_SIZE, HEAD_SIZE ** -0.5, AttentionType.DECODER
    impl.alibi_slopes = impl.sliding_window = impl.logits_soft_cap = None
    impl.vllm_flash_attn_version = 3
    beside = setting == "flash-beside"
    gen = torch.Generator().manual_seed(0)
    key_cache, value_cache = None, None
    for layer in range(2):  # the second layer replays the first one's launches and FA3 call
        kv_cache = torch.randn(170, KV_HEADS, BLOCK, 2 * HEAD_SIZE, generator=gen)  # [B, H, N, 2D]
        query = torch.randn(len(seq_lens), HEADS, HEAD_SIZE, generator=gen)
        output = torch.full_like(query, float("nan"))
        impl.forward(None, query, None, None, kv_cache, SimpleNamespace(relay=relay), output)
        key_cache, value_cache = kv_cache.transpose(1, 2).split(HEAD_SIZE, dim=-1)
        want = plain_attention_ref(query, key_cache, value_cache, common.query_start_loc,
                                   common.seq_lens, common.block_table_tensor, HEAD_SIZE ** -0.5)
        torch.testing.assert_close(output, want, atol=1e-4, rtol=1e-4, msg=f"layer {layer}")
    # per layer: FA3's prefix pass over the one group (not causal), FlashAttention on the rest
    assert CALLS == [dict(causal=False, fa_version=3, num_seqs=1, num_splits=1 if beside else 0),
                     dict(causal=True, fa_version=3, num_seqs=2, num_splits=0)] * 2
    replay = relay.replays[impl.scale]
    assert replay.replaying
    launched = [getattr(r.kernel, "fn", r.kernel).__name__ for r in replay.launches]
    assert ("_handoff_finish_kernel" in launched) == beside
