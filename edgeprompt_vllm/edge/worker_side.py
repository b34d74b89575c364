"""Worker side of the connector: fetch cloud layers in the background, write each on demand.

start_load_kv (before the forward) starts one LayerStream per cloud prompt of the step: all
layers are fetched in order on a background thread, each checksum-verified there.
wait_for_layer_load(l) (entry of attention layer l) waits for layer l only and writes it into
the paged cache, so the transfer of l+1 overlaps the compute of l. A failed layer (timeout,
checksum, dead actor) marks its blocks invalid: vLLM recomputes them (kv_load_failure_policy
"recompute"); the edge knows those tokens, they are the request's own prompt.
"""

import re
import time

import torch

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.edge.kv_writer import cpu_isa, write_layer
from edgeprompt_vllm.edge.metadata import EdgePromptMetadata, LoadSpec
from edgeprompt_vllm.edge.timeline import Timeline
from edgeprompt_vllm.fingerprint import Fingerprint
from edgeprompt_vllm.log import get_logger
from edgeprompt_vllm.transport.client import CloudClient, UnknownCloudPrompt

logger = get_logger(__name__)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


class WorkerSide:
    def __init__(self, config: EdgePromptConfig, fingerprint: Fingerprint, block_size: int):
        self.config, self.fp, self.block_size = config, fingerprint, block_size
        self.client = CloudClient.connect(config, fingerprint)
        self.client.registry()
        self.kv_caches: dict[str, torch.Tensor] = {}
        self.layer_of: dict[str, int] = {}
        self._isa: dict[str, str | None] = {}
        self._active: list[tuple[LoadSpec, object, torch.Tensor]] = []  # (spec, stream, slots)
        self._invalid: set[int] = set()
        self.timeline: Timeline | None = None

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches
        for name in kv_caches:
            m = _LAYER.search(name)
            if m is None:
                raise RuntimeError(f"cannot tell the layer index of KV cache {name!r}")
            self.layer_of[name] = int(m.group(1))

    def _stream(self, prompt_id: str):
        layers = range(self.fp.num_layers)
        try:
            return self.client.fetch_layers(prompt_id, layers)
        except UnknownCloudPrompt:  # registered after our last look: the scheduler saw it
            self.client.registry()
            return self.client.fetch_layers(prompt_id, layers)

    def start_load_kv(self, metadata: EdgePromptMetadata) -> None:
        self._active = []
        if not metadata.loads:
            return
        streams = {}
        for spec in metadata.loads:
            try:
                if spec.prompt_id not in streams:
                    streams[spec.prompt_id] = self._stream(spec.prompt_id)
                self._active.append((spec, streams[spec.prompt_id], spec.slot_mapping(self.block_size)))
            except Exception as e:
                logger.error("cannot fetch cloud prompt %s: %s; recomputing on the edge", spec.prompt_id, e)
                self._invalid |= spec.loaded_block_ids(self.block_size)
        self.timeline = Timeline(self.fp.num_layers, [s for s, _, _ in self._active],
                                 list(streams.values()))

    def wait_for_layer_load(self, layer_name: str) -> None:
        if not self._active or layer_name not in self.layer_of:
            return
        layer = self.layer_of[layer_name]
        self.timeline.enter(layer)
        for spec, stream, slots in self._active:
            try:
                header, kv = stream.result(layer, self.config.fetch_timeout_s)
                if kv.shape[1] < spec.end:
                    raise ValueError(f"cloud sent {kv.shape[1]} tokens, need {spec.end}")
                write_layer(self.kv_caches[layer_name], kv[0, spec.start:spec.end],
                            kv[1, spec.start:spec.end], slots, self._layer_isa(layer_name, kv.dtype))
            except Exception as e:
                logger.error("layer %d of cloud prompt %s failed (%s: %s); its blocks are recomputed",
                             layer, spec.prompt_id, type(e).__name__, e)
                self._invalid |= spec.loaded_block_ids(self.block_size)
        self.timeline.leave(layer)

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
        if self._active and self.timeline is not None:
            self.timeline.finish(self.config.timeline_path)
        self._active = []

    def take_invalid_block_ids(self) -> set[int]:
        bad, self._invalid = self._invalid, set()
        return bad
