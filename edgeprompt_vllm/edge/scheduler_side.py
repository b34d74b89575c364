"""Scheduler side of the connector: match requests to cloud prompts, plan the loads.

A request matches by `kv_transfer_params["cloud_prompt"]`, else by the longest registered
block-aligned token prefix. Loads are synchronous, inside the next forward: we return
(n, False), so vLLM calls start_load_kv before the forward (has_sync_kv_loads). Loaded blocks
become ordinary prefix-cache blocks: a later request gets them as a local hit and loads nothing.
"""

import time

from edgeprompt_vllm.config import EdgePromptConfig
from edgeprompt_vllm.edge.metadata import EdgePromptMetadata, LoadSpec
from edgeprompt_vllm.edge.planner import STRATEGIES, Decision, get_planner
from edgeprompt_vllm.edge.stats import EdgePromptStats
from edgeprompt_vllm.fingerprint import Fingerprint
from edgeprompt_vllm.log import get_logger
from edgeprompt_vllm.prompts import Match, PromptRegistry
from edgeprompt_vllm.transport.client import CloudClient, CloudUnavailable

logger = get_logger(__name__)
_REFRESH_MIN_S = 1.0
_STATE_TTL_S = 30.0
_MIN_OBSERVED_TOKENS = 16  # smaller steps (decode) do not feed the planner's prefill estimate


def _computes_whole_prompt(request) -> bool:
    """vLLM reads no cached KV for this request (skip_reading_prefix_cache; by default when it
    asks for prompt logprobs, which need every prompt position computed here)."""
    if getattr(request, "skip_reading_prefix_cache", False):
        return True
    params = getattr(request, "sampling_params", None)
    return params is not None and getattr(params, "prompt_logprobs", None) is not None


def requested_prompt(request) -> str | None:
    params = request.kv_transfer_params or {}
    return params.get("cloud_prompt") or params.get("cloud_prompt_id")


class SchedulerSide:
    def __init__(self, config: EdgePromptConfig, fingerprint: Fingerprint, block_size: int,
                 recompute_failures: bool = True):
        self.config, self.block_size = config, block_size
        # a request whose load failed: recomputed by vLLM, or failed (edge/failure_policy.py)
        self._failed_status = "load_failed_recomputed" if recompute_failures else "load_failed"
        self.client = CloudClient.connect(config, fingerprint)  # refuses a mismatched cloud
        self.planner = get_planner(config.planner_ewma)  # the worker side feeds it (same process)
        self._num_layers = fingerprint.num_layers
        self._bytes_per_token = fingerprint.kv_bytes_per_token()
        self._cloud_state: dict[str, tuple[str, float]] = {}  # prompt id -> (state, when)
        self._decisions: dict[str, Decision] = {}  # req -> the planner's decision
        self.registry = PromptRegistry(block_size)
        self._last_refresh = 0.0
        self.refresh()
        self._matched: dict[str, tuple[Match, int]] = {}  # req -> (match, local hit tokens)
        # req -> (registry, requested prompt id, match): vLLM asks again for a waiting request
        # every step until it is allocated, and again after a preemption; its tokens don't change
        self._lookups: dict[str, tuple[PromptRegistry, str | None, Match | None]] = {}
        self._to_load: dict[str, tuple[Match, int]] = {}
        self._loads: dict[str, LoadSpec] = {}  # req -> its load, until finished
        self._status: dict[str, dict] = {}  # req -> reported in the request's kv_transfer_params
        self._failed_at: dict[str, float] = {}  # cloud prompt -> when a load of it last failed
        self._stats = EdgePromptStats()  # hits and misses, by final status (edge/stats.py)

    def refresh(self) -> None:
        self._last_refresh = time.monotonic()
        registry = PromptRegistry(self.block_size)
        for p in self.client.registry(self.config.health_timeout_s):
            registry.add(p)
        self.registry = registry

    def _lookup(self, request) -> Match | None:
        rid = request.request_id
        seen = self._lookups.get(rid)
        if seen is not None and seen[0] is self.registry:  # asked before, same registry
            _, pid, match = seen
            if match is None and pid is not None:
                self._status[rid] = {"cloud_prompt": pid, "status": "prefix_mismatch"}
            return match
        pid = requested_prompt(request)
        if pid is not None and pid not in self.registry and \
                time.monotonic() - self._last_refresh > _REFRESH_MIN_S:
            try:
                self.refresh()
            except CloudUnavailable as e:  # never take the engine down: compute on the edge
                logger.warning("cannot refresh the cloud prompt registry: %s", e)
        if pid is not None and pid not in self.registry:
            logger.warning("request %s: unknown cloud prompt %r; computing it on the edge",
                           request.request_id, pid)
            self._status[request.request_id] = {"cloud_prompt": pid, "status": "unknown_cloud_prompt"}
            return None
        match = self.registry.match(request.prompt_token_ids or [], pid)
        if match is None and pid is not None:
            self._status[request.request_id] = {"cloud_prompt": pid, "status": "prefix_mismatch"}
        self._lookups[rid] = (self.registry, pid, match)
        return match

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        match = self._lookup(request)
        if match is None or match.num_tokens < self.config.min_prefix_blocks * self.block_size:
            return 0, False
        status = {"cloud_prompt": match.prompt.prompt_id, "cloud_tokens": match.num_tokens}
        why = self._no_load_reason(request, match, num_computed_tokens)
        if why is not None:
            self._status[request.request_id] = {**status, "status": why, "loaded_tokens": 0}
            return 0, False
        decision = self._plan(request, match, num_computed_tokens)
        if decision.strategy == "recompute":  # the link is slower than the edge's own prefill
            self._status[request.request_id] = {**status, "status": "recompute", "loaded_tokens": 0,
                                                **decision.status()}
            return 0, False
        self._matched[request.request_id] = (match, num_computed_tokens)
        self._status[request.request_id] = {**status, "status": "loading",
                                            "loaded_tokens": match.num_tokens - num_computed_tokens,
                                            **decision.status()}
        return match.num_tokens - num_computed_tokens, False

    def _no_load_reason(self, request, match: Match, num_computed_tokens: int) -> str | None:
        """Why a matched request loads nothing (its status), or None: it may load."""
        if _computes_whole_prompt(request):  # e.g. prompt logprobs: no cached or loaded KV
            return "prefix_reuse_off"
        if num_computed_tokens >= match.num_tokens:  # vLLM's prefix cache holds it already
            return "cached"
        if getattr(request, "lora_request", None) is not None:
            # the cloud runs the base model: an adapter changes every layer's K and V (through
            # its own projections or the hidden states), so the edge computes the prompt itself
            return "lora_adapter"
        if self.client.down_reason is not None:  # a dead or stalled cloud: the edge computes it
            return "cloud_unavailable"
        failed = self._failed_at.get(match.prompt.prompt_id)
        if failed is not None and time.monotonic() - failed < self.config.failed_prompt_retry_s:
            return "load_failed_recently"
        return None

    # ---------------- the planner (edge/planner.py) ----------------
    def _plan(self, request, match: Match, num_computed_tokens: int) -> Decision:
        rid = request.request_id
        if rid in self._decisions:  # asked again (not scheduled last time): the same decision
            return self._decisions[rid]
        strategy = (request.kv_transfer_params or {}).get("strategy") or self.config.strategy
        if strategy not in ("auto",) + STRATEGIES:
            logger.warning("request %s: unknown strategy %r; using %r", rid, strategy, self.config.strategy)
            strategy = self.config.strategy
        pid, load = match.prompt.prompt_id, match.num_tokens - num_computed_tokens
        t0 = time.perf_counter()
        cold = self._cold(pid)
        d = self.planner.plan(rid, pid, num_layers=self._num_layers,
                              layer_bytes=load * self._bytes_per_token, load_tokens=load,
                              edge_tokens=max(1, request.num_tokens - match.num_tokens),
                              cold=cold, strategy=strategy,
                              layers_per_message=self.config.layers_per_message,
                              spent_s=time.perf_counter() - t0,
                              min_gain_s=self.config.planner_min_gain_s)
        if d.strategy != "recompute":
            self._cloud_state[pid] = ("warm", time.monotonic())  # the cloud will have computed it
        self._decisions[rid] = d
        return d

    def _cold(self, prompt_id: str) -> bool:
        """Whether the cloud still has to compute the prompt (asked at most every 30 s)."""
        state, when = self._cloud_state.get(prompt_id, (None, 0.0))
        if state is None or time.monotonic() - when > _STATE_TTL_S:
            try:
                state = self.client.describe(prompt_id, self.config.health_timeout_s)["state"]
            except Exception as e:  # the planner assumes the worst; the load itself will tell
                logger.warning("cannot ask the cloud about %s: %s", prompt_id, e)
                state = "cold"
            self._cloud_state[prompt_id] = (state, time.monotonic())
        return state != "warm"

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        m = self._matched.pop(request.request_id, None)
        if m is not None and num_external_tokens > 0:
            self._to_load[request.request_id] = m

    def build_connector_meta(self, scheduler_output) -> EdgePromptMetadata:
        meta = EdgePromptMetadata(step_work=_step_work(scheduler_output))
        self.planner.step_built(scheduler_output.num_scheduled_tokens.keys())
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
        d = self._decisions.get(req_id)
        spec = LoadSpec(req_id, match.prompt.prompt_id, tuple(block_ids), start, match.num_tokens,
                        d.layers_per_message if d is not None else 1,
                        d is not None and d.cloud_state == "cold")
        meta.loads.append(spec)
        self._loads[req_id] = spec

    def update_connector_output(self, connector_output) -> None:
        obs = getattr(connector_output, "kv_connector_worker_meta", None)
        for step in getattr(obs, "steps", None) or ():  # the worker's measurements (planner_meta.py)
            try:
                self.planner.observe_step(**step)
            except Exception:  # measurements must never break serving
                logger.exception("planner observation failed")
        if obs is not None:
            self.planner.step_done()
        bad = getattr(connector_output, "invalid_block_ids", None)
        if not bad:
            return
        for req_id, spec in self._loads.items():
            if spec.loaded_block_ids(self.block_size) & bad:
                self._load_failed(spec, self._status.get(req_id))

    def _load_failed(self, load: LoadSpec, status: dict | None) -> None:
        """A load of `load.prompt_id` failed: the edge computes that prompt for a while
        (config.failed_prompt_retry_s), and the request's status says how it ended."""
        self._failed_at[load.prompt_id] = time.monotonic()
        if status:
            status["status"] = self._failed_status

    def request_finished(self, request, block_ids) -> tuple[bool, dict | None]:
        self.planner.step_done()
        self.planner.forget(request.request_id)
        self._decisions.pop(request.request_id, None)
        load = self._loads.pop(request.request_id, None)
        self._matched.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)
        status = self._status.pop(request.request_id, None)
        # policy "fail": vLLM ends the request before update_connector_output runs
        if load is not None and _failed(request):
            self._load_failed(load, status)
        if status and status["status"] == "loading":  # no load error came back for it
            status["status"] = "loaded"
        self._stats.request_finished(status)
        return False, ({"edgeprompt": status} if status else None)

    def take_stats(self) -> EdgePromptStats | None:
        if self._stats.is_empty():
            return None
        out, self._stats = self._stats, EdgePromptStats()
        return out


def _failed(request) -> bool:
    """Whether vLLM ended the request with an error (e.g. its load failed, policy "fail")."""
    status = getattr(request, "status", None)
    return getattr(status, "name", None) == "FINISHED_ERROR"


def _step_work(scheduler_output) -> tuple[int, float] | None:
    """(new tokens, sum of new * (context before + new / 2)) of a step, for the planner."""
    num = scheduler_output.num_scheduled_tokens
    n_total, work = 0, 0.0
    for new in scheduler_output.scheduled_new_reqs:
        n = num.get(new.req_id, 0)
        n_total, work = n_total + n, work + n * (new.num_computed_tokens + n / 2)
    cached = scheduler_output.scheduled_cached_reqs
    for i, req_id in enumerate(cached.req_ids):
        n = num.get(req_id, 0)
        n_total, work = n_total + n, work + n * (cached.num_computed_tokens[i] + n / 2)
    return (n_total, work) if n_total >= _MIN_OBSERVED_TOKENS else None
