"""The edge runs vLLM's synchronous scheduler (edge/sync_scheduling.py). On two H100s (vLLM
0.26, async scheduling by default on GPU) every request whose cloud layer failed and was
recomputed answered another first token than stock. vLLM's CPU platform turns async scheduling
off whatever the arguments say, so here the checks are on the arguments and on the refusal."""

from types import SimpleNamespace

import pytest
from vllm.engine.arg_utils import EngineArgs

from edgeprompt_vllm.edge.sync_scheduling import check_sync_scheduling, names_edgeprompt

EDGE = {"kv_connector": "EdgePromptConnector", "kv_role": "kv_consumer",
        "kv_connector_module_path": "edgeprompt_vllm.edge.connector"}
OTHER = {"kv_connector": "ExampleConnector", "kv_role": "kv_both"}


def engine_args(tiny_model, kv_transfer_config, async_scheduling=None) -> EngineArgs:
    from vllm.config import KVTransferConfig

    # EngineArgs loads the plugins (ours patches create_engine_config)
    return EngineArgs(model=str(tiny_model), max_model_len=512, async_scheduling=async_scheduling,
                      kv_transfer_config=KVTransferConfig(**kv_transfer_config))


@pytest.mark.parametrize("kv, asked, expected", [
    (EDGE, None, False),  # unset: the plugin picks the synchronous scheduler
    (EDGE, True, True),  # asked for: kept (the connector refuses it at start)
    (OTHER, None, None),  # another connector: vLLM decides, as without the plugin
])
def test_the_plugin_defaults_edge_engines_to_sync_scheduling(tiny_model, kv, asked, expected):
    args = engine_args(tiny_model, kv, asked)
    args.create_engine_config()
    assert args.async_scheduling is expected


def test_the_connector_refuses_async_scheduling():
    with pytest.raises(ValueError, match="needs vLLM's synchronous scheduler"):
        check_sync_scheduling(SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=True)))
    check_sync_scheduling(SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=False)))


def test_names_edgeprompt_reads_dicts_and_configs():
    assert names_edgeprompt(EDGE) and not names_edgeprompt(OTHER) and not names_edgeprompt(None)
    assert names_edgeprompt(SimpleNamespace(kv_connector="EdgePromptConnector"))
