"""Bring a cloud up: join or start Ray, start the CloudPromptService actor, register and prefill
the registry's prompts with progress. Used by `edgeprompt cloud` and `edgeprompt demo`."""

import json
import time
from pathlib import Path

import ray

from edgeprompt_vllm.cloud.deploy import start_cloud_service
from edgeprompt_vllm.cloud.prompt_files import PromptSpec
from edgeprompt_vllm.config import DEFAULT_ACTOR_NAME, DEFAULT_NAMESPACE
from edgeprompt_vllm.fingerprint import Fingerprint


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def resolve_dtype(model: str | Path, dtype: str = "auto") -> str:
    """The one dtype cloud and edge both run (the fingerprint compares it): fp32 on CPU; on a
    GPU the model's half dtype (a float32 config runs as bfloat16)."""
    if dtype != "auto":
        return dtype
    if not has_cuda():
        return "float32"
    cfg = json.loads((Path(model) / "config.json").read_text())
    want = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16")
    return want if want in ("float16", "bfloat16") else "bfloat16"


def connect_ray(address: str | None, namespace: str, num_cpus: int | None = None,
                temp_dir: str | None = None) -> tuple[str, bool]:
    """-> (GCS address "host:port" for the edges, whether this process started the cluster).

    address "local": start a private cluster in this process (it lives as long as we do);
    "auto": the cluster already running on this machine
    (`RAY_AUTH_MODE=token ray start --head`);
    None: "auto", else start one; "HOST:PORT": join that cluster.
    Always with Ray's token authentication (transport/client.require_token_auth).
    """
    from edgeprompt_vllm.transport.client import require_token_auth

    require_token_auth(starting=False)
    kw = dict(namespace=namespace, log_to_driver=False, logging_level="WARNING")
    started = False
    if address in (None, "auto"):
        try:
            ray.init(address="auto", **kw)
        except ConnectionError:
            if address == "auto":
                raise
            address = "local"
    elif address != "local":
        ray.init(address=address, **kw)
    if address == "local":
        require_token_auth(starting=True)
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus,
                 _temp_dir=temp_dir, **kw)
        started = True
    return ray.get_runtime_context().gcs_address, started


def stop_cloud(actor) -> None:
    """Kills the cloud actor (if any; already gone is fine) and leaves the Ray cluster."""
    import ray

    if actor is not None:
        try:
            ray.kill(actor)
        except Exception:
            pass
    ray.shutdown()


def start_cloud(model: str | Path, specs: list[PromptSpec], *, name: str = DEFAULT_ACTOR_NAME,
                namespace: str = DEFAULT_NAMESPACE, resources: dict | None = None,
                detached: bool = False, num_cpus: float = 1, num_gpus: float = 0,
                dtype: str = "float32", block_size: int = 32, max_model_len: int = 2048,
                max_kv_bytes: int = 1 << 30, load_format: str = "auto",
                engine_kwargs: dict | None = None, progress: bool = True, out=None):
    """Starts (or finds) the actor, registers and prefills each spec; -> (actor, fingerprint)."""
    actor = start_cloud_service(str(model), name=name, namespace=namespace, resources=resources,
                                detached=detached, num_cpus=num_cpus, num_gpus=num_gpus,
                                dtype=dtype, block_size=block_size, max_model_len=max_model_len,
                                max_kv_bytes=max_kv_bytes, load_format=load_format,
                                engine_kwargs=engine_kwargs)
    fp = Fingerprint.from_dict(ray.get(actor.stats.remote())["fingerprint"])
    for spec in specs:
        register_with_progress(actor, spec, fp, progress=progress, out=out)
    return actor, fp


class PromptRefused(ValueError):
    """The cloud actor refused a registry prompt (e.g. longer than its max_model_len)."""


def register_with_progress(actor, spec: PromptSpec, fp: Fingerprint, progress: bool = True,
                           out=None, poll_s: float = 0.2) -> dict:
    """Registers and prefills one prompt; a bar counts its layers as the cloud computes them."""
    from tqdm import tqdm

    ref = spec.register(actor, prefill=True)
    digest = fp.digest()
    bar = tqdm(total=fp.num_layers, desc=f"prefill {spec.name}", unit="layer", leave=True,
               disable=not progress, file=out, dynamic_ncols=True)
    t0 = time.monotonic()
    try:
        while not ray.wait([ref], timeout=poll_s)[0]:
            try:
                d = ray.get(actor.describe.remote(spec.name, digest), timeout=5)
            except Exception:  # not registered yet: tokenizing the text
                continue
            done = sum(1 for c in d["checksums"] if c)
            bar.update(done - bar.n)
        try:
            info = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the actor refused it (too long, ...)
            cause = getattr(e, "cause", None) or e
            raise PromptRefused(f"{spec.path or spec.name}: cloud prompt {spec.name!r} was refused "
                                f"by the cloud: {type(cause).__name__}: {cause}") from None
        bar.update(fp.num_layers - bar.n)
        bar.set_postfix_str(f"{info['num_tokens']} tokens, {info['shipped_tokens']} shipped, "
                            f"{time.monotonic() - t0:.1f} s")
    finally:
        bar.close()
    return {**info, "kind": spec.kind, "pinned": spec.pinned}
