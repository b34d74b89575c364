"""What happens to a request whose cloud layer fails to load: recomputed on the edge, or failed.

The worker side marks a failed layer's blocks invalid (checksum, timeout, dead cloud). vLLM then
recomputes them (kv_load_failure_policy "recompute") or fails the requests that read them
("fail"). Its recompute is exact only with the synchronous scheduler and Model Runner V1:
  - under async scheduling (vLLM's default on GPU) the request's next step is already scheduled,
    from the token sampled over the invalid KV;
  - Model Runner V2 (vLLM 0.26's default for dense models) keeps each request's computed-token
    count on the GPU and does not follow the scheduler's rollback.
Seen on two H100s with vLLM 0.26 (tests/edge/test_pair_gpu.py): under either, the request whose
layer failed answered other tokens than stock vLLM (with the synchronous scheduler and Model
Runner V2: stock's output shifted by one token).

So where vLLM cannot recompute exactly, the connector switches "recompute" to "fail": such a
request ends with an error, never with wrong tokens (DESIGN.md, invariant 4), and the engine
serves the others. Exact recompute: `--no-async-scheduling` and VLLM_USE_V2_MODEL_RUNNER=0
(vLLM's CPU platform always runs that way). vLLM's fast defaults stay the default: on one H200
host at the same time, EdgePrompt made 4247 output tok/s at a 1024-token cloud prompt with those
two settings, against 5104 with vLLM's defaults (benchmarks/results/README.md, session 12).
"""

from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)


def inexact_recompute(vllm_config) -> str | None:
    """What keeps vLLM from recomputing a failed load exactly in this engine (None: nothing)."""
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        return "async scheduling"
    if getattr(vllm_config, "use_v2_model_runner", False):
        return "Model Runner V2"
    return None


def recomputes_failures(vllm_config) -> bool:
    """Whether a failed load is recomputed in this engine, whether or not settle_failure_policy
    already ran on this copy of the config (a worker process may hold one made before)."""
    policy = vllm_config.kv_transfer_config.kv_load_failure_policy
    return policy == "recompute" and inexact_recompute(vllm_config) is None


def settle_failure_policy(vllm_config) -> str:
    """The policy in force, "recompute" or "fail": "recompute" becomes "fail" where vLLM cannot
    recompute exactly. Run from the scheduler-side connector's __init__: vLLM's Scheduler
    creates its connector before it reads the policy."""
    kvt = vllm_config.kv_transfer_config
    why = inexact_recompute(vllm_config)
    if kvt.kv_load_failure_policy == "recompute" and why:
        kvt.kv_load_failure_policy = "fail"
        logger.warning(
            "EdgePrompt: with %s vLLM cannot recompute a failed cloud load exactly, so a request "
            "whose cloud layer fails ends with an error instead (kv_load_failure_policy 'fail'). "
            "For recompute on the edge run with --no-async-scheduling and "
            "VLLM_USE_V2_MODEL_RUNNER=0.", why)
    return kvt.kv_load_failure_policy
