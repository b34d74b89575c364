"""block_decode (one program per block of decode requests x KV head, prefix and own keys in one
state) against plain attention over the concatenated KV, under TRITON_INTERPRET on the CPU."""

import inspect

import pytest
import torch
from edgeprompt_vllm.kernels import plain_attention_ref
from edgeprompt_vllm.kernels.block_decode import (
    block_decode,
    block_decode_ref,
    row_blocks_for,
    row_blocks_tensor,
)

# make_batch kwargs; every request decodes one token. Prefixes are block-aligned.
WORKLOADS = {
    "one_group": dict(own_lens=[37, 17, 5, 64], groups=[(0, 4, 64)]),
    "groups_of_1_and_ungrouped": dict(
        own_lens=[9, 17, 1, 40, 3, 20], groups=[(4, 6, 32), (0, 1, 48), (2, 4, 16)]
    ),
    "no_sharing": dict(own_lens=[37, 17, 80]),
    "own_is_only_the_new_token": dict(own_lens=[1, 1, 1], groups=[(0, 3, 32)]),
    "group_longer_than_a_row_block": dict(own_lens=[5, 33, 2, 17, 9, 1, 26], groups=[(0, 7, 64)]),
}
CONFIGS = [
    dict(BLOCK_R=2, SLAB=8, INTERLEAVE=True),
    dict(BLOCK_R=4, SLAB=4, INTERLEAVE=False),
    dict(BLOCK_R=1, SLAB=16, INTERLEAVE=True),
]


def _run(batch, groups, cfg, poisoned, fn=block_decode):
    m = batch.meta
    blocks = row_blocks_tensor(row_blocks_for(groups, m.seq_lens.shape[0], cfg["BLOCK_R"]), "cpu")
    out = poisoned(batch.query)
    lse = poisoned(batch.query, (batch.query.shape[1], batch.query.shape[0]), torch.float32)
    return fn(batch.query, batch.key_cache, batch.value_cache, m.query_start_loc, m.seq_lens,
              m.block_table, m.prefix_lens, blocks, m.group_block_table, m.group_prefix_len,
              batch.scale, out=out, lse=lse, return_lse=True, config=cfg)  # fmt: skip


def _plain(batch):
    m = batch.meta
    return plain_attention_ref(batch.query, batch.key_cache, batch.value_cache,
                               m.query_start_loc, m.seq_lens, m.block_table, batch.scale,
                               return_lse=True)  # fmt: skip


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"r{c['BLOCK_R']}s{c['SLAB']}")
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_block_decode_equals_plain_attention(name, cfg, make_batch, poisoned, check_attention):
    w = WORKLOADS[name]
    batch = make_batch(query_lens=[1] * len(w["own_lens"]), seed=3, **w)
    got = _run(batch, w.get("groups", []), cfg, poisoned)
    check_attention(got, _plain(batch), batch.query.dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("queries_per_kv,head_size", [(4, 64), (8, 128), (3, 64)])
def test_gqa_dtypes_and_heads(dtype, queries_per_kv, head_size, make_batch, poisoned,
                              check_attention):  # fmt: skip
    w = WORKLOADS["group_longer_than_a_row_block"]
    batch = make_batch(query_lens=[1] * 7, dtype=dtype, queries_per_kv=queries_per_kv,
                       head_size=head_size, block_size=32, seed=5, **w)  # fmt: skip
    got = _run(batch, w["groups"], dict(BLOCK_R=4, SLAB=8), poisoned)
    check_attention(got, _plain(batch), dtype)


def test_reference_equals_plain_attention(make_batch, poisoned, check_attention):
    w = WORKLOADS["groups_of_1_and_ungrouped"]
    batch = make_batch(query_lens=[1] * 6, queries_per_kv=4, seed=1, **w)
    got = _run(batch, w["groups"], dict(BLOCK_R=2), poisoned, fn=block_decode_ref)
    check_attention(got, _plain(batch), torch.float32)


def test_row_blocks_cut_groups_and_ungrouped_runs():
    groups = [(4, 6, 32), (0, 1, 48), (2, 4, 16)]
    assert row_blocks_for(groups, 9, 2) == [
        (0, 1, 1), (1, 2, -1), (2, 4, 2), (4, 6, 0), (6, 8, -1), (8, 9, -1),
    ]  # fmt: skip


def test_bad_config_is_rejected(make_batch, poisoned):
    batch = make_batch(query_lens=[1], own_lens=[3])
    with pytest.raises(ValueError, match="BLOCK_R must be a power of two"):
        _run(batch, [], dict(BLOCK_R=3), poisoned)
    with pytest.raises(ValueError, match="unknown keys"):
        _run(batch, [], dict(BLOCK_R=2, TILE=4), poisoned)


def test_launcher_and_reference_take_the_same_arguments():
    assert inspect.signature(block_decode).parameters.keys() == inspect.signature(
        block_decode_ref
    ).parameters.keys()
