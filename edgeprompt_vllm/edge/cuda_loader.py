"""Layer-wise loading into a CUDA paged KV cache: each layer is issued as it arrives, on one side
stream, and the forward waits for that layer only, on the GPU (issue 4).

One `SideStream` per worker (one side CUDA stream on the KV cache's device, for the worker's
life), one `LayerLoader` per step (start_load_kv .. wait_for_save):

  start    SideStream.begin(): the side stream waits on an event recorded on the compute
           (current) stream, so our writes into freshly allocated blocks come after every kernel
           queued earlier that may still read them (with async scheduling vLLM's host runs a
           step ahead of the GPU). Each spec's slots go to the device, then every layer's Future
           of every LayerStream gets a done-callback.
  arrival  The callback runs in the stream's fetch thread the moment the layer arrives (its
           checksum was verified just before, by decode_layer), or at once in start if it
           already had. Under the loader's lock, unless the step ended or that stream was given
           up, SideStream.issue:
               kv        [2, T, H, hs]  host, read-only, numpy-backed (T: the cloud prompt)
            -> pinned    [2, n, H, hs]  CPU memcpy of tokens [lo, hi): the union of the specs
            -> uploaded  [2, n, H, hs]  H2D copy, side stream
            -> each spec's tokens into its slots of every cache of that layer, side stream
               (kv_writer.scatter_kv into the [B, N, H, hs] views)
            -> one CUDA event recorded on the side stream: layer l of this stream is written.
  wait(l)  The host waits only until layer l of the stream is *issued*, at most the fetch
           timeout; then the compute stream waits on its event: no host sync with the GPU.
           A timeout gives the stream up under the same lock, so none of its layers is written
           after the caller marked its blocks for recompute.
  close    (wait_for_save) nothing more is issued; the compute stream waits on the side stream,
           which also covers an issued layer that nobody waited for.

Pinned buffers come from torch's caching host allocator (`torch.empty(pin_memory=True)`): the
non_blocking H2D copy records an event on the side stream for its block, and the allocator
hands that block out again only once the event completed, so we drop our reference right after
issuing. The device staging tensor [2, n, H, hs] is allocated on the side stream and freed into
that stream's pool: only later side-stream work can reuse it, after the scatter (stream order).
Pinned memory in use: the layers issued but not yet copied (a step's cloud KV at worst); the
allocator keeps its high-water mark cached.

Why callbacks rather than a thread of our own, or issuing inside wait_for_layer_load: a layer is
moved the moment it arrives, with no polling and no thread to stop, and the pinned memcpy runs in
the fetch thread (which already pays the checksum), not in the thread launching the forward.
"""

import functools
import threading

import torch

from edgeprompt_vllm.edge.kv_writer import paged_index, scatter_kv


class SideStream:
    """The CUDA work of the loader: one side stream on `device`."""

    def __init__(self, device):
        self.stream = torch.cuda.Stream(device=torch.device(device))
        self.device = self.stream.device  # with its index ("cuda" -> the current device)

    def begin(self) -> None:
        """The side stream waits on what the compute stream has queued so far (an event)."""
        self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def upload_slots(self, slots: torch.Tensor) -> torch.Tensor:
        """slots [n] int64 on the host -> on the device (queued on the side stream)."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            return slots.pin_memory().to(self.device, non_blocking=True)

    def issue(self, kv: torch.Tensor, lo: int, hi: int, writes) -> torch.cuda.Event:
        """kv [2, T, H, hs] on the host (object store) or already on this device (a GPU-pair
        slot): tokens [lo, hi) go up once if needed; each write (kv_cache, a, b, slots [b - a]
        on the device) puts tokens [a, b) of them into its slots.
        -> the event after the last write, on the side stream."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if kv.device == self.device:
                uploaded = kv[:, lo:hi]  # [2, n, H, hs]
            else:
                pinned = torch.empty((2, hi - lo, *kv.shape[2:]), dtype=kv.dtype, pin_memory=True)
                pinned.copy_(kv[:, lo:hi])  # [2, n, H, hs]
                uploaded = pinned.to(self.device, non_blocking=True)  # [2, n, H, hs]
            for kv_cache, a, b, slots in writes:
                block, offset = paged_index(slots, kv_cache.shape[2])
                scatter_kv(kv_cache, uploaded[0, a:b], uploaded[1, a:b], block, offset)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def wait(self, event: torch.cuda.Event) -> None:
        """The compute stream waits on the GPU (the host does not)."""
        torch.cuda.current_stream(self.device).wait_event(event)

    def end(self) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


class LayerLoader:
    """One step's layer-wise load through `side` (a SideStream, or a fake with its methods).

    loads:  [(stream, [(start, end, slots [end - start] int64 on the host)])], one per
            LayerStream (its `futures`: layer -> Future of (header, kv [2, T, H, hs]))
    caches: layer index -> the paged KV caches of that layer
    heads:  the KV heads of each layer these caches hold (a tensor-parallel rank's share)
    """

    def __init__(self, side, loads, caches: dict[int, list[torch.Tensor]],
                 heads: slice = slice(None)):
        self._side, self._caches, self._heads = side, caches, heads
        self._cond = threading.Condition()
        self._closed = False
        self._given_up: set[int] = set()  # streams whose layers are no longer written
        self._issued: dict[tuple[int, int], object] = {}  # (stream, layer) -> event | None | error
        self.streams = [stream for stream, _ in loads]
        self._index = {id(stream): i for i, stream in enumerate(self.streams)}
        side.begin()
        self._jobs = []  # per stream: (lo, hi, [(a, b, slots on the device)]), a, b from lo
        for _, specs in loads:
            lo, hi = min(s for s, _, _ in specs), max(e for _, e, _ in specs)
            self._jobs.append((lo, hi, [(s - lo, e - lo, side.upload_slots(slots))
                                        for s, e, slots in specs]))
        for i, stream in enumerate(self.streams):
            for layer, future in stream.futures.items():
                future.add_done_callback(functools.partial(self._arrived, i, layer))

    def _arrived(self, i: int, layer: int, future) -> None:
        state = None
        with self._cond:
            if not (self._closed or i in self._given_up):
                state = self._issue(i, layer, future)
                self._issued[(i, layer)] = state
                self._cond.notify_all()
        # the layer's buffer is free once what was issued from it has run
        self.streams[i].consumed(layer, None if isinstance(state, BaseException) else state)

    def _issue(self, i: int, layer: int, future):
        """-> the event after the layer's writes, None (nothing to write), or its error."""
        lo, hi, targets = self._jobs[i]
        try:
            _, kv = future.result()  # the fetch's error (cloud down, checksum...) raises here
            if kv.shape[1] < hi:
                raise ValueError(f"cloud sent {kv.shape[1]} tokens, need {hi}")
            writes = [(cache, a, b, slots) for cache in self._caches.get(layer, ())
                      for a, b, slots in targets]
            return self._side.issue(kv[:, :, self._heads], lo, hi, writes) if writes else None
        except BaseException as e:  # noqa: BLE001 (handed to wait(), which raises it)
            return e

    def wait(self, stream, layer: int, timeout_s: float) -> None:
        """Until layer `layer` of `stream` is issued (host), then the compute stream waits for
        its writes (GPU). Raises the layer's error, or TimeoutError (the stream is given up)."""
        i = self._index[id(stream)]
        with self._cond:
            if not self._cond.wait_for(lambda: (i, layer) in self._issued, timeout_s):
                self._given_up.add(i)
                raise TimeoutError(f"layer {layer} of cloud prompt {stream.prompt_id!r} did not "
                                   f"arrive in {timeout_s} s")
            state = self._issued[(i, layer)]
        if isinstance(state, BaseException):
            raise state
        if state is not None:
            self._side.wait(state)

    def close(self) -> None:
        with self._cond:
            self._closed = True
        self._side.end()

