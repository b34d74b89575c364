"""A two-process channel for the GPU-pair transport (pair_link.py): one torch.distributed
backend of two ranks, rank 0 the cloud (sender), rank 1 the edge's receiver, built without the
global process group (the vLLM engine in either process keeps its own).

    store = host_store(host)                       # rank 0: a TCP store on a free port
    group = PairGroup(store, rank, "nccl", 60.0)   # both ranks, concurrently (gloo blocks
                                                   # until the peer joins; NCCL connects lazily)
    group.hello()                                   # both ranks: the first exchange, 1 element
    group.send(kv, dsum) / group.recv(out)          # KV [2, T, H, hs] then its checksum [1] int64

Why not Ray's own tensor transport (RDT, benchmarks/transfer_pair.py, 37 GB/s): an RDT actor
can be in at most one collective group per backend, so one cloud actor could serve one edge
(ray.experimental.collective.create_collective_group refuses the second), and a custom RDT
transport must be registered in the process that creates both actors (the cloud and an edge are
created by different processes). Ray still does everything else here: placing the receiver,
the calls that pair each send with its receive, and failure detection. The bytes move exactly
as RDT's NCCL transport moves them (NCCL send/recv between the two GPUs).

`device_checksum` is what both ends compare: an integer sum computed where the tensor lives
(the cloud's GPU at capture, the receiver's GPU after the transfer), so no byte has to visit a
host to be verified.
"""

import datetime
import os
import socket

import torch

_MOD = 65521  # weights cycle with this period (the largest prime below 2**16)
_CHUNK = _MOD * 64  # words per partial sum (4.2 M): a multiple of _MOD, so every chunk has the
# same weights, kept per device (16 MiB of int32); it bounds the temporaries too
_weights: dict[torch.device, torch.Tensor] = {}


def device_checksum(t: torch.Tensor) -> int:
    """A position-weighted sum of the tensor's 16-bit words, sum(w[i] * (i % 65521 + 1)), exact
    (int64) and independent of the reduction order: a partial, shifted, permuted or flipped copy
    changes it. Each product fits an int32 (|w| <= 2**15, weight <= 65521), and the sum over a
    layer stays far below 2**63."""
    words = t.contiguous().view(-1).view(torch.int16)
    total = torch.zeros((), dtype=torch.int64, device=t.device)
    for lo in range(0, words.numel(), _CHUNK):
        w = words[lo:lo + _CHUNK]
        total += (w.to(torch.int32) * _chunk_weights(t.device)[:w.numel()]).sum(dtype=torch.int64)
    return int(total)


def _chunk_weights(device: torch.device) -> torch.Tensor:
    """int32 [_CHUNK]: i % _MOD + 1 (made once per device)."""
    w = _weights.get(device)
    if w is None or w.numel() != _CHUNK:
        w = _weights[device] = torch.arange(_CHUNK, dtype=torch.int32, device=device) % _MOD + 1
    return w


def host_store(host: str) -> tuple[torch.distributed.TCPStore, int]:
    """Rank 0's rendezvous store on a free port of `host` -> (store, port)."""
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    store = torch.distributed.TCPStore(host, port, 2, is_master=True, wait_for_workers=False,
                                       timeout=datetime.timedelta(seconds=60))
    return store, port


def peer_store(host: str, port: int) -> torch.distributed.TCPStore:
    return torch.distributed.TCPStore(host, port, 2, is_master=False,
                                      timeout=datetime.timedelta(seconds=60))


class PairGroup:
    """Rank `rank` of a two-rank `backend` ("nccl": CUDA tensors on the current device; "gloo":
    CPU tensors). Sends and receives are matched in the order they are posted."""

    def __init__(self, store, rank: int, backend: str, timeout_s: float):
        from torch.distributed import PrefixStore

        timeout = datetime.timedelta(seconds=timeout_s)
        prefix = PrefixStore("edgeprompt-pair", store)
        self.backend, self.rank = backend, rank
        if backend == "nccl":
            # a watchdog timeout aborts this group only, never the process (the cloud serves
            # other edges): 2 = CleanUpOnly (torch.distributed's TORCH_NCCL_ASYNC_ERROR_HANDLING)
            os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "2"
            from torch.distributed import ProcessGroupNCCL

            options = ProcessGroupNCCL.Options()
            options._timeout = timeout
            self._pg = ProcessGroupNCCL(prefix, rank, 2, options)
        elif backend == "gloo":
            from torch.distributed import ProcessGroupGloo

            self._pg = ProcessGroupGloo(prefix, rank, 2, timeout)
        else:
            raise ValueError(f"pair backend must be 'nccl' or 'gloo', not {backend!r}")
        self._store = store  # rank 0 hosts it: it lives as long as the group

    def send(self, kv: torch.Tensor, dsum: int) -> None:
        """Queues kv, then its checksum, to the peer. NCCL: on the group's own stream, after
        what the current stream queued; nothing waits for it (a send stuck on a vanished peer
        must not stall the cloud's compute stream), and the group keeps both tensors alive until
        sent. Gloo: returns once sent."""
        peer = 1 - self.rank
        checksum = torch.tensor([dsum], dtype=torch.int64, device=kv.device)
        works = [self._pg.send([kv.contiguous()], peer, 0), self._pg.send([checksum], peer, 0)]
        if self.backend == "gloo":
            for work in works:
                work.wait()

    def recv(self, out: torch.Tensor) -> int:
        """Receives into `out` (contiguous, the sent shape and dtype) and returns the sender's
        checksum of it; NCCL: synchronizes the device first."""
        peer = 1 - self.rank
        self._pg.recv([out], peer, 0).wait()
        dsum = torch.empty(1, dtype=torch.int64, device=out.device)
        self._pg.recv([dsum], peer, 0).wait()
        return int(dsum.item())  # .item() waits for the receive (NCCL: the current stream)

    def hello(self, device: torch.device) -> None:
        """The first exchange, one element from rank 0 to rank 1: it sets up the communicator
        (NCCL connects lazily, at a group's first transfer: about a second) when the link opens
        rather than in the first load, and shows the channel works."""
        if self.rank == 0:
            one = torch.ones(1, device=device)
            self.send(one, device_checksum(one))
        else:
            one = torch.empty(1, device=device)
            if self.recv(one) != device_checksum(one) or float(one.item()) != 1.0:
                raise RuntimeError("the pair channel's first exchange arrived wrong")

    def close(self) -> None:
        """Aborts pending work (NCCL) and frees the communicators."""
        for name in ("abort", "shutdown"):
            fn = getattr(self._pg, name, None)
            if fn is not None:
                try:
                    fn()
                    return
                except Exception:  # noqa: BLE001 (already broken: nothing more to free)
                    pass
