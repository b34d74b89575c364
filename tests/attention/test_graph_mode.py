"""graph_mode: FULL CUDA graphs for decode steps forecast to relay nothing, PIECEWISE otherwise.

The wrapper runs around vLLM's own ModelCudaGraphManager.dispatch, with hand-made captured
descriptors: no GPU needed. This is vLLM 0.32's dispatch (the CPU install); 0.26's matches a
descriptor on the same fields except max_query_len and num_ubatches, which stay at their
defaults here.
"""

import pytest

from edgeprompt_vllm.attention import graph_mode


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(graph_mode, "STATS", graph_mode.GraphModeStats())
    monkeypatch.setattr(graph_mode, "STEP", graph_mode._Step())


class _Config:  # the fields of a VllmConfig the wrapper reads
    def __init__(self, instance_id):
        self.instance_id = instance_id


def _manager(config, candidates):
    from vllm.v1.worker.gpu.cudagraph_utils import ModelCudaGraphManager

    mgr = object.__new__(ModelCudaGraphManager)
    mgr._graphs_captured, mgr._lora_dispatch_map = True, {}
    mgr._candidates, mgr.vllm_config = candidates, config
    return mgr


@pytest.fixture
def descs():
    """FULL (uniform decode, 256 requests) and PIECEWISE descriptors of 256 tokens."""
    pytest.importorskip("vllm")
    import vllm  # noqa: F401  (vllm first: importing its worker modules alone is circular)
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor

    assert graph_mode.install()
    full = BatchExecutionDescriptor(cg_mode=CUDAGraphMode.FULL, num_tokens=256, num_reqs=256,
                                    uniform_token_count=1)
    piecewise = BatchExecutionDescriptor(cg_mode=CUDAGraphMode.PIECEWISE, num_tokens=256, num_reqs=None)
    return full, piecewise


@pytest.fixture
def manager(descs):
    """A relay engine's manager that 'captured' both kinds of graph of 256 tokens."""
    config = _Config("relay-engine")
    graph_mode.enable_for(config)
    return _manager(config, {(n, 0): list(descs) for n in range(1, 257)})


def test_decode_step_runs_full_graph_until_a_build_relays(manager):
    # nothing decided yet (a fresh engine, or after prefill-only steps): the step runs eagerly
    desc = manager.dispatch(250, 250, 1, num_active_loras=0)  # uniform decode, 1 token each
    assert desc.cg_mode.name == "PIECEWISE" and desc.num_reqs is None
    assert not graph_mode.step_is_full_graph()
    graph_mode.note_build(False)  # its build relayed nothing
    desc = manager.dispatch(250, 250, 1, num_active_loras=0)
    assert desc.cg_mode.name == "FULL" and graph_mode.step_is_full_graph()
    assert manager.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "FULL"  # no build noted
    graph_mode.note_build(True)  # a (non-FULL) step relayed a group
    assert manager.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "PIECEWISE"
    assert graph_mode.graph_mode_stats() == {"full_steps": 2, "piecewise_for_relay": 2,
                                             "eager_for_relay": 0}


def test_any_builder_of_a_step_forecasting_relay_wins(manager):
    graph_mode.note_build(False)
    graph_mode.note_build(True)  # a second KV-cache group's builder
    assert manager.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "PIECEWISE"
    graph_mode.note_build(False)
    graph_mode.note_build(False)
    assert manager.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "FULL"


def test_mixed_and_uncaptured_steps_are_left_alone(manager):
    graph_mode.note_build(True)
    assert manager.dispatch(3, 256, None, num_active_loras=0).cg_mode.name == "PIECEWISE"  # prefill
    assert manager.dispatch(300, 300, 1, num_active_loras=0).cg_mode.name == "NONE"  # not captured
    graph_mode.note_build(False)
    assert manager.dispatch(3, 256, None, num_active_loras=0).cg_mode.name == "PIECEWISE"
    assert graph_mode.graph_mode_stats() == {"full_steps": 0, "piecewise_for_relay": 0,
                                             "eager_for_relay": 0}
    assert not graph_mode.step_is_full_graph()


def test_without_piecewise_graphs_a_relaying_step_runs_eagerly(descs):
    full, _ = descs  # FULL_DECODE_ONLY: no PIECEWISE graphs were captured
    config = _Config("decode-only")
    graph_mode.enable_for(config)
    mgr = _manager(config, {(n, 0): [full] for n in range(1, 257)})
    assert mgr.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "NONE"
    assert graph_mode.graph_mode_stats()["eager_for_relay"] == 1


def test_relay_in_full_graphs_keeps_vllms_dispatch_and_records_the_mode(descs):
    """forecast=False (the FULL graphs hold the relay kernels, graph_relay.py): decode steps stay
    FULL whatever the builds forecast; the step's mode is still known to the builders."""
    config = _Config("relay-in-graphs")
    graph_mode.enable_for(config, forecast=False)
    mgr = _manager(config, {(n, 0): list(descs) for n in range(1, 257)})
    graph_mode.note_build(True)
    assert mgr.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "FULL"
    assert graph_mode.step_is_full_graph()
    assert mgr.dispatch(3, 256, None, num_active_loras=0).cg_mode.name == "PIECEWISE"
    assert not graph_mode.step_is_full_graph()
    assert graph_mode.graph_mode_stats() == {"full_steps": 1, "piecewise_for_relay": 0,
                                             "eager_for_relay": 0}


def test_the_engine_is_known_by_its_config_object_not_its_instance_id(descs):
    """vLLM re-runs VllmConfig.__post_init__ after the engine core starts (a new instance_id):
    the enabled engine must still be recognised; an equal-looking other config must not."""
    config = _Config("before-handshake")
    graph_mode.enable_for(config)
    mgr = _manager(config, {(n, 0): list(descs) for n in range(1, 257)})
    config.instance_id = "after-handshake"
    graph_mode.note_build(True)
    assert mgr.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "PIECEWISE"  # forecast
    other = _manager(_Config("after-handshake"), {(n, 0): list(descs) for n in range(1, 257)})
    assert other.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "FULL"  # stock


def test_engines_without_relay_dispatch_as_stock(descs):
    """A stock engine in the same process (the wrapper is on the class) keeps its FULL graphs."""
    stock = _manager(_Config("stock-engine"), {(n, 0): list(descs) for n in range(1, 257)})
    graph_mode.note_build(True)
    assert stock.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "FULL"
    assert graph_mode.graph_mode_stats()["full_steps"] == 0  # not counted: not ours


def test_choose_passes_every_argument_through():
    calls = []

    class Desc:
        def __init__(self, name):
            self.cg_mode = type("Mode", (), {"name": name})()

    def dispatch(*args, **kwargs):
        calls.append((args, kwargs))
        return Desc("FULL" if args[2] == 1 else "PIECEWISE")

    graph_mode.note_build(True)
    desc = graph_mode.choose(dispatch, 8, 8, 1, 0, max_query_len=1, num_ubatches=1)
    assert desc.cg_mode.name == "PIECEWISE"
    assert calls == [((8, 8, 1, 0), {"max_query_len": 1, "num_ubatches": 1}),
                     ((8, 8, None, 0), {"max_query_len": 1, "num_ubatches": 1})]


class _Common:  # the CommonAttentionMetadata fields has_prefill reads
    def __init__(self, query_lens, is_prefilling=None):
        import numpy as np
        import torch

        self.num_reqs = len(query_lens)
        self.query_start_loc_cpu = torch.tensor(np.concatenate([[0], np.cumsum(query_lens)]))
        self.is_prefilling = None if is_prefilling is None else torch.tensor(is_prefilling)


def test_has_prefill_prefers_vllms_flag():
    # a 1-token prefill (the whole prompt was in the prefix cache) looks like a decode request
    assert graph_mode.has_prefill(_Common([1, 1, 1], [False, True, False]), 16)
    assert not graph_mode.has_prefill(_Common([1, 40, 1], [False, False, False]), 16)
    # without the flag (older vLLM): a request with more query tokens than a group takes
    assert graph_mode.has_prefill(_Common([1, 40, 1]), 16)
    assert not graph_mode.has_prefill(_Common([1, 16, 1]), 16)


@pytest.mark.parametrize("v2,mode,spec,dp,possible", [
    (True, "FULL_AND_PIECEWISE", None, 1, True), (True, "FULL_DECODE_ONLY", None, 1, True),
    (False, "FULL_AND_PIECEWISE", None, 1, False), (True, "PIECEWISE", None, 1, False),
    (True, "NONE", None, 1, False),  # enforce_eager
    (True, "FULL_AND_PIECEWISE", object(), 1, False), (True, "FULL_AND_PIECEWISE", None, 2, False)])
def test_full_graphs_only_where_asked_for_and_the_forecast_is_safe(v2, mode, spec, dp, possible):
    from types import SimpleNamespace

    pytest.importorskip("vllm")
    from vllm.config.compilation import CUDAGraphMode

    config = SimpleNamespace(use_v2_model_runner=v2, speculative_config=spec,
                             compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode[mode]),
                             parallel_config=SimpleNamespace(data_parallel_size=dp))
    assert graph_mode.full_graphs_possible(config) is possible


def test_a_builder_that_needs_the_forecast_turns_it_on(descs):
    config = _Config("two-builders")
    graph_mode.enable_for(config, forecast=True)  # e.g. a GQA group's builder (FA3 in FULL graphs)
    graph_mode.enable_for(config, forecast=False)  # an MHA group's (relay in FULL graphs)
    mgr = _manager(config, {(n, 0): list(descs) for n in range(1, 257)})
    graph_mode.note_build(True)
    assert mgr.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "PIECEWISE"
