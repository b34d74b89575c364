"""The layer loader on a real GPU (edge/cuda_loader.py): pinned copy, H2D and scatter on the side
stream into paged caches laid out as vLLM 0.26 hands them to the connector, one event per layer.

Ordering is made visible with torch.cuda._sleep: a busy side stream shows that the compute
stream waits on the GPU (not the host), a busy compute stream that the side stream's writes
come after kernels queued before the step. tests/edge/test_layer_loader.py checks the control
flow on CPU.
"""

import time

import pytest
import torch
from edge import loader_fakes
from edge.loader_fakes import FakeStream, reference_write, slots_of, vllm_cache

from edgeprompt_vllm.edge.cuda_loader import LayerLoader, SideStream
from edgeprompt_vllm.edge.metadata import EdgePromptMetadata, LoadSpec

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

L, TOKENS, NUM_BLOCKS = 4, 80, 16
LOADS = [((3, 11, 0, 7, 9), 0, 80), ((14, 2, 5, 8, 1), 32, 80)]  # (block ids, start, end)


def gpu_sleep(ms: float, stream=None) -> None:
    """Keeps `stream` (default: the current one) busy for about `ms` on the GPU."""
    cycles = int(ms * _cycles_per_ms())
    with torch.cuda.stream(stream or torch.cuda.current_stream()):
        torch.cuda._sleep(cycles)


_CALIBRATED: list[float] = []


def _cycles_per_ms() -> float:
    if not _CALIBRATED:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm-up
        start.record()
        torch.cuda._sleep(10_000_000)
        stop.record()
        stop.synchronize()
        _CALIBRATED.append(10_000_000 / start.elapsed_time(stop))
    return _CALIBRATED[0]


def make_step(layout: str, dtype, stream: FakeStream):
    caches = {l: [vllm_cache(NUM_BLOCKS, layout, "cuda", dtype, seed=l)] for l in range(L)}
    expected = {l: [c.cpu() for c in cs] for l, cs in caches.items()}
    for l in range(L):
        for ids, start, end in LOADS:
            kv = stream.kv[l]
            reference_write(expected[l][0], kv[0, start:end], kv[1, start:end],
                            slots_of(ids, start, end))
    loads = [(stream, [(start, end, slots_of(ids, start, end)) for ids, start, end in LOADS])]
    return caches, expected, loads


@pytest.mark.parametrize("layout", ["logical", "5d"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_side_stream_writes_equal_a_reference_scatter(layout, dtype):
    s = FakeStream("P", L, TOKENS, dtype=dtype)
    caches, expected, loads = make_step(layout, dtype, s)
    side = SideStream("cuda")
    loader = LayerLoader(side, loads, caches)
    # Every layer is issued (and its pinned buffer dropped) while the side stream is still busy:
    # the caching host allocator must not hand a buffer out again before its copy ran.
    gpu_sleep(100, side.stream)
    for l in range(L):
        s.arrive(l)
    for l in range(L):
        loader.wait(s, l, timeout_s=5)
    seen = [caches[l][0].clone() for l in range(L)]  # on the compute stream, after the waits
    loader.close()
    torch.cuda.synchronize()
    for l in range(L):
        assert torch.equal(seen[l].cpu(), expected[l][0]), f"layer {l}"


def test_the_compute_stream_waits_on_the_gpu_not_the_host():
    s = FakeStream("P", L, TOKENS)
    caches, expected, loads = make_step("logical", torch.float32, s)
    side = SideStream("cuda")
    loader = LayerLoader(side, loads, caches)
    gpu_sleep(300, side.stream)  # the copies of this step wait behind 300 ms of side work
    s.arrive(0)
    before = caches[0][0].clone()  # the compute stream, not waiting: reads the old cache
    t0 = time.perf_counter()
    loader.wait(s, 0, timeout_s=5)
    host_wait = time.perf_counter() - t0
    after = caches[0][0].clone()  # queued behind the wait on layer 0's event
    pending = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert host_wait < 0.1, f"the host waited {host_wait:.3f} s: it synchronised with the GPU"
    assert pending, "the compute stream had nothing to wait for"
    assert torch.equal(after.cpu(), expected[0][0])
    assert not torch.equal(before.cpu(), expected[0][0])
    loader.close()


def test_writes_come_after_kernels_queued_before_the_step():
    s = FakeStream("P", L, TOKENS)
    caches, expected, loads = make_step("logical", torch.float32, s)
    old = caches[0][0].clone()
    gpu_sleep(300)  # an earlier step's kernels, still running
    earlier_read = caches[0][0].clone()  # ... one of which reads the blocks we load into
    loader = LayerLoader(SideStream("cuda"), loads, caches)
    s.arrive(0)  # issued at once, on an idle side stream: only the start event holds it back
    loader.wait(s, 0, timeout_s=5)
    loader.close()
    torch.cuda.synchronize()
    assert torch.equal(earlier_read, old)
    assert torch.equal(caches[0][0].cpu(), expected[0][0])


def test_a_stalled_layer_times_out_into_recompute_and_is_never_written(monkeypatch):
    s = FakeStream("P", L, TOKENS)
    w = loader_fakes.make_worker(monkeypatch, {"P": s}, L, fetch_timeout_s=0.2)
    w.register_kv_caches({f"model.layers.{l}.self_attn.attn":
                          vllm_cache(NUM_BLOCKS, "logical", "cuda", seed=l) for l in range(L)})
    old = {name: c.clone() for name, c in w.kv_caches.items()}
    w.start_load_kv(EdgePromptMetadata(loads=[LoadSpec(f"r{i}", "P", ids, start, end)
                                              for i, (ids, start, end) in enumerate(LOADS)]))
    assert isinstance(w._side, SideStream) and w._loader is not None
    s.arrive(0)
    w.wait_for_layer_load("model.layers.0.self_attn.attn")
    t0 = time.perf_counter()
    w.wait_for_layer_load("model.layers.1.self_attn.attn")  # layer 1 stalls
    assert 0.15 < time.perf_counter() - t0 < 2
    for l in range(2, L):
        w.wait_for_layer_load(f"model.layers.{l}.self_attn.attn")  # not waited for again
    w.wait_for_save()
    for l in range(1, L):
        s.arrive(l)  # too late: the blocks are recomputed, maybe reused
    torch.cuda.synchronize()
    assert w.take_invalid_block_ids() == {3, 11, 0, 7, 9, 5, 8, 1}
    for l in range(1, L):
        name = f"model.layers.{l}.self_attn.attn"
        assert torch.equal(w.kv_caches[name], old[name]), f"layer {l} was written late"
    assert not torch.equal(w.kv_caches["model.layers.0.self_attn.attn"],
                           old["model.layers.0.self_attn.attn"])
