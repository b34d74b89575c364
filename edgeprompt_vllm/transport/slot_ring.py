"""The staging slots of a GPU-pair link (pair_link.py): a few one-layer buffers that the
receiver actor fills and the worker reads, each handed out again only once its last reader ran.

    ring = SlotRing()
    ring.reserve(nbytes, make)       # make(count, nbytes) -> [count] uint8 tensors [>= nbytes]
    i = ring.acquire(timeout_s)      # waits for a free slot (None: only if one is free now)
    kv = ring.view(i, (2, T, H, hs), torch.float16)    # the layer in slot i (as_layer)
    ring.release(i, event)           # free once `event` (the reader's CUDA event) completed

Events are anything with .synchronize() (CUDA events on the GPU; the tests pass fakes).
"""

import math
import threading
from collections import deque

import torch

SLOTS = 4  # layers in flight


def layer_nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def as_layer(buf: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """The first bytes of a uint8 buffer [>= nbytes] as a tensor of `shape` and `dtype`."""
    return buf[:layer_nbytes(shape, dtype)].view(dtype).view(shape)


class SlotsBusy(RuntimeError):
    """A layer larger than the slots while they are in use: that load takes the object store."""


class SlotRing:
    def __init__(self, count: int = SLOTS):
        self.count = count
        self._slots: list[torch.Tensor] = []  # [count] x [nbytes] uint8
        self._free: deque = deque()  # (slot index, event of its last reader or None)
        self._cond = threading.Condition()
        self._broken: str | None = None

    @property
    def nbytes(self) -> int:
        return self._slots[0].numel() if self._slots else 0

    def reserve(self, nbytes: int, make) -> None:
        """Slots of at least `nbytes`: made now, or again and larger when every slot is free;
        else SlotsBusy. Nothing waits here: a stream still holding slots may need this very
        step's loader to free them."""
        if self.nbytes >= nbytes:
            return
        with self._cond:
            if len(self._free) != len(self._slots):
                raise SlotsBusy(f"{nbytes}-byte layers while the {self.nbytes}-byte slots are "
                                "in use")
            for _, event in self._free:
                if event is not None:
                    event.synchronize()
            self._slots = list(make(self.count, nbytes))
            self._free = deque((i, None) for i in range(self.count))

    def acquire(self, timeout_s: float | None) -> int | None:
        """A free slot whose last reader has run; TimeoutError, or RuntimeError once broken.
        timeout_s None: never waits for a slot to come free (None when none is free now)."""
        with self._cond:
            if timeout_s is None:
                if not (self._free or self._broken):
                    return None
            elif not self._cond.wait_for(lambda: self._free or self._broken, timeout_s):
                raise TimeoutError(f"no free slot in {timeout_s} s")
            if self._broken:
                raise RuntimeError(self._broken)
            slot, event = self._free.popleft()
        if event is not None:
            event.synchronize()
        return slot

    def release(self, slot: int | None, event=None) -> None:
        if slot is None:
            return
        with self._cond:
            self._free.append((slot, event))
            self._cond.notify_all()

    def break_(self, reason: str) -> None:
        """Wakes every waiter with `reason` (the link broke)."""
        with self._cond:
            self._broken = reason
            self._cond.notify_all()

    def view(self, slot: int, shape, dtype: torch.dtype) -> torch.Tensor:
        """Slot `slot` as a tensor of `shape` and `dtype` (its first bytes)."""
        return as_layer(self._slots[slot], shape, dtype)
