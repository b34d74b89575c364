"""Offline throughput of every scheme on the paper's workload (paper §3.2).

One shared cloud prompt of --cloud-len tokens, --num-requests edge prompts of --edge-len tokens
(ShareGPT V3 text), --output-len tokens each (ignore_eos), all submitted to `LLM.generate`.
Each scheme runs in its own process, one after the other:

  paged      stock vLLM (no EdgePrompt plugin), no prefix caching
  paged-pc   stock vLLM with prefix caching (the strong baseline)
  cascade    stock vLLM's cascade attention (vLLM 0.26 GPU only: V1 runner, FLASH_ATTN)
  relay      EdgePrompt relay attention, the cloud prompt prefilled locally (RelayAttention mode)

Every scheme first prefills the cloud prompt alone (one request, 1 token), then times the batch.
Output: a table on stdout and a JSON file with the device, versions, commit and command.

  python benchmarks/benchmark_throughput.py --model DIR --load-format dummy --out results.json
  python benchmarks/benchmark_throughput.py --cpu-smoke --out /tmp/t.json     # tiny model, CI
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SCHEMES = ("paged", "paged-pc", "cascade", "relay")


def scheme_settings(scheme: str) -> tuple[dict, dict]:
    """(environment, LLM kwargs) of a scheme."""
    stock = {"VLLM_PLUGINS": ""}  # load no plugin: stock vLLM
    if scheme == "paged":
        return stock, {"enable_prefix_caching": False}
    if scheme == "paged-pc":
        return stock, {"enable_prefix_caching": True}
    if scheme == "cascade":
        return {**stock, "VLLM_USE_V2_MODEL_RUNNER": "0"}, {
            "enable_prefix_caching": True, "attention_backend": "FLASH_ATTN", "disable_cascade_attn": False}
    if scheme == "relay":
        return {}, {"enable_prefix_caching": True, "attention_backend": "CUSTOM"}
    raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def run_worker(args) -> dict:
    """One scheme in this process: build the workload, start the engine, time the batch."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from edgeprompt_vllm.bench.workload import make_workload

    _, llm_kwargs = scheme_settings(args.scheme)
    tok = AutoTokenizer.from_pretrained(args.model)
    work = make_workload(tok, args.cloud_len, args.edge_len, args.num_requests)
    llm = LLM(args.model, load_format=args.load_format, dtype=args.dtype, seed=0,
              max_model_len=args.cloud_len + args.edge_len + args.output_len + 16,
              **json.loads(args.engine_args), **llm_kwargs)
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=work.cloud)], SamplingParams(max_tokens=1), use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in work.prompts()], sp)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = None
    if args.scheme == "relay":
        from edgeprompt_vllm.attention.stats import relay_stats

        stats = llm.collective_rpc(relay_stats)[0]
    return {"scheme": args.scheme, "cloud_len": args.cloud_len, "elapsed_s": elapsed,
            "output_tokens": out_tokens, "output_tok_per_s": out_tokens / elapsed,
            "requests_per_s": len(outs) / elapsed, "relay_stats": stats}


def environment() -> dict:
    import torch
    import vllm

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"device": device, "vllm": vllm.__version__, "torch": torch.__version__, "commit": commit,
            "command": " ".join(sys.argv)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model directory (edgeprompt-make-model)")
    p.add_argument("--load-format", default="auto", help="'dummy' for config-only presets")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--schemes", default="paged,paged-pc,relay")
    p.add_argument("--cloud-lens", default="1024", help="comma list of cloud prompt lengths")
    p.add_argument("--edge-len", type=int, default=512)
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--engine-args", default="{}", help="JSON of extra LLM(...) arguments")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/throughput.json"))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, small counts (CI)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scheme", help=argparse.SUPPRESS)
    p.add_argument("--cloud-len", type=int, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cpu_smoke:
        from edgeprompt_vllm.models.make_model import default_model_dir, make_model

        args.model = args.model or str(make_model("tiny-llama", default_model_dir("tiny-llama")) and
                                       default_model_dir("tiny-llama"))
        args.dtype, args.cloud_lens, args.edge_len = "float32", "96", 40
        args.num_requests, args.output_len = 8, 8
        args.engine_args = json.dumps({"enforce_eager": True, "block_size": 32,
                                       "kv_cache_memory_bytes": 1 << 30, "max_num_seqs": 8})
    if not args.model:
        p.error("--model is required (or --cpu-smoke)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        args.result.write_text(json.dumps(run_worker(args)))
        return 0
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for cloud_len in [int(x) for x in args.cloud_lens.split(",")]:
        for scheme in args.schemes.split(","):
            env, _ = scheme_settings(scheme)
            result = args.out.with_suffix(f".{scheme}.{cloud_len}.part")
            cmd = [sys.executable, __file__, "--worker", "--scheme", scheme, "--cloud-len", str(cloud_len),
                   "--result", str(result), "--model", args.model, "--load-format", args.load_format,
                   "--dtype", args.dtype, "--edge-len", str(args.edge_len), "--num-requests",
                   str(args.num_requests), "--output-len", str(args.output_len), "--engine-args", args.engine_args]
            print(f"== {scheme}, cloud prompt {cloud_len} ...", flush=True)
            proc = subprocess.run(cmd, env={**os.environ, **env, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"})
            if proc.returncode != 0:
                rows.append({"scheme": scheme, "cloud_len": cloud_len, "error": f"exit {proc.returncode}"})
                continue
            rows.append(json.loads(result.read_text()))
            result.unlink()
            print(f"   {rows[-1]['output_tok_per_s']:.0f} output tok/s", flush=True)
    report = {"environment": environment(), "workload": {k: getattr(args, k) for k in (
        "edge_len", "num_requests", "output_len", "load_format", "dtype")}, "results": rows}
    args.out.write_text(json.dumps(report, indent=2))
    print("\n| scheme | cloud prompt | output tok/s | requests/s |\n|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['scheme']} | {r['cloud_len']} | {r['error']} | |")
        else:
            print(f"| {r['scheme']} | {r['cloud_len']} | {r['output_tok_per_s']:.0f} | {r['requests_per_s']:.2f} |")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
