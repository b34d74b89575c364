"""relay_prefix against relay_prefix_ref: groups of all sizes, splits, GQA, dtypes, odd prefixes."""

import functools

import pytest
import torch
from edgeprompt_vllm.kernels import (
    merge_partial_states,
    relay_prefix,
    relay_prefix_partials,
    relay_prefix_ref,
)
from edgeprompt_vllm.kernels.relay_prefix import _pick_num_splits, _prefix_config

# name: (make_batch kwargs, relay_prefix kwargs).
# make_batch defaults: fp16, 2 KV heads, MHA, head 64, block 16.
CASES = {
    "one_decode_group_fp32": (
        dict(dtype=torch.float32, query_lens=[1] * 5, own_lens=[3] * 5, groups=[(0, 5, 64)]),
        {},
    ),
    "odd_prefix_37_split3": (
        dict(query_lens=[1, 1, 1], own_lens=[2, 5, 1], groups=[(0, 3, 37)]),
        dict(num_splits=3),
    ),
    "many_groups_group_of_1_and_ungrouped": (
        dict(
            query_lens=[1, 1, 1, 1, 1, 1],
            own_lens=[4, 1, 7, 2, 3, 9],
            groups=[(3, 5, 17), (0, 2, 48), (5, 6, 32)],
        ),
        {},
    ),
    "bf16_gqa4_head128_block32": (
        dict(
            dtype=torch.bfloat16,
            queries_per_kv=4,
            head_size=128,
            block_size=32,
            query_lens=[1, 1, 1],
            own_lens=[5, 1, 2],
            groups=[(0, 3, 96)],
        ),
        {},
    ),
    "gqa8_prefill_many_m_tiles": (
        dict(queries_per_kv=8, query_lens=[20, 1, 13], own_lens=[20, 4, 13], groups=[(0, 3, 32)]),
        dict(num_splits=2),
    ),
    "gqa3_padded_heads": (
        dict(queries_per_kv=3, query_lens=[2, 1], own_lens=[2, 1], groups=[(0, 2, 40)]),
        {},
    ),
    "empty_prefix_group": (
        dict(query_lens=[1, 1], own_lens=[5, 6], groups=[(0, 1, 0), (1, 2, 16)]),
        {},
    ),
}


def _args(batch):
    m = batch.meta
    return (
        batch.query,
        batch.key_cache,
        batch.value_cache,
        m.query_start_loc,
        m.group_req_start,
        m.group_req_end,
        m.group_block_table,
        m.group_prefix_len,
        batch.scale,
    )


@pytest.mark.parametrize("name", list(CASES))
def test_relay_prefix_matches_ref(name, make_batch, poisoned, check_attention):
    batch_kw, kw = CASES[name]
    batch = make_batch(seed=list(CASES).index(name), **batch_kw)
    q = batch.query
    out, lse = poisoned(q), poisoned(q, (q.shape[1], q.shape[0]), torch.float32)
    got = relay_prefix(*_args(batch), out=out, lse=lse, **kw)
    want = relay_prefix_ref(*_args(batch))
    check_attention(got, want, q.dtype)


def test_tokens_outside_groups_get_empty_state(make_batch):
    batch = make_batch(query_lens=[1, 2, 1], own_lens=[3, 4, 5], groups=[(1, 2, 32)], seed=11)
    out, lse = relay_prefix(*_args(batch))
    assert torch.all(out[[0, 3]] == 0) and torch.isneginf(lse[:, [0, 3]]).all()
    assert torch.isfinite(lse[:, 1:3]).all()


def test_partials_reduce_to_relay_prefix(make_batch, check_attention):
    """relay_prefix_partials (what the fused path hands the suffix) + merge == relay_prefix."""
    batch = make_batch(
        queries_per_kv=4, query_lens=[1, 1, 1], own_lens=[2, 2, 2], groups=[(0, 3, 80)], seed=12
    )
    parts = relay_prefix_partials(*_args(batch), num_splits=3)
    assert parts[0].shape[0] == 3
    out, lse = torch.empty_like(batch.query), torch.empty_like(parts[1][0])
    merge_partial_states(out, parts[0], parts[1], lse)
    check_attention((out, lse), relay_prefix_ref(*_args(batch)), batch.query.dtype)


def test_relay_prefix_rejects_bad_arguments(make_batch):
    batch = make_batch(query_lens=[1, 1], own_lens=[2, 2], groups=[(0, 2, 16)])
    args = list(_args(batch))
    for idx, bad, name in [
        (4, args[4].long(), "group_req_start"),
        (5, args[5][:0], "group_req_end"),
        (6, args[6][0], "group_block_table"),
        (7, args[7].float(), "group_prefix_len"),
        (2, args[2][..., :32], "value_cache"),
    ]:
        bad_args = list(args)
        bad_args[idx] = bad
        with pytest.raises(ValueError, match=name):
            relay_prefix(*bad_args)


@pytest.mark.parametrize(
    "name", ["one_decode_group_fp32", "odd_prefix_37_split3", "bf16_gqa4_head128_block32",
             "gqa8_prefill_many_m_tiles", "gqa3_padded_heads", "empty_prefix_group"]
)  # fmt: skip
def test_unmasked_full_tiles_match_ref(name, make_batch, poisoned, check_attention):
    """Full tiles without masks, the partial last tile masked (TILE_N 16: several of each)."""
    batch_kw, kw = CASES[name]
    batch = make_batch(seed=list(CASES).index(name), **batch_kw)
    q = batch.query
    out, lse = poisoned(q), poisoned(q, (q.shape[1], q.shape[0]), torch.float32)
    config = dict(UNMASKED_FULL_TILES=True, TILE_N=16)
    got = relay_prefix(*_args(batch), out=out, lse=lse, config=config, **kw)
    check_attention(got, relay_prefix_ref(*_args(batch)), q.dtype)


def test_launch_knobs_big_rows_and_balanced_splits(make_batch, poisoned, check_attention):
    """The launcher knobs in `config`: prefill tiles from 16 rows on, balanced split count."""
    batch = make_batch(
        queries_per_kv=4, query_lens=[1] * 6, own_lens=[3] * 6, groups=[(0, 6, 96)], seed=13
    )
    q = batch.query
    out, lse = poisoned(q), poisoned(q, (q.shape[1], q.shape[0]), torch.float32)
    config = dict(big_rows=16, split_policy="balanced", TILE_N=16)
    got = relay_prefix(*_args(batch), out=out, lse=lse, config=config)
    check_attention(got, relay_prefix_ref(*_args(batch)), q.dtype)
    with pytest.raises(ValueError, match="split_policy"):
        relay_prefix(*_args(batch), config=dict(split_policy="most"))


def test_big_rows_moves_the_prefill_tiles():
    assert _prefix_config(4, 128, 256, big_rows=1024)["BLOCK_M"] == 128  # 1024 rows: prefill tiles
    decode = _prefix_config(4, 128, 256)  # the default (4096) keeps decode tiles at 1024 rows,
    assert (decode["BLOCK_M"], decode["TILE_N"], decode["num_stages"]) == (64, 32, 3)  # 32 keys
    decode = _prefix_config(4, 128, 64)  # 256 rows: below LARGE_DECODE_ROWS, 64 keys
    assert (decode["BLOCK_M"], decode["TILE_N"], decode["num_stages"]) == (64, 64, 3)
    assert _prefix_config(4, 128, 1024)["BLOCK_M"] == 128  # 4096 rows


@pytest.mark.parametrize(
    "programs,prefix_len,tile_n,fused,fill,balanced",
    [
        (64, 2048, 32, True, 3, 4),  # GQA-4 batch 256 (8 M tiles x 8 KV heads): 192 -> 256
        (128, 2048, 64, True, 2, 2),  # MHA batch 256: already 97% of one wave
        (32, 1024, 64, True, 4, 4),  # batch 64: at the fused cap either way
        (8, 4096, 64, False, 16, 16),  # 8 GQA requests, long prefix, unfused cap
        (200, 2048, 64, True, 1, 1),  # enough programs: no split either way
        (64, 64, 64, True, 1, 1),  # one tile: nothing to split
    ],
)
def test_balanced_split_policy(programs, prefix_len, tile_n, fused, fill, balanced):
    pick = functools.partial(_pick_num_splits, programs, prefix_len, tile_n, 132, fused)
    assert (pick(), pick("fill"), pick("balanced")) == (fill, fill, balanced)
