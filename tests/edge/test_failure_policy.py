"""A request whose cloud layer fails: recomputed where vLLM can do that exactly, else failed,
never answered with wrong tokens (edge/failure_policy.py).

On two H100s (vLLM 0.26: async scheduling and Model Runner V2 by default) the recomputed
request answered other tokens than stock. The connector now switches such engines to
kv_load_failure_policy "fail". vLLM's CPU platform recomputes exactly (synchronous scheduler,
V1 runner; tests/edge/test_edge_vs_stock.py), so here the "fail" path runs by asking for it.
"""

import random
from types import SimpleNamespace

import pytest
from edge.cloud_run import CLOUD_TOKENS, EDGE_TOKENS, run, tokens

from edgeprompt_vllm.edge.failure_policy import recomputes_failures, settle_failure_policy


def engine(policy: str, async_scheduling: bool, v2: bool):
    return SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=async_scheduling),
                           use_v2_model_runner=v2,
                           kv_transfer_config=SimpleNamespace(kv_load_failure_policy=policy))


@pytest.mark.parametrize("policy, async_scheduling, v2, expected", [
    ("recompute", False, False, "recompute"),  # exact: vLLM's CPU platform, or asked for on GPU
    ("recompute", True, False, "fail"),  # the next step is scheduled before the failure is known
    ("recompute", False, True, "fail"),  # Model Runner V2 does not roll back
    ("recompute", True, True, "fail"),  # vLLM 0.26's GPU defaults
    ("fail", False, False, "fail"),  # asked for: kept
])
def test_recompute_only_where_vllm_does_it_exactly(policy, async_scheduling, v2, expected):
    config = engine(policy, async_scheduling, v2)
    # a worker's copy of the config, made before the scheduler settled it, says the same
    assert recomputes_failures(config) == (expected == "recompute")
    assert settle_failure_policy(config) == expected
    assert config.kv_transfer_config.kv_load_failure_policy == expected  # what vLLM then reads
    assert recomputes_failures(config) == (expected == "recompute")


@pytest.mark.slow
def test_a_failed_load_fails_its_request_and_the_engine_goes_on(tiny_model, tmp_path):
    rng = random.Random(11)
    A, C = tokens(rng, 96, CLOUD_TOKENS), tokens(rng, 64, CLOUD_TOKENS)
    rounds = [[{"token_ids": C + tokens(rng, 20, EDGE_TOKENS), "cloud_prompt": "C"},
               {"token_ids": A + tokens(rng, 30, EDGE_TOKENS), "cloud_prompt": "A"}],
              [{"token_ids": C + tokens(rng, 9, EDGE_TOKENS), "cloud_prompt": "C"},
               {"token_ids": A + tokens(rng, 12, EDGE_TOKENS), "cloud_prompt": "A"}]]
    stock = run(tiny_model, "stock", rounds, tmp_path)
    edge = run(tiny_model, "edge", rounds, tmp_path, cloud_prompts={"A": A, "C": C},
               corrupt=[["C", 2]], failure_policy="fail",
               extra_config={"failed_prompt_retry_s": 600})
    # C's layer 2 is corrupt in the cloud's store: its load fails, and vLLM returns the failed
    # request without its kv_transfer_params (so without our status)
    assert edge["finish_reasons"] == ["error", "length", "length", "length"]
    assert edge["token_ids"][0] == []
    statuses = [s and s["status"] for s in edge["edgeprompt"]]
    # C's next request computes C on the edge instead of loading the corrupt layer again
    assert statuses == [None, "loaded", "load_failed_recently", "cached"]
    # every other request is exact, and the engine went on
    assert edge["token_ids"][1:] == stock["token_ids"][1:]
