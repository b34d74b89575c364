"""vLLM's own (Async)Scheduler under KV pressure with async scheduling, without and with the
EdgePromptConnector (scheduler role, a fake cloud): does the connector change the schedule?

No model runs: each step's "model" samples one token for every request whose prompt is done, and
the engine loop keeps two steps in flight, as vLLM's EngineCore.step_with_batch_queue does with
async scheduling. The requests share a cloud prompt (a prefix-cache hit after a warm-up request,
status "cached") and then need more KV blocks than the cache holds, so vLLM preempts.

    python scheduler_pressure.py MODEL_DIR RESULT_JSON
-> {"stock": {...}, "edgeprompt": {...}}: per scheduler defer_block_free, steps, preemptions,
   scheduled tokens, finished requests and their EdgePrompt statuses.
"""

import collections
import json
import os
import random
import sys

os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")

import torch  # noqa: E402
from vllm.config import (CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig,  # noqa: E402
                         VllmConfig)
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.async_scheduler import AsyncScheduler  # noqa: E402
from vllm.v1.kv_cache_interface import (FullAttentionSpec, KVCacheConfig,  # noqa: E402
                                        KVCacheGroupSpec)
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from edgeprompt_vllm.config import EdgePromptConfig  # noqa: E402
from edgeprompt_vllm.prompts import CloudPrompt  # noqa: E402
from edgeprompt_vllm.serving.edge_args import kv_transfer_config  # noqa: E402
from edgeprompt_vllm.transport.client import CloudClient  # noqa: E402

BS, CLOUD_LEN, EDGE_LEN, OUT_LEN = 16, 256, 128, 48
NUM_REQUESTS, GROUPS, NUM_BLOCKS = 96, 12, 420
PID = "pressure-cloud"
rng = random.Random(0)
CLOUD = [rng.randrange(3, 4000) for _ in range(CLOUD_LEN)]
EDGES = [[rng.randrange(3, 4000) for _ in range(EDGE_LEN)] for _ in range(NUM_REQUESTS)]


class FakeCloud:
    """CloudClient's surface for SchedulerSide. Down until the warm-up ran: the edge prefills the
    cloud prompt itself (as if loaded), so every later request is a prefix-cache hit."""

    warm = False

    @property
    def down_reason(self):
        return None if FakeCloud.warm else "warm-up"

    def registry(self, timeout_s=None):
        return [CloudPrompt(PID, tuple(CLOUD))]

    def describe(self, prompt_id, timeout_s=None):
        return {"state": "warm"}


CloudClient.connect = classmethod(lambda cls, config, fingerprint: FakeCloud())
init_none_hash(sha256)
HASHER = get_request_block_hasher(BS, sha256)


def make_scheduler(model: str, edgeprompt: bool) -> AsyncScheduler:
    model_config = ModelConfig(model=model, dtype="float32", seed=0, skip_tokenizer_init=True,
                               max_model_len=CLOUD_LEN + EDGE_LEN + OUT_LEN + 16)
    scheduler_config = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=2048,
                                       max_model_len=model_config.max_model_len,
                                       enable_chunked_prefill=True, async_scheduling=True,
                                       is_encoder_decoder=False)
    cache_config = CacheConfig(block_size=BS, cache_dtype="auto", enable_prefix_caching=True)
    kvt = KVTransferConfig(**kv_transfer_config(EdgePromptConfig(strategy="layerwise"))) \
        if edgeprompt else None
    vllm_config = VllmConfig(scheduler_config=scheduler_config, model_config=model_config,
                             cache_config=cache_config, kv_transfer_config=kvt)
    vllm_config.scheduler_config.async_scheduling = True  # (VllmConfig turns it off on CPU)
    cache_config.num_gpu_blocks = NUM_BLOCKS
    kv_cache_config = KVCacheConfig(
        num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["model.layers.0.self_attn.attn"], FullAttentionSpec(
            block_size=BS, num_kv_heads=1, head_size=1, dtype=torch.float32))])
    return AsyncScheduler(vllm_config=vllm_config, kv_cache_config=kv_cache_config,
                          block_size=BS, log_stats=False,
                          structured_output_manager=StructuredOutputManager(vllm_config))


def run(model: str, edgeprompt: bool) -> dict:
    FakeCloud.warm = False
    sched = make_scheduler(model, edgeprompt)
    counts = collections.Counter()
    preempt = sched._preempt_request

    def counted_preempt(request, *args, **kwargs):
        counts["preemptions"] += 1
        return preempt(request, *args, **kwargs)

    sched._preempt_request = counted_preempt
    progress: dict[str, int] = {}

    def execute(so) -> ModelRunnerOutput:
        if so.total_num_scheduled_tokens == 0:
            return ModelRunnerOutput(req_ids=[], req_id_to_index={})
        for new in so.scheduled_new_reqs:
            progress[new.req_id] = new.num_computed_tokens
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            progress[rid] = cached.num_computed_tokens[i]
        req_ids, sampled = [], []
        for rid, n in so.num_scheduled_tokens.items():
            progress[rid] += n
            req = sched.requests.get(rid)
            req_ids.append(rid)
            sampled.append([7] if req is None or progress[rid] >= req.num_prompt_tokens else [])
        return ModelRunnerOutput(req_ids=req_ids, sampled_token_ids=sampled,
                                 req_id_to_index={r: i for i, r in enumerate(req_ids)})

    def request(i: int, prompt: list[int], max_tokens: int) -> Request:
        extra = {"kv_transfer_params": {"cloud_prompt": PID}} if edgeprompt else None
        return Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                       extra_args=extra), None, block_hasher=HASHER)

    def loop(groups: list[list[Request]]) -> list:
        """EngineCore.step_with_batch_queue (two steps in flight); a group added per output."""
        finished, queue = [], collections.deque()
        for r in groups.pop(0):
            sched.add_request(r)
        while groups or sched.has_requests() or queue:
            if sched.has_requests():
                so = sched.schedule()
                if so.total_num_scheduled_tokens:
                    counts["steps"] += 1
                    counts["tokens"] += so.total_num_scheduled_tokens
                queue.appendleft((so, execute(so)))
                if len(queue) < 2:
                    continue
            elif not queue:
                for r in groups.pop(0):
                    sched.add_request(r)
                continue
            so, out = queue.pop()
            outputs = sched.update_from_output(so, out)
            for eco in outputs.values():
                finished += [o for o in eco.outputs if o.finish_reason is not None]
            if outputs and groups:
                for r in groups.pop(0):
                    sched.add_request(r)
        return finished

    loop([[request(-1, CLOUD + [5] * 16, 1)]])  # the warm-up: the cloud prompt onto the engine
    FakeCloud.warm = True
    counts.clear()
    reqs = [request(i, CLOUD + EDGES[i], OUT_LEN) for i in range(NUM_REQUESTS)]
    size = NUM_REQUESTS // GROUPS
    finished = loop([reqs[i:i + size] for i in range(0, NUM_REQUESTS, size)])
    statuses = collections.Counter(
        str(((o.kv_transfer_params or {}).get("edgeprompt") or {}).get("status")) for o in finished)
    return {"defer_block_free": sched.defer_block_free, "finished": len(finished),
            "statuses": dict(statuses), **counts}


if __name__ == "__main__":
    model, out = sys.argv[1], sys.argv[2]
    result = {"stock": run(model, False), "edgeprompt": run(model, True)}
    with open(out, "w") as f:
        json.dump(result, f)
