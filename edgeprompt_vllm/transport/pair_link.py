"""The GPU-pair transport of the connector: cloud GPU -> edge GPU by NCCL, Ray orchestrating.

    link = PairLink(client, device)                    # worker side; raises if it cannot pair
    stream = link.fetch_layers("sys-A", range(L), shape, dtype)   # a LayerStream
    header, kv = stream.result(l, timeout)             # kv [2, T, H, hs] on the edge's GPU
    stream.consumed(l, event)                          # the slot is free once `event` completed

    cloud actor (its GPU)                  receiver actor (edge GPU)        vLLM worker (edge GPU)
      pair_send(l, seq) ---- NCCL kv, checksum ----> receive(slot)  --- CUDA IPC slot --->
                                                     checks the checksum   scatter on the side stream

Per layer the worker makes two Ray calls at once: `pair_send` on the cloud (through the
client, so the audit records it: prompt id, digest, layer, pair id, sequence number) and
`receive` on the receiver, into a free slot of a ring of `SLOTS` (slot_ring.py); up to `SLOTS`
layers are in flight; the slots are sized at start for the registry's largest prompt. The
checksum (pair_group.device_checksum) is computed by the cloud when it captured the layer, sent
after it, and recomputed by the receiver on what arrived: a mismatch fails that layer only.
Anything else (a cloud call that fails, a receive not done within the fetch timeout, a dead
receiver) breaks the link: the receiver is killed (a receive blocked on a vanished sender
dies with it), the cloud closes its end, the stream's remaining layers fail (their blocks are
recomputed) and the next load opens a new link.

CPU (gloo): the same calls and checks; the receiver returns each layer through Ray instead of a
slot. What the tests run; `transport: "pair"` asks for it there.
"""

import itertools
import threading
import time
from collections import deque

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from edgeprompt_vllm.log import get_logger
from edgeprompt_vllm.transport.client import CloudClient, CloudUnavailable, LayerStream
from edgeprompt_vllm.transport.pair_receiver import PairReceiver
from edgeprompt_vllm.transport.slot_ring import SLOTS, SlotRing, layer_nbytes
from edgeprompt_vllm.transport.wire import DTYPES, CorruptLayer, LayerHeader

logger = get_logger(__name__)


class PairBroken(CloudUnavailable):
    """The pair channel failed; its stream's remaining layers are recomputed."""


def device_uuid(device: torch.device) -> str:
    return f"GPU-{torch.cuda.get_device_properties(device).uuid}"


def pair_possible(cloud_pair: dict | None, device: torch.device) -> str | None:
    """Why the edge on `device` cannot pair with a cloud described by `cloud_pair` (the
    handshake's "pair"), or None if it can: NCCL needs two different GPUs, gloo two CPUs."""
    if not cloud_pair:
        return "the cloud offers no pair channel"
    if device.type == "cuda":
        if cloud_pair["backend"] != "nccl":
            return "the cloud is not on a GPU"
        if cloud_pair["device_uuid"] == device_uuid(device):
            return "the cloud shares the edge's GPU (NCCL needs two GPUs)"
        return None
    return None if cloud_pair["backend"] == "gloo" else "the edge is on the CPU, the cloud on a GPU"


class PairLink:
    def __init__(self, client: CloudClient, device: torch.device, timeout_s: float):
        why = pair_possible(client.cloud_info.get("pair"), device)
        if why:
            raise RuntimeError(f"no GPU-pair transport: {why}")
        self.client, self.device, self.timeout_s = client, device, timeout_s
        self.backend = client.cloud_info["pair"]["backend"]
        self.broken: str | None = None
        self._submit_lock = threading.Lock()  # sends and receives posted in one order
        self._seq = itertools.count()
        self.slots = SlotRing() if device.type == "cuda" else None  # CPU: layers come by value
        uuid = device_uuid(device) if device.type == "cuda" else None
        # on this node: it shares slots with this process through CUDA IPC (a zero-resource
        # actor could otherwise land on any node, the cloud's included)
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.receiver = (ray.remote(PairReceiver)
                         .options(num_cpus=0, num_gpus=0, max_concurrency=1,
                                  scheduling_strategy=here).remote(uuid))
        t0 = time.perf_counter()
        try:
            opened = client._get(client._call("pair_open", client._digest, self.backend, timeout_s))
            self.pair_id = opened["pair_id"]
            ray.get(self.receiver.join.remote(opened["host"], opened["port"], self.backend,
                                              timeout_s), timeout=timeout_s)
        except BaseException:
            ray.kill(self.receiver)
            raise
        logger.info("GPU-pair link %s up (%s, %.2f s)", self.pair_id, self.backend,
                    time.perf_counter() - t0)

    # ---- the slots (CUDA) ----
    def reserve(self, nbytes: int) -> None:
        """Slots for layers of `nbytes` (SlotsBusy: too small and in use)."""
        if self.slots is not None:
            self.slots.reserve(nbytes, self._make_slots)

    def _make_slots(self, count: int, nbytes: int) -> list[torch.Tensor]:
        """The receiver allocates them; this process maps each once through CUDA IPC."""
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        handles = ray.get(self.receiver.make_slots.remote(count, nbytes), timeout=self.timeout_s)
        slots = []
        for h in handles:
            args = list(h)
            args[6] = self.device.index  # the receiver's device 0 is this GPU
            slots.append(rebuild_cuda_tensor(*args))
        return slots

    def _acquire(self, wait: bool) -> int | None:
        try:
            return self.slots.acquire(self.timeout_s if wait else None)
        except (TimeoutError, RuntimeError) as e:
            raise PairBroken(str(e)) from e

    def release(self, slot: int | None, event) -> None:
        if self.slots is not None:
            self.slots.release(slot, event)

    # ---- layers ----
    def fetch_layers(self, prompt_id: str, layers, shape: tuple, dtype: str) -> "PairStream":
        if self.broken:
            raise PairBroken(self.broken)
        self.reserve(layer_nbytes(shape, DTYPES[dtype]))
        return PairStream(self, prompt_id, self.client._check_layers(layers), shape, dtype)

    def submit(self, prompt_id: str, layer: int, shape, dtype: str, wait: bool = True):
        """-> (slot, cloud ref, receiver ref): one send paired with one receive. wait False:
        None instead of waiting for a slot to come free (CUDA; on CPU there are no slots)."""
        slot = None
        if self.slots is not None:
            slot = self._acquire(wait)
            if slot is None:
                return None
        c = self.client
        with self._submit_lock:
            if self.broken:
                self.release(slot, None)
                raise PairBroken(self.broken)
            seq = next(self._seq)
            cloud_ref = c._call("pair_send", c._check_id(prompt_id), c._digest, layer,
                                self.pair_id, seq, self.timeout_s)
            recv_ref = self.receiver.receive.remote(slot, list(shape), dtype)
        return slot, cloud_ref, recv_ref

    def wait(self, cloud_ref, recv_ref) -> tuple[dict, dict]:
        """Both ends of one layer -> (header dict with "dsum", receiver's reply)."""
        try:
            header = self.client._get(cloud_ref, self.timeout_s)
        except CloudUnavailable as e:
            raise self.fail(str(e)) from e
        except Exception as e:  # the cloud refused or failed this send: the pair is out of step
            raise self.fail(f"cloud send failed: {type(e).__name__}: {e}") from e
        try:
            reply = ray.get(recv_ref, timeout=self.timeout_s)
        except Exception as e:  # noqa: BLE001 (timeout, dead receiver)
            raise self.fail(f"receive failed: {type(e).__name__}: {e}") from e
        return header, reply

    def fail(self, reason: str) -> PairBroken:
        """Breaks the link (once): kills the receiver, closes the cloud's end."""
        with self._submit_lock:
            first = self.broken is None
            if first:
                self.broken = reason
        if self.slots is not None:
            self.slots.break_(reason)
        if first:
            logger.error("GPU-pair link %s broken (%s); its layers are recomputed, the next load "
                         "opens a new link", self.pair_id, reason)
            self.close()
        return PairBroken(reason)

    def close(self) -> None:
        try:
            ray.kill(self.receiver)
        except Exception:  # noqa: BLE001 (already gone)
            pass
        try:
            self.client._call("pair_close", self.client._digest, self.pair_id)
        except Exception:  # noqa: BLE001 (a cloud that is down closes nothing)
            pass


class PairStream(LayerStream):
    """LayerStream's futures, timings and messages; the layers come over a PairLink."""

    def __init__(self, link: PairLink, prompt_id: str, layers: list[int], shape, dtype: str):
        self._link, self._shape, self._dtype = link, tuple(shape), dtype
        self._slot_of: dict[int, int | None] = {}
        super().__init__(link.client, prompt_id, layers, SLOTS)

    def consumed(self, layer: int, event) -> None:
        """The consumer is done with `layer` (on the GPU once `event` completed)."""
        self._link.release(self._slot_of.pop(layer, None), event)

    def _run(self) -> None:
        """Submits layers while slots are free, delivers them in order. It waits for a slot only
        with nothing in flight: the streams of a step share the link's slots, and a stream that
        waited while holding arrived layers it had not delivered (their slots free only once
        delivered and written) would deadlock with another stream doing the same."""
        pending: deque = deque()
        todo = deque(self.layers)
        try:
            while todo or pending:
                while todo and len(pending) < self._inflight:
                    submit_s = self._now()
                    sent = self._link.submit(self.prompt_id, todo[0], self._shape, self._dtype,
                                             wait=not pending)
                    if sent is None:  # no free slot now: deliver what is in flight first
                        break
                    layer = todo.popleft()
                    self.timings[layer]["submit_s"] = submit_s
                    pending.append((layer, *sent))
                self._deliver(*pending.popleft())
        except CloudUnavailable as e:  # PairBroken included: the rest of the stream fails
            for _, slot, _, _ in pending:
                self._link.release(slot, None)  # a broken link's slots are never read again
            self._fail(self.layers, e)
        except BaseException as e:  # noqa: BLE001 (a bug must not leave a layer waiting)
            self._fail(self.layers, e)

    def _deliver(self, layer: int, slot, cloud_ref, recv_ref) -> None:
        header_d, reply = self._link.wait(cloud_ref, recv_ref)
        data_s = self._now()
        dsum = header_d.pop("dsum")
        header = LayerHeader(**header_d)
        if header.layer != layer or header.shape != self._shape:
            raise self._link.fail(f"cloud sent layer {header.layer} {header.shape}, asked "
                                  f"{layer} {self._shape}")
        if not reply["sent"] == reply["got"] == dsum:
            self._link.release(slot, None)
            self.futures[layer].set_exception(CorruptLayer(
                f"layer {layer} of {self.prompt_id!r}: device checksum {reply['got']} != "
                f"{dsum} (sent {reply['sent']})"))
            return
        kv = reply["kv"] if slot is None else self._link.slots.view(slot, self._shape,
                                                                    DTYPES[self._dtype])
        self._slot_of[layer] = slot
        self.timings[layer].update(header_s=data_s, data_s=data_s, ready_s=self._now(),
                                   nbytes=header.nbytes, wire_nbytes=header.nbytes,
                                   cloud_compute_s=header.compute_s, message=len(self.messages),
                                   recv_ms=reply["recv_ms"], checksum_ms=reply["sum_ms"])
        self.messages.append({"layers": [layer], "nbytes": header.nbytes,
                              "wire_nbytes": header.nbytes, "codec": "none", "header_s": data_s,
                              "pull_s": data_s, "data_s": data_s,
                              "cloud_compute_s": [header.compute_s], "ready_s": self._now()})
        self.futures[layer].set_result((header, kv))
