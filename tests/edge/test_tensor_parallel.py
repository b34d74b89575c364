"""Tensor parallelism: each rank's cache holds its share of the KV heads, and the connector
writes only that share of every layer the cloud sends (edge/parallel.py).

Before this, a rank wrote all heads into its cache: with tensor_parallel_size 2 the CPU writer
took the cloud's 2 heads for the rank's 1, and the edge answered other tokens than stock vLLM
with status "loaded". End to end on CPU: 2 ranks (the tiny model's 2 KV heads, one per rank),
both transports, against stock vLLM with the same parallelism.
"""

import random

import pytest
import torch
from edge.cloud_run import CLOUD_TOKENS, EDGE_TOKENS, run, tokens

from edgeprompt_vllm.edge.kv_writer import write_layer
from edgeprompt_vllm.edge.parallel import kv_head_slice

# vLLM's CPU workers bind their threads per NUMA node; one node here, so bind them by hand
TP2 = {"engine": {"tensor_parallel_size": 2}}
TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


@pytest.mark.parametrize("total, tp, expected", [
    (8, 1, [(0, 8)]),
    (8, 2, [(0, 4), (4, 8)]),
    (8, 8, [(i, i + 1) for i in range(8)]),
    (2, 4, [(0, 1), (0, 1), (1, 2), (1, 2)]),  # fewer heads than ranks: each head on 2 ranks
    (1, 2, [(0, 1), (0, 1)]),
])
def test_kv_head_slice_follows_vllms_split(total, tp, expected):
    got = [kv_head_slice(total, tp, r) for r in range(tp)]
    assert [(s.start, s.stop) for s in got] == expected


@pytest.mark.parametrize("total, tp, rank", [(6, 4, 0), (3, 2, 1), (4, 6, 0), (8, 2, 2)])
def test_kv_head_slice_refuses_uneven_splits_and_bad_ranks(total, tp, rank):
    with pytest.raises(ValueError):
        kv_head_slice(total, tp, rank)


def test_writer_refuses_more_heads_than_the_cache_holds():
    cache = torch.zeros(4, 1, 32, 2 * 64)  # CPU: [blocks, heads, block size, 2 * head size]
    key = value = torch.ones(3, 2, 64)  # 2 heads for a cache of 1
    with pytest.raises(ValueError, match="2 KV heads to write into a cache of 1"):
        write_layer(cache, key, value, torch.arange(3), isa=None)
    assert not cache.any()


@pytest.mark.slow
def test_two_ranks_match_stock_with_both_transports(tiny_model, tmp_path):
    rng = random.Random(3)
    A = tokens(rng, 100, CLOUD_TOKENS)
    reqs = [{"token_ids": A + tokens(rng, n, EDGE_TOKENS), "cloud_prompt": "A"} for n in (9, 40)]
    stock = run(tiny_model, "stock", [reqs], tmp_path, env=TP2_ENV, **TP2)
    for transport in ("object_store", "pair"):
        edge = run(tiny_model, "edge", [reqs], tmp_path, env=TP2_ENV, cloud_prompts={"A": A},
                   extra_config={"transport": transport}, **TP2)
        assert [s["status"] for s in edge["edgeprompt"]] == ["loaded", "cached"], transport
        assert edge["token_ids"] == stock["token_ids"], transport
