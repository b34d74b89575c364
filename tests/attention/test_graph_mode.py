"""graph_mode: FULL CUDA graphs for decode steps forecast to relay nothing, PIECEWISE otherwise.

The wrapper runs around vLLM's own CudaGraphManager.dispatch (Model Runner V2's; its candidate
matching is the same in 0.32 as in 0.26), with hand-made captured descriptors: no GPU needed.
"""

import pytest

from edgeprompt_vllm.attention import graph_mode


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    monkeypatch.setattr(graph_mode, "STATS", graph_mode.GraphModeStats())
    monkeypatch.setattr(graph_mode, "STEP", graph_mode._Step())


@pytest.fixture
def manager():
    """A CudaGraphManager that 'captured' FULL (uniform decode, 256 requests) and PIECEWISE
    graphs of 256 tokens, with graph_mode's wrapper installed and fresh state."""
    pytest.importorskip("vllm")
    import vllm  # noqa: F401  (vllm first: importing its worker modules alone is circular)
    from vllm.config.compilation import CUDAGraphMode
    from vllm.v1.worker.gpu.cudagraph_utils import BatchExecutionDescriptor, CudaGraphManager

    assert graph_mode.install()
    full = BatchExecutionDescriptor(cg_mode=CUDAGraphMode.FULL, num_tokens=256, num_reqs=256,
                                    uniform_token_count=1)
    piecewise = BatchExecutionDescriptor(cg_mode=CUDAGraphMode.PIECEWISE, num_tokens=256, num_reqs=None)
    mgr = object.__new__(CudaGraphManager)
    mgr._graphs_captured, mgr._lora_dispatch_map = True, {}
    mgr._candidates = {(n, 0): [full, piecewise] for n in range(1, 257)}
    return mgr


def test_decode_step_runs_full_graph_until_a_build_relays(manager):
    # nothing decided yet (a fresh engine, or after prefill-only steps): the step runs eagerly
    desc = manager.dispatch(250, 250, 1, num_active_loras=0)  # uniform decode, 1 token each
    assert desc.cg_mode.name == "PIECEWISE" and desc.num_reqs is None
    assert not graph_mode.step_is_full_graph()
    graph_mode.note_build(False)  # its build relayed nothing
    desc = manager.dispatch(250, 250, 1, num_active_loras=0)
    assert desc.cg_mode.name == "FULL" and graph_mode.step_is_full_graph()
    assert manager.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "FULL"
    graph_mode.note_build(True)  # a (non-FULL) step relayed a group
    assert manager.dispatch(250, 250, 1, num_active_loras=0).cg_mode.name == "PIECEWISE"
    assert graph_mode.graph_mode_stats() == {"full_steps": 2, "piecewise_for_relay": 2}


def test_mixed_and_uncaptured_steps_are_left_alone(manager):
    graph_mode.note_build(True)
    assert manager.dispatch(3, 256, None, num_active_loras=0).cg_mode.name == "PIECEWISE"  # prefill + decode
    assert manager.dispatch(300, 300, 1, num_active_loras=0).cg_mode.name == "NONE"  # larger than captured
    graph_mode.note_build(False)
    assert manager.dispatch(3, 256, None, num_active_loras=0).cg_mode.name == "PIECEWISE"
    assert graph_mode.graph_mode_stats() == {"full_steps": 0, "piecewise_for_relay": 0}
    assert not graph_mode.step_is_full_graph()


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
