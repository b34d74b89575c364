"""The GPU-pair link's slot ring on CPU tensors, with fake CUDA events: a slot is handed out
again only after its last reader's event completed; growing the slots never waits on slots in
use; a broken link wakes every waiter; views cover the first bytes of a slot."""

import threading
import time

import pytest
import torch

from edgeprompt_vllm.transport.slot_ring import SlotRing, SlotsBusy


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
