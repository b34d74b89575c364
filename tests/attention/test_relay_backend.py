"""Relay attention inside real vLLM engines versus stock vLLM on the concatenated prompts."""

import json
import random

import pytest

from helpers import close_in_top_k, max_logprob_gap, run_script

# fp32 on CPU: tokens identical and logprobs this close (relay runs fp32 torch references).
FP32_LOGPROB_ATOL = 1e-4
# fp16 on GPU: vLLM's check_logprobs_close rule with this logprob tolerance while tokens agree.
FP16_LOGPROB_ATOL = 5e-2


def _prompts(seed: int, cloud_lens: tuple[int, int], edge_range: tuple[int, int], n: int, vocab: int):
    rng = random.Random(seed)
    clouds = [[rng.randrange(10, vocab) for _ in range(c)] for c in cloud_lens]
    return [clouds[i % 2] + [rng.randrange(10, vocab) for _ in range(rng.randrange(*edge_range))]
            for i in range(n)]


@pytest.mark.slow
def test_tiny_model_relay_equals_stock_vllm(tiny_model):
    # Two cloud prompts (100 and 70 tokens: 3 and 2 whole blocks of 32), interleaved, 8 edges.
    prompts = _prompts(0, (100, 70), (1, 60), 8, 4000)
    stock = run_script("relay_generate.py", str(tiny_model), json.dumps(prompts), "stock")
    relay = run_script("relay_generate.py", str(tiny_model), json.dumps(prompts), "relay")
    assert relay["token_ids"] == stock["token_ids"]
    assert max_logprob_gap(stock, relay) < FP32_LOGPROB_ATOL
    stats = relay["relay_stats"]
    # Every decode step after the first found both clouds' groups.
    assert stats["relay_batches"] >= 14 and stats["groups"] >= 2 * 14, stats


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("runner,cloud_lens", [("v2", (1024, 512)), ("v2-forecast", (1024, 512)),
                                                ("v1", (1024, 512)), ("v2", (48, 16)),
                                                ("v2-forecast-flash", (1024, 512)),
                                                ("v2-forecast-flash-beside", (1024, 512))],
                         ids=["v2", "v2-forecast", "v1", "v2-short-clouds", "v2-flash-prefix",
                              "v2-flash-beside"])
def test_llama2_7b_shape_relay_close_to_stock_on_gpu(tmp_path, runner, cloud_lens):
    """v2: relay inside vLLM's FULL decode graphs (graph_relay.py); v2-forecast: FULL graphs of
    FlashAttention, relaying steps moved to piecewise graphs (graph_mode.py); v1: piecewise;
    v2-flash-prefix: as v2-forecast, every relaying step's prefix pass on FA3 (flash_prefix.py);
    v2-flash-beside: the same, FA3's pass beside our suffix kernel ("handoff", kernels/handoff.py)."""
    from edgeprompt_vllm.models.make_model import make_model

    make_model("llama-2-7b", tmp_path / "m")
    prompts = _prompts(1, cloud_lens, (16, 300), 24, 31000)
    # kv_cache_memory_bytes None: size the KV cache from gpu_memory_utilization (the CPU default of
    # 1 GiB holds only ~2k tokens of this model: requests would evict each other's shared blocks).
    env = {"EP_ENGINE_ARGS": json.dumps({"load_format": "dummy", "dtype": "float16", "block_size": 16,
                                         "kv_cache_memory_bytes": None,
                                         "gpu_memory_utilization": 0.8, "max_model_len": 2048,
                                         "max_num_seqs": 64, "enforce_eager": False}),
           "EP_MAX_TOKENS": "32", "VLLM_USE_V2_MODEL_RUNNER": "0" if runner == "v1" else "1",
           "EDGEPROMPT_RELAY_IN_FULL_GRAPHS": "0" if runner.startswith("v2-forecast") else "auto",
           "EDGEPROMPT_PREFIX_PASS": {"v2-forecast-flash": "flash",
                                      "v2-forecast-flash-beside": "flash-beside"}.get(runner, "auto"),
           "EDGEPROMPT_CHECK_HOST_BLOCK_TABLE": "1",  # every host lookup checked against the device
           # decode steps relay whenever a prefix pass pays, not only when it pays for leaving the
           # FULL graph: 12 requests per cloud prompt would otherwise run FULL (stock) after one step
           "EDGEPROMPT_PIECEWISE_STEP_S": "0"}
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))  # too long for argv
    args = (str(tmp_path / "m"), f"@{tmp_path / 'prompts.json'}")
    stock = run_script("relay_generate.py", *args, "stock", env=env)
    relay = run_script("relay_generate.py", *args, "relay", env=env)
    stats = relay["relay_stats"]
    counters = {k: v for k, v in stats.items() if k != "compiled_kernel_keys"}
    print("relay_stats", json.dumps(counters))  # shown with -rA: the evidence of what ran
    assert close_in_top_k(stock, relay, FP16_LOGPROB_ATOL) == []
    # The builder read its block ids from the runner's host copies, never from the device.
    assert stats["host_rows_noted"] > 0 and stats["host_rows_copied"] == 0, stats
    if cloud_lens[0] < 64:  # 3 and 1 shared blocks: never worth a prefix pass (cost model)
        assert stats["relay_batches"] == 0 and stats["full_steps"] > 0, stats  # FULL graphs
        return
    assert stats["relay_batches"] > 16, stats  # most of the 32 decode steps relayed
    if runner == "v2":  # ... inside FULL graphs, none moved out of them
        assert stats["full_graph_relay_batches"] > 16 and stats["piecewise_for_relay"] == 0, stats
    if runner.startswith("v2-forecast"):  # relaying decode steps ran piecewise (graph_mode.py)
        assert stats["piecewise_for_relay"] > 16 and stats["full_graph_relay_batches"] == 0, stats
    # 12 requests per 1024-token prefix: a small prefix pass, ours by the cost model (FA3's fixed
    # cost does not pay), unless forced onto FA3
    flash, beside = stats["flash_prefix_batches"], stats["prefix_beside_batches"]
    assert flash > 16 if runner.startswith("v2-forecast-flash") else flash == 0, stats
    assert beside == flash if runner == "v2-forecast-flash-beside" else beside == 0, stats
