"""The GPU-pair link's slot ring on CPU tensors, with fake CUDA events: a slot is handed out
again only after its last reader's event completed; growing the slots never waits on slots in
use; a broken link wakes every waiter; views cover the first bytes of a slot. Two streams of one
step share the ring without deadlock (a fake link; the real one needs two GPUs)."""

import threading
import time

import pytest
import torch

from edgeprompt_vllm.transport.pair_link import PairStream
from edgeprompt_vllm.transport.slot_ring import SLOTS, SlotRing, SlotsBusy
from edgeprompt_vllm.transport.wire import LayerHeader


class FakeEvent:
    def __init__(self):
        self.done = threading.Event()

    def synchronize(self):
        assert self.done.wait(5), "event never completed"


def make(count, nbytes, log):
    log.append((count, nbytes))
    return [torch.zeros(nbytes, dtype=torch.uint8) for _ in range(count)]


def test_a_slot_comes_back_only_after_its_reader_ran():
    log = []
    ring = SlotRing(count=2)
    ring.reserve(64, lambda c, n: make(c, n, log))
    a, b = ring.acquire(1), ring.acquire(1)
    assert {a, b} == {0, 1} and log == [(2, 64)]
    with pytest.raises(TimeoutError):
        ring.acquire(0.05)  # both in use
    assert ring.acquire(None) is None  # "only if one is free now"
    reader = FakeEvent()
    ring.release(a, reader)
    got = []
    t = threading.Thread(target=lambda: got.append(ring.acquire(5)))
    t.start()
    time.sleep(0.1)
    assert not got  # free, but its reader has not run yet
    reader.done.set()
    t.join(5)
    assert got == [a]


def test_growing_never_waits_on_slots_in_use():
    log = []
    ring = SlotRing(count=2)
    ring.reserve(64, lambda c, n: make(c, n, log))
    ring.reserve(32, lambda c, n: make(c, n, log))  # big enough already: nothing made
    slot = ring.acquire(1)
    with pytest.raises(SlotsBusy, match="128-byte layers while the 64-byte slots are in use"):
        ring.reserve(128, lambda c, n: make(c, n, log))
    ring.release(slot)
    ring.reserve(128, lambda c, n: make(c, n, log))
    assert log == [(2, 64), (2, 128)] and ring.nbytes == 128


def test_a_broken_link_wakes_waiters_and_views_are_the_first_bytes():
    ring = SlotRing(count=1)
    ring.reserve(4 * 2 * 3 * 4, lambda c, n: [torch.arange(n, dtype=torch.uint8) for _ in range(c)])
    slot = ring.acquire(1)
    view = ring.view(slot, (2, 3, 1, 2), torch.float32)
    assert view.shape == (2, 3, 1, 2) and view.data_ptr() == ring._slots[slot].data_ptr()
    errors = []
    t = threading.Thread(target=lambda: errors.append(pytest.raises(RuntimeError, ring.acquire, 5)))
    t.start()
    time.sleep(0.05)
    ring.break_("receiver died")
    t.join(5)
    assert errors and "receiver died" in str(errors[0].value)


class FakeLink:
    """PairLink's surface for PairStream over a real SlotRing: a layer has arrived as soon as it
    was submitted (as when the receiver runs ahead of the worker's delivery)."""

    def __init__(self, timeout_s: float):
        self.client, self.timeout_s, self.submitted = None, timeout_s, []
        self.slots = SlotRing()
        self.slots.reserve(64, lambda c, n: [torch.zeros(n, dtype=torch.uint8) for _ in range(c)])

    def submit(self, prompt_id, layer, shape, dtype, wait=True):
        slot = self.slots.acquire(self.timeout_s if wait else None)
        if slot is None:
            return None
        self.submitted.append((prompt_id, layer))
        header = LayerHeader(prompt_id, layer, shape[1], shape[2], shape[3], dtype, "-").to_dict()
        return slot, {**header, "dsum": 7}, {"sent": 7, "got": 7, "recv_ms": 0.0, "sum_ms": 0.0}

    def wait(self, header, reply):
        return dict(header), reply

    def release(self, slot, event):
        self.slots.release(slot, event)

    def fail(self, reason):
        return RuntimeError(reason)


def test_two_streams_share_the_slots_without_deadlock():
    """A step loading two cloud prompts over one link: each slot frees only once its layer was
    delivered and written (here: at once, as the CUDA loader does on arrival). A stream that
    waited for a slot while holding arrived, undelivered layers stalled both streams until the
    fetch timeout; on two H100s the first load of two prompts took 60 s and was recomputed."""
    link = FakeLink(timeout_s=3)
    shape, layers = (2, 2, 1, 4), list(range(12))
    streams = [PairStream(link, pid, layers, shape, "float32") for pid in ("A", "B")]
    for s in streams:  # the consumer: frees a layer's slot as soon as it is delivered
        for layer, future in s.futures.items():
            future.add_done_callback(lambda f, s=s, layer=layer: s.consumed(layer, None))
    for s in streams:
        got = [s.result(layer, 10) for layer in layers]  # raises a stream's error
        assert [h.layer for h, _ in got] == layers and got[0][1].shape == shape
    assert sorted(link.submitted) == [(p, layer) for p in "AB" for layer in layers]
    assert len(link.slots._free) == SLOTS  # every slot back
