"""The composition (prefix per group + suffix + merge) against plain attention over the whole KV."""

import random

import pytest
import torch
from edgeprompt_vllm.kernels import (
    RelayMetadata,
    plain_attention_ref,
    relay_attention,
    relay_attention_ref,
)

# Named workloads: make_batch kwargs. Defaults: fp16, 2 KV heads, MHA, head 64, block 16.
# Every prefix is block-aligned (only whole blocks are shared, as with vLLM's prefix cache).
WORKLOADS = {
    "decode_one_group": dict(query_lens=[1] * 4, own_lens=[37, 17, 5, 64], groups=[(0, 4, 64)]),
    "decode_groups_of_1_and_ungrouped": dict(
        query_lens=[1] * 6,
        own_lens=[9, 17, 1, 40, 3, 20],
        groups=[(4, 6, 32), (0, 1, 48), (2, 4, 16)],
    ),
    "no_sharing": dict(query_lens=[1, 3, 1], own_lens=[37, 17, 80]),
    "edge_prefill_after_cloud_prompt": dict(
        query_lens=[17, 5], own_lens=[17, 37], groups=[(0, 2, 48)]
    ),
    "mixed_prefill_and_decode_gqa8": dict(
        queries_per_kv=8, query_lens=[20, 1, 1], own_lens=[20, 9, 33], groups=[(0, 3, 32)]
    ),
    "suffix_is_only_the_new_token": dict(query_lens=[1, 1], own_lens=[1, 1], groups=[(0, 2, 32)]),
}


def _plain(batch):
    m = batch.meta
    return plain_attention_ref(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        m.query_start_loc,
        m.seq_lens,
        m.block_table,
        batch.scale,
        return_lse=True,
    )


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_relay_equals_plain_attention(name, make_batch, poisoned, check_attention):
    batch = make_batch(seed=list(WORKLOADS).index(name), **WORKLOADS[name])
    got = relay_attention(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.meta,
        batch.scale,
        out=poisoned(batch.query),
        return_lse=True,
    )
    check_attention(got, _plain(batch), batch.query.dtype)


# Each remaining axis once: dtypes, head 128, GQA 4, block 32, the schedules, splits.
VARIANTS = {
    "fp32": (dict(dtype=torch.float32), {}),
    "bf16_head128": (dict(dtype=torch.bfloat16, head_size=128), {}),
    "gqa4_block32": (dict(queries_per_kv=4, block_size=32), {}),
    "serial_three_kernels": ({}, dict(schedule="serial")),
    "overlap_schedule": ({}, dict(schedule="overlap")),  # on CPU: no side stream, same kernels
    "split_suffix_and_prefix": ({}, dict(suffix_splits=3, prefix_splits=2)),
    "split_serial_bf16": (
        dict(dtype=torch.bfloat16),
        dict(schedule="serial", suffix_splits=2, prefix_splits=3),
    ),
    "gqa4_measuring_switches": (  # what benchmarks/sweep_relay_decode.py's "combo" variant turns on
        dict(queries_per_kv=4),
        dict(
            schedule="fused",
            prefix_config=dict(
                UNMASKED_FULL_TILES=True, TILE_N=16, big_rows=4096, split_policy="balanced"
            ),
            suffix_config=dict(UNMASKED_FULL_TILES=True, TILE_N=16, HEAD_FASTEST=True),
        ),
    ),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_relay_variants_equal_plain_attention(name, make_batch, poisoned, check_attention):
    batch_kw, kw = VARIANTS[name]
    workload = dict(
        query_lens=[1, 2, 1, 1], own_lens=[37, 17, 70, 3], groups=[(0, 2, 64), (3, 4, 32)]
    )
    batch = make_batch(seed=100 + list(VARIANTS).index(name), **workload, **batch_kw)
    got = relay_attention(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.meta,
        batch.scale,
        out=poisoned(batch.query),
        return_lse=True,
        **kw,
    )
    check_attention(got, _plain(batch), batch.query.dtype)


def _random_workload(rng: random.Random) -> tuple[dict, dict]:
    """A random batch: contiguous groups (some of 1), ungrouped requests, decode, causal chunks."""
    block_size = rng.choice([16, 32])
    batch_kw = dict(
        dtype=rng.choice([torch.float16, torch.bfloat16, torch.float32]),
        head_size=rng.choice([64, 128]),
        queries_per_kv=rng.choice([1, 2, 3, 4, 8]),
        block_size=block_size,
        query_lens=[],
        own_lens=[],
        groups=[],
    )
    r = 0
    for _ in range(rng.randint(1, 4)):
        n = rng.randint(1, 3)
        prefix = block_size * rng.randint(0, 3)
        if prefix:
            batch_kw["groups"].append((r, r + n, prefix))
        for _ in range(n):
            q = 1 if rng.random() < 0.7 else rng.randint(2, 19)
            batch_kw["query_lens"].append(q)
            batch_kw["own_lens"].append(q + rng.randint(0, 50))
        r += n
    kw = dict(
        schedule=rng.choice(["fused", "fused", "serial"]),
        suffix_splits=rng.choice([None, 1, 2, 3]),
        prefix_splits=rng.choice([None, 1, 2]),
    )
    return batch_kw, kw


@pytest.mark.parametrize("seed", range(12))
def test_random_batches_equal_plain_attention(seed, make_batch, poisoned, check_attention):
    batch_kw, kw = _random_workload(random.Random(seed))
    batch = make_batch(seed=seed, **batch_kw)
    got = relay_attention(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        batch.meta,
        batch.scale,
        out=poisoned(batch.query),
        return_lse=True,
        **kw,
    )
    check_attention(got, _plain(batch), batch.query.dtype)


def test_unknown_schedule_is_rejected(make_batch):
    batch = make_batch(query_lens=[1], own_lens=[3], groups=[(0, 1, 16)])
    with pytest.raises(ValueError, match="schedule"):
        relay_attention(
            batch.query,
            batch.key_cache,
            batch.value_cache,
            batch.meta,
            batch.scale,
            schedule="fast",
        )


def test_reference_composition_equals_plain_attention(make_batch, check_attention):
    """The torch references agree in fp32 (so kernel-vs-ref failures point at the kernels)."""
    batch = make_batch(dtype=torch.float32, **WORKLOADS["decode_groups_of_1_and_ungrouped"])
    got = relay_attention_ref(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, batch.scale, return_lse=True
    )
    check_attention(got, _plain(batch), torch.float32)


def _meta_with(meta: RelayMetadata, **changes) -> RelayMetadata:
    fields = {k: getattr(meta, k) for k in meta.__dataclass_fields__}
    fields.update(changes)
    return RelayMetadata(**fields)


@pytest.mark.parametrize(
    "change,message",
    [
        (
            lambda m: dict(
                prefix_lens=m.prefix_lens + 16, group_prefix_len=m.group_prefix_len + 16
            ),
            "query positions must be >= prefix_lens",
        ),
        (lambda m: dict(group_req_start=m.group_req_start * 0), "in two groups"),
        (lambda m: dict(group_block_table=m.group_block_table.flip(1)), "shared blocks"),
        (lambda m: dict(prefix_lens=m.prefix_lens * 0), "prefix_lens=0 != group_prefix_len"),
        (lambda m: dict(max_query_len=0), "max_query_len"),
    ],
)
def test_metadata_validation_names_the_problem(change, message, make_batch):
    batch = make_batch(query_lens=[1, 1, 1], own_lens=[1, 5, 9], groups=[(0, 1, 32), (1, 3, 32)])
    bad = _meta_with(batch.meta, **change(batch.meta))
    with pytest.raises(ValueError, match=message):
        relay_attention(batch.query, batch.key_cache, batch.value_cache, bad, batch.scale)
