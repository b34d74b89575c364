"""Interactive serving of every scheme under Poisson arrivals (paper §3.3).

For each scheme a real `vllm serve` process is started (serving/server.py VllmServer); for
edgeprompt also the real CloudPromptService Ray actor (a private local Ray cluster in this
process) with one registered, prefilled cloud prompt per --cloud-lens length. Requests are
streamed /v1/completions with token-id prompts through the `openai` async client
(edgeprompt_vllm/bench/load.py): Poisson arrivals at each rate of --rates, --num-prompts fresh
requests per rate. The prompt is a ShareGPT V3 cloud prompt of --cloud-lens tokens (512 and 1024)
+ a private edge prompt of --edge-len (512) tokens; --output-len (128) tokens, ignore_eos.
Stock schemes get the whole prompt; edgeprompt gets only the edge prompt plus
kv_transfer_params={"cloud_prompt": NAME}, as its users send it (the middleware prepends the
cloud prompt's tokens, the connector loads its KV).

Schemes (as benchmark_throughput.py): paged (stock, no prefix caching), paged-pc (stock +
prefix caching), cascade (vLLM 0.26 GPU only, else 'n/a'), relay (relay backend, cloud prompt
prefilled on the edge), edgeprompt (cloud actor + connector + relay + middleware). On a GPU
the cloud engine shares the GPU (--cloud-gpu-memory-utilization) and every scheme's server gets
--gpu-memory-utilization (default 0.9 minus the cloud's share), so all have the same KV cache;
with --cloud-device 1 (two GPUs) the cloud engine runs on the second GPU and every server
keeps 0.9.

Per scheme and cloud prompt length, before the rates: one request puts the cloud prompt on the
server (prefill, or the cloud transfer), then bursts of 2, 4, ... --warmup-requests at once
(Triton JIT for every batch size class).
Measured per rate: output tok/s, TTFT, TPOT, ITL and end-to-end latency (mean, p50, p99),
failures. "Sustainable rate": the highest rate whose p99 TPOT is within --tpot-slo-ms with no
failure (every lower rate passing too), and where p99 TPOT crosses the SLO (interpolated); the
issue's target reads edgeprompt / paged-pc of it (>= 1.4x). The same is reported for a sweep of
SLOs (SLO_SWEEP_MS: "at the same p99 TPOT", whichever a deployment picks), as a table and as the
plot's last panel (sustainable rate vs SLO, with 1.4x paged-pc's drawn).

Output: tables on stdout, a JSON (device, versions, commit, command, workload; rewritten after
every rate) and a PNG (throughput, p99 TPOT, p99 TTFT, p50 ITL vs rate, per cloud prompt).
--profile-rate R: after the rates, one more pass of --profile-prompts requests at R under vLLM's
torch profiler (bench/profile.py; a row of its own, not in the sweep), whose table of kernels
by device time says where a serving step's time goes; traces stay in --log-dir.

How to run:
  # GPU (vLLM 0.26, H100), Llama-2-7b shape with dummy weights; a subset per command is fine
  python benchmarks/benchmark_serving.py --model models/llama-2-7b --load-format dummy \\
      --dtype float16 --schemes paged-pc,edgeprompt --out benchmarks/results/serving/h100_a.json
  # merge runs and re-read them at another SLO
  python benchmarks/benchmark_serving.py --plot-only a.json b.json --tpot-slo-ms 60 --out all.json
  # CPU smoke (CI): tiny model, two low rates, a few requests
  python benchmarks/benchmark_serving.py --cpu-smoke --out /tmp/serving/cpu_smoke.json
"""

import argparse
import asyncio
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from edgeprompt_vllm.bench import profile
from edgeprompt_vllm.bench.cli import SPARE_TOKENS, add_workload_args, needed_len, resolve_defaults

SCHEMES = ("paged", "paged-pc", "cascade", "relay", "edgeprompt")
# --cpu-smoke: the tiny model, fp32, eager, a 1 GiB KV cache, block 32, small counts; the SLO is
# loose (CPU latencies say nothing about the GPU's)
CPU_SMOKE = {"dtype": "float32", "block_size": 32, "cloud_lens": "64", "edge_len": 64,
             "output_len": 16, "rates": "2,8", "num_prompts": 8, "warmup_requests": 4,
             "tpot_slo_ms": 500.0}
CPU_ENGINE = f"--enforce-eager --kv-cache-memory-bytes {1 << 30} --max-num-seqs 16"


def scheme_serve(scheme: str) -> tuple[dict, list[str]]:
    """(environment, `vllm serve` flags) of a scheme; edgeprompt's connector flags come later."""
    stock = {"VLLM_PLUGINS": ""}  # load no plugin: stock vLLM
    if scheme == "paged":
        return stock, ["--no-enable-prefix-caching"]
    if scheme == "paged-pc":
        return stock, ["--enable-prefix-caching"]
    if scheme == "cascade":
        return {**stock, "VLLM_USE_V2_MODEL_RUNNER": "0"}, [
            "--enable-prefix-caching", "--attention-backend", "FLASH_ATTN",
            "--no-disable-cascade-attn"]
    if scheme == "relay":
        return {}, ["--enable-prefix-caching", "--attention-backend", "CUSTOM"]
    if scheme == "edgeprompt":
        return {}, ["--enable-prefix-caching"]  # + edge_serve_args (relay backend, middleware)
    raise ValueError(f"unknown scheme {scheme!r}; known: {', '.join(SCHEMES)}")


def common_args(args, max_model_len: int) -> list[str]:
    out = ["--dtype", args.dtype, "--block-size", str(args.block_size), "--max-model-len",
           str(max_model_len), "--load-format", args.load_format, "--seed", "0",
           "--disable-uvicorn-access-log"]
    if args.gpu_memory_utilization:
        out += ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
    return out + shlex.split(args.vllm_args)


def warmup_bursts(limit: int) -> list[int]:
    """Warm-up bursts of 2, 4, 8, ... requests at once, up to `limit`: batches of every size
    class compile their kernels before the first rate (a lone burst of `limit` left small
    batches to compile during the lowest rate)."""
    sizes, n = [], 2
    while n < limit:
        sizes.append(n)
        n *= 2
    return sizes + [limit] if limit > 0 else sizes


def cloud_id(cloud_len: int) -> str:
    return f"bench-{cloud_len}"


class Run:
    """One scheme's server (and cloud): warm-up, then every rate of every cloud prompt length."""

    def __init__(self, args, scheme: str, works: dict, report: dict):
        self.args, self.scheme, self.works, self.report = args, scheme, works, report

    def row(self, cloud_len, rate, **kw) -> dict:
        r = {"scheme": self.scheme, "cloud_len": cloud_len, "rate": rate, **kw}
        self.report["results"].append(r)
        write_outputs(self.report, self.args.out)
        return r

    def requests(self, cloud_len: int, start: int, count: int):
        """-> (prompts, max_tokens, extra_body) of requests start..start+count."""
        part = self.works[cloud_len].part(start, count)
        lens = part.output_lens or [self.args.output_len] * count
        if self.scheme == "edgeprompt":
            return part.edges, lens, {"kv_transfer_params": {"cloud_prompt": cloud_id(cloud_len)}}
        return part.prompts(), lens, None

    def load(self, server, cloud_len, start, count, rate, desc):
        from edgeprompt_vllm.bench.load import run_load

        prompts, lens, extra = self.requests(cloud_len, start, count)
        return asyncio.run(run_load(server.base_url, server.model, prompts, lens, rate, extra,
                                    seed=int(start), progress=not self.args.quiet, desc=desc))

    def run(self) -> None:
        from edgeprompt_vllm.bench.load import summarize
        from edgeprompt_vllm.serving.server import VllmServer

        args, lens = self.args, sorted(self.works)
        max_len = needed_len(args, max(lens), max(args.max_output_len if args.output_len_from_data
                                                  else args.output_len, 1))
        env, flags = scheme_serve(self.scheme)
        cloud = server = None
        info = {"scheme": self.scheme}
        try:
            if self.scheme == "edgeprompt":
                from edgeprompt_vllm.bench.cloud import start_bench_cloud
                from edgeprompt_vllm.serving.edge_args import edge_serve_args

                cloud = start_bench_cloud(
                    args.model, {cloud_id(cl): self.works[cl].cloud for cl in lens},
                    dtype=args.dtype, block_size=args.block_size,
                    max_model_len=max(lens) + SPARE_TOKENS, load_format=args.load_format,
                    gpu_memory_utilization=args.cloud_gpu_memory_utilization or 0.25,
                    cloud_device=args.cloud_device)
                info["cloud_prefill_s"] = cloud.prefill_s
                cfg = cloud.kv_transfer_config(args.edge_strategy)["kv_connector_extra_config"]
                flags = flags + edge_serve_args(cfg, dtype=args.dtype, block_size=args.block_size)
                env = {**env, "RAY_AUTH_MODE": "token"}
            if args.profile_rate:
                flags = flags + profile.server_flags(self.profile_dir())
            t0 = time.perf_counter()
            server = VllmServer(args.model, extra_args=(*common_args(args, max_len), *flags),
                                env=env, log_path=args.log_dir / f"{self.scheme}.log",
                                startup_timeout_s=args.startup_timeout_s)
            info["command"] = shlex.join(server.cmd)
            print(f"== {self.scheme}: {info['command']}", flush=True)
            server.start()
            info["startup_s"] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 (a scheme that cannot start is an error row)
            tail = server.log_tail(15) if server else ""
            print(f"   {self.scheme} failed to start: {type(e).__name__}: {e}"[:2000], flush=True)
            for cl in lens:
                self.row(cl, None, error=f"start failed: {type(e).__name__}: {str(e)[:300]}",
                         log_tail=tail)
            self.stop(server, cloud)
            return
        bursts = warmup_bursts(args.warmup_requests)
        w = 1 + sum(bursts)  # the first request and the bursts come before the rates' requests
        try:
            for cl in lens:
                t0 = time.perf_counter()
                desc = f"{self.scheme} cloud {cl}"
                first, _ = self.load(server, cl, 0, 1, float("inf"), f"{desc} first")
                start, warmed = 1, list(first)
                for size in bursts:
                    burst, _ = self.load(server, cl, start, size, float("inf"),
                                         f"{desc} warm-up x{size}")
                    start, warmed = start + size, warmed + burst
                warm = {"first_ttft_s": first[0].ttft_s, "s": time.perf_counter() - t0,
                        "failed": sum(not r.ok for r in warmed)}
                for k, rate in enumerate(args.rates):
                    results, dur = self.load(server, cl, w + k * args.num_prompts,
                                             args.num_prompts, rate, f"{desc} rate {rate:g}")
                    m = summarize(results, dur)
                    self.row(cl, rate, metrics=m, warmup=warm if k == 0 else None)
                    print(f"   cloud {cl} rate {rate:g}: {m['output_tok_per_s']:.1f} tok/s, "
                          f"p99 TPOT {_f(m['tpot_ms']['p99'])} ms, "
                          f"p99 TTFT {_f(m['ttft_ms']['p99'])} ms, failed {m['failed']}",
                          flush=True)
                if args.profile_rate:
                    self.profile_pass(server, cl, w + len(args.rates) * args.num_prompts, desc)
            info["server_metrics"] = _metrics(server.base_url)
            if cloud is not None:
                info["cloud_stats"] = cloud.stats()
        except Exception as e:  # noqa: BLE001 (a broken server: an error row, then the next scheme)
            tail = server.log_tail(15)
            print(f"   {self.scheme} failed: {type(e).__name__}: {e}\n{tail}", flush=True)
            self.row(None, None, error=f"{type(e).__name__}: {str(e)[:300]}", log_tail=tail)
        finally:
            self.report["servers"].append(info)
            self.stop(server, cloud)

    def profile_dir(self) -> Path:
        d = self.args.log_dir / f"profile-{self.scheme}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def profile_pass(self, server, cloud_len: int, start: int, desc: str) -> None:
        """--profile-rate: one more pass under the torch profiler; a row of its own (status, not
        metrics: the profiler's overhead keeps it out of the sweep)."""
        from edgeprompt_vllm.bench.load import summarize

        rate, n = self.args.profile_rate, self.args.profile_prompts
        out = profile.profiled(server.base_url, self.profile_dir(), lambda: self.load(
            server, cloud_len, start, n, rate, f"{desc} profiled rate {rate:g}"))
        results, dur = out.pop("result")
        out["metrics_under_profiler"] = summarize(results, dur)
        self.row(cloud_len, rate, status=f"profiled pass, {n} requests (not in the sweep): "
                                         f"{Path(out['file']).name}", profile=out)
        print("\n".join(["   profile, " + desc] + ["   " + x for x in out["table"][:15]]), flush=True)

    @staticmethod
    def stop(server, cloud) -> None:
        if server is not None:
            server.stop()
        if cloud is not None:
            cloud.stop()


def _f(x) -> str:
    return "-" if x is None else f"{x:.1f}"


def _ci(interval) -> str:
    """ " [lo-hi]" of a 95% interval, or nothing (older reports have none)."""
    return "" if not interval else f" [{interval[0]:.1f}-{interval[1]:.1f}]"


def _metrics(base_url: str) -> dict:
    """EdgePrompt's counters and vLLM's prefix cache counters from /metrics (totals)."""
    from edgeprompt_vllm.serving.prom import scrape

    out: dict = {}
    for prefix in ("edgeprompt_", "vllm:prefix_cache"):
        try:
            for name, _, value in scrape(base_url, prefix):
                if name.endswith("_total"):
                    out[name] = out.get(name, 0.0) + value
        except Exception as e:  # noqa: BLE001 (counters are extras)
            out[f"{prefix}error"] = str(e)[:200]
    return out


# ---------------- sustainable rate, tables, files ----------------
SLO_SWEEP_MS = (10.0, 15.0, 20.0, 25.0, 30.0, 40.0, 50.0)  # p99 TPOT SLOs of the sweep table


def sustainable(report: dict, slo_ms: float) -> list[dict]:
    from edgeprompt_vllm.bench.load import sustainable_rate

    rows = [r for r in report["results"] if "metrics" in r]
    out = []
    for cl in sorted({r["cloud_len"] for r in rows}):
        base = None
        for s in dict.fromkeys(r["scheme"] for r in rows):
            pts = [{"rate": r["rate"], **{k: r["metrics"][k] for k in ("tpot_ms", "failed")}}
                   for r in rows if r["scheme"] == s and r["cloud_len"] == cl]
            sr = {"scheme": s, "cloud_len": cl, **sustainable_rate(pts, slo_ms)}
            if s == "paged-pc":
                base = sr
            out.append(sr)
        for sr in out:
            if sr["cloud_len"] == cl and base and base["interpolated"] > 0:
                sr["vs_paged_pc"] = sr["interpolated"] / base["interpolated"]
    return out


def sustainable_by_slo(report: dict) -> list[dict]:
    """`sustainable` at every SLO of the sweep and the run's own, one row per (SLO, scheme,
    cloud prompt)."""
    slos = sorted(set(SLO_SWEEP_MS) | {float(report["workload"]["tpot_slo_ms"])})
    return [row for slo in slos for row in sustainable(report, slo)]


def slo_sweep_table(report: dict) -> list[str]:
    """Rows: scheme and cloud prompt; columns: SLO; cells: interpolated sustainable rate (req/s,
    '>=' where every rate passed) and its ratio to paged-pc's."""
    sweep = report.get("sustainable_by_slo") or []
    slos = sorted({s["slo_p99_tpot_ms"] for s in sweep})
    if not slos:
        return []
    lines = ["", "sustainable rate (req/s, interpolated) by p99 TPOT SLO; (x): vs paged-pc", "",
             "| scheme | cloud | " + " | ".join(f"{v:g} ms" for v in slos) + " |",
             "|---" * (2 + len(slos)) + "|"]
    for key in dict.fromkeys((s["scheme"], s["cloud_len"]) for s in sweep):
        cells = []
        for slo in slos:
            s = next(x for x in sweep if (x["scheme"], x["cloud_len"]) == key
                     and x["slo_p99_tpot_ms"] == slo)
            ratio = f" ({s['vs_paged_pc']:.2f}x)" if s.get("vs_paged_pc") is not None else ""
            cells.append(f"{'>=' if s['censored'] else ''}{s['interpolated']:.1f}{ratio}")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    return lines


def tables(report: dict) -> str:
    head = "| scheme | cloud | rate | out tok/s | TTFT p50/p99 ms | TPOT p50/p99 [95% CI] ms"
    lines = [head + " | ITL p50/p99 ms | failed |", "|---" * 8 + "|"]
    for r in report["results"]:
        if "metrics" not in r:
            lines.append(f"| {r['scheme']} | {r['cloud_len']} | {r['rate']} | "
                         f"{r.get('status') or r.get('error')} | | | | |")
            continue
        m = r["metrics"]
        lat = " | ".join(f"{_f(m[k]['p50'])} / {_f(m[k]['p99'])}{_ci(m[k].get('p99_ci95'))}"
                         for k in ("ttft_ms", "tpot_ms", "itl_ms"))
        lines.append(f"| {r['scheme']} | {r['cloud_len']} | {r['rate']:g} | "
                     f"{m['output_tok_per_s']:.1f} | {lat} | {m['failed']} |")
    slo = report["workload"]["tpot_slo_ms"]
    title = f"sustainable rate at p99 TPOT <= {slo:g} ms (req/s; '>=': every rate passed):"
    head = "| scheme | cloud | highest passing rate | interpolated | vs paged-pc |"
    lines += ["", title, "", head, "|---" * 5 + "|"]
    for s in report.get("sustainable", []):
        ratio = f"{s['vs_paged_pc']:.2f}x" if s.get("vs_paged_pc") is not None else ""
        at_least = ">=" if s["censored"] else ""
        lines.append(f"| {s['scheme']} | {s['cloud_len']} | {at_least}{s['rate']:g} | "
                     f"{s['interpolated']:.2f} | {ratio} |")
    return "\n".join(lines + slo_sweep_table(report))


def write_outputs(report: dict, out: Path) -> None:
    from edgeprompt_vllm.bench.plots import plot_serving

    report["sustainable"] = sustainable(report, report["workload"]["tpot_slo_ms"])
    report["sustainable_by_slo"] = sustainable_by_slo(report)
    out.write_text(json.dumps(report, indent=2))
    if any("metrics" in r for r in report["results"]):
        plot_serving(report, out.with_suffix(".png"))


def plot_only(paths: list[Path], out: Path, slo_ms: float | None) -> int:
    reports = [json.loads(p.read_text()) for p in paths]
    report = dict(reports[0], results=[r for rep in reports for r in rep["results"]],
                  servers=[s for rep in reports for s in rep.get("servers", [])])
    if len(reports) > 1:
        report["merged_from"] = [str(p) for p in paths]
    if slo_ms is not None:
        report["workload"] = dict(report["workload"], tpot_slo_ms=slo_ms)
    write_outputs(report, out)
    print(tables(report))
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_args(p, SCHEMES, cloud_lens="512,1024", engine="server")
    p.add_argument("--rates", default="4,8,12,16,20,24,28,32,40,48",
                   help="requests/s, comma list; 'inf': all at once")
    p.add_argument("--num-prompts", type=int, default=200, help="requests per rate")
    p.add_argument("--warmup-requests", type=int, default=32)
    p.add_argument("--tpot-slo-ms", type=float, default=50.0,
                   help="p99 TPOT for the sustainable rate")
    p.add_argument("--vllm-args", default="", help="extra `vllm serve` flags, one string")
    p.add_argument("--profile-rate", type=float,
                   help="after the rates, one more pass at this rate under vLLM's torch profiler "
                        "(not in the sweep); the head of its kernel table goes into the JSON")
    p.add_argument("--profile-prompts", type=int, default=64, help="requests of that pass")
    p.add_argument("--startup-timeout-s", type=float, default=600)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serving/serving.json"))
    p.add_argument("--plot-only", type=Path, nargs="+", metavar="JSON",
                   help="redraw the PNG and tables from these result files (merged into --out)")
    p.add_argument("--log-dir", type=Path, help="server logs (default: a new temporary folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, small counts (CI)")
    args = p.parse_args(argv)
    if args.cpu_smoke:  # small defaults; options given on the command line still win
        from edgeprompt_vllm.models.make_model import default_model_dir, make_model

        p.set_defaults(**CPU_SMOKE)
        args = p.parse_args(argv)
        args.vllm_args = f"{CPU_ENGINE} {args.vllm_args}"
        if not args.model:
            args.model = str(default_model_dir("tiny-llama"))
            make_model("tiny-llama", args.model)
    args.rates = [float(x) for x in args.rates.split(",")]
    if not args.model and not args.plot_only:
        p.error("--model is required (or --cpu-smoke, or --plot-only)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot_only:
        return plot_only(args.plot_only, args.out,
                         args.tpot_slo_ms if "--tpot-slo-ms" in (argv or sys.argv) else None)
    # Ray reads RAY_AUTH_MODE when it is imported: the cloud's cluster uses token authentication
    # and the edge joins it by address (serving/edge_args.ray_env).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    from transformers import AutoTokenizer

    from edgeprompt_vllm.bench.env import cascade_unavailable, environment
    from edgeprompt_vllm.bench.workload import describe_workload, make_workload

    resolve_defaults(args)
    schemes = args.schemes.split(",")
    for s in schemes:
        scheme_serve(s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="edgeprompt-serving-"))
    args.log_dir.mkdir(parents=True, exist_ok=True)
    print(f"server logs: {args.log_dir}", flush=True)
    lens = [int(x) for x in args.cloud_lens.split(",")]
    tok = AutoTokenizer.from_pretrained(args.model)
    total = 1 + sum(warmup_bursts(args.warmup_requests)) + args.num_prompts * len(args.rates) \
        + (args.profile_prompts if args.profile_rate else 0)
    works = {cl: make_workload(tok, cl, args.edge_len, total,
                               None if args.output_len_from_data else args.output_len,
                               args.max_output_len) for cl in lens}
    workload = {k: getattr(args, k) for k in (
        "edge_len", "output_len", "output_len_from_data", "max_output_len", "rates", "num_prompts",
        "warmup_requests", "tpot_slo_ms", "load_format", "dtype", "block_size",
        "gpu_memory_utilization", "cloud_gpu_memory_utilization", "cloud_device", "edge_strategy",
        "vllm_args", "profile_rate", "profile_prompts")}
    workload.update(describe_workload(works[lens[0]], args.output_len, args.max_output_len),
                    cloud_lens=lens, schemes=schemes, model=args.model,
                    client="openai AsyncOpenAI, streamed /v1/completions with token-id prompts, "
                           "Poisson arrivals; every rate gets fresh edge prompts")
    report = {"environment": environment(argv if argv is not None else sys.argv),
              "workload": workload, "results": [], "servers": []}
    print(f"ShareGPT V3: {workload['sharegpt_complete_records']} complete records; output "
          f"lengths: {workload['output_lens']}", flush=True)
    na = cascade_unavailable() if "cascade" in schemes else None
    for s in schemes:
        if s == "cascade" and na:
            for cl in lens:
                report["results"].append({"scheme": s, "cloud_len": cl, "rate": None, "status": na})
            continue
        Run(args, s, works, report).run()
    report["environment"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    write_outputs(report, args.out)
    print("\n" + tables(report))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.png')}")
    return 1 if any("error" in r for r in report["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
