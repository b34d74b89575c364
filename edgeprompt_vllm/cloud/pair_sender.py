"""The cloud's ends of GPU-pair channels (transport/pair_group.py), one per edge receiver.

    pairs = PairSender(device, host)
    pairs.open("nccl", 60.0)  -> {"pair_id", "host", "port"}: the receiver joins there
    pairs.send(pair_id, seq, payload, timeout_s)   # payload() -> (kv [2, T, H, hs], checksum)
    pairs.close(pair_id)

Sends of one pair go out in `seq` order (0, 1, 2, ...), the order in which the edge posted the
matching receives: each send waits for its turn (the actor is threaded, calls may run in any
order), takes the layer (waiting for a cold prompt's layer to be computed) and queues it. A call
that fails still passes the turn on, but then the pair's receives no longer match its sends: the
edge closes that pair and opens another.
"""

import itertools
import threading

import torch

from edgeprompt_vllm.log import get_logger
from edgeprompt_vllm.transport.pair_group import PairGroup, host_store

logger = get_logger(__name__)


class _Pair:
    def __init__(self, store, backend: str, timeout_s: float):
        self.store, self.backend, self.timeout_s = store, backend, timeout_s
        self.group: PairGroup | None = None
        self.error: str | None = None
        self.ready = threading.Event()
        self.turn = threading.Condition()
        self.next_seq, self.closed = 0, False

    def connect(self, device: torch.device) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            self.group = PairGroup(self.store, 0, self.backend, self.timeout_s)
            self.group.hello(device)  # before any layer: sends wait for `ready`
        except Exception as e:  # noqa: BLE001 (told to the pair's senders)
            self.error = f"{type(e).__name__}: {e}"
        self.ready.set()


class PairSender:
    def __init__(self, device: torch.device, host: str):
        self.device, self.host = device, host
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self._pairs: dict[str, _Pair] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()

    def describe(self) -> dict:
        """What an edge needs to decide on a pair: the backend, the host, the GPU's UUID."""
        uuid = None
        if self.device.type == "cuda":
            uuid = f"GPU-{torch.cuda.get_device_properties(self.device).uuid}"
        return {"backend": self.backend, "host": self.host, "device_uuid": uuid}

    def active(self) -> bool:
        """Whether any edge has a pair open (a GPU cloud then keeps new layers on the GPU)."""
        with self._lock:
            return bool(self._pairs)

    def open(self, backend: str, timeout_s: float) -> dict:
        if backend != self.backend:
            raise ValueError(f"this cloud's pair backend is {self.backend!r}, not {backend!r}")
        store, port = host_store(self.host)
        pair = _Pair(store, backend, timeout_s)
        with self._lock:
            pair_id = f"pair-{next(self._ids)}"
            self._pairs[pair_id] = pair
        threading.Thread(target=pair.connect, args=(self.device,), daemon=True,
                         name=f"ep-{pair_id}").start()
        return {"pair_id": pair_id, "host": self.host, "port": port}

    def _pair(self, pair_id: str) -> _Pair:
        with self._lock:
            pair = self._pairs.get(pair_id)
        if pair is None:
            raise KeyError(f"no open pair {pair_id!r}")
        return pair

    def send(self, pair_id: str, seq: int, payload, timeout_s: float) -> None:
        pair = self._pair(pair_id)
        if not pair.ready.wait(timeout_s):
            raise TimeoutError(f"{pair_id}: the edge's receiver did not join in {timeout_s} s")
        if pair.error:
            raise RuntimeError(f"{pair_id} failed to connect: {pair.error}")
        with pair.turn:
            if not pair.turn.wait_for(lambda: pair.closed or pair.next_seq == seq, timeout_s):
                raise TimeoutError(f"{pair_id}: send {seq} did not get its turn in {timeout_s} s "
                                   f"(at {pair.next_seq})")
            if pair.closed:
                raise RuntimeError(f"{pair_id} was closed")
            try:
                kv, dsum = payload()
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)
                pair.group.send(kv.to(self.device), dsum)
            finally:
                pair.next_seq += 1
                pair.turn.notify_all()

    def close(self, pair_id: str) -> None:
        with self._lock:
            pair = self._pairs.pop(pair_id, None)
        if pair is None:
            return
        with pair.turn:
            pair.closed = True
            pair.turn.notify_all()
        if pair.group is not None:
            pair.group.close()
        logger.info("closed %s", pair_id)
