"""Worker side of the connector: fetch cloud layers in the background, write each on demand.

start_load_kv (before the forward) starts one LayerStream per cloud prompt of the step: all
layers are fetched in order on a background thread, each checksum-verified there.
wait_for_layer_load(l) (entry of attention layer l) waits for layer l only, so the transfer of
l+1 overlaps the compute of l:
  CPU   it writes layer l into the paged cache (cpu_attn_reshape_and_cache), then returns.
  CUDA  a LayerLoader (cuda_loader.py) already issued each layer as it arrived (pinned copy,
        H2D and scatter on one side stream, one event per layer); the host waits until layer l
        is issued, the compute stream waits on its event. The timeline's leave_s is then
        "issued", not "written".
A failed layer (timeout, checksum, dead actor) marks its blocks invalid: vLLM recomputes them
(kv_load_failure_policy "recompute"; the edge knows those tokens, they are the request's own
prompt), or fails their requests where it cannot recompute exactly (edge/failure_policy.py).
Layers come from the object store, or over a GPU-pair link (transport/pair_link.py; config
`transport`) straight into a staging slot on this GPU. A link that cannot be opened leaves the
object store in charge for `_LINK_RETRY_S`; a link that broke is replaced at the next load.
"""

import re
import time

import torch

from edgeprompt_vllm.attention import graph_mode
from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.edge.cuda_loader import LayerLoader, SideStream
from edgeprompt_vllm.edge.kv_writer import cache_heads, cpu_isa, write_layer
from edgeprompt_vllm.edge.metadata import EdgePromptMetadata, LoadSpec
from edgeprompt_vllm.edge.parallel import check_no_pipeline_parallelism, this_worker_kv_heads
from edgeprompt_vllm.edge.planner import get_planner, step_observation
from edgeprompt_vllm.edge.planner_meta import HAS_WORKER_META, PlannerObservations
from edgeprompt_vllm.edge.stats import EdgePromptStats
from edgeprompt_vllm.edge.timeline import Timeline
from edgeprompt_vllm.fingerprint import Fingerprint
from edgeprompt_vllm.log import get_logger
from edgeprompt_vllm.transport.client import CloudClient, CloudUnavailable, UnknownCloudPrompt
from edgeprompt_vllm.transport.pair_link import PairLink, pair_possible
from edgeprompt_vllm.transport.slot_ring import SlotsBusy
from edgeprompt_vllm.transport.wire import DTYPES

logger = get_logger(__name__)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_LINK_RETRY_S = 30.0  # after a pair link failed to open or broke, the object store this long


class WorkerSide:
    def __init__(self, config: EdgePromptConfig, fingerprint: Fingerprint, block_size: int,
                 recompute_failures: bool = True):
        self.config, self.fp, self.block_size = config, fingerprint, block_size
        self._on_failure = ("its blocks are recomputed on the edge" if recompute_failures else
                            "its requests fail (edge/failure_policy.py)")
        self.client = CloudClient.connect(config, fingerprint)
        self.client.registry()
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.heads = slice(0, fingerprint.num_kv_heads)  # this worker's KV heads (register_kv_caches)
        self.layer_of: dict[str, int] = {}
        self._isa: dict[str, str | None] = {}
        self._active: list[tuple[LoadSpec, object, torch.Tensor]] = []  # (spec, stream, slots)
        self._invalid: set[int] = set()
        self._failed_streams: set[int] = set()  # id() of this step's streams that failed
        self._side: SideStream | None = None  # CUDA: the one side stream (_side_stream)
        self._waited_up_front = False  # this step is a FULL CUDA graph: its loads were waited for at start
        self._loader: LayerLoader | None = None  # CUDA: this step's layer loader
        self.timeline: Timeline | None = None
        self._stats = EdgePromptStats()
        self._relay_seen = _relay_counts()
        self.planner = get_planner(config.planner_ewma)  # fed here, asked by the scheduler side
        self._step: dict = {}  # this step's clock and work, for the planner
        self._planner_obs: list[dict] = []  # -> the scheduler side (build_connector_worker_meta)
        self._link: PairLink | None = None
        self._link_retry_at = 0.0
        self._link_refused: str | None = None  # why transport "pair" cannot pair (logged once)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches
        check_no_pipeline_parallelism()
        self.heads = this_worker_kv_heads(self.fp.num_kv_heads)  # of every layer the cloud sends
        for name, cache in kv_caches.items():
            m = _LAYER.search(name)
            if m is None:
                raise RuntimeError(f"cannot tell the layer index of KV cache {name!r}")
            self.layer_of[name] = int(m.group(1))
            if cache.dtype != DTYPES[self.fp.dtype]:  # e.g. --kv-cache-dtype fp8
                raise RuntimeError(
                    f"KV cache {name!r} holds {cache.dtype}, but the cloud ships {self.fp.dtype} "
                    f"KV: EdgePrompt needs the KV cache in the model's dtype (no --kv-cache-dtype)")
            if cache_heads(cache) != self.heads.stop - self.heads.start:
                raise RuntimeError(
                    f"KV cache {name!r} holds {cache_heads(cache)} KV heads, but this worker's "
                    f"share of the model's {self.fp.num_kv_heads} is heads "
                    f"{self.heads.start}..{self.heads.stop - 1}")
        self._pair_link()  # a pair link opens now (its receiver actor, the channel), not in a load

    def _pair_link(self) -> PairLink | None:
        """The GPU-pair link to use now, opened on first need; None: the object store."""
        mode = self.config.transport
        cache = next(iter(self.kv_caches.values()), None)
        if mode == "object_store" or cache is None or (mode == "auto" and cache.device.type != "cuda"):
            return None
        if self._link is not None and self._link.broken is None:
            return self._link
        if time.monotonic() < self._link_retry_at:
            return None
        why = pair_possible(self.client.cloud_info.get("pair"), cache.device)
        if why:
            if mode == "pair" and why != self._link_refused:
                logger.error("transport 'pair' asked, but %s: layers go through the object store", why)
            self._link_refused, self._link_retry_at = why, time.monotonic() + _LINK_RETRY_S
            return None
        self._link = link = None
        try:
            link = PairLink(self.client, cache.device, self.config.fetch_timeout_s)
            link.reserve(max((self._layer_bytes(p.shipped_len(self.block_size))
                              for p in self.client.registry()), default=0))  # the largest prompt
            self._link = link
        except Exception as e:  # noqa: BLE001 (the object store still works)
            logger.warning("cannot open a GPU-pair link (%s: %s); the object store carries the "
                           "layers", type(e).__name__, e)
            if link is not None:
                link.close()
            self._link_retry_at = time.monotonic() + _LINK_RETRY_S
        return self._link

    def _pair_stream(self, prompt_id: str):
        link = self._pair_link()
        if link is None:
            return None
        shape = self._layer_shape(self.client.describe(prompt_id)["shipped_tokens"])
        try:
            return link.fetch_layers(prompt_id, range(self.fp.num_layers), shape, self.fp.dtype)
        except SlotsBusy as e:  # a prompt registered since, larger than the slots
            logger.info("%s; the object store carries %s", e, prompt_id)
            return None
        except CloudUnavailable as e:  # the link broke meanwhile: the object store this time
            logger.warning("GPU-pair link unusable (%s); the object store carries %s", e, prompt_id)
            self._link_retry_at = time.monotonic() + _LINK_RETRY_S
            return None

    def _layer_shape(self, tokens: int) -> tuple:
        """One layer of a prompt as shipped: [2 (K, V), tokens, KV heads, head size]."""
        return (2, tokens, self.fp.num_kv_heads, self.fp.head_size)

    def _layer_bytes(self, tokens: int) -> int:
        return tokens * self.fp.kv_bytes_per_token()

    def _stream(self, prompt_id: str, layers_per_message: int = 1):
        try:
            return self._open_stream(prompt_id, layers_per_message)
        except UnknownCloudPrompt:  # registered after our last look: the scheduler saw it
            self.client.registry()
            return self._open_stream(prompt_id, layers_per_message)

    def _open_stream(self, prompt_id: str, layers_per_message: int):
        stream = self._pair_stream(prompt_id)
        if stream is not None:  # one layer per message: a pair link has no per-message cost
            return stream
        return self.client.fetch_layers(prompt_id, range(self.fp.num_layers),
                                        layers_per_message=layers_per_message,
                                        codec=self.config.wire_codec)

    def start_load_kv(self, metadata: EdgePromptMetadata) -> None:
        self._close_loader()
        self._active, self._failed_streams = [], set()
        self._step.update(work=metadata.step_work, start=time.perf_counter())
        if not metadata.loads:
            return
        streams = {}
        for spec in metadata.loads:
            try:
                if spec.prompt_id not in streams:
                    streams[spec.prompt_id] = self._stream(spec.prompt_id, spec.layers_per_message)
                self._active.append((spec, streams[spec.prompt_id], spec.slot_mapping(self.block_size)))
            except Exception as e:
                logger.error("cannot fetch cloud prompt %s: %s; %s", spec.prompt_id, e,
                             self._on_failure)
                self._invalid |= spec.loaded_block_ids(self.block_size)
        self.timeline = Timeline(self.fp.num_layers, [s for s, _, _ in self._active],
                                 list(streams.values()))
        side = self._side_stream()
        if side is not None and self._active:
            self._loader = LayerLoader(side, self._loads_per_stream(), self._caches_per_layer(),
                                       self.heads)
        self._waited_up_front = bool(self._active) and graph_mode.step_is_full_graph()
        if self._waited_up_front:
            # a FULL CUDA graph runs no wait_for_layer_load: every layer is waited for before it
            first_name = {layer: name for name, layer in reversed(self.layer_of.items())}
            for layer in sorted(first_name):
                self.wait_for_layer_load(first_name[layer])

    def _side_stream(self) -> SideStream | None:
        """The side stream when the KV cache is on CUDA (created once); None on CPU."""
        if self._side is None:
            cache = next(iter(self.kv_caches.values()), None)
            if cache is not None and cache.device.type == "cuda":
                self._side = SideStream(cache.device)
        return self._side

    def _loads_per_stream(self) -> list[tuple[object, list[tuple[int, int, torch.Tensor]]]]:
        """-> [(stream, [(start, end, slots [end - start])])] for LayerLoader."""
        loads: dict[int, tuple[object, list]] = {}
        for spec, stream, slots in self._active:
            loads.setdefault(id(stream), (stream, []))[1].append((spec.start, spec.end, slots))
        return list(loads.values())

    def _caches_per_layer(self) -> dict[int, list[torch.Tensor]]:
        caches: dict[int, list[torch.Tensor]] = {}
        for name, cache in self.kv_caches.items():
            caches.setdefault(self.layer_of[name], []).append(cache)
        return caches

    def _close_loader(self) -> None:
        """The step's end (or a new step): the loader writes nothing more (cuda_loader.py)."""
        if self._loader is not None:
            self._loader, loader = None, self._loader
            loader.close()

    def wait_for_layer_load(self, layer_name: str) -> None:
        if self.layer_of.get(layer_name) == 0:
            self._step["enter0"] = time.perf_counter()
        if not self._active or layer_name not in self.layer_of:
            return
        layer = self.layer_of[layer_name]
        self.timeline.enter(layer)
        if self._loader is not None:
            self._wait_issued(layer)
        else:
            self._write_now(layer_name, layer)
        self.timeline.leave(layer)

    def _wait_issued(self, layer: int) -> None:
        """CUDA: the host waits until layer `layer` is issued, the compute stream for its event."""
        for stream in self._loader.streams:
            if id(stream) in self._failed_streams:  # its blocks are already marked for recompute
                continue
            try:
                self._loader.wait(stream, layer, self.config.fetch_timeout_s)
            except Exception as e:
                self._fail_layer(stream, layer, e)

    def _write_now(self, layer_name: str, layer: int) -> None:
        """CPU: fetch and write layer `layer` of every load, on this thread."""
        for spec, stream, slots in self._active:
            if id(stream) in self._failed_streams:  # its blocks are already marked for recompute
                continue
            try:
                header, kv = stream.result(layer, self.config.fetch_timeout_s)
                if kv.shape[1] < spec.end:
                    raise ValueError(f"cloud sent {kv.shape[1]} tokens, need {spec.end}")
                key, value = kv[:, spec.start:spec.end, self.heads]  # [T, h, hs] each
                write_layer(self.kv_caches[layer_name], key, value, slots,
                            self._layer_isa(layer_name, kv.dtype))
            except Exception as e:
                self._fail_layer(stream, layer, e)

    def _fail_layer(self, stream, layer: int, error: Exception) -> None:
        """A layer of `stream` failed (timeout, checksum, dead cloud): the blocks of every request
        loading from it are invalid (recomputed, or the requests fail). After a timeout or an
        unavailable cloud no later layer of it is waited for: a stalled cloud costs a step at
        most `fetch_timeout_s`, not one timeout per layer."""
        if isinstance(error, (TimeoutError, CloudUnavailable)):
            self._failed_streams.add(id(stream))
        for spec, s, _ in self._active:
            if s is stream:
                self._invalid |= spec.loaded_block_ids(self.block_size)
        logger.error("layer %d of cloud prompt %s failed (%s: %s); %s", layer, stream.prompt_id,
                     type(error).__name__, error, self._on_failure)

    def _layer_isa(self, layer_name: str, dtype: torch.dtype) -> str | None:
        if layer_name not in self._isa:
            cache = self.kv_caches[layer_name]
            if cache.device.type != "cpu":
                self._isa[layer_name] = None
            else:
                from vllm.forward_context import get_forward_context

                module = get_forward_context().no_compile_layers.get(layer_name)
                self._isa[layer_name] = cpu_isa(module, dtype, self.block_size, self.fp.head_size)
        return self._isa[layer_name]

    def wait_for_save(self) -> None:
        self._close_loader()
        rec = None
        if self._active and self.timeline is not None:
            rec = self.timeline.finish(self.config.timeline_path)
            self._record(rec)
        if self._waited_up_front:  # no edge compute between the layers' waits: nothing to learn
            self._step, self._waited_up_front = {}, False
        else:
            self._observe_step(rec)
        self._active = []

    def _observe_step(self, rec: dict | None) -> None:
        """This step's measurements (transfer, cloud and edge compute, clock) -> the planner."""
        step, self._step = self._step, {}
        if rec is None and step.get("work") is None:
            return
        obs = step_observation(
            [x["edge_compute_s"] for x in rec["layers"]] if rec is not None else None,
            [list(s.messages) for s in self.timeline.streams] if rec is not None else [],
            step.get("work"), step.get("start"), step.get("enter0"), time.perf_counter(),
            self.fp.num_layers, self._layer_bytes(1),
            [any(sp.cloud_cold for sp, st, _ in self._active if st is s) for s in self.timeline.streams]
            if rec is not None else None)
        if HAS_WORKER_META:
            self._planner_obs.append(obs)
            return
        try:  # no worker -> scheduler channel in this vLLM: feed this process's planner
            self.planner.observe_step(**obs)
        except Exception:  # measurements must never break serving
            logger.exception("planner observation failed")

    def take_planner_observations(self) -> PlannerObservations | None:
        obs, self._planner_obs = self._planner_obs, []
        return PlannerObservations(obs) if obs else None

    def _record(self, rec: dict) -> None:
        """One load step's timeline -> the metrics (edge/stats.py)."""
        st = self._stats
        st.add("loads", len(rec["loads"]))
        st.add("loaded_tokens", sum(x["tokens"] for x in rec["loads"]))
        for stream in self.timeline.streams:
            for layer in stream.layers:
                nbytes = stream.timings.get(layer, {}).get("nbytes")
                if nbytes is None:
                    st.add("layer_failures")
                else:
                    st.add("cloud_layers")
                    st.add("cloud_bytes", nbytes)
        for lay in rec["layers"]:
            if lay["wait_s"] is not None:
                st.observe("layer_waits", lay["wait_s"])
        ready = [r for r in (lay["ready_s"] for lay in rec["layers"])
                 if isinstance(r, float) and r == r]  # (None, NaN: the layer never arrived)
        if ready:
            st.observe("load_seconds", max(ready))

    def take_stats(self) -> EdgePromptStats | None:
        """Since the last call (once per step): loads, and the relay groups of this step."""
        batches, groups = _relay_counts()
        if batches > self._relay_seen[0]:  # relay attention ran a metadata build
            self._stats.add("relay_groups", groups - self._relay_seen[1])
            self._stats.observe("relay_groups_per_step", groups - self._relay_seen[1])
        self._relay_seen = (batches, groups)
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, EdgePromptStats()
        return out

    def take_invalid_block_ids(self) -> set[int]:
        bad, self._invalid = self._invalid, set()
        return bad


def _relay_counts() -> tuple[int, int]:
    from edgeprompt_vllm.attention.stats import RELAY_STATS

    return RELAY_STATS.batches, RELAY_STATS.groups
