"""Helpers shared by the tests (tests/ is on sys.path: pyproject.toml `pythonpath`)."""

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

SCRIPTS = Path(__file__).parent / "scripts"
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/NAME.py as a module (its folder is not on sys.path in the tests), registered in
    sys.modules under NAME (Ray's cloudpickle finds classes by module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def interruptible(**popen_kwargs) -> dict:
    """Popen kwargs for a child the test stops with Ctrl-C (SIGINT). A shell starts background
    jobs with SIGINT ignored, the ignore is inherited across exec, and Python then installs no
    KeyboardInterrupt handler: restore the default in the child, whatever ran the tests."""
    return {**popen_kwargs, "preexec_fn": lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)}


def run_script(name: str, *args: str, env: dict | None = None, timeout: float = 600) -> dict:
    """Runs tests/scripts/NAME with this Python; it writes its JSON result to the path given last.

    (Not stdout: vLLM logs to stdout.)
    """
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args, str(result)],
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        if proc.returncode != 0:
            raise AssertionError(f"{name} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(result.read_text())


def plugin_processes(trace_dir: Path) -> list[str]:
    """Names of the processes that ran edgeprompt_vllm.register() (EDGEPROMPT_PLUGIN_TRACE_DIR)."""
    return sorted(p.read_text().strip() for p in Path(trace_dir).glob("*.txt"))


def max_logprob_gap(a: dict, b: dict) -> float:
    """Largest |logprob| difference over the chosen tokens of two runs with identical tokens."""
    gap = 0.0
    for ta, tb, la, lb in zip(a["token_ids"], b["token_ids"], a["top_logprobs"], b["top_logprobs"]):
        assert ta == tb
        gap = max([gap] + [abs(pa[str(t)] - pb[str(t)]) for t, pa, pb in zip(ta, la, lb)])
    return gap


def close_in_top_k(a: dict, b: dict, tol: float) -> list[str]:
    """Low-precision check, as vLLM's check_logprobs_close: walk each pair of sequences; while
    tokens agree their logprobs must be within `tol`; at the first divergence each side's token
    must be in the other's top 5 (a near tie), and the comparison of that pair stops there.
    Returns the problems found (empty: close)."""
    problems = []
    for i, (ta, tb, la, lb) in enumerate(zip(a["token_ids"], b["token_ids"], a["top_logprobs"], b["top_logprobs"])):
        for pos, (x, y, pa, pb) in enumerate(zip(ta, tb, la, lb)):
            if x != y:
                if str(x) not in pb or str(y) not in pa:
                    problems.append(f"seq {i} pos {pos}: {x} vs {y}, not in each other's top 5")
                break
            if abs(pa[str(x)] - pb[str(x)]) > tol:
                problems.append(f"seq {i} pos {pos}: logprob {pa[str(x)]:.4f} vs {pb[str(x)]:.4f}")
                break
    return problems
