"""The CUDA layer loader's control flow (edge/cuda_loader.py) on CPU: its CUDA half is a fake
(loader_fakes.FakeSide), the streams are fakes whose layers arrive when the test says so.
tests/edge/test_cuda_loader.py checks the same loader on a real GPU."""

import threading
import time

import pytest
import torch
from edge import loader_fakes
from edge.loader_fakes import FakeSide, FakeStream, reference_write, slots_of, vllm_cache

from edgeprompt_vllm.edge import worker_side
from edgeprompt_vllm.edge.cuda_loader import LayerLoader
from edgeprompt_vllm.edge.metadata import EdgePromptMetadata, LoadSpec
from edgeprompt_vllm.transport.wire import CorruptLayer

L, TOKENS = 3, 48
A = ((7, 2, 5), 0, 48)  # (block ids, start, end): a request loading the whole prompt
B = ((4, 9, 1), 16, 48)  # another one whose first block was already cached


def setup(*streams: FakeStream, layout="logical"):
    caches = {l: [vllm_cache(12, layout, seed=l)] for l in range(L)}
    expected = {l: [c.clone() for c in cs] for l, cs in caches.items()}
    side = FakeSide(*streams)
    loads = [(s, [(start, end, slots_of(ids, start, end)) for ids, start, end in (A, B)])
             for s in streams]
    return side, loads, caches, expected


def expect_written(expected, stream: FakeStream, layer: int) -> None:
    for cache in expected[layer]:
        for ids, start, end in (A, B):
            kv = stream.kv[layer]
            reference_write(cache, kv[0, start:end], kv[1, start:end], slots_of(ids, start, end))


def assert_caches(caches, expected) -> None:
    for l in caches:
        for got, want in zip(caches[l], expected[l]):
            assert torch.equal(got, want), f"layer {l}"


@pytest.mark.parametrize("layout", ["logical", "5d"])
def test_a_tensor_parallel_rank_writes_only_its_kv_heads(layout):
    """Rank 1 of 2 holds KV head 1 of the cloud's 2 (edge/parallel.py)."""
    s = FakeStream("P", L, TOKENS)
    caches = {l: [vllm_cache(12, layout, seed=l, heads=1)] for l in range(L)}
    expected = {l: [c.clone() for c in cs] for l, cs in caches.items()}
    loads = [(s, [(start, end, slots_of(ids, start, end)) for ids, start, end in (A, B)])]
    loader = LayerLoader(FakeSide(s), loads, caches, heads=slice(1, 2))
    for l in range(L):
        s.arrive(l)
        loader.wait(s, l, timeout_s=5)
        kv = s.kv[l][:, :, 1:2]
        for ids, start, end in (A, B):
            reference_write(expected[l][0], kv[0, start:end], kv[1, start:end],
                            slots_of(ids, start, end))
    loader.close()
    assert_caches(caches, expected)


@pytest.mark.parametrize("layout", ["logical", "5d"])
def test_each_layer_is_issued_as_it_arrives_and_waited_alone(layout):
    s = FakeStream("P", L, TOKENS)
    side, loads, caches, expected = setup(s, layout=layout)
    loader = LayerLoader(side, loads, caches)
    assert side.calls() == [("begin",), ("upload",), ("upload",)]  # the side stream waited first

    t0 = time.perf_counter()
    s.arrive_later(0, 0.05)
    loader.wait(s, 0, timeout_s=5)  # returns once layer 0 arrived, without layer 1
    assert time.perf_counter() - t0 >= 0.05
    # issued in the fetch thread, the moment it arrived; the compute stream waits on its event
    assert side.calls()[3:] == [("issue", "P:0"), ("wait", "P:0")]
    assert side.thread_of("issue", "P:0") == "fetch-P-0"
    assert side.thread_of("wait", "P:0") == threading.current_thread().name
    expect_written(expected, s, 0)
    assert_caches(caches, expected)  # layer 0 written, layers 1 and 2 untouched

    s.arrive(1)
    s.arrive(2)  # issued on arrival, before anyone waits for them
    assert side.calls()[5:] == [("issue", "P:1"), ("issue", "P:2")]
    loader.wait(s, 2, timeout_s=5)
    loader.wait(s, 1, timeout_s=5)
    loader.close()
    assert side.calls()[7:] == [("wait", "P:2"), ("wait", "P:1"), ("end",)]
    # each layer's buffer was handed back once, with the event after its writes
    assert [(l, e.name) for l, e in s.consumed_calls] == [(0, "P:0"), (1, "P:1"), (2, "P:2")]
    expect_written(expected, s, 1)
    expect_written(expected, s, 2)
    assert_caches(caches, expected)


def test_layers_that_arrived_before_the_step_are_issued_at_start():
    s = FakeStream("P", L, TOKENS)
    s.arrive(0)
    side, loads, caches, _ = setup(s)
    LayerLoader(side, loads, caches)
    assert side.calls() == [("begin",), ("upload",), ("upload",), ("issue", "P:0")]
    assert side.thread_of("issue", "P:0") == threading.current_thread().name


def test_a_stalled_layer_times_out_and_its_stream_is_never_written_again():
    s, other = FakeStream("P", L, TOKENS), FakeStream("Q", L, TOKENS, seed=5)
    side, loads, caches, expected = setup(s, other)
    loader = LayerLoader(side, loads, caches)
    other.arrive(0)
    with pytest.raises(TimeoutError, match="layer 0 of cloud prompt 'P'"):
        loader.wait(s, 0, timeout_s=0.05)
    s.arrive(0)  # too late: its blocks are being recomputed, and may be reused after the step
    s.arrive(1)
    loader.wait(other, 0, timeout_s=5)
    assert ("issue", "P:0") not in side.calls() and ("issue", "P:1") not in side.calls()
    assert s.consumed_calls == [(0, None), (1, None)]  # given up: handed back, nothing to wait for
    expect_written(expected, other, 0)
    assert_caches(caches, expected)


def test_a_failed_layer_raises_its_error_and_the_next_layers_still_load():
    s = FakeStream("P", L, TOKENS)
    side, loads, caches, expected = setup(s)
    loader = LayerLoader(side, loads, caches)
    s.corrupt(0)
    with pytest.raises(CorruptLayer):
        loader.wait(s, 0, timeout_s=5)
    s.futures[1].set_result((None, s.kv[1][:, :20]))  # fewer tokens than the loads need
    with pytest.raises(ValueError, match="cloud sent 20 tokens, need 48"):
        loader.wait(s, 1, timeout_s=5)
    s.arrive(2)
    loader.wait(s, 2, timeout_s=5)
    assert side.calls()[3:] == [("issue", "P:2"), ("wait", "P:2")]
    assert [(l, e and e.name) for l, e in s.consumed_calls] == [(0, None), (1, None), (2, "P:2")]
    expect_written(expected, s, 2)
    assert_caches(caches, expected)


def test_nothing_is_issued_after_the_step_closed():
    s = FakeStream("P", L, TOKENS)
    side, loads, caches, expected = setup(s)
    loader = LayerLoader(side, loads, caches)
    s.arrive(0)
    loader.wait(s, 0, timeout_s=5)
    loader.close()
    s.arrive(1)
    assert side.calls()[3:] == [("issue", "P:0"), ("wait", "P:0"), ("end",)]
    assert [(l, e and e.name) for l, e in s.consumed_calls] == [(0, "P:0"), (1, None)]
    expect_written(expected, s, 0)
    assert_caches(caches, expected)


# --- WorkerSide with the loader (its CUDA half faked), against a fake cloud client ---

def make_worker(monkeypatch, streams, side, fetch_timeout_s=5.0):
    w = loader_fakes.make_worker(monkeypatch, streams, L, fetch_timeout_s)
    if side is not None:
        monkeypatch.setattr(w, "_side_stream", lambda: side)
    w.register_kv_caches({f"model.layers.{l}.self_attn.attn": vllm_cache(12, seed=l)
                          for l in range(L)})
    return w


def step(*specs):
    return EdgePromptMetadata(loads=[LoadSpec(f"r{i}", p, ids, start, end)
                                     for i, (p, (ids, start, end)) in enumerate(specs)])


def test_worker_side_waits_per_layer_and_a_stall_is_recomputed(monkeypatch):
    s, q = FakeStream("P", L, TOKENS), FakeStream("Q", L, TOKENS, seed=5)
    side = FakeSide(s, q)
    w = make_worker(monkeypatch, {"P": s, "Q": q}, side, fetch_timeout_s=0.1)
    caches = {l: [c] for l, c in enumerate(w.kv_caches.values())}
    expected = {l: [c.clone()] for l, cs in caches.items() for c in cs}
    w.start_load_kv(step(("P", A), ("P", B), ("Q", A)))
    assert side.calls()[:4] == [("begin",), ("upload",), ("upload",), ("upload",)]
    for stream in (s, q):
        stream.arrive(0)
    w.wait_for_layer_load("model.layers.0.self_attn.attn")
    q.arrive(1)  # P's layer 1 stalls
    w.wait_for_layer_load("model.layers.1.self_attn.attn")
    assert w._failed_streams == {id(s)}
    q.arrive(2)
    s.arrive(1)  # too late: never written
    s.arrive(2)
    w.wait_for_layer_load("model.layers.2.self_attn.attn")  # P is not waited for again
    w.wait_for_save()
    issued = [c[1] for c in side.calls() if c[0] == "issue"]
    assert sorted(issued) == ["P:0", "Q:0", "Q:1", "Q:2"]
    assert [c[1] for c in side.calls() if c[0] == "wait"] == ["P:0", "Q:0", "Q:1", "Q:2"]
    assert side.calls()[-1] == ("end",)
    assert w.take_invalid_block_ids() == {7, 2, 5, 9, 1}  # what P's requests loaded: recomputed
    for ids, start, end in (A, B):
        kv = s.kv[0]
        reference_write(expected[0][0], kv[0, start:end], kv[1, start:end], slots_of(ids, start, end))
    for l in range(L):
        kv = q.kv[l]
        reference_write(expected[l][0], kv[0, :48], kv[1, :48], slots_of(*A))
    assert_caches(caches, expected)


def test_worker_side_on_cpu_caches_keeps_the_write_on_demand_path(monkeypatch):
    s = FakeStream("P", L, TOKENS)
    w = make_worker(monkeypatch, {"P": s}, side=None)
    assert w._side_stream() is None
    written = []
    monkeypatch.setattr(worker_side, "write_layer",
                        lambda cache, k, v, slots, isa: written.append((k.shape[0], isa)))
    monkeypatch.setattr(w, "_layer_isa", lambda name, dtype: "vec")
    w.start_load_kv(step(("P", A)))
    assert w._loader is None
    s.arrive(0)
    w.wait_for_layer_load("model.layers.0.self_attn.attn")
    assert written == [(48, "vec")]


def test_a_full_cuda_graph_step_waits_for_every_layer_before_the_graph(monkeypatch):
    """A FULL graph replays no wait_for_layer_load (attention/graph_mode.py): start_load_kv
    itself waits for each layer, in order, and every layer is written before the forward."""
    from edgeprompt_vllm.attention import graph_mode

    s = FakeStream("P", L, TOKENS)
    for layer in range(L):
        s.arrive(layer)
    side = FakeSide(s)
    w = make_worker(monkeypatch, {"P": s}, side)
    caches = {l: [c] for l, c in enumerate(w.kv_caches.values())}
    expected = {l: [c.clone()] for l, cs in caches.items() for c in cs}
    monkeypatch.setattr(graph_mode, "STEP", graph_mode._Step(mode="FULL"))
    w.start_load_kv(step(("P", A)))
    assert [c[1] for c in side.calls() if c[0] == "wait"] == ["P:0", "P:1", "P:2"]
    for l in range(L):
        kv = s.kv[l]
        reference_write(expected[l][0], kv[0, :48], kv[1, :48], slots_of(*A))
    assert_caches(caches, expected)
    observed = []
    monkeypatch.setattr(w, "_observe_step", observed.append)
    w.wait_for_save()
    assert w.take_invalid_block_ids() == set()
    assert observed == []  # no edge compute ran between those waits: the planner learns nothing


@pytest.mark.parametrize("cache, message", [
    (vllm_cache(12, dtype=torch.float16), "holds torch.float16, but the cloud ships float32"),
    (vllm_cache(12, heads=1), "holds 1 KV heads, but this worker's share of the model's 2"),
])
def test_worker_side_refuses_a_cache_the_cloud_s_layers_do_not_fit(monkeypatch, cache, message):
    """A KV cache in another dtype (--kv-cache-dtype) or with other heads than this worker's
    share is refused when vLLM registers it, not written wrong later."""
    w = loader_fakes.make_worker(monkeypatch, {}, 1)
    with pytest.raises(RuntimeError, match=message):
        w.register_kv_caches({"model.layers.0.self_attn.attn": cache})
