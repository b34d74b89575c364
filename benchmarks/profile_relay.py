"""Where the time of one offline throughput run goes: JIT compiles, host-side batch building, and
the CUDA kernels of a profiled slice. A diagnostic companion of benchmark_throughput.py.

Runs the paper's workload (shared cloud prompt, ShareGPT edge prompts, ignore_eos) through one
engine --passes times. After each pass it records the pass's throughput, the Triton kernels
compiled so far (files in TRITON_CACHE_DIR) and the relay builders' host time. With
--profile-requests N it then profiles one more batch of N requests with vLLM's torch profiler and
keeps the self-CUDA-time table.

  python benchmarks/profile_relay.py --model DIR --load-format dummy --dtype float16 \\
      --scheme relay --passes 2 --profile-requests 256 --out /tmp/prof
  VLLM_PLUGINS= python benchmarks/profile_relay.py ... --scheme paged-pc    # stock vLLM
"""

import argparse
import json
import os
import shutil
import time
from pathlib import Path

SCHEMES = {  # LLM kwargs; stock schemes need VLLM_PLUGINS= in the environment
    "relay": {"enable_prefix_caching": True, "attention_backend": "CUSTOM"},
    "paged-pc": {"enable_prefix_caching": True},
    "cascade": {"enable_prefix_caching": True, "attention_backend": "FLASH_ATTN",
                "disable_cascade_attn": False},
}


def count_compiled(cache_dir: Path) -> int:
    """Triton kernels compiled into the cache (one .cubin per specialization on CUDA)."""
    return sum(1 for _ in cache_dir.rglob("*.cubin")) if cache_dir.exists() else 0


def relay_stats(llm) -> dict | None:
    from edgeprompt_vllm.attention.stats import relay_stats as worker_stats

    try:
        return llm.collective_rpc(worker_stats)[0]
    except Exception as e:  # noqa: BLE001  stock vLLM without the plugin: no counters
        return {"unavailable": f"{type(e).__name__}: {e}"[:200]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--load-format", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--scheme", choices=sorted(SCHEMES), default="relay")
    p.add_argument("--cloud-len", type=int, default=1024)
    p.add_argument("--edge-len", type=int, default=512)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--passes", type=int, default=2)
    p.add_argument("--profile-requests", type=int, default=0)
    p.add_argument("--profile-output-len", type=int, default=64)
    p.add_argument("--engine-args", default="{}", help="JSON of extra LLM(...) arguments")
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON and the table")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/profile_relay"),
                   help="Triton cache (unless TRITON_CACHE_DIR is set) and raw profiler traces")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc(relay_stats)
    cache_dir = Path(os.environ.setdefault("TRITON_CACHE_DIR", str(args.work_dir / "triton-cache")))
    profile_dir = args.work_dir / "torch-profile"

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from edgeprompt_vllm.bench.workload import make_workload

    tok = AutoTokenizer.from_pretrained(args.model)
    work = make_workload(tok, args.cloud_len, args.edge_len, args.num_requests)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in work.prompts()]
    extra = json.loads(args.engine_args)
    if args.profile_requests:
        extra["profiler_config"] = {"profiler": "torch", "torch_profiler_dir": str(profile_dir),
                                    "torch_profiler_with_stack": False}
    t0 = time.perf_counter()
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, seed=0,
              max_model_len=args.cloud_len + args.edge_len + args.output_len + 16,
              **SCHEMES[args.scheme], **extra)
    report = {"scheme": args.scheme, "startup_s": time.perf_counter() - t0,
              "compiled_after_startup": count_compiled(cache_dir), "passes": []}
    llm.generate([TokensPrompt(prompt_token_ids=work.cloud)], SamplingParams(max_tokens=1), use_tqdm=False)
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for i in range(args.passes):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        report["passes"].append({"pass": i, "elapsed_s": elapsed, "output_tok_per_s": tokens / elapsed,
                                 "compiled": count_compiled(cache_dir), "relay_stats": relay_stats(llm)})
        print(json.dumps(report["passes"][-1]), flush=True)
    if args.profile_requests:
        sp_prof = SamplingParams(temperature=0, max_tokens=args.profile_output_len, ignore_eos=True)
        llm.start_profile()
        t0 = time.perf_counter()
        llm.generate(prompts[: args.profile_requests], sp_prof, use_tqdm=False)
        report["profiled_s"] = time.perf_counter() - t0
        llm.stop_profile()
        table = profile_dir / "profiler_out_0.txt"
        if table.exists():
            shutil.copy(table, args.out / f"profile_{args.scheme}.txt")
    (args.out / f"profile_{args.scheme}.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
