"""The cloud side of the `edgeprompt` benchmark scheme: a private local Ray cluster in this
process, the real CloudPromptService actor, the benchmark's cloud prompts registered as token ids
and prefilled, and the edge's --kv-transfer-config pointing at it.

On a GPU both the cloud engine (inside the actor) and the edge engine share the one GPU: the
cloud gets `gpu_memory_utilization` of it, the edge must be given less than 0.9 minus that. With
`cloud_device` (a second GPU's index) the cloud engine runs there instead, as a cloud would on
its own machine, and the edge keeps its whole GPU.
"""

import os
import time
import uuid
from dataclasses import dataclass

ACTOR_NAME = "edgeprompt-bench-cloud"


@dataclass
class BenchCloud:
    actor: object
    address: str  # Ray GCS "host:port"
    namespace: str
    prefill_s: float  # registering and prefilling every cloud prompt

    def kv_transfer_config(self, strategy: str = "layerwise") -> dict:
        from edgeprompt_vllm.config import EdgePromptConfig
        from edgeprompt_vllm.serving.edge_args import kv_transfer_config

        return kv_transfer_config(
            EdgePromptConfig(
                ray_address=self.address,
                namespace=self.namespace,
                actor_name=ACTOR_NAME,
                strategy=strategy,
            )
        )

    def stats(self) -> dict:
        import ray

        s = ray.get(self.actor.stats.remote())
        return {k: v for k, v in s.items() if k != "fingerprint"}

    def stop(self) -> None:
        from edgeprompt_vllm.cloud.launch import stop_cloud

        stop_cloud(self.actor)


def start_bench_cloud(
    model: str,
    prompts: dict[str, list[int]],
    *,
    dtype: str,
    block_size: int,
    max_model_len: int,
    load_format: str = "auto",
    gpu_memory_utilization: float = 0.25,
    cloud_device: str | None = None,
) -> BenchCloud:
    import ray
    import torch

    from edgeprompt_vllm.cloud.deploy import start_cloud_service, visible_gpu

    os.environ.setdefault("RAY_AUTH_MODE", "token")  # the edge joins by address (edge_args.ray_env)
    namespace = f"edgeprompt-bench-{uuid.uuid4().hex[:8]}"
    gpu = torch.cuda.is_available()
    ray.init(
        address="local",
        namespace=namespace,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="WARNING",
        num_gpus=torch.cuda.device_count() if gpu else 0,
    )
    # On a GPU the KV cache is sized by the memory share, not the CPU default of 256 MiB.
    engine_kwargs = (
        {"gpu_memory_utilization": gpu_memory_utilization, "kv_cache_memory_bytes": None}
        if gpu
        else None
    )
    if gpu and cloud_device is not None:  # its own GPU: Ray assigns none, the env var picks it
        gpus, env_vars = 0, {"CUDA_VISIBLE_DEVICES": visible_gpu(int(cloud_device))}
    else:
        gpus, env_vars = (gpu_memory_utilization if gpu else 0), None
    t0 = time.perf_counter()
    actor = start_cloud_service(
        model,
        name=ACTOR_NAME,
        namespace=namespace,
        detached=False,
        num_cpus=0,
        num_gpus=gpus,
        env_vars=env_vars,
        dtype=dtype,
        block_size=block_size,
        max_model_len=max_model_len,
        max_kv_bytes=16 << 30,
        load_format=load_format,
        engine_kwargs=engine_kwargs,
    )
    for pid, ids in prompts.items():
        ray.get(actor.register_prompt.remote(pid, token_ids=ids, pinned=True, prefill=True))
    return BenchCloud(
        actor, ray.get_runtime_context().gcs_address, namespace, time.perf_counter() - t0
    )
