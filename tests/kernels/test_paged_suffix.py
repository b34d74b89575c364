"""paged_suffix against paged_suffix_ref: each axis covered once, not the full cartesian product."""

import importlib

import pytest
import torch
from edgeprompt_vllm.kernels import (
    _launch,
    paged_suffix,
    paged_suffix_ref,
    relay_prefix_partials,
)

# name: (make_batch kwargs, paged_suffix kwargs).
# make_batch defaults: fp16, 2 KV heads, MHA, head 64, block 16.
CASES = {
    "decode_fp32": (
        dict(dtype=torch.float32, query_lens=[1, 1, 1], own_lens=[37, 17, 64], groups=[(0, 2, 32)]),
        {},
    ),
    "decode_bf16_gqa4_head128": (
        dict(
            dtype=torch.bfloat16,
            queries_per_kv=4,
            head_size=128,
            query_lens=[1, 1],
            own_lens=[37, 17],
        ),
        {},
    ),
    "decode_gqa8_block32": (
        dict(
            queries_per_kv=8,
            block_size=32,
            query_lens=[1, 1, 1],
            own_lens=[37, 100, 5],
            groups=[(1, 3, 64)],
        ),
        {},
    ),
    "decode_gqa3_padded_heads": (dict(queries_per_kv=3, query_lens=[1, 1], own_lens=[17, 40]), {}),
    "decode_split_kv": (
        dict(query_lens=[1, 1], own_lens=[150, 37], groups=[(0, 1, 16)]),
        dict(num_splits=3),
    ),
    "causal_chunks": (dict(query_lens=[5, 1, 17], own_lens=[37, 9, 17], groups=[(0, 2, 16)]), {}),
    "causal_many_tiles_per_request": (
        dict(queries_per_kv=8, query_lens=[20, 3, 33], own_lens=[20, 40, 47]),
        {},
    ),
    "causal_split_kv_bf16": (
        dict(dtype=torch.bfloat16, query_lens=[7, 2], own_lens=[77, 9]),
        dict(num_splits=2),
    ),
}


def _prefix_partials(batch, **kw):
    """The batch's shared-prefix partial states (relay_prefix_partials over its groups)."""
    m = batch.meta
    return relay_prefix_partials(
        batch.query, batch.key_cache, batch.value_cache, m.query_start_loc, m.group_req_start,
        m.group_req_end, m.group_block_table, m.group_prefix_len, batch.scale, **kw,
    )  # fmt: skip


def _run(batch, poisoned, prefix_lens=None, **kw):
    m = batch.meta
    args = (
        batch.query,
        batch.key_cache,
        batch.value_cache,
        m.query_start_loc,
        m.seq_lens,
        m.block_table,
        m.prefix_lens if prefix_lens is None else prefix_lens,
        batch.scale,
    )
    out, lse = (
        poisoned(batch.query),
        poisoned(batch.query, (batch.query.shape[1], batch.query.shape[0]), torch.float32),
    )
    got = paged_suffix(
        *args, out=out, lse=lse, max_query_len=m.max_query_len, max_seq_len=m.max_seq_len, **kw
    )
    want = paged_suffix_ref(*args, **kw)
    return got, want


@pytest.mark.parametrize("name", list(CASES))
def test_paged_suffix_matches_ref(name, make_batch, poisoned, check_attention):
    batch_kw, kw = CASES[name]
    batch = make_batch(seed=list(CASES).index(name), **batch_kw)
    got, want = _run(batch, poisoned, **kw)
    check_attention(got, want, batch.query.dtype)


def test_empty_suffix_gives_zero_and_neg_inf(make_batch, poisoned, check_attention):
    """A request whose keys all lie before prefix_lens: out 0, lse -inf (what the merge expects)."""
    batch = make_batch(query_lens=[1, 2], own_lens=[17, 37], seed=4)
    seq = batch.meta.seq_lens
    got, want = _run(batch, poisoned, prefix_lens=torch.stack([seq[0], seq[1] - 1]).to(torch.int32))
    check_attention(got, want, batch.query.dtype)
    assert torch.all(got[0][0] == 0) and torch.all(torch.isneginf(got[1][:, 0]))
    assert torch.isneginf(got[1][:, 1]).all() and torch.isfinite(got[1][:, 2]).all(), "causal bound"


def test_zero_query_requests_are_skipped(make_batch, poisoned, check_attention):
    batch = make_batch(query_lens=[2, 0, 1], own_lens=[37, 5, 17], seed=5)
    got, want = _run(batch, poisoned)
    check_attention(got, want, batch.query.dtype)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_fused_prefix_merge_matches_ref(num_splits, make_batch, poisoned, check_attention):
    """prefix_state folded in by the suffix epilogue (split 0) equals the torch merge."""
    batch = make_batch(
        queries_per_kv=4,
        query_lens=[1, 3, 1, 1],
        own_lens=[20, 37, 17, 3],
        groups=[(0, 2, 48), (3, 4, 16)],
        seed=6,
    )
    parts = _prefix_partials(batch, num_splits=2)
    got, want = _run(batch, poisoned, prefix_state=parts, num_splits=num_splits)
    check_attention(got, want, batch.query.dtype)


def test_fused_merge_of_a_prefix_state_in_the_query_dtype(make_batch, poisoned, check_attention):
    """One prefix part in fp16, as FlashAttention returns its output, folds in like the fp32 one."""
    batch = make_batch(
        queries_per_kv=4, query_lens=[1, 2, 1], own_lens=[20, 37, 3], groups=[(0, 2, 48)], seed=7
    )
    part_out, part_lse = _prefix_partials(batch, num_splits=1, fused=False)
    got, _ = _run(batch, poisoned, prefix_state=(part_out.to(torch.float16), part_lse))
    _, want = _run(batch, poisoned, prefix_state=(part_out, part_lse))
    check_attention(got, want, batch.query.dtype)


def test_paged_suffix_rejects_bad_arguments(make_batch):
    batch = make_batch(query_lens=[1], own_lens=[17])
    m = batch.meta
    args = [
        batch.query,
        batch.key_cache,
        batch.value_cache,
        m.query_start_loc,
        m.seq_lens,
        m.block_table,
        m.prefix_lens,
        batch.scale,
    ]
    for idx, bad, name in [
        (4, m.seq_lens.long(), "seq_lens"),
        (3, m.query_start_loc[:1], "query_start_loc"),
        (5, m.block_table[0], "block_table"),
        (1, batch.key_cache.float(), "key_cache"),
        (0, batch.query[:, :1], "num_heads"),
    ]:
        bad_args = list(args)
        bad_args[idx] = bad
        with pytest.raises(ValueError, match=name):
            paged_suffix(*bad_args)


# Launch-order and masking switches (off by default; benchmarks/sweep_relay_decode.py measures them).
# TILE_N 16 gives the small cases several full tiles before the masked tail / causal diagonal.
SWITCHES = {
    "head_fastest": dict(HEAD_FASTEST=True),
    "unmasked_full_tiles": dict(UNMASKED_FULL_TILES=True, TILE_N=16),
    "both": dict(HEAD_FASTEST=True, UNMASKED_FULL_TILES=True, TILE_N=16),
}
SWITCH_CASES = [
    "decode_fp32",
    "decode_bf16_gqa4_head128",
    "decode_gqa3_padded_heads",
    "decode_split_kv",
    "causal_chunks",
    "causal_many_tiles_per_request",
]


@pytest.mark.parametrize("switch", list(SWITCHES))
@pytest.mark.parametrize("name", SWITCH_CASES)
def test_switches_match_ref(name, switch, make_batch, poisoned, check_attention):
    batch_kw, kw = CASES[name]
    batch = make_batch(seed=list(CASES).index(name), **batch_kw)
    got, want = _run(batch, poisoned, config=SWITCHES[switch], **kw)
    check_attention(got, want, batch.query.dtype)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_unmasked_full_tiles_odd_head_size_and_fused_merge(
    num_splits, make_batch, poisoned, check_attention
):
    """Head 80 (padded to 128: the unmasked loads keep the head mask), a suffix that is a whole
    number of tiles (no masked tail at all), and prefix states folded in."""
    batch = make_batch(
        queries_per_kv=4,
        head_size=80,
        query_lens=[1, 1, 4],
        own_lens=[64, 33, 40],
        groups=[(0, 2, 32)],
        seed=7,
    )
    parts = _prefix_partials(batch, num_splits=2, config=dict(UNMASKED_FULL_TILES=True, TILE_N=16))
    got, want = _run(
        batch,
        poisoned,
        prefix_state=parts,
        num_splits=num_splits,
        config=dict(UNMASKED_FULL_TILES=True, HEAD_FASTEST=True, TILE_N=16),
    )
    check_attention(got, want, batch.query.dtype)


def test_pdl_only_right_after_the_prefix_kernel(make_batch, poisoned, check_attention, monkeypatch):
    """The PDL switch (off by default): the suffix launch uses programmatic dependent launch only
    when the latest launch was the prefix kernel's. The interpreter has no PDL (its grid
    dependency calls are no-ops), so this checks the plumbing and the results, not overlap."""
    suffix_mod = importlib.import_module("edgeprompt_vllm.kernels.paged_suffix")
    prefix_mod = importlib.import_module("edgeprompt_vllm.kernels.relay_prefix")
    monkeypatch.setattr(suffix_mod, "supports_pdl", lambda t: True)
    monkeypatch.setattr(prefix_mod, "supports_pdl", lambda t: True)
    launches = []
    monkeypatch.setattr(
        _launch, "RECORDER", lambda kernel, grid, kw, compiled: launches.append((kernel, kw))
    )
    batch = make_batch(
        queries_per_kv=4, query_lens=[1, 1, 2], own_lens=[37, 17, 70], groups=[(0, 3, 64)], seed=8
    )
    parts = _prefix_partials(batch, config=dict(LAUNCH_DEPENDENTS=True))
    got, want = _run(batch, poisoned, prefix_state=parts, config=dict(PDL=True))
    check_attention(got, want, batch.query.dtype)
    (pre, pre_kw), (suf, suf_kw) = launches
    assert pre_kw["LAUNCH_DEPENDENTS"] and suf_kw["PDL"] and suf_kw["launch_pdl"]
    launches.clear()  # again, the latest launch now being the suffix's, not the prefix's
    got, want = _run(batch, poisoned, prefix_state=parts, config=dict(PDL=True))
    check_attention(got, want, batch.query.dtype)
    assert not launches[0][1]["PDL"] and "launch_pdl" not in launches[0][1]


@pytest.mark.parametrize("sms, stages", [(1, 3), (64, 2)])  # 24 programs: 24 / SM, or 0.4 / SM
def test_decode_stages_follow_the_grid(make_batch, poisoned, check_attention, monkeypatch, sms,
                                       stages):  # fmt: skip
    """Decode launches with fewer than DEEP_PIPELINE_PROGRAMS_PER_SM programs per SM take 2
    stages, the others 3 (_suffix_config); a config that names num_stages keeps it. Same
    results either way."""
    suffix_mod = importlib.import_module("edgeprompt_vllm.kernels.paged_suffix")
    monkeypatch.setattr(suffix_mod, "device_sms", lambda t: sms)
    launches = []
    monkeypatch.setattr(_launch, "RECORDER", lambda kernel, grid, kw, compiled: launches.append(kw))
    own_lens = [5 + 7 * i for i in range(12)]
    batch = make_batch(queries_per_kv=4, query_lens=[1] * 12, own_lens=own_lens)
    assert suffix_mod.DEEP_PIPELINE_PROGRAMS_PER_SM == 24  # 12 requests x 2 KV heads = 24 programs
    got, want = _run(batch, poisoned)
    check_attention(got, want, batch.query.dtype)
    got, want = _run(batch, poisoned, config=dict(num_stages=4))
    check_attention(got, want, batch.query.dtype)
    assert [kw["num_stages"] for kw in launches] == [stages, 4]
    cfg = suffix_mod._suffix_config
    assert cfg(4, 128, 16, 1)["num_stages"] == 3  # no grid given
    assert cfg(4, 128, 16, 1, programs_per_sm=1.0)["num_stages"] == 2
    assert cfg(4, 128, 16, 512, programs_per_sm=1.0)["num_stages"] == 2  # prefill tiles: always 2
