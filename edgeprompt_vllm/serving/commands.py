"""`edgeprompt cloud` (start the cloud) and `edgeprompt edge-args` (the edge's `vllm serve` flags).

    edgeprompt cloud --model M --prompts configs/cloud_prompts/ [--ray-address ADDR]
    vllm serve M <the flags it prints>          # the edge, on the same or another machine
"""

import argparse
import signal
import sys
import time
from pathlib import Path

from edgeprompt_vllm.config import DEFAULT_ACTOR_NAME, DEFAULT_NAMESPACE, EdgePromptConfig
from edgeprompt_vllm.serving.edge_args import edge_command, edge_serve_args, ray_env


def _cloud_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto",
                   help="model dtype, the same on cloud and edge (auto: float32 on CPU, the "
                        "model's half dtype on GPU)")
    p.add_argument("--block-size", type=int, default=32,
                   help="KV block size, the same on cloud and edge (default 32)")


def build_cloud_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", required=True, help="model directory (the edges run the same one)")
    p.add_argument("--prompts", required=True, type=Path,
                   help="the cloud prompt registry: a directory of YAML files (or one file)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join: HOST:PORT, 'auto' (the one on this machine) or "
                        "'local' (start a private one here); default: auto, else start one")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--actor-name", default=DEFAULT_ACTOR_NAME)
    p.add_argument("--resources-cloud", action="store_true",
                   help="place the actor on a node started with the custom resource 'cloud'")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs for the actor (default: 1 where CUDA is available, else 0)")
    _cloud_engine_args(p)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--max-kv-bytes", type=int, default=1 << 30,
                   help="the cloud's store of prefilled KV (LRU; pinned prompts stay)")
    p.add_argument("--load-format", default="auto", help="'dummy' for models without weights")
    p.add_argument("--detach", action="store_true",
                   help="leave the actor running (detached) and exit; needs a running cluster")
    p.add_argument("--no-progress", action="store_true")
    return p


def run_cloud(args: argparse.Namespace) -> int:
    from edgeprompt_vllm.cloud.launch import (
        PromptRefused,
        connect_ray,
        has_cuda,
        resolve_dtype,
        start_cloud,
        stop_cloud,
    )
    from edgeprompt_vllm.cloud.prompt_files import PromptFileError, load_registry

    try:
        specs = load_registry(args.prompts)
    except PromptFileError as e:
        print(f"edgeprompt cloud: error: {e}", file=sys.stderr)
        return 2
    if not (Path(args.model) / "config.json").is_file():
        print(f"edgeprompt cloud: error: {args.model} has no config.json", file=sys.stderr)
        return 2
    import ray

    _sigterm_as_interrupt()
    dtype = resolve_dtype(args.model, args.dtype)
    num_gpus = args.num_gpus if args.num_gpus is not None else (1 if has_cuda() else 0)
    try:
        address, started = connect_ray(args.ray_address, args.namespace)
    except (ConnectionError, RuntimeError) as e:
        print(f"edgeprompt cloud: error: cannot join the Ray cluster {args.ray_address!r}: {e}",
              file=sys.stderr)
        return 2
    if started and args.detach:
        ray.shutdown()
        print("edgeprompt cloud: error: --detach needs a Ray cluster that outlives this command "
              "(`RAY_AUTH_MODE=token ray start --head`, then --ray-address auto)",
              file=sys.stderr)
        return 2
    print(f"[cloud] Ray cluster {address} ({'started here' if started else 'joined'}), "
          f"namespace {args.namespace!r}", flush=True)
    actor = None
    try:
        print(f"[cloud] starting actor {args.actor_name!r}: {args.model} ({dtype}, block size "
              f"{args.block_size})", flush=True)
        actor, fp = start_cloud(
            args.model, specs, name=args.actor_name, namespace=args.namespace,
            resources={"cloud": 1} if args.resources_cloud else None, detached=args.detach,
            num_gpus=num_gpus, dtype=dtype, block_size=args.block_size,
            max_model_len=args.max_model_len, max_kv_bytes=args.max_kv_bytes,
            load_format=args.load_format, progress=not args.no_progress)
        print(f"[cloud] ready: {len(specs)} cloud prompt(s): "
              + ", ".join(f"{s.name} ({s.kind}{', pinned' if s.pinned else ''})" for s in specs))
        config = EdgePromptConfig(ray_address=address, namespace=args.namespace,
                                  actor_name=args.actor_name)
        extra = ["--load-format", args.load_format] if args.load_format != "auto" else []
        env = ray_env()
        print("[cloud] start an edge with:\n  " + edge_command(
            args.model, edge_serve_args(config, dtype=dtype, block_size=args.block_size),
            ["--max-model-len", str(args.max_model_len), *extra], env), flush=True)
        if env:
            print("[cloud] (Ray token authentication: an edge on another machine also needs this "
                  "machine's ~/.ray/auth_token, or RAY_AUTH_TOKEN)", flush=True)
        if args.detach:
            print(f"[cloud] detached; stop it with ray.kill(ray.get_actor({args.actor_name!r}, "
                  f"namespace={args.namespace!r}))")
            actor = None
            return 0
        print("[cloud] serving; Ctrl-C stops it", flush=True)
        while True:
            time.sleep(3600)
    except PromptRefused as e:
        print(f"edgeprompt cloud: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\n[cloud] stopping", flush=True)
        return 0
    finally:
        stop_cloud(actor)


def build_edge_args_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--ray-address", required=True, help="the cloud's Ray cluster, HOST:PORT")
    p.add_argument("--namespace", default=DEFAULT_NAMESPACE)
    p.add_argument("--actor-name", default=DEFAULT_ACTOR_NAME)
    p.add_argument("--on-cloud-unavailable", choices=("recompute", "error"), default="recompute",
                   help="a request naming a cloud prompt while the cloud does not answer: "
                        "recompute it on the edge, or answer 503")
    p.add_argument("--dtype", default="float32", help="the cloud's dtype (it prints it)")
    p.add_argument("--block-size", type=int, default=32)
    p.add_argument("--model", default=None, help="print the whole `vllm serve MODEL ...` command")
    return p


def run_edge_args(args: argparse.Namespace) -> int:
    import shlex

    config = EdgePromptConfig(ray_address=args.ray_address, namespace=args.namespace,
                              actor_name=args.actor_name,
                              on_cloud_unavailable=args.on_cloud_unavailable)
    flags = edge_serve_args(config, dtype=args.dtype, block_size=args.block_size)
    print(edge_command(args.model, flags) if args.model else shlex.join(flags))
    return 0


def _sigterm_as_interrupt() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)
