"""The benchmark scripts' CPU modes, end to end, so that they never rot: every scheme that exists
on CPU (cascade is reported as n/a there; the serving smoke leaves out "paged", for CI time),
real engines, real `vllm serve` processes and the real cloud actor for edgeprompt; the JSON and
PNG must come out with sane numbers.

Each script runs as a child process (vLLM starts its own processes and keeps global state).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CPU_SCHEMES = {"paged", "paged-pc", "relay", "edgeprompt"}
SERVING_SCHEMES = CPU_SCHEMES - {"paged"}  # the serving smoke's `vllm serve` schemes


def run_script(name: str, out: Path, *args: str, timeout: float) -> tuple[dict, str]:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / name),
            "--cpu-smoke",
            "--quiet",
            "--out",
            str(out),
            *args,
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"{name} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert out.with_suffix(".png").stat().st_size > 10_000  # a real plot
    return json.loads(out.read_text()), proc.stdout


def check_environment(report: dict) -> None:
    env = report["environment"]
    assert env["device"].startswith("CPU") and env["vllm"] and env["commit"]
    assert "--cpu-smoke" in env["command"]
    w = report["workload"]
    assert w["sharegpt_complete_records"] > 10_000 and w["sharegpt_file_truncated"]


def test_throughput_cpu_smoke(tmp_path, tiny_model):
    out = tmp_path / "throughput.json"
    # two short cloud prompts (CI time): the second runs in the same engine after a cache reset
    report, stdout = run_script(
        "benchmark_throughput.py",
        out,
        "--model",
        str(tiny_model),
        "--cloud-lens",
        "64,96,4096",  # 4096 + edge exceeds the tiny model's 4096-token context: a status row
        "--max-model-len",
        "400",  # forwarded to every worker's engine (one compile cache entry across runs)
        timeout=600,
    )
    check_environment(report)
    assert report["workload"]["max_model_len"] == 400
    rows = report["results"]
    past_context = [r for r in rows if r["cloud_len"] == 4096]
    assert {r["scheme"] for r in past_context} == CPU_SCHEMES | {"cascade"}
    assert all(r["status"].startswith("n/a: needs 4192 tokens of context") for r in past_context)
    rows = [r for r in rows if r["cloud_len"] != 4096]
    assert not [r for r in rows if "error" in r]
    for i, cl in enumerate(report["workload"]["cloud_lens"]):
        got = {r["scheme"]: r for r in rows if r["cloud_len"] == cl}
        assert set(got) == CPU_SCHEMES | {"cascade"}
        assert got["cascade"]["status"] == "n/a (CPU)"
        for s in CPU_SCHEMES:
            r = got[s]
            assert len(r["passes"]) == report["workload"]["passes"] >= 2
            assert all(
                p["output_tok_per_s"] > 0 and p["requests"] == report["workload"]["num_requests"]
                for p in r["passes"]
            )
            assert r["output_tok_per_s"] == r["passes"][-1]["output_tok_per_s"]
            assert r["engine_reused"] == (i > 0)
        # the relay backend relayed, and EdgePrompt loaded the cloud prompt from the cloud actor
        # (also the second one: the reset emptied the prefix cache, as a fresh engine's)
        assert got["relay"]["passes"][-1]["relay"]["relay_batches"] > 0
        assert got["relay"]["passes"][-1]["new_kernel_variants"] == []  # CPU: torch, no Triton
        assert got["edgeprompt"]["warmup_edgeprompt"]["status"] == "loaded"
        assert got["edgeprompt"]["warmup_edgeprompt"]["cloud_tokens"] == cl
        assert got["edgeprompt"]["cloud_stats"]["prefills"] == 2  # both registered at start
        assert got["edgeprompt"]["passes"][-1]["edgeprompt_status"] == {
            "cached": report["workload"]["num_requests"]
        }
    assert "| edgeprompt |" in stdout
    # --plot-only redraws from the JSON
    again = tmp_path / "again.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "benchmark_throughput.py"),
            "--plot-only",
            str(out),
            "--out",
            str(again),
        ],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert again.with_suffix(".png").exists() and "| paged-pc |" in proc.stdout


def test_serving_cpu_smoke(tmp_path, tiny_model):
    out = tmp_path / "serving.json"
    report, stdout = run_script(
        # (CI time: one rate, and no "paged" server: stock vLLM without prefix caching runs
        # end to end in test_throughput_cpu_smoke; here paged-pc is the stock server)
        "benchmark_serving.py", out, "--model", str(tiny_model), "--rates", "8",
        "--schemes", "paged-pc,cascade,relay,edgeprompt",
        "--profile-rate", "8", "--profile-prompts", "4", timeout=600
    )
    check_environment(report)
    rows = report["results"]
    assert not [r for r in rows if "error" in r]
    # one profiled pass per scheme, after the sweep and kept out of it: vLLM's op table
    profiled = {r["scheme"]: r for r in rows if "profile" in r}
    assert set(profiled) == SERVING_SCHEMES
    for r in profiled.values():
        assert r["rate"] == 8 and r["status"].startswith("profiled pass, 4 requests")
        assert r["profile"]["metrics_under_profiler"]["completed"] == 4
        assert any("Name" in line for line in r["profile"]["table"][:3])
        assert any("attention" in line for line in r["profile"]["table"])  # the model's ops
    rows = [r for r in rows if "profile" not in r]
    rates = report["workload"]["rates"]
    assert {r["scheme"] for r in rows} == SERVING_SCHEMES | {"cascade"}
    for r in rows:
        if r["scheme"] == "cascade":
            assert r["status"] == "n/a (CPU)"
            continue
        m = r["metrics"]
        assert m["failed"] == 0 and m["completed"] == report["workload"]["num_prompts"]
        assert m["output_tok_per_s"] > 0
        assert m["output_tokens"] == m["completed"] * report["workload"]["output_len"]
        for k in ("ttft_ms", "tpot_ms", "itl_ms"):
            assert 0 < m[k]["p50"] <= m[k]["p99"]
    for s in SERVING_SCHEMES:
        assert sorted(r["rate"] for r in rows if r["scheme"] == s) == sorted(rates)
    sus = {s["scheme"]: s for s in report["sustainable"]}
    assert set(sus) == SERVING_SCHEMES and sus["paged-pc"]["vs_paged_pc"] == 1.0
    # the edgeprompt server loaded the cloud prompt from the cloud actor
    ep = next(s for s in report["servers"] if s["scheme"] == "edgeprompt")
    assert ep["server_metrics"].get("edgeprompt_cloud_layers_received_total", 0) > 0
    assert "sustainable rate" in stdout
