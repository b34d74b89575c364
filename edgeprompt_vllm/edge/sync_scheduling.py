"""The edge runs vLLM's synchronous scheduler: the plugin makes it the default, the connector
refuses to start without it.

A cloud layer that fails (checksum, timeout, dead cloud) marks its blocks invalid and vLLM
recomputes them (kv_load_failure_policy "recompute"). Under async scheduling, vLLM's default on
GPU, the request's next step is already scheduled when the failure is reported: it decodes from
the token sampled over the invalid KV, and the output is not stock vLLM's. Seen on two H100s with
vLLM 0.26 (tests/edge/test_pair_gpu.py): every request with status load_failed_recomputed had
another first token than stock. vLLM's CPU platform turns async scheduling off, so CPU runs never
showed it.
"""

import functools

from edgeprompt_vllm.log import get_logger

logger = get_logger(__name__)
CONNECTOR = "EdgePromptConnector"


def names_edgeprompt(kv_transfer_config) -> bool:
    """Whether an engine's kv_transfer_config (a dict or vLLM's KVTransferConfig) loads ours."""
    if kv_transfer_config is None:
        return False
    if isinstance(kv_transfer_config, dict):
        return kv_transfer_config.get("kv_connector") == CONNECTOR
    return getattr(kv_transfer_config, "kv_connector", None) == CONNECTOR


def default_to_sync_scheduling() -> None:
    """From now on in this process, an engine whose arguments load the EdgePrompt connector and
    leave --async-scheduling unset gets the synchronous scheduler (EngineArgs is where
    `vllm serve` and `LLM(...)` both build their config). An explicit --async-scheduling is kept,
    and the connector then refuses it (check_sync_scheduling)."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "edgeprompt_sync_default", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        if self.async_scheduling is None and names_edgeprompt(self.kv_transfer_config):
            self.async_scheduling = False
            logger.info("EdgePrompt: vLLM's synchronous scheduler (a failed cloud layer is "
                        "recomputed exactly only there)")
        return original(self, *args, **kwargs)

    create_engine_config.edgeprompt_sync_default = True
    EngineArgs.create_engine_config = create_engine_config


def check_sync_scheduling(vllm_config) -> None:
    """ValueError when the engine schedules asynchronously (see the module's docstring)."""
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        raise ValueError(
            "EdgePrompt's connector needs vLLM's synchronous scheduler: with async scheduling a "
            "cloud layer that fails to load is recomputed too late and the request answers other "
            "tokens than stock vLLM. Leave --async-scheduling out (the EdgePrompt plugin then "
            "turns it off) or pass --no-async-scheduling.")
