"""Command-line options shared by benchmark_throughput.py and benchmark_serving.py."""

import argparse


def add_workload_args(p: argparse.ArgumentParser, schemes: tuple[str, ...], cloud_lens: str,
                      engine: str) -> None:
    """Model, schemes and the paper's workload; `engine` names what --gpu-memory-utilization
    sizes ("engine" offline, "server" interactive)."""
    p.add_argument("--model", help="model directory (edgeprompt-make-model)")
    p.add_argument("--load-format", default="auto", help="'dummy' for config-only presets")
    p.add_argument("--dtype", default="auto",
                   help="auto: fp32 on CPU, the model's half dtype on GPU")
    p.add_argument("--block-size", type=int, help="KV block size (default: 16 on GPU, 32 on CPU)")
    p.add_argument("--schemes", default=",".join(schemes))
    p.add_argument("--cloud-lens", default=cloud_lens, help="comma list of cloud prompt lengths")
    p.add_argument("--edge-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--output-len-from-data", action="store_true",
                   help="each request's output length is its ShareGPT answer's (ignore_eos)")
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--gpu-memory-utilization", type=float,
                   help=f"every scheme's {engine} (GPU; default 0.9 - the cloud's share)")
    p.add_argument("--cloud-gpu-memory-utilization", type=float, default=0.25,
                   help="the cloud actor's engine, on the same GPU (edgeprompt)")
    p.add_argument("--cloud-device", help="edgeprompt on a GPU: run the cloud engine on this CUDA "
                   "device (a second GPU, as on its own machine); the edges then default to "
                   "--gpu-memory-utilization 0.9")
    p.add_argument("--edge-strategy", default="layerwise",
                   help="the edge's transfer strategy (edge/planner.py), or auto")


def resolve_memory(args, gpu: bool) -> None:
    """The same edge memory share for every scheme of a run, decided once: 0.9 (vLLM's default)
    less the cloud engine's share where it runs on the edge's GPU."""
    if gpu and args.gpu_memory_utilization is None:
        shared = args.cloud_device is None
        args.gpu_memory_utilization = round(0.9 - shared * args.cloud_gpu_memory_utilization, 3)
    if not gpu:
        args.cloud_gpu_memory_utilization = args.cloud_device = None


def resolve_defaults(args) -> None:
    """Decided once by the driver, the same for every scheme, recorded in the JSON: the dtype
    (the fingerprint compares it), the block size and the memory shares."""
    from edgeprompt_vllm.bench.env import has_cuda
    from edgeprompt_vllm.cloud.launch import resolve_dtype

    gpu = has_cuda()
    if gpu and args.cloud_device is not None:
        import torch

        check_cloud_device(args.cloud_device, torch.cuda.device_count())
    args.dtype = resolve_dtype(args.model, args.dtype)
    args.block_size = args.block_size or (16 if gpu else 32)
    resolve_memory(args, gpu)


def check_cloud_device(cloud_device: str, num_gpus: int) -> None:
    """--cloud-device must name another GPU than the edges' (device 0), one this machine has."""
    if not str(cloud_device).isdigit() or not 0 < int(cloud_device) < num_gpus:
        raise SystemExit(f"--cloud-device {cloud_device}: name a second GPU (this machine has "
                         f"{num_gpus} CUDA device(s); the edges run on device 0); without "
                         "--cloud-device the cloud engine shares the edges' GPU")


SPARE_TOKENS = 16


def needed_len(args, cloud_len: int, max_out: int) -> int:
    """The engine length a cloud prompt's requests need: cloud + edge + output, plus spare."""
    return cloud_len + args.edge_len + max_out + SPARE_TOKENS
