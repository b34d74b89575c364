"""A request whose cloud layer fails: recomputed where vLLM can do that exactly, else failed,
never answered with wrong tokens (edge/failure_policy.py).

On two H100s (vLLM 0.26: async scheduling and Model Runner V2 by default) the recomputed
request answered other tokens than stock. The connector now switches such engines to
kv_load_failure_policy "fail". vLLM's CPU platform recomputes exactly (synchronous scheduler,
V1 runner). End to end on CPU, tests/edge/test_edge_vs_stock.py runs both: recompute over the
object store, and "fail" (asked for) over the pair transport, each followed by a request for
the same cloud prompt that is computed on the edge instead of loading it again.
"""

from types import SimpleNamespace

import pytest

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
