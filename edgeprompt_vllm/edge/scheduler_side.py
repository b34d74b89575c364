"""Scheduler side of the connector: match requests to cloud prompts, plan the loads.

A request matches by `kv_transfer_params["cloud_prompt"]`, else by the longest registered
block-aligned token prefix. Loads are synchronous, inside the next forward: we return
(n, False), so vLLM calls start_load_kv before the forward (has_sync_kv_loads). Loaded blocks
become ordinary prefix-cache blocks: a later request gets them as a local hit and loads nothing.
"""

import time

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.edge.metadata import EdgePromptMetadata, LoadSpec
from edgeprompt_vllm.fingerprint import Fingerprint
from edgeprompt_vllm.log import get_logger
from edgeprompt_vllm.prompts import Match, PromptRegistry
from edgeprompt_vllm.transport.client import CloudClient

logger = get_logger(__name__)
_REFRESH_MIN_S = 1.0


def requested_prompt(request) -> str | None:
    params = request.kv_transfer_params or {}
    return params.get("cloud_prompt") or params.get("cloud_prompt_id")


class SchedulerSide:
    def __init__(self, config: EdgePromptConfig, fingerprint: Fingerprint, block_size: int):
        self.config, self.block_size = config, block_size
        self.client = CloudClient.connect(config, fingerprint)  # refuses a mismatched cloud
        self.registry = PromptRegistry(block_size)
        self._last_refresh = 0.0
        self.refresh()
        self._matched: dict[str, tuple[Match, int]] = {}  # req -> (match, local hit tokens)
        self._to_load: dict[str, tuple[Match, int]] = {}
        self._loads: dict[str, LoadSpec] = {}  # req -> its load, until finished
        self._status: dict[str, dict] = {}  # req -> reported in the request's kv_transfer_params

    def refresh(self) -> None:
        self._last_refresh = time.monotonic()
        registry = PromptRegistry(self.block_size)
        for p in self.client.registry():
            registry.add(p)
        self.registry = registry

    def _lookup(self, request) -> Match | None:
        pid = requested_prompt(request)
        if pid is not None and pid not in self.registry and \
                time.monotonic() - self._last_refresh > _REFRESH_MIN_S:
            self.refresh()
        if pid is not None and pid not in self.registry:
            logger.warning("request %s: unknown cloud prompt %r; computing it on the edge",
                           request.request_id, pid)
            self._status[request.request_id] = {"cloud_prompt": pid, "status": "unknown_cloud_prompt"}
            return None
        match = self.registry.match(request.prompt_token_ids or [], pid)
        if match is None and pid is not None:
            self._status[request.request_id] = {"cloud_prompt": pid, "status": "prefix_mismatch"}
        return match

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        match = self._lookup(request)
        if match is None or match.num_tokens < self.config.min_prefix_blocks * self.block_size:
            return 0, False
        status = {"cloud_prompt": match.prompt.prompt_id, "cloud_tokens": match.num_tokens}
        if num_computed_tokens >= match.num_tokens:  # vLLM's prefix cache holds it already
            self._status[request.request_id] = {**status, "status": "cached", "loaded_tokens": 0}
            return 0, False
        self._matched[request.request_id] = (match, num_computed_tokens)
        self._status[request.request_id] = {**status, "status": "loading",
                                            "loaded_tokens": match.num_tokens - num_computed_tokens}
        return match.num_tokens - num_computed_tokens, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        m = self._matched.pop(request.request_id, None)
        if m is not None and num_external_tokens > 0:
            self._to_load[request.request_id] = m

    def build_connector_meta(self, scheduler_output) -> EdgePromptMetadata:
        meta = EdgePromptMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            self._add(meta, new.req_id, new.block_ids[0])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):  # resumed after preemption: all its blocks
            if req_id in self._to_load and req_id in cached.resumed_req_ids and cached.new_block_ids[i]:
                self._add(meta, req_id, cached.new_block_ids[i][0])
        self._to_load.clear()
        return meta

    def _add(self, meta: EdgePromptMetadata, req_id: str, block_ids) -> None:
        m = self._to_load.get(req_id)
        if m is None:
            return
        match, start = m
        spec = LoadSpec(req_id, match.prompt.prompt_id, tuple(block_ids), start, match.num_tokens)
        meta.loads.append(spec)
        self._loads[req_id] = spec

    def update_connector_output(self, connector_output) -> None:
        bad = getattr(connector_output, "invalid_block_ids", None)
        if not bad:
            return
        for req_id, spec in self._loads.items():
            if spec.loaded_block_ids(self.block_size) & bad and req_id in self._status:
                self._status[req_id]["status"] = "load_failed_recomputed"

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        self._loads.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        status = self._status.pop(request.request_id, None)
        if status and status["status"] == "loading":  # no load error came back for it
            status["status"] = "loaded"
        return False, ({"edgeprompt": status} if status else None)
