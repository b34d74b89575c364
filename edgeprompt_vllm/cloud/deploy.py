"""Start (or find) the named, detached CloudPromptService actor."""

import os

import ray

from edgeprompt_vllm.cloud.service import CloudPromptService
from edgeprompt_vllm.config import DEFAULT_ACTOR_NAME, DEFAULT_NAMESPACE


def start_cloud_service(model: str, *, name: str = DEFAULT_ACTOR_NAME,
                        namespace: str = DEFAULT_NAMESPACE, resources: dict | None = None,
                        num_cpus: float = 1, max_concurrency: int = 64, detached: bool = True,
                        num_gpus: float = 0, env_vars: dict | None = None, **service_kwargs):
    """Creates the actor (get_if_exists) and waits until its engine is up; returns its handle.

    `resources={"cloud": 1}` places it on a node started with that custom resource; on a GPU
    node give `num_gpus` (Ray then picks the GPU), or `num_gpus=0` and
    `env_vars={"CUDA_VISIBLE_DEVICES": visible_gpu(1)}` to pin the engine to a GPU of your choice
    (Ray >= 2.48 leaves CUDA_VISIBLE_DEVICES alone for actors that ask for no GPU).
    """
    cls = ray.remote(CloudPromptService)
    actor = cls.options(
        name=name, namespace=namespace, get_if_exists=True,
        lifetime="detached" if detached else None, max_concurrency=max_concurrency,
        num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or {},
        runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", **(env_vars or {})}},
    ).remote(model, **service_kwargs)
    ray.get(actor.stats.remote())  # raises if the engine failed to start
    return actor


def visible_gpu(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry for this process's GPU `index`: an actor's env var names
    physical GPUs (or UUIDs), so with CUDA_VISIBLE_DEVICES=2,3 here, GPU 1 is "3", not "1"."""
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if d.strip()]
    if not visible:
        return str(index)
    if not 0 <= index < len(visible):
        raise ValueError(f"GPU {index} is not visible (CUDA_VISIBLE_DEVICES={','.join(visible)})")
    return visible[index]
