"""Fakes around the layer loader (edge/cuda_loader.py): LayerStream-like streams whose layers
arrive when a test says so, a SideStream stand-in that runs on CPU, vLLM-shaped paged caches
and a reference scatter written independently of kv_writer."""

import threading
from concurrent.futures import Future

import torch

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.edge import worker_side
from edgeprompt_vllm.edge.kv_writer import paged_index, scatter_kv
from edgeprompt_vllm.fingerprint import Fingerprint
from edgeprompt_vllm.transport.wire import CorruptLayer, decode_layer, encode_kv

H, HS, BS = 2, 8, 16  # KV heads, head size, block size


class FakeStream:
    """LayerStream's surface: `futures` (layer -> Future of (header, kv [2, T, H, hs])),
    result(), and what Timeline/stats read. Layers arrive through arrive()/corrupt().
    dtype: the model's; its layers come through the real wire format (checksum verified,
    read-only and numpy-backed, as LayerStream delivers them)."""

    def __init__(self, prompt_id: str, num_layers: int, tokens: int, seed: int = 0,
                 dtype=torch.float32):
        self.prompt_id, self.layers = prompt_id, list(range(num_layers))
        self.futures = {l: Future() for l in self.layers}
        self.timings = {l: {} for l in self.layers}
        self.messages, self.t_start = [], 0.0
        self.consumed_calls: list[tuple[int, object]] = []  # (layer, event or None)
        g = torch.Generator().manual_seed(seed)
        self.kv = [decode_layer(*encode_kv(prompt_id, l, torch.randn(2, tokens, H, HS, generator=g)
                                           .to(dtype))) for l in self.layers]

    def result(self, layer: int, timeout_s: float):
        return self.futures[layer].result(timeout=timeout_s)

    def consumed(self, layer: int, event) -> None:
        self.consumed_calls.append((layer, event))

    def arrive(self, layer: int) -> None:
        kv = self.kv[layer]
        self.timings[layer].update(nbytes=kv.numel() * kv.element_size(), ready_s=0.0, data_s=0.0)
        self.futures[layer].set_result((None, self.kv[layer]))

    def corrupt(self, layer: int) -> None:
        self.futures[layer].set_exception(CorruptLayer(f"layer {layer}: checksum mismatch"))

    def arrive_later(self, layer: int, delay_s: float) -> threading.Thread:
        t = threading.Timer(delay_s, self.arrive, (layer,))
        t.name = f"fetch-{self.prompt_id}-{layer}"
        t.start()
        return t


class FakeEvent:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self):
        return f"event({self.name})"


class FakeSide:
    """SideStream's methods on CPU: writes at once (through kv_writer.scatter_kv), logs every call
    with the thread it ran on. Issues and events are named "prompt:layer" after `streams`."""

    def __init__(self, *streams: FakeStream):
        self.log: list[tuple] = []
        self.lock = threading.Lock()
        # by storage: the loader hands over a view of each layer (this worker's KV heads)
        self.names = {_storage(kv): f"{s.prompt_id}:{l}" for s in streams for l, kv in enumerate(s.kv)}

    def _note(self, *entry):
        with self.lock:
            self.log.append(entry + (threading.current_thread().name,))

    def begin(self):
        self._note("begin")

    def upload_slots(self, slots):
        self._note("upload")
        return slots.clone()

    def issue(self, kv, lo, hi, writes):
        uploaded = kv[:, lo:hi].clone()
        for kv_cache, a, b, slots in writes:
            block, offset = paged_index(slots, kv_cache.shape[2])
            scatter_kv(kv_cache, uploaded[0, a:b], uploaded[1, a:b], block, offset)
        event = FakeEvent(self.names[_storage(kv)])
        self._note("issue", event.name)
        return event

    def wait(self, event):
        self._note("wait", event.name)

    def end(self):
        self._note("end")

    def calls(self) -> list[tuple]:
        """The log without thread names."""
        with self.lock:
            return [e[:-1] for e in self.log]

    def thread_of(self, *call) -> str:
        with self.lock:
            return next(e[-1] for e in self.log if e[:-1] == call)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def vllm_cache(num_blocks: int, layout: str = "logical", device="cpu", dtype=torch.float32,
               seed: int = 1, heads: int = H) -> torch.Tensor:
    """A paged cache as vLLM 0.26 hands it to the connector. `logical`: FlashAttention/Triton's
    logical [B, H, N, 2 * hs] over physical NHD memory [B, N, H, 2 * hs] (stride order 0,2,1,3);
    `5d`: [B, 2, N, H, hs]."""
    g = torch.Generator().manual_seed(seed)
    if layout == "logical":
        return torch.randn(num_blocks, BS, heads, 2 * HS, generator=g, dtype=dtype).to(device).permute(0, 2, 1, 3)
    return torch.randn(num_blocks, 2, BS, heads, HS, generator=g, dtype=dtype).to(device)


def reference_write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    slots: torch.Tensor) -> None:
    """key, value [T, H, hs] into `slots` of a vllm_cache, by the layout's own indexing."""
    block, offset = slots // BS, slots % BS
    if cache.dim() == 4:  # [B, H, N, 2 * hs]
        cache[block, :, offset, :HS] = key
        cache[block, :, offset, HS:] = value
    else:  # [B, 2, N, H, hs]
        cache[block, 0, offset] = key
        cache[block, 1, offset] = value


def slots_of(block_ids, start: int, end: int) -> torch.Tensor:
    t = torch.arange(start, end)
    return torch.tensor(block_ids)[t // BS] * BS + t % BS


class FakeClient:
    """CloudClient's surface for WorkerSide: serves the given streams by prompt id."""

    def __init__(self, streams: dict[str, FakeStream]):
        self.streams = streams

    def registry(self):
        return []

    def fetch_layers(self, prompt_id, layers, **kw):
        return self.streams[prompt_id]


def make_worker(monkeypatch, streams: dict[str, FakeStream], num_layers: int,
                fetch_timeout_s: float = 5.0) -> "worker_side.WorkerSide":
    monkeypatch.setattr(worker_side.CloudClient, "connect",
                        classmethod(lambda cls, config, fp: FakeClient(streams)))
    fp = Fingerprint("Fake", num_layers, H, HS, "float32", "{}", BS, "dummy")
    return worker_side.WorkerSide(EdgePromptConfig(fetch_timeout_s=fetch_timeout_s), fp, BS)
