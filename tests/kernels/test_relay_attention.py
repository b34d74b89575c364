"""The composition (prefix per group + suffix + merge) against plain attention over the whole KV."""

import importlib
import inspect
import random

import pytest
import torch
from edgeprompt_vllm.kernels import (
    RelayMetadata,
    _launch,
    plain_attention_ref,
    relay_attention,
    relay_attention_ref,
)
from edgeprompt_vllm.kernels.external_prefix import prefix_attention_ref

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
    "gqa4_128_row_prefix_tiles": (  # sweep_relay_decode.py's prefix_128x32w8s3_um_z2
        dict(queries_per_kv=4),
        dict(
            schedule="fused",
            prefix_splits=2,
            prefix_config=dict(BLOCK_M=128, TILE_N=32, num_warps=8, UNMASKED_FULL_TILES=True),
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


def _as_token_lists(batch, order: list[int], slots: int):
    """The batch with its requests put in `order` (groups no longer contiguous) and its groups
    given as token lists in a table of `slots` entries (the unused ones empty), as
    attention/graph_relay.py builds them for CUDA graphs."""
    m = batch.meta
    qsl, starts, ends = m.query_start_loc.tolist(), m.group_req_start.tolist(), m.group_req_end.tolist()
    old_tokens = [list(range(qsl[r], qsl[r + 1])) for r in order]
    new_qsl = [0]
    for toks in old_tokens:
        new_qsl.append(new_qsl[-1] + len(toks))
    new_of_old = {old: new for new, old in enumerate(order)}
    index, spans = [], []
    for r0, r1 in zip(starts, ends):
        begin = len(index)
        for r in reversed(range(r0, r1)):  # any order within a group
            n = new_of_old[r]
            index += list(range(new_qsl[n], new_qsl[n + 1]))
        spans.append((begin, len(index)))
    spans += [(len(index), len(index))] * (slots - len(spans))
    pad = slots - m.num_groups
    perm = torch.tensor(order)
    meta = RelayMetadata(
        query_start_loc=torch.tensor(new_qsl, dtype=torch.int32),
        seq_lens=m.seq_lens[perm],
        block_table=m.block_table[perm],
        prefix_lens=m.prefix_lens[perm],
        group_req_start=torch.tensor([s for s, _ in spans], dtype=torch.int32),
        group_req_end=torch.tensor([e for _, e in spans], dtype=torch.int32),
        group_block_table=torch.cat([m.group_block_table, m.group_block_table[:1].repeat(pad, 1)]),
        group_prefix_len=torch.cat([m.group_prefix_len, torch.zeros(pad, dtype=torch.int32)]),
        max_query_len=m.max_query_len,
        max_seq_len=m.max_seq_len,
        max_group_query_len=len(index),  # a bound, as a CUDA graph's: the whole batch
        max_prefix_len=m.max_prefix_len,
        group_token_index=torch.tensor(index + [0] * 3, dtype=torch.int32),
    )
    query = torch.cat([batch.query[t[0]:t[-1] + 1] for t in old_tokens])
    return type(batch)(query, batch.key_cache, batch.value_cache, meta, batch.scale)


@pytest.mark.parametrize("schedule", ["fused", "serial"])
@pytest.mark.parametrize("queries_per_kv", [1, 4])
def test_token_list_groups_equal_plain_attention(schedule, queries_per_kv, make_batch, poisoned,
                                                 check_attention):
    """Groups as token lists in a fixed-capacity table (CUDA graphs): requests of a group apart,
    in any order, unused slots empty; the references agree too."""
    batch = make_batch(seed=7, queries_per_kv=queries_per_kv, query_lens=[1] * 6,
                       own_lens=[9, 17, 1, 40, 3, 20], groups=[(0, 3, 48), (3, 5, 16)])
    lists = _as_token_lists(batch, order=[3, 0, 5, 1, 4, 2], slots=4)
    lists.meta.validate(lists.query.shape[0], lists.key_cache.shape[1])
    want = _plain(lists)
    got = relay_attention(lists.query, lists.key_cache, lists.value_cache, lists.meta, lists.scale,
                          out=poisoned(lists.query), return_lse=True, schedule=schedule,
                          prefix_splits=3)
    check_attention(got, want, lists.query.dtype)
    ref = relay_attention_ref(lists.query.float(), lists.key_cache, lists.value_cache, lists.meta,
                              lists.scale, return_lse=True)
    check_attention(ref, want, torch.float16)


def test_token_list_validation_names_the_problem(make_batch):
    batch = make_batch(query_lens=[1] * 3, own_lens=[1, 5, 9], groups=[(0, 3, 32)])
    lists = _as_token_lists(batch, order=[2, 0, 1], slots=2)
    bad = _meta_with(lists.meta, group_token_index=lists.meta.group_token_index.flip(0))
    with pytest.raises(ValueError, match="every token of its requests once"):
        bad.validate(lists.query.shape[0], lists.key_cache.shape[1])


@pytest.mark.parametrize("num_reqs,groups", [(1, [(0, 1, 16)]), (3, [(0, 2, 16)]),
                                             (6, [(0, 2, 32), (2, 5, 16), (5, 6, 16)])])
def test_built_metadata_is_16_byte_aligned_whatever_the_counts(num_reqs, groups):
    """Packed into one upload, every int32 array still starts 16-byte aligned: Triton specializes
    on pointer alignment, so otherwise each batch size class would JIT its own variants."""
    meta = RelayMetadata.build([1] * num_reqs, [40] * num_reqs,
                               torch.arange(3, dtype=torch.int32).repeat(num_reqs, 1),  # shared ids
                               groups, 16)
    arrays = [meta.query_start_loc, meta.seq_lens, meta.prefix_lens, meta.group_req_start,
              meta.group_req_end, meta.group_prefix_len]
    assert all(a.data_ptr() % 16 == 0 for a in arrays)
    assert meta.query_start_loc.tolist() == list(range(num_reqs + 1))
    assert meta.group_req_start.tolist() == [g[0] for g in groups]
    assert meta.group_req_end.tolist() == [g[1] for g in groups]
    assert meta.group_prefix_len.tolist() == [g[2] for g in groups]
    meta.validate(num_reqs, 16)


# ---- the prefix pass by another kernel (external_prefix.py; FA3 on the CUDA backend)

EXTERNAL_PREFIX = {
    # groups covering every request, as the CUDA backend relays them
    "gqa4_two_groups": dict(queries_per_kv=4, query_lens=[1, 1, 1, 1, 1],
                            own_lens=[37, 17, 70, 3, 9], groups=[(0, 3, 64), (3, 5, 32)]),
    # ungrouped requests before, between and after the groups: their sequences' prefix states
    # are computed for nothing and ignored
    "ungrouped_around_bf16": dict(dtype=torch.bfloat16, query_lens=[1, 2, 1, 1, 3, 1],
                                  own_lens=[5, 20, 33, 8, 40, 2],
                                  groups=[(1, 3, 48), (4, 5, 16)]),
    "fp32_block32_causal_chunks": dict(dtype=torch.float32, block_size=32,
                                       query_lens=[3, 4, 1], own_lens=[40, 9, 70],
                                       groups=[(0, 3, 64)]),
}  # fmt: skip


@pytest.mark.parametrize("schedule", ["fused", "serial"])  # fused: folded; serial: merged
@pytest.mark.parametrize("name", list(EXTERNAL_PREFIX))
def test_an_external_prefix_kernel_equals_plain_attention(
    name, schedule, make_batch, poisoned, check_attention, monkeypatch
):
    batch = make_batch(seed=200 + list(EXTERNAL_PREFIX).index(name), **EXTERNAL_PREFIX[name])
    calls, suffix_launches = [], []
    monkeypatch.setattr(_launch, "RECORDER", lambda kernel, grid, kw, compiled: (
        suffix_launches.append(kw) if "prefix_lens_ptr" in kw else None))  # fmt: skip

    def prefix_kernel(**kw):  # validate (on, CPU) has checked the sequences it is given
        calls.append((kw["cu_seqlens_q"].tolist(), kw["max_seqlen_q"]))
        prefix_attention_ref(**kw)

    got = relay_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.meta, batch.scale,
        out=poisoned(batch.query), return_lse=True, prefix_attention=prefix_kernel,
        schedule=schedule,
    )  # fmt: skip
    check_attention(got, _plain(batch), batch.query.dtype)
    assert len(calls) == 1 and calls[0][0][0] == 0 and calls[0][0][-1] == batch.query.shape[0]
    # fused: the suffix kernel, alone after the external pass, launches a request's KV heads
    # side by side (EXTERNAL_PREFIX_SUFFIX_CONFIG)
    assert [kw["HEAD_FASTEST"] for kw in suffix_launches] == [schedule == "fused"]


def test_an_external_prefix_kernel_needs_ordered_request_range_groups(make_batch):
    kw = dict(query_lens=[1, 1, 1], own_lens=[5, 6, 7])
    ordered = make_batch(seed=1, groups=[(0, 1, 16), (1, 3, 32)], **kw).meta
    assert ordered.prefix_seq_start_loc.tolist() == [0, 1, 3] and ordered.max_prefix_seq_len == 2
    shuffled = make_batch(seed=1, groups=[(1, 3, 32), (0, 1, 16)], **kw)
    assert shuffled.meta.prefix_seq_start_loc is None
    with pytest.raises(ValueError, match="contiguous request ranges in order"):
        relay_attention(shuffled.query, shuffled.key_cache, shuffled.value_cache, shuffled.meta,
                        shuffled.scale, prefix_attention=prefix_attention_ref)  # fmt: skip
    with pytest.raises(ValueError, match="contiguous request ranges in order"):
        relay_attention(shuffled.query, shuffled.key_cache, shuffled.value_cache, shuffled.meta,
                        shuffled.scale, schedule="serial", prefix_attention=prefix_attention_ref)  # fmt: skip


# ---- every launcher has a torch reference with the same signature (issue 3)

LAUNCHERS = [("relay_attention", "relay_attention"), ("paged_suffix", "paged_suffix"),
             ("relay_prefix", "relay_prefix"), ("merge", "merge_attn_states"),
             ("merge", "merge_partial_states")]  # fmt: skip


@pytest.mark.parametrize("module,name", LAUNCHERS)
def test_each_launcher_and_its_reference_take_the_same_arguments(module, name):
    mod = importlib.import_module(f"edgeprompt_vllm.kernels.{module}")
    launcher, reference = getattr(mod, name), getattr(mod, f"{name}_ref")
    assert inspect.signature(launcher).parameters.keys() == inspect.signature(
        reference
    ).parameters.keys()
