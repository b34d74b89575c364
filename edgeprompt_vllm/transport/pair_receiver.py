"""The edge's end of a GPU-pair channel: a Ray actor on the edge's own GPU (pair_link.py).

It runs outside the vLLM worker on purpose: a receive whose sender vanished blocks forever
(NCCL has no timeout on the device), and it must block this process, never the engine. The
worker waits for each receive with a timeout, then kills this actor and recomputes.

CUDA: it receives into `slots`, a few staging buffers it allocated and shared with the worker
once through CUDA IPC (same GPU); per layer the worker asks for a receive into a free slot and,
once it returns, scatters the slot into its paged cache on its side stream. CPU (gloo; what CI
runs): each layer is received into a fresh tensor and returned through Ray.
"""

import os
import time

import torch

from edgeprompt_vllm.transport.pair_group import PairGroup, device_checksum, peer_store
from edgeprompt_vllm.transport.slot_ring import as_layer
from edgeprompt_vllm.transport.wire import DTYPES


class PairReceiver:
    def __init__(self, device_uuid: str | None):
        """device_uuid: the edge GPU's "GPU-..." UUID (Ray leaves CUDA_VISIBLE_DEVICES alone for
        an actor asking for no GPU, so it is set here, before CUDA starts); None: CPU."""
        if device_uuid is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = device_uuid
            torch.cuda.set_device(0)
            self.device = torch.device("cuda", 0)
        else:
            self.device = torch.device("cpu")
        self.group: PairGroup | None = None
        self.slots: list[torch.Tensor] = []

    def join(self, host: str, port: int, backend: str, timeout_s: float) -> None:
        """Joins the cloud's channel; returns after its first exchange (PairGroup.hello)."""
        self.group = PairGroup(peer_store(host, port), 1, backend, timeout_s)
        self.group.hello(self.device)

    def make_slots(self, count: int, nbytes: int) -> list[tuple]:
        """CUDA: `count` staging buffers of `nbytes` -> their CUDA IPC handles (torch's
        reduce_tensor arguments, for rebuild_cuda_tensor in the worker)."""
        from torch.multiprocessing.reductions import reduce_tensor

        self.slots = []
        torch.cuda.synchronize()
        self.slots = [torch.empty(nbytes, dtype=torch.uint8, device=self.device)
                      for _ in range(count)]
        return [reduce_tensor(s)[1] for s in self.slots]

    def receive(self, slot: int | None, shape: list[int], dtype: str) -> dict:
        """One layer kv [2, T, H, hs] -> {"sent": the cloud's checksum, "got": ours of what
        arrived, "kv": the tensor (CPU only), "recv_ms": the receive (waiting for the sender
        included), "sum_ms": the checksum}. Returns once the bytes are in place."""
        dt = DTYPES[dtype]
        if slot is None:
            out = torch.empty(shape, dtype=dt)
        else:
            out = as_layer(self.slots[slot], shape, dt)
        t0 = time.perf_counter()
        sent = self.group.recv(out)
        t1 = time.perf_counter()
        reply = {"sent": sent, "got": device_checksum(out),  # both wait for the device
                 "recv_ms": 1e3 * (t1 - t0), "sum_ms": 1e3 * (time.perf_counter() - t1)}
        if slot is None:
            reply["kv"] = out
        return reply

    def ping(self) -> bool:
        return True
