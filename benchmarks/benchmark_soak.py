"""Soak: concurrent streaming OpenAI clients against an EdgePrompt edge (`vllm serve` + plugin)
for a fixed time, on loopback; counts failures and samples the server's memory.

    python benchmarks/benchmark_soak.py --duration 180 --clients 12      # starts cloud + edge
    python benchmarks/benchmark_soak.py --base-url http://127.0.0.1:8000 --server-pid PID ...
    python benchmarks/benchmark_soak.py --baseline ...      # stock vLLM, prompts sent inline

Each client loops until the deadline: a streamed chat (cloud prompt travel-agent), a streamed
completion (lisbon-guide), or a streamed plain completion, with a question drawn from a few.
A request fails if it raises, or its stream ends without a finish_reason or without text. The
distinct answers to each distinct request are kept (greedy: one each, whatever the batch). The RSS
of the server's whole process tree (API server, engine core, worker) is sampled every second.
Writes benchmarks/results/soak/cpu.json (with the CPU model, vLLM version, git commit, command).
tests/reliability/test_soak.py runs run_soak() for a shorter time.
"""

import argparse
import json
import platform
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

WORKLOAD = (("chat", "travel-agent"), ("completion", "lisbon-guide"), ("completion", None))
QUESTIONS = ("Which museum opens first?", "Where do I buy a tram ticket?", "Is the river walk safe?",
             "What should I eat for lunch?", "How far is the castle?", "Any rainy-day tips?")


def tree_rss(pid: int) -> dict[str, int]:
    """Bytes resident in `pid` and each of its descendants, by process name."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {}
    out: dict[str, int] = {}
    for p in procs:
        try:
            out[p.name()] = out.get(p.name(), 0) + p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def kv_cache_usage(base_url: str) -> float:
    """The server's vllm:kv_cache_usage_perc (a fraction, 0 when no request holds a block)."""
    from edgeprompt_vllm.serving.prom import scrape, total

    return total(scrape(base_url, prefix="vllm:kv_cache_usage_perc"), "vllm:kv_cache_usage_perc")


def one_request(client, model: str, kind: str, cloud: str | None, question: str,
                max_tokens: int, inline: dict | None = None) -> dict:
    """`inline` (the stock baseline): {name: text} of the cloud prompts, sent by the client."""
    extra = {"kv_transfer_params": {"cloud_prompt": cloud}} if cloud and inline is None else None
    system = [{"role": "system", "content": inline[cloud]}] if cloud and inline else []
    prefix = inline[cloud] if cloud and inline else ""
    t0 = time.perf_counter()
    first, text, finish = None, "", None
    if kind == "chat":
        stream = client.chat.completions.create(
            model=model, messages=[*system, {"role": "user", "content": question}],
            max_tokens=max_tokens, temperature=0, stream=True, extra_body=extra)
        for chunk in stream:
            for ch in chunk.choices:
                if ch.delta.content:
                    first = first or time.perf_counter()
                    text += ch.delta.content
                finish = ch.finish_reason or finish
    else:
        stream = client.completions.create(model=model, prompt=f"{prefix}\nQuestion: {question}\nAnswer:",
                                           max_tokens=max_tokens, temperature=0, stream=True,
                                           extra_body=extra)
        for chunk in stream:
            for ch in chunk.choices:
                if ch.text:
                    first = first or time.perf_counter()
                    text += ch.text
                finish = ch.finish_reason or finish
    if finish is None or not text:
        raise RuntimeError(f"stream ended without {'finish_reason' if finish is None else 'text'}")
    end = time.perf_counter()
    return {"ttft_s": (first or end) - t0, "latency_s": end - t0, "text": text}


def run_soak(base_url: str, model: str, server_pid: int, duration_s: float = 150.0,
             clients: int = 12, max_tokens: int = 24, seed: int = 0,
             inline: dict | None = None) -> dict:
    """The soak itself, against a running server; -> the results (JSON-ready). `inline`: the
    cloud prompts' texts, sent by the clients (a stock server: the baseline)."""
    import openai

    deadline = time.monotonic() + duration_s
    lock = threading.Lock()
    ok, failures, answers = [], [], {}
    rss = [(0.0, tree_rss(server_pid))]
    t_start = time.monotonic()

    def client_loop(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        client = openai.OpenAI(base_url=base_url + "/v1", api_key="EMPTY", timeout=120,
                               max_retries=0)
        while time.monotonic() < deadline:
            kind, cloud = rng.choice(WORKLOAD)
            question = rng.choice(QUESTIONS)
            try:
                r = one_request(client, model, kind, cloud, question, max_tokens, inline)
            except Exception as e:  # noqa: BLE001 (counted: a soak reports every failure)
                with lock:
                    failures.append(f"{type(e).__name__}: {str(e)[:200]}")
                continue
            with lock:
                ok.append(r)
                answers.setdefault((kind, cloud, question), set()).add(r["text"])

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    kv_usage = []
    while any(t.is_alive() for t in threads):
        time.sleep(1.0)
        rss.append((time.monotonic() - t_start, tree_rss(server_pid)))
        kv_usage.append(kv_cache_usage(base_url))
    wall = time.monotonic() - t_start
    warm_at = next((i for i, (t, _) in enumerate(rss) if t >= 0.2 * wall), len(rss) - 1)
    by_process = {"after_warmup": rss[warm_at][1], "end": rss[-1][1]}
    rss = [(t, sum(b.values())) for t, b in rss]
    warm = [rss[warm_at][1]]
    lat = sorted(r["latency_s"] for r in ok) or [0.0]
    ttft = sorted(r["ttft_s"] for r in ok) or [0.0]
    return {
        "duration_s": round(wall, 1), "clients": clients, "max_tokens": max_tokens,
        "requests": len(ok) + len(failures), "succeeded": len(ok), "failed": len(failures),
        "failures": failures[:20], "requests_per_s": round(len(ok) / wall, 2),
        "latency_s": {"p50": _pct(lat, 50), "p90": _pct(lat, 90), "max": round(lat[-1], 3)},
        "ttft_s": {"p50": _pct(ttft, 50), "p90": _pct(ttft, 90), "max": round(ttft[-1], 3)},
        # greedy answers to the same request under different batch mixes
        "distinct_requests": len(answers),
        "requests_with_one_answer": sum(1 for v in answers.values() if len(v) == 1),
        "answers": [{"kind": k, "cloud_prompt": c, "question": q, "texts": sorted(v)}
                    for (k, c, q), v in sorted(answers.items(), key=str)],
        "kv_cache_usage": {"max": max(kv_usage, default=0.0),
                           "mean": round(sum(kv_usage) / max(1, len(kv_usage)), 4)},
        "rss_mb": {"start": _mb(rss[0][1]), "after_warmup": _mb(warm[0]), "end": _mb(rss[-1][1]),
                   "max": _mb(max(b for _, b in rss)),
                   "growth_after_warmup": _mb(rss[-1][1] - warm[0])},
        "rss_by_process_mb": {k: {n: _mb(b) for n, b in v.items()} for k, v in by_process.items()},
        "rss_samples_mb": [[round(t, 1), _mb(b)] for t, b in rss[:: max(1, len(rss) // 60)]],
    }


def _pct(xs: list[float], q: float) -> float:
    return round(xs[min(len(xs) - 1, int(len(xs) * q / 100))], 3)


def _mb(b: int) -> float:
    return round(b / 2**20, 1)


def environment() -> dict:
    import vllm

    from edgeprompt_vllm.bench.env import cpu_name, source_commit

    cpu = cpu_name()
    commit = source_commit(short=False)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True,
                           check=False, cwd=Path(__file__).parent).stdout.strip()
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "vllm": vllm.__version__,
            "git_commit": commit + ("-dirty" if dirty else ""), "python": platform.python_version(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def start_deployment(model: Path, tmp: Path):
    """`edgeprompt cloud` (private local Ray) + the `vllm serve` edge it prints; -> (cloud, edge)."""
    import re
    import shlex

    from edgeprompt_vllm.serving.server import CPU_ENGINE_ARGS, VllmServer

    log = tmp / "cloud.log"
    with open(log, "wb") as out:
        cloud = subprocess.Popen([str(Path(sys.executable).parent / "edgeprompt"), "cloud",
                                  "--model", str(model), "--prompts", str(_registry()),
                                  "--ray-address", "local", "--namespace", "ep-soak",
                                  "--no-progress"],
                                 stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    deadline = time.monotonic() + 300
    while not (m := re.search(r"^  ((?:\w+=\S+ )*vllm serve .*)$", log.read_text(), re.MULTILINE)):
        if cloud.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"edgeprompt cloud failed:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    words = shlex.split(m.group(1))
    env = dict(w.split("=", 1) for w in words[:words.index("vllm")])
    edge = VllmServer(model, extra_args=(*words[words.index("vllm") + 3:], *CPU_ENGINE_ARGS),
                      env=env, log_path=tmp / "edge.log")
    edge.start()
    return cloud, edge


def start_stock(model: Path, tmp: Path):
    from edgeprompt_vllm.serving.server import CPU_SERVE_ARGS, VllmServer

    server = VllmServer(model, extra_args=(*CPU_SERVE_ARGS, "--block-size", "32"),
                        env={"VLLM_PLUGINS": ""}, log_path=tmp / "stock.log")
    server.start()
    return server


def cloud_texts() -> dict[str, str]:
    """{name: system message or text} of the registry's cloud prompts."""
    from edgeprompt_vllm.cloud.prompt_files import load_registry

    return {s.name: s.content for s in load_registry(_registry())}


def _registry() -> Path:
    from edgeprompt_vllm.cloud.prompt_files import default_registry_dir

    return default_registry_dir()


def main() -> int:
    import signal
    import tempfile

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=180.0, help="seconds of load")
    p.add_argument("--clients", type=int, default=12, help="concurrent streaming clients")
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--base-url", help="a running edge (default: start cloud + edge here)")
    p.add_argument("--server-pid", type=int, help="its `vllm serve` pid (with --base-url)")
    p.add_argument("--model", help="model directory (default: the tiny-llama preset)")
    p.add_argument("--baseline", action="store_true",
                   help="stock `vllm serve` without the plugin, the clients sending the cloud "
                        "prompts themselves (default out: results/soak/cpu_stock.json)")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    results = Path(__file__).parent / "results" / "soak"
    args.out = args.out or results / ("cpu_stock.json" if args.baseline else "cpu.json")
    cloud = edge = inline = None
    try:
        if args.base_url:
            base_url, pid, model = args.base_url, args.server_pid, args.model
        else:
            from edgeprompt_vllm.models.make_model import default_model_dir, make_model

            model = Path(args.model) if args.model else default_model_dir("tiny-llama")
            if not args.model:
                make_model("tiny-llama", model)
            tmp = Path(tempfile.mkdtemp(prefix="ep-soak-"))
            if args.baseline:
                edge, inline = start_stock(model, tmp), cloud_texts()
            else:
                cloud, edge = start_deployment(model, tmp)
            base_url, pid = edge.base_url, edge.proc.pid
        res = run_soak(base_url, str(model), pid, args.duration, args.clients, args.max_tokens,
                       inline=inline)
    finally:
        if edge is not None:
            edge.stop()
        if cloud is not None and cloud.poll() is None:
            cloud.send_signal(signal.SIGINT)
            cloud.wait(timeout=60)
    out = {"environment": environment(), **res}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("rss_samples_mb", "answers")},
                     indent=1))
    print(f"written to {args.out}")
    return 0 if res["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
