"""Per-layer KV of cloud prompts in the Ray object store, bounded by LRU over unpinned prompts.

Each computed layer is `ray.put` once (this actor owns it): every edge on this node reads it
zero-copy from shared memory, edges on other nodes pull it through Ray's object transfer.
A slot is filled as soon as its layer is computed, so fetches of a cold prompt stream.
"""

import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import ray

from edgeprompt_vllm.transport.wire import LayerHeader


@dataclass
class LayerSlot:
    ready: threading.Event = field(default_factory=threading.Event)
    header: LayerHeader | None = None
    ref: "ray.ObjectRef | None" = None
    error: str | None = None
    device_kv: "object | None" = None  # [2, T, H, hs] on the engine's device, for pair channels
    dsum: int | None = None  # transport/pair_group.device_checksum of device_kv


@dataclass
class PromptKV:
    prompt_id: str
    num_layers: int
    pinned: bool
    slots: list[LayerSlot] = field(default_factory=list)
    nbytes: int = 0

    def __post_init__(self):
        self.slots = [LayerSlot() for _ in range(self.num_layers)]

    @property
    def complete(self) -> bool:
        return all(s.ready.is_set() and s.error is None for s in self.slots)

    def fail(self, error: str) -> None:
        for s in self.slots:
            if not s.ready.is_set():
                s.error = error
                s.ready.set()


class PromptStore:
    """prompt id -> PromptKV, LRU order; evicts complete unpinned prompts above `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, PromptKV] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def get(self, prompt_id: str) -> PromptKV | None:
        with self._lock:
            kv = self._items.get(prompt_id)
            if kv is not None:
                self._items.move_to_end(prompt_id)
            return kv

    def start(self, prompt_id: str, num_layers: int, pinned: bool) -> tuple[PromptKV, bool]:
        """The entry of a prompt, creating an empty one if absent; (entry, created)."""
        with self._lock:
            kv = self._items.get(prompt_id)
            if kv is not None and not any(s.error for s in kv.slots):
                self._items.move_to_end(prompt_id)
                return kv, False
            kv = self._items[prompt_id] = PromptKV(prompt_id, num_layers, pinned)
            return kv, True

    def fill(self, kv: PromptKV, layer: int, header: LayerHeader, ref, device_kv=None,
             dsum: int | None = None) -> None:
        slot = kv.slots[layer]
        slot.header, slot.ref, slot.device_kv, slot.dsum = header, ref, device_kv, dsum
        with self._lock:
            kv.nbytes += header.nbytes
        slot.ready.set()
        if layer == kv.num_layers - 1:
            self.evict()

    def drop(self, prompt_id: str) -> None:
        with self._lock:
            self._items.pop(prompt_id, None)

    def evict(self) -> list[str]:
        """Drops least recently used, complete, unpinned prompts until under the budget."""
        dropped = []
        with self._lock:
            total = sum(kv.nbytes for kv in self._items.values())
            for pid in list(self._items):
                if total <= self.max_bytes:
                    break
                kv = self._items[pid]
                if kv.pinned or not kv.complete:
                    continue
                total -= kv.nbytes
                del self._items[pid]  # its refs go: Ray frees the objects once edges release them
                dropped.append(pid)
            self.evictions += len(dropped)
        return dropped

    def summary(self) -> dict:
        with self._lock:
            return {"prompts": {pid: {"bytes": kv.nbytes, "pinned": kv.pinned, "complete": kv.complete}
                                for pid, kv in self._items.items()},
                    "bytes": sum(kv.nbytes for kv in self._items.values()),
                    "max_bytes": self.max_bytes, "evictions": self.evictions}
