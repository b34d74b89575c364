"""The GPU-pair transport end to end on two GPUs: the cloud actor on GPU 1, the edge engine on
GPU 0, layers over NCCL (transport "auto" picks it), against stock vLLM on the concatenated
prompts (Llama-2-7b shape, dummy weights, fp16). tests/edge/test_edge_vs_stock.py runs the same
logic on CPU (gloo)."""

import json
import math
import random

import pytest
import torch
from edge.cloud_run import CLOUD_TOKENS, EDGE_TOKENS, run, tokens
from edge.tolerance import logprob_atol
from helpers import close_in_top_k

from edgeprompt_vllm.cloud.deploy import visible_gpu

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

LAYERS = 32
ENGINE = {"load_format": "dummy", "dtype": "float16", "block_size": 16, "max_model_len": 2048,
          "kv_cache_memory_bytes": None, "gpu_memory_utilization": 0.5, "max_num_seqs": 32,
          "enforce_eager": True}


def load_rates(timeline: list[dict]) -> list[dict]:
    """Per load: its bytes and the time from the step's start until its last layer was ready."""
    out = []
    for t in timeline:
        ready = [lay["ready_s"] for lay in t["layers"]
                 if lay.get("ready_s") is not None and not math.isnan(lay["ready_s"])]
        nbytes = sum(lay["nbytes"] for lay in t["layers"])
        if ready and nbytes:
            out.append({"prompts": [x["prompt_id"] for x in t["loads"]], "bytes": nbytes,
                        "last_layer_s": round(max(ready), 4),
                        "GBps": round(nbytes / max(ready) / 1e9, 2)})
    return out


# vLLM's GPU defaults (async scheduling, Model Runner V2) cannot recompute a failed load
# exactly: the connector fails such a request instead (edge/failure_policy.py). The synchronous
# scheduler with Model Runner V1 recomputes it.
EXACT_RECOMPUTE = dict(engine_args={"async_scheduling": False},
                       env={"VLLM_USE_V2_MODEL_RUNNER": "0"})


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("transport, recompute", [("pair", False), ("object_store", True)])
def test_two_gpus_match_stock(tmp_path, transport, recompute):
    from edgeprompt_vllm.models.make_model import make_model

    model = tmp_path / "m"
    make_model("llama-2-7b", model)
    rng = random.Random(7)
    clouds = {"A": tokens(rng, 1024, (10, 31000)), "B": tokens(rng, 512, (10, 31000)),
              "C": tokens(rng, 256, (10, 31000))}
    round1 = [{"token_ids": clouds["AB"[i % 2]] + tokens(rng, rng.randrange(16, 300), (10, 31000)),
               "cloud_prompt": "AB"[i % 2]} for i in range(12)]
    round2 = [{"token_ids": clouds["C"] + tokens(rng, 40, (10, 31000)), "cloud_prompt": "C"}]
    round3 = [{"token_ids": clouds["C"] + tokens(rng, 11, (10, 31000)), "cloud_prompt": "C"}]
    rounds = [round1, round2, round3]
    engine = {**ENGINE, **(EXACT_RECOMPUTE["engine_args"] if recompute else {})}
    env = EXACT_RECOMPUTE["env"] if recompute else None
    spec = dict(engine=engine, max_tokens=24, cloud_engine={"kv_cache_memory_bytes": 2 << 30,
                                                        "gpu_memory_utilization": 0.3})
    stock = run(model, "stock", rounds, tmp_path, timeout=900, env=env, **spec)
    edge = run(model, "edge", rounds, tmp_path, timeout=900, env=env, cloud_prompts=clouds,
               corrupt=[["C", 5]], cloud_env={"CUDA_VISIBLE_DEVICES": visible_gpu(1)}, **spec,
               extra_config={"audit_path": str(tmp_path / "audit.jsonl"), "transport": transport,
                             "timeline_path": str(tmp_path / "timeline.jsonl"),
                             "failed_prompt_retry_s": 600})
    (tmp_path / "results.json").write_text(json.dumps({"stock": stock, "edge": edge}))
    print("loads", json.dumps(load_rates(edge["timeline"])))  # -rA shows the evidence
    st = edge["edgeprompt"]
    assert sorted(s["cloud_prompt"] for s in st[:12] if s["status"] == "loaded") == ["A", "B"]
    # C's layer 5 fails its checksum: its request is recomputed, or fails (never wrong tokens).
    # Round 3 asks for C again: cached after the recompute, computed on the edge after a failure.
    if recompute:
        assert [s["status"] for s in st[12:]] == ["load_failed_recomputed", "cached"]
        assert close_in_top_k(stock, edge, logprob_atol(torch.float16)) == []
    else:
        assert edge["finish_reasons"][12] == "error" and edge["token_ids"][12] == []
        assert st[13]["status"] == "load_failed_recently"
        served = {k: edge[k][:12] + edge[k][13:] for k in ("token_ids", "top_logprobs")}
        expect = {k: stock[k][:12] + stock[k][13:] for k in ("token_ids", "top_logprobs")}
        assert close_in_top_k(expect, served, logprob_atol(torch.float16)) == []
    calls = [json.loads(x)["method"] for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    if transport == "pair":
        assert "fetch_layer" not in calls and calls.count("pair_open") == 1, calls
        assert calls.count("pair_send") == 3 * LAYERS
    else:
        assert "pair_open" not in calls and calls.count("fetch_layer") >= 3 * LAYERS, calls
    (bad,) = [t for t in edge["timeline"] if t["loads"][0]["prompt_id"] == "C"]
    assert [i for i, lay in enumerate(bad["layers"]) if not lay["nbytes"]] == [5]


@pytest.mark.skipif(torch.cuda.device_count() < 3, reason="needs three GPUs")
def test_two_ranks_on_two_gpus_match_stock(tiny_model, tmp_path):
    """Tensor parallelism on GPUs: the edge's 2 ranks on GPUs 0 and 1 (the tiny model's 2 KV
    heads, one per rank), the cloud on GPU 2. Each rank writes its head of every layer with the
    CUDA scatter (tests/edge/test_tensor_parallel.py: the same on CPU)."""
    rng = random.Random(5)
    A = tokens(rng, 320, CLOUD_TOKENS)
    reqs = [{"token_ids": A + tokens(rng, n, EDGE_TOKENS), "cloud_prompt": "A"}
            for n in (9, 40, 131)]
    spec = dict(engine={"dtype": "float16", "tensor_parallel_size": 2,
                        "gpu_memory_utilization": 0.3},
                cloud_engine={"gpu_memory_utilization": 0.3}, max_tokens=24)
    stock = run(tiny_model, "stock", [reqs], tmp_path, timeout=600, **spec)
    for transport, links in (("pair", 2), ("object_store", 0)):  # pair: a link per rank
        audit = tmp_path / f"audit-{transport}.jsonl"
        edge = run(tiny_model, "edge", [reqs], tmp_path, timeout=600, cloud_prompts={"A": A},
                   cloud_env={"CUDA_VISIBLE_DEVICES": visible_gpu(2)},
                   extra_config={"transport": transport, "audit_path": str(audit)}, **spec)
        statuses = [s["status"] for s in edge["edgeprompt"]]
        assert statuses[0] == "loaded" and set(statuses) <= {"loaded", "cached"}, statuses
        assert close_in_top_k(stock, edge, logprob_atol(torch.float16)) == [], transport
        calls = [json.loads(x)["method"] for x in audit.read_text().splitlines()]
        assert calls.count("pair_open") == links, (transport, calls)
